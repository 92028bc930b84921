"""Summaries of finished runs: a table of final metrics and a PNG of the curves."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Union

from .solve import Result

Outcome = Union[Result, BaseException]


def summary_rows(outcomes: Mapping[str, Outcome], metrics: Sequence[str]) -> List[Dict[str, object]]:
    """One row per solver: final metrics, solver wall time, time per iteration, oracle calls."""
    rows = []
    for name, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            rows.append({"solver": name, "status": f"failed: {type(outcome).__name__}"})
            continue
        final = outcome.final
        row: Dict[str, object] = {"solver": name, "status": "ok"}
        row.update({m: final.get(m) for m in metrics})
        row["wall_time_s"] = outcome.wall_time
        row["ms_per_iter"] = 1000 * outcome.wall_time / max(outcome.iterations, 1)
        row["oracle_calls"] = outcome.counts.total
        row.update({f"calls_{k}": v for k, v in outcome.counts.items()})
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(outcomes: Mapping[str, Outcome], metrics: Sequence[str], path: Path, title: str = "") -> None:
    """One row per metric; columns: against oracle calls and against solver wall time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {n: r for n, r in outcomes.items() if isinstance(r, Result)}
    metrics = list(metrics) or ["calls/total"]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, (axis_key, label) in enumerate((("calls/total", "oracle calls"), ("time", "solver time (s)"))):
            ax = axes[i][j]
            for name, result in results.items():
                points = [(r[axis_key], r[metric]) for r in result.history if metric in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker=".", label=name)
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            if metric in ("grad_norm_sq", "inner_distance") and any(
                    v > 0 for r in results.values() for v in r.metric(metric)):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
