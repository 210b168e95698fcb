"""The training multi-asset of every workflow: ``checkpoints`` + ``trained_weights`` (+ the plan's own
outputs, such as RL's rollouts) from one run of the one loop over the workflow's plan."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from kitchen.hashing import hash_json
from kitchen.home import home_dir
from kitchen.manifests import BaseModelManifest, Manifest
from kitchen.telemetry.training import CompositeObserver, TelemetryObserver
from kitchen.training.loop import (
    METRICS_FILE,
    BaseObserver,
    Checkpoint,
    Ledger,
    StepMetrics,
    TrainingResult,
    TrainingSpec,
    read_metrics,
    run_training,
)
from kitchen.training.plan import TrainingPlan
from kitchen.workflows import PlanContext, Workflow
from kitchen_assets.factory import WORKFLOW, Placement, asset_ins, with_config
from kitchen_assets.metadata import image_markdown, line_plot
from kitchen_assets.telemetry import instrumented
from resources.training import TrainingBackend

# A transient failure (dropped connection, timed-out request) reruns the step, and the rerun resumes from the
# ledger's latest checkpoint; any other error fails the step at once (allow_retries=False below).
TRAIN_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0)) if math.isfinite(seconds) else 0
    return f"{seconds // 60}m{seconds % 60:02d}s"


class DagsterLogObserver(BaseObserver):
    """Progress lines in the run's event log."""

    def __init__(self, context: dg.AssetExecutionContext, headline: str) -> None:
        self.context, self.headline = context, headline

    def on_start(self, total_steps: int, resumed_from: Checkpoint | None) -> None:
        if resumed_from is not None:
            self.context.log.info(
                f"resuming at step {resumed_from.step}/{total_steps} from checkpoint {resumed_from.path}"
            )

    def on_step(self, metrics: StepMetrics, total_steps: int) -> None:
        extra = ""
        if self.headline != "loss" and self.headline in metrics.metrics:
            extra = f" {self.headline} {metrics.metrics[self.headline]:.4f}"
        self.context.log.info(
            f"step {metrics.step}/{total_steps} loss {metrics.loss:.4f}{extra} "
            f"lr {metrics.learning_rate:.2e} "
            f"{metrics.tokens_per_second:.0f} tok/s {metrics.step_seconds:.1f}s/step "
            f"ETA {format_eta(metrics.eta_seconds)}"
        )

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.context.log.info(f"checkpoint ({checkpoint.kind}) at step {checkpoint.step}: {checkpoint.path}")

    def on_epoch(self, epoch: int, step: int) -> None:
        self.context.log.info(f"epoch {epoch + 1} done at step {step}")


def training_spec(config: Any, base_model: BaseModelManifest, learning_rate: float) -> TrainingSpec:
    """The loop's settings from a ``train`` section (a seam tests patch to fail one partition)."""
    return TrainingSpec.from_section(config, base_model, learning_rate)


def hyperparameters(config: Any, spec: TrainingSpec, plan: TrainingPlan) -> dict[str, float | int | str]:
    """What the registry records as the run's hyperparameters: the effective learning rate and rank, every
    scalar training setting, and the plan's own scalar settings (loss function, beta, group size...)."""
    skip = {"resume", "max_in_flight", "learning_rate", "lora_rank"}
    values: dict[str, float | int | str] = {
        k: v for k, v in config.model_dump().items() if k not in skip and isinstance(v, int | float | str)
    }
    values["max_steps"] = config.max_steps or 0
    for k, v in plan.fingerprint().items():
        if isinstance(v, int | float | str) and not k.endswith("_hash"):
            values.setdefault(k, v)
    return {"learning_rate": spec.learning_rate, "lora_rank": spec.lora_rank, **values}


def resume_key(
    workflow: Workflow, spec: TrainingSpec, plan: TrainingPlan, base_model: BaseModelManifest, backend: str
) -> str:
    """Names everything that shapes the result, so only a run with the same inputs resumes."""
    return hash_json(
        {
            "workflow": workflow.name,
            "spec": spec.resume_fields(),
            "plan": dict(plan.fingerprint()),
            "base": base_model.content_hash,
            "backend": backend,
        }
    )


def interrupted(run_dir: Path, key: str, total_steps: int) -> dg.Failure:
    """An interrupt (Ctrl-C) as a failure Dagster does not retry (its RetryPolicy reruns an interrupted
    step), saying what the same command will do."""
    ledger = Ledger.open(run_dir, key)
    latest = ledger.latest_state()
    if ledger.complete:
        said = "interrupted after training finished; the same command trains again"
    elif latest is not None:
        done = len(read_metrics(run_dir / METRICS_FILE))
        said = (
            f"interrupted after step {done}/{total_steps}; the same command resumes from the checkpoint "
            f"at step {latest.step} ({latest.path})"
        )
    else:
        said = "interrupted before the first checkpoint; the same command starts training over"
    return dg.Failure(description=said, allow_retries=False)


def stop_on_interrupt(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Ctrl-C anywhere in the training step stops the run: Dagster's RetryPolicy would rerun an interrupted
    step, so an interrupt that ``interrupted`` did not already turn into a failure becomes one here."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from fn(*args, **kwargs)
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError) as err:
            said = (
                "interrupted; the same command resumes from the latest checkpoint (or trains again if done)"
            )
            raise dg.Failure(description=said, allow_retries=False) from err

    return wrapper


def training_asset(
    workflow: Workflow,
    retry_policy: dg.RetryPolicy | None = TRAIN_RETRY_POLICY,
    placement: Placement = WORKFLOW,
) -> dg.AssetsDefinition:
    outs = {
        "checkpoints": dg.AssetOut(
            key=placement.key(workflow, "checkpoints"),
            kinds={"pytorch"},
            description="Training-state checkpoints (weights + optimizer state) written during the run.",
        ),
        "trained_weights": dg.AssetOut(
            key=placement.key(workflow, "trained_weights"),
            kinds={"pytorch"},
            description="Final LoRA weights saved for sampling.",
        ),
        **{
            kind: dg.AssetOut(key=placement.key(workflow, kind), kinds={"parquet"}, description=description)
            for kind, description in workflow.train_outputs.items()
        },
    }

    def train(
        context: dg.AssetExecutionContext,
        config: Any,
        training: TrainingBackend,
        base_model: BaseModelManifest,
        **inputs: Manifest,
    ) -> Iterator[dg.Output[Any]]:
        learning_rate = config.learning_rate or workflow.default_learning_rate(base_model)
        service = training.service_client()
        plan = workflow.build_plan(
            PlanContext(
                config=config, base_model=base_model, inputs=inputs, service=service, log=context.log.info
            )
        )
        spec = training_spec(config, base_model, learning_rate)
        key = resume_key(workflow, spec, plan, base_model, training.backend_name)
        run_dir = home_dir("runs", workflow.name, key[:16])
        if base_model.lora_rank and base_model.lora_rank != config.lora_rank:
            context.log.info(
                f"continuing the rank-{base_model.lora_rank} adapter of {base_model.registered_version} "
                f"(--lora-rank {config.lora_rank} does not apply)"
            )
        batch = f"batch {config.batch_size}, " if hasattr(config, "batch_size") else ""  # RL: groups
        context.log.info(
            f"training {plan.total_steps} steps on {training.backend_name} "
            f"({batch}lr {learning_rate:.2e}, rank {spec.lora_rank}); run dir {run_dir}"
        )
        try:
            result = run_training(
                service,
                spec,
                plan,
                run_dir,
                key=key,
                observer=CompositeObserver(
                    DagsterLogObserver(context, plan.headline), TelemetryObserver(plan.headline)
                ),
                resume=config.resume,
            )
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError) as err:
            raise interrupted(run_dir, key, plan.total_steps) from err
        except Exception as err:
            if training.is_transient(err):
                raise
            raise dg.Failure(description=f"{type(err).__name__}: {err}", allow_retries=False) from err
        finally:
            service.close()
        yield from _outputs(
            workflow,
            result,
            spec,
            run_dir,
            training.backend_name,
            hyperparameters(config, spec, plan),
            config,
        )
        for kind, extra in plan.outputs().items():
            markdown = {k: dg.MetadataValue.md(v) for k, v in extra.markdown.items()}
            yield dg.Output(extra.manifest, output_name=kind, metadata={**extra.metadata, **markdown})

    fn = with_config(stop_on_interrupt(train), workflow, "train", placement)
    return dg.multi_asset(
        name=placement.op(workflow, "train"),
        group_name=placement.group(workflow),
        partitions_def=placement.partitions,
        retry_policy=retry_policy,
        outs=outs,
        ins=asset_ins(workflow, ("base_model", *workflow.train_inputs), placement),
    )(instrumented(fn))


def _outputs(
    workflow: Workflow,
    result: TrainingResult,
    spec: TrainingSpec,
    run_dir: Path,
    backend: str,
    hyper: dict[str, float | int | str],
    config: Any,
) -> Iterator[dg.Output[Any]]:
    steps = [m.step for m in result.metrics]
    series = {"train loss": (steps, [m.loss for m in result.metrics])}
    if result.headline != "loss":
        series[result.headline] = (steps, [m.metrics.get(result.headline, math.nan) for m in result.metrics])
    plot = line_plot(
        run_dir / "loss.png",
        series,
        title=f"{workflow.name}: training",
        xlabel="step",
        ylabel="loss" if result.headline == "loss" else f"loss, {result.headline}",
    )
    tps = [m.tokens_per_second for m in result.metrics if math.isfinite(m.tokens_per_second)]
    checkpoints, weights = result.manifests(
        spec, backend=backend, run_name=run_dir.name, epochs=config.epochs, hyperparameters=hyper
    )
    resumed = result.resumed_from
    yield dg.Output(
        checkpoints,
        output_name="checkpoints",
        metadata={
            "steps": result.steps,
            "final_loss": result.final_loss,
            "first_loss": result.metrics[0].loss if result.metrics else float("nan"),
            "mean_tokens_per_second": sum(tps) / len(tps) if tps else 0.0,
            "resumed": resumed is not None,
            "resumed_from": f"step {resumed.step}: {resumed.path}" if resumed is not None else "",
            "checkpoint_uris": dg.MetadataValue.md(
                "\n".join(f"- step {c.step} ({c.kind}): `{c.path}`" for c in checkpoints.checkpoints)
            ),
            "loss_curve": image_markdown(plot, "training curves"),
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
