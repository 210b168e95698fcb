"""Two ``kitchen run`` processes started together on one fresh ``KITCHEN_HOME``, on different datasets: both
succeed, and each registered version names its own dataset, its own run's upstream materialisations and
the hash of the adapter its own training loop wrote.

Before per-run manifests, both runs wrote ``manifests/supervised/<kind>.json``: a run could train on, or
register, the other's outputs, and registration named whichever run materialised each asset last.
"""

# No ``from __future__ import annotations``: Dagster reads the context type from the signature.

import hashlib
import json
from pathlib import Path

import dagster as dg
import pytest

from kitchen.manifests import DatasetManifest
from kitchen.registry import ModelRegistry
from kitchen.workflows import get_workflow
from kitchen_assets.io import ManifestIOManager, manifest_path
from kitchen_assets.registry import upstream_kinds
from tests.cli_runs import (
    adapter_file_hashes,
    finish,
    smoke_flags,
    start_run,
    trained_sampler_of_run,
    uri_path,
)

WORKFLOW = "supervised"


def _rows(kind: str, n: int) -> str:
    if kind == "add":
        rows = [{"question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(n)]
    else:
        rows = [{"instruction": f"Repeat the word w{i}.", "output": f"w{i} w{i}"} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_two_runs_started_together_on_one_home_stay_apart(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "shared-home"
    datasets = {"add": tmp_path / "add.jsonl", "repeat": tmp_path / "repeat.jsonl"}
    datasets["add"].write_text(_rows("add", 40))
    datasets["repeat"].write_text(_rows("repeat", 56))
    procs = {
        kind: start_run(
            WORKFLOW,
            smoke_flags(WORKFLOW, tiny_model_dir, dataset=str(path), max_rows=None, gate_margin=0.0),
            home,
        )
        for kind, path in datasets.items()
    }
    done = {kind: finish(proc) for kind, proc in procs.items()}
    for kind, result in done.items():
        assert result.returncode == 0, f"{kind}: {result.explain()}"

    import dagster._core.instance.ref as ref

    registry = ModelRegistry(f"sqlite:///{home / 'mlflow.db'}")
    names = {m.name for m in registry.client.search_registered_models()}
    assert names == {f"supervised-tiny-{kind}" for kind in datasets}
    weights_hashes = set()
    with dg.DagsterInstance.from_ref(ref.InstanceRef.from_dir(str(home / "dagster"))) as instance:
        for kind, path in datasets.items():
            (version,) = registry.client.search_model_versions(f"name='supervised-tiny-{kind}'")
            tags = version.tags
            run_id = tags["dagster.run_id"]
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.is_success
            # Its own dataset, in its run's config and in the lineage.
            assert tags["kitchen.dataset"] == str(path)
            assert str(path) in json.dumps(run.run_config)
            # Every upstream asset is the one its own run materialised.
            for asset in upstream_kinds(get_workflow(WORKFLOW)):
                assert tags[f"kitchen.upstream.{WORKFLOW}/{asset}"] == run_id, asset
            # The weights are what its own training loop wrote (telemetry, not manifests), hashed.
            sampler = trained_sampler_of_run(home, run_id)
            assert tags["kitchen.weights.sampler_path"] == sampler
            files = adapter_file_hashes(uri_path(sampler))
            assert tags["kitchen.weights.hash"] == _sha(
                {"base": tags["kitchen.base_model.content_hash"], "adapter": files}
            )
            registered = Path(
                registry.client.download_artifacts(version.run_id, "model/adapter", str(home / kind))
            )
            assert adapter_file_hashes(registered) == files  # the registered bytes are that adapter
            weights_hashes.add(tags["kitchen.weights.hash"])
            # Each materialisation recorded its own manifest file.
            for key in ("dataset", "trained_weights"):
                event = instance.get_latest_materialization_event(dg.AssetKey([WORKFLOW, key]))
                assert event is not None
            own = manifest_path(dg.AssetKey([WORKFLOW, "dataset"]), home / "manifests", run_id)
            assert json.loads(own.read_text())["data"]["name"] == str(path)
    assert len(weights_hashes) == 2  # different data, different weights


def _marker(run_id: str) -> DatasetManifest:
    return DatasetManifest(
        name=run_id, source="jsonl", path="p", content_hash="h", schema_found="s", train_rows=1, test_rows=1
    )


UP, MIDDLE, DOWN = dg.AssetKey(["t", "up"]), dg.AssetKey(["t", "middle"]), dg.AssetKey(["t", "down"])
IO = {"io_manager": ManifestIOManager()}


@dg.asset(key=UP)
def up(context: dg.AssetExecutionContext) -> DatasetManifest:
    return _marker(context.run_id)


@dg.asset(key=MIDDLE, deps=[UP])
def middle(context: dg.AssetExecutionContext) -> None:
    """Another run re-materialises ``up`` while this run is between ``up`` and ``down``."""
    assert dg.materialize([up], instance=context.instance, resources=IO).success


@dg.asset(key=DOWN, ins={"loaded": dg.AssetIn(key=UP)}, deps=[MIDDLE])
def down(loaded: DatasetManifest) -> DatasetManifest:
    return _marker(loaded.name)


def _loaded_by_down(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == DOWN]
    path = event.step_materialization_data.materialization.metadata["manifest"].value
    return str(json.loads(Path(str(path)).read_text())["data"]["name"])


def test_a_run_loads_the_upstream_it_made_not_the_latest() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        first = dg.materialize([up, middle, down], instance=instance, resources=IO)
        assert first.success
        latest = instance.get_latest_materialization_event(UP)
        assert latest is not None and latest.run_id != first.run_id  # the other run's is the latest
        assert _loaded_by_down(first) == first.run_id  # but this run read its own

        # Not part of the run: the latest materialisation the instance records.
        alone = dg.materialize([up, middle, down], selection=[DOWN], instance=instance, resources=IO)
        assert alone.success
        assert _loaded_by_down(alone) == latest.run_id


def test_a_second_run_with_the_same_inputs_does_not_share_the_run_dir(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Same inputs, same run directory: while one run trains there, another fails at once naming it,
    instead of interleaving the two runs' ledgers."""
    from kitchen.locks import file_lock
    from kitchen.training.loop import LOCK_FILE, RunDirInUseError, run_training
    from resources.local_engine import LocalServiceClient
    from tests.test_training_loop import _sft, _spec

    run_dir = tmp_path / "run"
    # The first run holds the claim (another open file: flock excludes it even in this process).
    with file_lock(run_dir / LOCK_FILE), pytest.raises(RunDirInUseError, match=str(run_dir)):
        run_training(
            LocalServiceClient(root=tmp_path / "e"), _spec(tiny_model_dir), _sft(4, 2), run_dir, key="k"
        )
    assert not (run_dir / "ledger.json").exists()

    class TimesOut:  # the backend's own timeout stays a timeout (transient: the step is retried)
        def create_lora_training_client(self, *args: object, **kwargs: object) -> None:
            raise TimeoutError("the service did not answer")

    with pytest.raises(TimeoutError, match="did not answer"):
        run_training(TimesOut(), _spec(tiny_model_dir), _sft(4, 2), run_dir, key="k")  # type: ignore[arg-type]
    done = run_training(
        LocalServiceClient(root=tmp_path / "e"), _spec(tiny_model_dir), _sft(4, 2), run_dir, key="k"
    )
    assert done.steps == 2
