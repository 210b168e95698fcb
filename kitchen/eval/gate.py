"""The quality gate in front of registration: did training improve the model enough, without hurting NLL?

A pure function of the report's numbers, so the eval report records the verdict and the blocking asset
check enforces (and explains) the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# Rounding slack for "improvement >= margin" (0.30 - 0.28 is 0.0199999...).
_EPS = 1e-9


@dataclass(frozen=True)
class GateSettings:
    metric: str
    """Primary metric: a held-out name (``exact_match``, ``f1``, ``nll``, ...) or ``task/metric``."""
    margin: float
    """How much the trained model must improve on the base in the metric's own direction."""
    max_nll_increase: float | None = 0.0
    """Held-out NLL may rise by at most this much (0: no regression allowed); None: no NLL rule (for
    workflows whose evaluation reports no held-out NLL)."""
    min_gap_closed: float | None = None
    """With a reference model (distillation's teacher): the share of the base-to-reference gap on the
    primary metric the trained model must close."""


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str
    metric: str
    margin: float
    base: float | None = None
    trained: float | None = None
    improvement: float | None = None
    higher_is_better: bool | None = None
    base_nll: float | None = None
    trained_nll: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_verdict(
    base: Mapping[str, float],
    trained: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    settings: GateSettings,
    *,
    reference: Mapping[str, float] | None = None,
) -> GateVerdict:
    """Pass only if the primary metric improves by at least ``margin`` (and by more than nothing, so a
    model identical to its base, such as one trained with learning rate 0, always fails) and held-out
    NLL rises by no more than ``max_nll_increase``. A base NLL that is not finite is decided explicitly:
    +inf passes the NLL rule (any finite NLL is better), NaN or -inf fails it (nothing to compare to)."""
    metric, margin = settings.metric, settings.margin
    if metric not in base or metric not in trained:
        available = ", ".join(sorted(set(base) & set(trained)))
        return GateVerdict(
            False, f"primary metric {metric!r} is not in the report (it has: {available})", metric, margin
        )
    if metric not in higher_is_better:
        return GateVerdict(False, f"lm-eval states no direction for {metric!r}", metric, margin)
    b, t, higher = base[metric], trained[metric], higher_is_better[metric]
    if not (math.isfinite(b) and math.isfinite(t)):
        return GateVerdict(
            False,
            f"{metric} is not finite (base {b}, trained {t})",
            metric,
            margin,
            b,
            t,
            higher_is_better=higher,
        )
    improvement = t - b if higher else b - t
    b_nll, t_nll = base.get("nll"), trained.get("nll")

    def verdict(passed: bool, reason: str) -> GateVerdict:
        return GateVerdict(passed, reason, metric, margin, b, t, improvement, higher, b_nll, t_nll)

    direction = "higher" if higher else "lower"
    numbers = (
        f"trained {metric} {t:.4g} vs base {b:.4g} ({direction} is better): improvement {improvement:+.4g}"
    )
    if improvement <= 0 or improvement < margin - _EPS:
        return verdict(False, f"{numbers}, needed at least {margin:.4g} and more than 0")
    if settings.max_nll_increase is None:
        return _beyond_nll(
            verdict, numbers, settings, metric, b, improvement, higher, reference, "no NLL rule"
        )
    if b_nll is None or t_nll is None or not math.isfinite(t_nll):
        return verdict(False, f"{numbers}, but held-out NLL is missing or not finite")
    if not math.isfinite(b_nll):
        # "NLL does not rise" compared with inf or NaN is vacuous, so the outcome is decided here: an
        # infinite base NLL is beaten by any finite one; NaN (or -inf) means the base could not be scored.
        if b_nll == math.inf:
            return verdict(
                True,
                f"{numbers} >= margin {margin:.4g}; held-out NLL {t_nll:.4g} vs base inf "
                "(the base gives a reference token zero probability; any finite NLL is no regression)",
            )
        return verdict(
            False,
            f"{numbers}, but the base model's held-out NLL is {b_nll}, so whether NLL regressed "
            "cannot be judged; check the base model's evaluation",
        )
    if t_nll > b_nll + settings.max_nll_increase + _EPS:
        return verdict(
            False,
            f"{numbers}, but held-out NLL regressed: {t_nll:.4g} vs base {b_nll:.4g} "
            f"(allowed increase {settings.max_nll_increase:.4g})",
        )
    nll_note = f"held-out NLL {t_nll:.4g} vs base {b_nll:.4g}"
    return _beyond_nll(verdict, numbers, settings, metric, b, improvement, higher, reference, nll_note)


def _beyond_nll(
    verdict: Any,
    numbers: str,
    settings: GateSettings,
    metric: str,
    b: float,
    improvement: float,
    higher: bool,
    reference: Mapping[str, float] | None,
    nll_note: str,
) -> GateVerdict:
    """The rules after the NLL one: the share of the gap to a reference model, when asked for."""
    if settings.min_gap_closed is not None:
        r = (reference or {}).get(metric)
        if r is None or not math.isfinite(r):
            return verdict(False, f"{numbers}, but the reference model reports no finite {metric}")
        gap = r - b if higher else b - r
        closed = improvement / gap if gap > 0 else math.inf
        needed = settings.min_gap_closed
        if closed < needed - _EPS:
            return verdict(
                False,
                f"{numbers}, but it closed {closed:.1%} of the gap to the reference ({r:.4g}); "
                f"needed {needed:.0%}",
            )
        nll_note += f"; closed {closed:.1%} of the gap to the reference ({r:.4g})"
    return verdict(True, f"{numbers} >= margin {settings.margin:.4g}; {nll_note}")


def verdict_from_report(
    base: Mapping[str, float], trained: Mapping[str, float], report_path: str
) -> GateVerdict:
    """The gate's verdict on a saved eval report: the settings, directions and reference it records, under
    the one rule above. The blocking asset check and the registry both ask this, so they cannot differ."""
    import json
    from pathlib import Path

    path = Path(report_path)
    if not path.is_file():
        return GateVerdict(
            False, f"the eval report {path} is missing, so the gate cannot be checked", "", 0.0
        )
    report = json.loads(path.read_text())
    settings = GateSettings(**report["gate"]["settings"])
    return gate_verdict(
        base, trained, report["higher_is_better"], settings, reference=report.get("reference")
    )
