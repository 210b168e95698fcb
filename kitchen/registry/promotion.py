"""The champion/challenger rule: who gets the ``champion`` alias after a new version is registered.

Weights that failed the eval gate are never registered (``register_trained_model`` refuses them). A
new version becomes ``champion`` when it strictly beats the current champion on the primary metric;
otherwise it becomes ``challenger``. A champion that records no value
for the metric is not displaced: there is no evidence the newcomer is better. Unless the newcomer was
trained from the champion (a DPO run on feedback from a supervised champion): then its eval report's
base column is the champion, measured on the same held-out data, and that is the value compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from kitchen.eval.gate import verdict_from_report
from kitchen.manifests import EvalManifest

Alias = Literal["champion", "challenger"]
CHAMPION: Literal["champion"] = "champion"
CHALLENGER: Literal["challenger"] = "challenger"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    source: str  # where the verdict came from, so the metadata says which rule applied


def eval_gate(report: EvalManifest) -> GateResult:
    """The quality gate's verdict on ``report``: the same rule, settings and numbers as the blocking asset
    check (``kitchen.eval.gate.verdict_from_report``), so registration can never disagree with it."""
    verdict = verdict_from_report(report.base, report.trained, report.report_path)
    return GateResult(verdict.passed, f"quality gate: {verdict.reason}")


@dataclass(frozen=True)
class PromotionDecision:
    """Which alias the new version got, and the numbers behind it (recorded as tags and metadata)."""

    alias: Alias
    reason: str
    metric: str
    value: float | None
    lower_is_better: bool
    gate_passed: bool
    gate_source: str
    previous_champion: str | None
    previous_champion_value: float | None

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "promoted": self.promoted}


def decide_promotion(
    *,
    version: str,
    metric: str,
    value: float | None,
    lower_is_better: bool,
    gate: GateResult,
    champion_version: str | None,
    champion_value: float | None,
    champion_measured_here: bool = False,
) -> PromotionDecision:
    """Apply the rule; ``champion_*`` describe the current holder of the alias (None: nobody);
    ``champion_measured_here``: its value is the newcomer's report's base column (it started from it)."""

    def decide(alias: Alias, reason: str) -> PromotionDecision:
        return PromotionDecision(
            alias=alias,
            reason=reason,
            metric=metric,
            value=value,
            lower_is_better=lower_is_better,
            gate_passed=gate.passed,
            gate_source=gate.source,
            previous_champion=champion_version,
            previous_champion_value=champion_value,
        )

    if champion_version == version:
        return decide(CHAMPION, "is already the champion (registering the same weights again keeps it)")
    if not gate.passed:
        return decide(CHALLENGER, f"did not pass the eval gate ({gate.source})")
    if not _finite(value):
        return decide(CHALLENGER, f"has no finite {metric} to compare")
    if champion_version is None:
        return decide(CHAMPION, f"passed the gate and there is no champion yet ({metric} {value:.4g})")
    if not _finite(champion_value):
        return decide(CHALLENGER, f"champion v{champion_version} records no {metric}, so it cannot be beaten")
    assert value is not None and champion_value is not None
    beats = value < champion_value if lower_is_better else value > champion_value
    direction = "lower" if lower_is_better else "higher"
    verdict = "beats" if beats else "does not beat"
    against = f"champion v{champion_version}'s {champion_value:.4g}"
    if champion_measured_here:
        against += " (measured as this run's starting model on its held-out data)"
    reason = f"{metric} {value:.4g} {verdict} {against} ({direction} wins)"
    return decide(CHAMPION if beats else CHALLENGER, reason)
