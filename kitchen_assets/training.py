"""The training multi-asset (checkpoints + trained weights from one run), shared by every workflow.

A workflow supplies how its datums become per-step batches and which loss the loop uses; the loop itself
(``kitchen.training.loop``) is the same for all of them.
"""

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import dagster as dg
from tinker import types

from kitchen.data import read_datums
from kitchen.hashing import hash_json, weights_content_hash
from kitchen.home import home_dir
from kitchen.manifests import (
    BaseModelManifest,
    CheckpointRef,
    CheckpointsManifest,
    DatumsManifest,
    WeightsManifest,
)
from kitchen.telemetry.training import CompositeObserver, TelemetryObserver
from kitchen.training.batching import make_batches
from kitchen.training.loop import Checkpoint, StepMetrics, TrainingResult, TrainingSpec, run_training
from kitchen.training.schedule import KNOWN_HIDDEN_SIZES, recommended_lora_lr
from kitchen_assets.config import TrainingConfig
from kitchen_assets.metadata import image_markdown, line_plot
from kitchen_assets.telemetry import instrumented
from resources.training import TrainingBackend


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class DagsterLogObserver:
    """Progress lines in the run's event log (what the CLI shows while training)."""

    def __init__(self, context: dg.AssetExecutionContext, every: int = 1) -> None:
        self.context, self.every = context, every

    def on_step(self, metrics: StepMetrics, total_steps: int) -> None:
        if metrics.step % self.every == 0 or metrics.step == total_steps:
            self.context.log.info(
                f"step {metrics.step}/{total_steps} loss {metrics.loss:.4f} lr {metrics.learning_rate:.2e} "
                f"{metrics.tokens_per_second:.0f} tok/s {metrics.step_seconds:.1f}s/step "
                f"ETA {_format_eta(metrics.eta_seconds)}"
            )

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.context.log.info(f"checkpoint ({checkpoint.kind}) at step {checkpoint.step}: {checkpoint.path}")

    def on_epoch(self, epoch: int, step: int) -> None:
        self.context.log.info(f"epoch {epoch + 1} done at step {step}")


def resolve_learning_rate(config: TrainingConfig, base_model: BaseModelManifest) -> float:
    if config.learning_rate is not None:
        return config.learning_rate
    hidden = None
    if base_model.path:
        import json

        cfg_path = Path(base_model.path) / "config.json"
        if cfg_path.is_file():
            hidden = json.loads(cfg_path.read_text()).get("hidden_size")
    hidden = hidden or KNOWN_HIDDEN_SIZES.get(base_model.backend_model)
    return recommended_lora_lr(hidden, base_model.architecture)


BatchBuilder = Callable[[list[types.Datum], TrainingConfig], list]


def sft_batches(datums: list[types.Datum], config: TrainingConfig) -> list:
    return make_batches(
        datums,
        batch_size=config.batch_size,
        epochs=config.epochs,
        seed=config.seed,
        max_steps=config.max_steps,
    )


# A transient failure (dropped connection, timed-out request) reruns the step, and the rerun resumes from the
# ledger's latest checkpoint; any other error fails the step at once (allow_retries=False below).
TRAIN_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


def training_multi_asset(
    workflow: str,
    *,
    loss_fn: str = "cross_entropy",
    batch_builder: BatchBuilder = sft_batches,
    retry_policy: dg.RetryPolicy | None = TRAIN_RETRY_POLICY,
) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{workflow}__train",
        group_name=workflow,
        retry_policy=retry_policy,
        outs={
            "checkpoints": dg.AssetOut(
                key=[workflow, "checkpoints"],
                kinds={"pytorch"},
                description="Training-state checkpoints (weights + optimizer state) written during the run.",
            ),
            "trained_weights": dg.AssetOut(
                key=[workflow, "trained_weights"],
                kinds={"pytorch"},
                description="Final LoRA weights saved for sampling.",
            ),
        },
        ins={
            "base_model": dg.AssetIn(key=[workflow, "base_model"]),
            "datums": dg.AssetIn(key=[workflow, "datums"]),
        },
    )
    @instrumented
    def train(
        context: dg.AssetExecutionContext,
        config: TrainingConfig,
        training: TrainingBackend,
        base_model: BaseModelManifest,
        datums: DatumsManifest,
    ):
        train_datums = read_datums(Path(datums.train_path))
        batches = batch_builder(train_datums, config)
        lr = resolve_learning_rate(config, base_model)
        spec = TrainingSpec(
            base_model=base_model.backend_model,
            lora_rank=config.lora_rank,
            learning_rate=lr,
            lr_schedule=config.lr_schedule,
            warmup_steps=config.warmup_steps,
            total_steps=len(batches),
            save_every=config.save_every,
            seed=config.seed,
            loss_fn=loss_fn,
            weight_decay=config.weight_decay,
            grad_clip_norm=config.grad_clip_norm,
            max_in_flight=config.max_in_flight,
        )
        # The key names everything that shapes the result; pipelining depth does not, so changing it
        # between attempts still resumes.
        key = hash_json(
            {
                "spec": {k: v for k, v in asdict(spec).items() if k != "max_in_flight"},
                "datums": datums.content_hash,
                "base": base_model.content_hash,
                "backend": training.backend_name,
                "epochs": config.epochs,
                "batch_size": config.batch_size,
            }
        )
        run_dir = home_dir("runs", workflow, key[:16])
        context.log.info(
            f"training {len(batches)} steps on {training.backend_name} "
            f"(batch {config.batch_size}, lr {lr:.2e}, rank {config.lora_rank}); run dir {run_dir}"
        )
        try:
            result = run_training(
                training.service_client(),
                spec,
                batches,
                run_dir,
                key=key,
                observer=CompositeObserver(DagsterLogObserver(context), TelemetryObserver()),
                resume=config.resume,
            )
        except Exception as err:
            if training.is_transient(err):
                raise
            raise dg.Failure(description=f"{type(err).__name__}: {err}", allow_retries=False) from err
        hyper = {
            "learning_rate": lr,
            "lr_schedule": config.lr_schedule,
            "warmup_steps": config.warmup_steps,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lora_rank": config.lora_rank,
            "max_steps": config.max_steps or 0,
            "seed": config.seed,
            "loss_fn": loss_fn,
        }
        yield from _outputs(workflow, result, spec, run_dir, training.backend_name, hyper, config)

    return train


def _outputs(
    workflow: str,
    result: TrainingResult,
    spec: TrainingSpec,
    run_dir: Path,
    backend: str,
    hyper: dict[str, float | int | str],
    config: TrainingConfig,
):
    steps = [m.step for m in result.metrics]
    plot = line_plot(
        run_dir / "loss.png",
        {"train loss": (steps, [m.loss for m in result.metrics])},
        title=f"{workflow}: training loss",
        xlabel="step",
        ylabel="mean NLL per trained token",
    )
    tps = [m.tokens_per_second for m in result.metrics if m.tokens_per_second == m.tokens_per_second]
    refs = [CheckpointRef(step=c.step, path=c.path, kind=c.kind) for c in result.checkpoints]  # type: ignore[arg-type]
    checkpoints = CheckpointsManifest(
        checkpoints=refs,
        steps=result.steps,
        epochs=config.epochs,
        final_loss=result.final_loss,
        metrics_path=result.metrics_path,
        backend=backend,
        run_name=run_dir.name,
    )
    weights = WeightsManifest(
        sampler_path=result.sampler_path,
        state_path=result.state_path,
        base_model=spec.base_model,
        backend=backend,
        lora_rank=spec.lora_rank,
        steps=result.steps,
        final_loss=result.final_loss,
        content_hash=weights_content_hash(result.sampler_path),
        hyperparameters=hyper,
    )
    yield dg.Output(
        checkpoints,
        output_name="checkpoints",
        metadata={
            "steps": result.steps,
            "final_loss": result.final_loss,
            "first_loss": result.metrics[0].loss if result.metrics else float("nan"),
            "mean_tokens_per_second": sum(tps) / len(tps) if tps else 0.0,
            "resumed_from": result.resumed_from or "",
            "checkpoint_uris": dg.MetadataValue.md(
                "\n".join(f"- step {c.step} ({c.kind}): `{c.path}`" for c in refs)
            ),
            "loss_curve": image_markdown(plot, "loss curve"),
            "metrics_jsonl": dg.MetadataValue.path(result.metrics_path),
        },
    )
    yield dg.Output(
        weights,
        output_name="trained_weights",
        metadata={
            "sampler_path": weights.sampler_path,
            "state_path": weights.state_path,
            "backend": backend,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "lora_rank": spec.lora_rank,
            "hyperparameters": dg.MetadataValue.json(hyper),
        },
    )
