"""Register trained weights as a model version, with lineage, then apply the champion/challenger rule.

One call does it all and is safe to repeat: the same weights (by content hash) never get a second
version, and registrations of one model on one machine are serialised by a file lock. Across machines a
duplicate created in a race is detected right after creation and removed (the oldest version wins).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kitchen.manifests import EvalManifest, RegisteredModelManifest
from kitchen.registry.lineage import (
    Provenance,
    TrainedModel,
    adapter_dir,
    lineage_tags,
    run_params,
    run_tags,
    weights_hash,
)
from kitchen.registry.names import parse_model_ref, validate_model_name
from kitchen.registry.promotion import CHALLENGER, CHAMPION, PromotionDecision, decide_promotion, eval_gate
from kitchen.registry.store import MODEL_ARTIFACT_DIR, ModelRegistry, RegistryError

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run
    from mlflow.entities.model_registry import ModelVersion

MODEL_FORMAT = "kitchen-registered-model/1"
_MAX_EVAL_ARTIFACT_BYTES = 50 * 1024 * 1024
DESCRIPTOR = "kitchen_model.json"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class RegistrationResult:
    manifest: RegisteredModelManifest
    decision: PromotionDecision
    tags: dict[str, str]
    run_url: str | None
    version_url: str | None


def register_trained_model(
    registry: ModelRegistry,
    model: TrainedModel,
    provenance: Provenance,
    *,
    name: str,
    experiment_name: str,
    run_name: str,
    rename_run: bool = False,
    promote: bool = True,
    log: Log = lambda _: None,
) -> RegistrationResult:
    """Register ``model`` as a version of ``name`` (or find the version that holds its weights), log the
    Dagster run's MLflow run, and move the champion or challenger alias. ``run_name`` names the MLflow run
    when this call starts it; with ``rename_run`` it also renames one the telemetry sink started. Without
    ``promote`` (one configuration of a sweep) a version that would become champion becomes challenger:
    the sweep's report promotes only its best configuration (``promote_version``)."""
    validate_model_name(name)
    gate = eval_gate(model.eval_report)
    if not gate.passed:
        raise RegistryError(
            f"refusing to register {model.weights.sampler_path}: its eval report failed the {gate.source} "
            "(re-run evaluation after training again, or change the gate settings)"
        )
    weights_id = weights_hash(model)
    tags = lineage_tags(model, provenance, weights_id=weights_id)
    experiment_id = registry.experiment_id(experiment_name)
    with registry.lock(name):
        registry.ensure_registered_model(
            name,
            description=f"Kitchen {model.workflow} LoRA adapters on {model.base_model.name}, "
            f"trained on {model.dataset.name}.",
            tags={
                "kitchen.workflow": model.workflow,
                "kitchen.base_model": model.base_model.name,
                "kitchen.dataset": model.dataset.name,
            },
        )
        existing = registry.versions_with_weights(name, weights_id)
        logged_run: str | None = None  # the MLflow run this call logged into, ended when done
        if existing:
            version, created = existing[0], False
            log(f"these weights are already {name} v{version.version}; no new version")
            _refresh_eval_tags(registry, version, tags)
        else:
            run = registry.run_for_dagster_run(
                experiment_id, provenance.dagster_run_id, run_name=run_name, tags=run_tags(tags)
            )
            logged_run = run.info.run_id
            if rename_run and run.info.run_name != run_name:
                registry.client.update_run(logged_run, name=run_name)
        try:
            if logged_run is not None:
                version = _log_and_create(registry, model, provenance, run, name, tags, log)
                created = True
                duplicates = registry.versions_with_weights(name, weights_id)
                if duplicates and str(duplicates[0].version) != str(version.version):
                    # Another machine registered the same weights at the same time: keep the oldest.
                    registry.client.delete_model_version(name, str(version.version))
                    log(
                        f"{name} v{version.version} duplicated v{duplicates[0].version} (a concurrent "
                        "registration); removed it"
                    )
                    version, created = duplicates[0], False
            decision = promote_version(
                registry,
                name,
                str(version.version),
                model.eval_report,
                model.lower_is_better,
                log,
                promote=promote,
                started_from=model.base_model.registered_version,
            )
        except BaseException:
            if logged_run is not None:
                registry.client.set_terminated(logged_run, "FAILED")
            raise
        if logged_run is not None:
            registry.client.set_terminated(logged_run, "FINISHED")
    number, run_id = str(version.version), version.run_id
    manifest = RegisteredModelManifest(
        name=name,
        version=number,
        model_uri=f"models:/{name}/{number}",
        source=str(version.source),
        run_id=run_id,
        experiment_id=experiment_id,
        tracking_uri=registry.display_uri,
        weights_hash=weights_id,
        created=created,
        alias=decision.alias,
        promotion_reason=decision.reason,
        primary_metric=decision.metric,
        value=decision.value,
        previous_champion=decision.previous_champion,
        previous_champion_value=decision.previous_champion_value,
        gate_passed=decision.gate_passed,
    )
    return RegistrationResult(
        manifest=manifest,
        decision=decision,
        tags=tags,
        run_url=registry.run_url(experiment_id, run_id) if run_id else None,
        version_url=registry.version_url(name, number),
    )


def _log_and_create(
    registry: ModelRegistry,
    model: TrainedModel,
    provenance: Provenance,
    run: Run,
    name: str,
    tags: dict[str, str],
    log: Log,
) -> ModelVersion:
    client, run_id = registry.client, run.info.run_id
    _log_run(registry, model, provenance, run)
    directory = adapter_dir(model.weights)
    with tempfile.TemporaryDirectory(prefix="kitchen-register-") as tmp:
        staged = Path(tmp) / MODEL_ARTIFACT_DIR
        _stage_model(staged, model, name, tags["kitchen.weights.hash"])
        client.log_artifacts(run_id, str(staged), MODEL_ARTIFACT_DIR)
    # Local adapters: the version's files are the run's model/ directory. Tinker keeps the weights:
    # the version points at the tinker:// path and the run holds the descriptor.
    artifacts = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_DIR}"
    source = artifacts if directory else model.weights.sampler_path
    version = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags=tags,
        run_link=registry.run_url(run.info.experiment_id, run_id),
        description=f"{model.workflow} on {model.base_model.name} / {model.dataset.name}, "
        f"{model.weights.steps} steps; Dagster run {provenance.dagster_run_id}",
    )
    log(f"registered {name} v{version.version} from MLflow run {run_id} (source {source})")
    return version


def _log_run(registry: ModelRegistry, model: TrainedModel, provenance: Provenance, run: Run) -> None:
    """Params, per-step training metrics, eval metrics, and the report, curves and plots as artifacts."""
    from mlflow.entities import Metric, Param

    client, run_id = registry.client, run.info.run_id
    have, logged = run.data.params, run.data.metrics
    params = [Param(k, v) for k, v in run_params(model, provenance).items() if k not in have]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    now = int(time.time() * 1000)
    # The telemetry sink may already have logged the steps live, under the same names.
    metrics = [] if any(k.startswith("train/") for k in run.data.metrics) else _training_metrics(model, now)
    report = model.eval_report
    for prefix, values in (("eval/trained", report.trained), ("eval/base", report.base)):
        metrics += [
            Metric(f"{prefix}/{k}", float(v), now, 0)
            for k, v in values.items()
            if f"{prefix}/{k}" not in logged
        ]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    metrics_path = Path(model.checkpoints.metrics_path)
    for path, folder in [
        *((p, "eval") for p in _report_files(Path(report.report_path))),
        (metrics_path, "training"),
        (metrics_path.with_name("loss.png"), "training"),
    ]:
        if path.is_file():
            client.log_artifact(run_id, str(path), folder)


def _report_files(report: Path) -> list[Path]:
    """The eval report and what the evaluation wrote beside it (plots, raw outputs), not its caches."""
    if not report.parent.is_dir():
        return [report]
    beside = [p for p in sorted(report.parent.iterdir()) if p.is_file() and p.suffix in (".json", ".png")]
    return [report, *(p for p in beside if p != report and p.stat().st_size < _MAX_EVAL_ARTIFACT_BYTES)]


def _training_metrics(model: TrainedModel, now: int) -> list[Metric]:
    from mlflow.entities import Metric

    path = Path(model.checkpoints.metrics_path)
    if not path.is_file():
        return []
    metrics = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                metrics.append(Metric(f"train/{key}", float(value), now, step))
    return metrics


def _stage_model(target: Path, model: TrainedModel, name: str, weights_id: str) -> None:
    """``adapter/`` (PEFT files as trained), ``tokenizer/`` and ``kitchen_model.json``: plain files,
    not the transformers flavour, which reloads a PEFT model on a local base with random LoRA weights."""
    target.mkdir(parents=True)
    directory = adapter_dir(model.weights)
    adapter_config = None
    if directory is not None:
        shutil.copytree(directory, target / "adapter", ignore=shutil.ignore_patterns(".*"))
        adapter_config = json.loads((target / "adapter" / "adapter_config.json").read_text())
    tokenizer_files: list[str] = []
    tok_dir = Path(model.base_model.tokenizer_path)
    if tok_dir.is_dir():
        (target / "tokenizer").mkdir()
        for file_name in _TOKENIZER_FILES:
            if (tok_dir / file_name).is_file():
                shutil.copy2(tok_dir / file_name, target / "tokenizer" / file_name)
                tokenizer_files.append(file_name)
    base = model.base_model
    descriptor = {
        "format": MODEL_FORMAT,
        "registered_model": name,
        "kind": "peft-lora-adapter",
        "backend": model.weights.backend,
        "weights": {
            "sampler_path": model.weights.sampler_path,
            "hash": weights_id,
            "adapter_dir": "adapter" if directory else None,
            "lora_rank": model.weights.lora_rank,
        },
        "adapter_config": adapter_config,
        "base_model": {
            "name": base.name,
            "backend_model": base.backend_model,
            "source": base.source,
            "content_hash": base.content_hash,
            "revision": base.revision,
            "architecture": base.architecture,
        },
        "tokenizer": {
            "source": base.tokenizer_path,
            "files": tokenizer_files,
            "fingerprint": model.tokenizer_hash,
        },
        "load": "kitchen.registry.load_sampling_client(service, 'models:/NAME@champion')",
    }
    (target / DESCRIPTOR).write_text(json.dumps(descriptor, indent=2, sort_keys=True) + "\n")


_WRITE_RACE_MARKERS = ("UNIQUE constraint", "IntegrityError", "Duplicate entry", "duplicate key")


def _race_safe(write: Callable[..., object], *args: str) -> None:
    """Run an idempotent registry write, retrying when a concurrent writer inserted the same row first.

    MLflow's SQL store sets a tag or alias by select-then-insert; two registrations of the same version at
    once (two machines, no shared lock) can both insert, and the loser gets a unique-constraint error over
    REST. The row then exists, so the retry updates it.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            write(*args)
            return
        except MlflowException as err:
            if attempt == 2 or not any(marker in str(err) for marker in _WRITE_RACE_MARKERS):
                raise
            time.sleep(0.05 * (attempt + 1))


def _refresh_eval_tags(registry: ModelRegistry, version: ModelVersion, tags: Mapping[str, str]) -> None:
    """Re-registration re-evaluates the same weights: the version's eval tags follow the newest report."""
    for key, value in tags.items():
        if key.startswith("kitchen.eval.") and version.tags.get(key) != value:
            _race_safe(registry.client.set_model_version_tag, version.name, str(version.version), key, value)


def _started_from(started: str | None, name: str, version: str) -> bool:
    """Whether a model trained from ``started`` (``models:/NAME/VERSION``) began at ``name``/``version``."""
    if not started:
        return False
    ref = parse_model_ref(started)
    return (ref.name, ref.version) == (name, version)


def promote_version(
    registry: ModelRegistry,
    name: str,
    version: str,
    report: EvalManifest,
    lower_is_better: bool,
    log: Log = lambda _: None,
    *,
    promote: bool = True,
    started_from: str | None = None,
) -> PromotionDecision:
    """Apply the champion/challenger rule to a registered ``version`` whose evaluation is ``report``, move
    the alias and record the decision as version tags. ``started_from``: the registered version the model
    was trained from, if any (its champion is then measured in the report's base column). Without
    ``promote``, champion is withheld."""
    client = registry.client
    aliases = registry.aliases(name)
    champion = aliases.get(CHAMPION)
    metric = report.primary_metric
    champion_value, measured_here = None, False
    if champion is not None and champion != version:
        raw = registry.version(name, champion).tags.get(f"kitchen.eval.{metric}")
        champion_value = float(raw) if raw is not None else None
        if champion_value is None and _started_from(started_from, name, champion):
            # The champion records no value for this metric (another workflow trained it, e.g. SFT before
            # DPO on feedback), but this run started from it: the report's base column is the champion
            # measured on this run's held-out data, beside the newcomer.
            champion_value = report.base.get(metric)
            measured_here = champion_value is not None
    decision = decide_promotion(
        version=version,
        metric=metric,
        value=report.trained.get(metric),
        lower_is_better=lower_is_better,
        gate=eval_gate(report),
        champion_version=champion,
        champion_value=champion_value,
        champion_measured_here=measured_here,
    )
    if not promote and decision.alias == CHAMPION and champion != version:
        withheld = f"{decision.reason}; left to the sweep report, which promotes only the best configuration"
        decision = dataclasses.replace(decision, alias=CHALLENGER, reason=withheld)
    if decision.alias == CHAMPION:
        _race_safe(client.set_registered_model_alias, name, CHAMPION, version)
        if aliases.get(CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
    elif aliases.get(CHAMPION) != version:  # never demote the champion by re-registering it
        _race_safe(client.set_registered_model_alias, name, CHALLENGER, version)
    for key, value in {
        "kitchen.promotion.alias": decision.alias,
        "kitchen.promotion.reason": decision.reason,
        "kitchen.promotion.gate_passed": str(decision.gate_passed).lower(),
        "kitchen.promotion.gate_source": decision.gate_source,
        "kitchen.promotion.previous_champion": decision.previous_champion or "none",
    }.items():
        _race_safe(client.set_model_version_tag, name, version, key, value)
    log(f"{name} v{version} -> {decision.alias}: {decision.reason}")
    return decision


__all__ = ["RegistrationResult", "RegistryError", "promote_version", "register_trained_model"]
