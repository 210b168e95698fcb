"""Builders for registry tests: the manifests a finished run leaves, around a small fake adapter.

No tests here; ``test_registry.py`` and ``test_registry_server.py`` import these (and so do the worker
processes of the concurrency test).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kitchen.manifests import (
    BaseModelManifest,
    CheckpointRef,
    CheckpointsManifest,
    DatasetManifest,
    DatumsManifest,
    EvalManifest,
    WeightsManifest,
)
from kitchen.registry import (
    ModelRegistry,
    Provenance,
    RegistrationResult,
    TrainedModel,
    register_trained_model,
)

UPSTREAM = ("base_model", "dataset", "datums", "checkpoints", "trained_weights", "eval_report")


def fake_trained_model(
    root: Path,
    *,
    seed: int,
    exact_match: float,
    base_exact_match: float = 0.1,
    gate_passed: bool | None = None,
    tinker: bool = False,
) -> TrainedModel:
    """A trained model as the upstream assets describe it; ``seed`` decides the adapter bytes."""
    run_dir = root / f"run-{seed}"
    adapter = run_dir / "sampler" / "final"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 32}))
    (adapter / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(2048))
    (adapter / "kitchen_sampler.json").write_text(json.dumps({"step": 4, "session_id": f"s{seed}"}))
    tokenizer = root / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tokenizer / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"step": s, "loss": 3.0 / s, "learning_rate": 1e-3, "tokens": 100}) + "\n"
            for s in (1, 2)
        )
    )
    report = run_dir / "report" / "report.json"  # laid out as the eval asset writes it
    (report.parent / "hf-datasets").mkdir(parents=True, exist_ok=True)
    (report.parent / "hf-datasets" / "cache.arrow").write_bytes(b"not an artifact")
    # The gate's settings as the eval asset records them; a failing gate is a margin nothing can meet.
    settings = {"metric": "exact_match", "margin": 10.0 if gate_passed is False else 0.0}
    report.write_text(
        json.dumps(
            {
                "trained": {"exact_match": exact_match},
                "higher_is_better": {"exact_match": True, "nll": False},
                "gate": {"settings": {**settings, "max_nll_increase": 0.0, "min_gap_closed": None}},
            }
        )
    )
    (report.parent / "report.png").write_bytes(b"\x89PNG fake plot")
    sampler_path = f"tinker://session-{seed}/sampler_weights/final" if tinker else adapter.resolve().as_uri()
    state_path = (
        f"tinker://session-{seed}/weights/final" if tinker else (run_dir / "state").resolve().as_uri()
    )
    base = BaseModelManifest(
        name="HuggingFaceTB/SmolLM2-135M-Instruct",
        source="hub",
        backend_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        path=None,
        tokenizer_path=str(tokenizer),
        content_hash="b" * 64,
        revision="rev-base",
    )
    dataset = DatasetManifest(
        name="kitchen/arithmetic",
        source="builtin",
        path=str(root / "dataset"),
        content_hash="d" * 64,
        schema_found="messages",
        train_rows=40,
        test_rows=8,
    )
    datums = DatumsManifest(
        train_path=str(root / "train.parquet"),
        test_path=str(root / "test.parquet"),
        content_hash="t" * 64,
        tokenizer_hash="k" * 64,
        num_datums=40,
        num_test_datums=8,
        num_tokens=900,
        trained_tokens=300,
        max_length=64,
        train_on="all_assistant",
        truncated_rows=0,
    )
    checkpoints = CheckpointsManifest(
        checkpoints=[
            CheckpointRef(step=2, path=f"{state_path}-2", kind="state"),
            CheckpointRef(step=4, path=state_path, kind="state"),
            CheckpointRef(step=4, path=sampler_path, kind="sampler"),
        ],
        steps=4,
        epochs=1,
        final_loss=1.5,
        metrics_path=str(metrics),
        backend="tinker" if tinker else "local",
        run_name=f"run-{seed}",
    )
    weights = WeightsManifest(
        sampler_path=sampler_path,
        state_path=state_path,
        base_model=base.backend_model,
        backend=checkpoints.backend,
        lora_rank=4,
        steps=4,
        final_loss=1.5,
        content_hash=f"w{seed}",
        hyperparameters={"learning_rate": 5e-3, "batch_size": 8, "lora_rank": 4, "seed": seed},
    )
    evaluation = EvalManifest(
        report_path=str(report),
        primary_metric="exact_match",
        base={"exact_match": base_exact_match, "nll": 2.0},
        trained={"exact_match": exact_match, "nll": 1.5},
        num_examples=8,
        seconds=1.0,
        gate_passed=gate_passed,
    )
    return TrainedModel(
        workflow="supervised",
        base_model=base,
        dataset=dataset,
        checkpoints=checkpoints,
        weights=weights,
        eval_report=evaluation,
        inputs={"datums": datums},
    )


def provenance(run_id: str) -> Provenance:
    return Provenance(
        dagster_run_id=run_id,
        dagster_run_url=f"http://127.0.0.1:3000/runs/{run_id}",
        upstream={f"supervised/{name}": run_id for name in UPSTREAM},
        config={"learning_rate": 5e-3, "max_rows": 48},
    )


def register(
    registry: ModelRegistry, model: TrainedModel, run_id: str, name: str = "sft-smol"
) -> RegistrationResult:
    return register_trained_model(
        registry,
        model,
        provenance(run_id),
        name=name,
        experiment_name="kitchen-supervised",
        run_name=f"supervised_job-{run_id[:8]}",
    )


def register_in_subprocess(tracking_uri: str, root: str, seed: int, exact_match: float, run_id: str) -> None:
    """Entry point of the concurrency test's worker processes."""
    model = fake_trained_model(Path(root), seed=seed, exact_match=exact_match)
    result = register(ModelRegistry(tracking_uri), model, run_id)
    print(json.dumps({"version": result.manifest.version, "created": result.manifest.created}))
