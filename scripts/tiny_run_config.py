"""Build the tiny model and write the run config that materialises the supervised group on it in seconds.

    python scripts/tiny_run_config.py OUT_DIR   # writes OUT_DIR/tiny-model/ and OUT_DIR/run_config.json

The config is per-op (what ``dagster asset materialize --select 'group:supervised' --config ...`` takes;
``supervised_job`` takes the same values flat). ``.ci/run`` uses it; a team's CI can start from it.
"""

import argparse
import json
from pathlib import Path

from kitchen.models.tiny import build_tiny_model
from kitchen_assets.config import SupervisedRunConfig, smoke_run_config, split_run_config
from kitchen_assets.supervised import SUPERVISED_OP_CONFIGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    out = parser.parse_args().out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir)
    flat = SupervisedRunConfig(**smoke_run_config(str(model_dir)))  # validated like a launch
    (out / "run_config.json").write_text(
        json.dumps({"ops": split_run_config(flat, SUPERVISED_OP_CONFIGS)}, indent=2)
    )
    print(out / "run_config.json")


if __name__ == "__main__":
    main()
