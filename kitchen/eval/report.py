"""Base-vs-trained report pieces: the comparison rows and the PNG of the loss curve and metric deltas."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kitchen.eval.harness import HELDOUT_METRICS


def metric_order(names: Iterable[str]) -> list[str]:
    """Held-out metrics first (in their fixed order), then other tasks' metrics by name."""
    present = set(names)
    return [m for m in HELDOUT_METRICS if m in present] + sorted(present - set(HELDOUT_METRICS))


def comparison_rows(base: Mapping[str, float], trained: Mapping[str, float]) -> list[dict[str, Any]]:
    """(metric, base, trained, delta = trained - base) for the metrics both models have."""
    return [
        {"metric": m, "base": base[m], "trained": trained[m], "delta": trained[m] - base[m]}
        for m in metric_order(set(base) & set(trained))
    ]


def gate_summary(report_path: str | Path) -> str:
    """One line for the CLI: the quality gate's verdict and why, from a saved report."""
    gate = json.loads(Path(report_path).read_text())["gate"]
    return f"quality gate: {'passed' if gate['passed'] else 'FAILED'} - {gate['reason']}"


def read_losses(metrics_path: str | Path) -> list[tuple[int, float]]:
    """(step, loss) from the training loop's ``metrics.jsonl``."""
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"training metrics not found at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows]


def report_plot(
    path: Path,
    losses: Sequence[tuple[int, float]],
    rows: Sequence[Mapping[str, Any]],
    higher_is_better: Mapping[str, bool],
) -> Path:
    """Two panels: the training loss by step, and each metric's change signed so that right is better
    (perplexity is left out: it is exp(nll) and would dwarf the rest)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure state, half the import time

    fig = Figure(figsize=(10, 3.8), dpi=100)
    loss_ax, delta_ax = fig.subplots(1, 2)
    if losses:
        loss_ax.plot([s for s, _ in losses], [v for _, v in losses], marker="." if len(losses) < 30 else None)
    loss_ax.set_title("training loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)

    shown = [r for r in rows if r["metric"] != "perplexity" and r["metric"] in higher_is_better]
    gains = [r["delta"] if higher_is_better[r["metric"]] else -r["delta"] for r in shown]
    labels = [r["metric"] for r in shown]
    delta_ax.barh(labels, gains, color=["tab:green" if g > 0 else "tab:red" for g in gains])
    delta_ax.axvline(0, color="black", linewidth=0.8)
    delta_ax.margins(x=0.2)  # room for the value labels
    delta_ax.invert_yaxis()
    delta_ax.set_title("trained vs base (right = better)")
    delta_ax.set_xlabel("improvement")
    for y, gain in enumerate(gains):
        delta_ax.annotate(
            f"{gain:+.3g}",
            (gain, y),
            va="center",
            ha="left" if gain >= 0 else "right",
            fontsize=8,
            xytext=(3 if gain >= 0 else -3, 0),
            textcoords="offset points",
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
