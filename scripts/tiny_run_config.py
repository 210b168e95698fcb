"""Build the tiny model and write the run config that materialises a workflow's group on it in seconds.

    python scripts/tiny_run_config.py OUT_DIR [WORKFLOW]  # OUT_DIR/tiny-model/ and OUT_DIR/run_config.json

The config is per-op (what ``dagster asset materialize --select 'group:<workflow>' --config ...`` takes;
``<workflow>_job`` takes the same values flat), from the workflow's own smoke config. ``.ci/run`` uses it;
a team's CI can start from it.
"""

import argparse
import json
from pathlib import Path

from kitchen.models.tiny import build_tiny_model
from kitchen.workflows import get_workflow, split_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("workflow", nargs="?", default="supervised")
    args = parser.parse_args()
    out = args.out_dir.resolve()
    workflow = get_workflow(args.workflow)
    if workflow.smoke_config is None:
        parser.error(f"workflow {workflow.name!r} defines no smoke config")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir)
    flat = workflow.config(**workflow.smoke_config(str(model_dir)))  # validated like a launch
    sections = {f"{workflow.name}__{kind}": section for kind, section in workflow.sections.items()}
    (out / "run_config.json").write_text(json.dumps({"ops": split_run_config(flat, sections)}, indent=2))
    print(out / "run_config.json")


if __name__ == "__main__":
    main()
