"""Helpers that turn results into Dagster UI metadata: markdown tables and PNG plots."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-style markdown table; cells are stringified, pipes and newlines escaped."""
    if not rows:
        return "_(empty)_"
    cols = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ⏎ ")[:200]

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """Write a PNG line plot of named (x, y) series and return its path."""
    from matplotlib.figure import Figure  # not pyplot: no global figure state, half the import time

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def bar_panels(
    path: Path, labels: Sequence[str], panels: Mapping[str, Sequence[float | None]], *, title: str
) -> Path:
    """One bar chart per named panel, the same ``labels`` on each (a missing value draws no bar)."""
    import math

    from matplotlib.figure import Figure

    cols = min(2, len(panels)) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig = Figure(figsize=(6 * cols, 1.0 + (0.9 + 0.3 * len(labels)) * rows), dpi=100)
    axes = fig.subplots(rows, cols)
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (name, values) in zip(flat, panels.items(), strict=False):
        ys = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        ax.barh(range(len(labels)), ys, color=["C0" if v is not None else "lightgray" for v in values])
        ax.set_yticks(range(len(labels)), labels=list(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def image_markdown(path: Path, alt: str) -> dg.MetadataValue:
    """Markdown with the PNG inlined, so the UI shows the picture without serving files."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def histogram_markdown(counts: Mapping[str, int]) -> str:
    """A text histogram table (bucket, count, bar)."""
    peak = max(counts.values(), default=0) or 1
    rows = [
        {"bucket": k, "count": v, "": "█" * max(1, round(20 * v / peak)) if v else ""}
        for k, v in counts.items()
    ]
    return markdown_table(rows)
