"""A model-free workflow for the telemetry tests: an asset, a training-like multi-asset and a check.

Loaded in-process by tests/test_telemetry_dagster.py and by ``dagster asset materialize -f`` there.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg

from kitchen.telemetry.training import TelemetryObserver
from kitchen.training.loop import Checkpoint, StepMetrics
from kitchen_assets.telemetry import instrumented

WORKFLOW = "toy"


class ToyConfig(dg.Config):
    fail: bool = False
    steps: int = 2


@dg.asset(key_prefix=[WORKFLOW], group_name=WORKFLOW, name="source")
@instrumented
def source(context: dg.AssetExecutionContext, config: ToyConfig) -> int:
    if config.fail:
        raise ValueError("the toy source is broken")
    return config.steps


@dg.multi_asset(
    name=f"{WORKFLOW}__train",
    group_name=WORKFLOW,
    outs={
        "checkpoints": dg.AssetOut(key=[WORKFLOW, "checkpoints"]),
        "weights": dg.AssetOut(key=[WORKFLOW, "weights"]),
    },
    ins={"source": dg.AssetIn(key=[WORKFLOW, "source"])},
)
@instrumented
def train(context: dg.AssetExecutionContext, source: int) -> Iterator[dg.Output[int]]:
    observer = TelemetryObserver()
    for step in range(1, source + 1):
        observer.on_step(
            StepMetrics(
                step=step,
                epoch=0,
                loss=1.0 / step,
                learning_rate=1e-3,
                tokens=10,
                trained_tokens=5,
                step_seconds=0.1,
                tokens_per_second=100.0,
                elapsed_seconds=0.1 * step,
                eta_seconds=0.0,
            ),
            source,
        )
    observer.on_epoch(0, source)
    observer.on_checkpoint(Checkpoint(source, "file:///toy/final", "state"))
    yield dg.Output(source, output_name="checkpoints")
    yield dg.Output(source * 2, output_name="weights")


@dg.asset_check(asset=dg.AssetKey([WORKFLOW, "weights"]))
def weights_are_even(weights: int) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=weights % 2 == 0)


toy_job = dg.define_asset_job(
    "toy_job", selection=dg.AssetSelection.groups(WORKFLOW), tags={"kitchen/workflow": WORKFLOW}
)

defs = dg.Definitions(
    assets=[source, train], asset_checks=[weights_are_even], jobs=[toy_job], executor=dg.in_process_executor
)
