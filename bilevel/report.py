"""Summaries of runs: a table of final metrics, statuses, and a PNG of the curves.

Rows and curves come from each solver's evaluation records, so a solver that stopped
(interrupted, diverged, failed) is summarized from the records it has. Statuses are honest:
:func:`divergence` reports a finished run as diverged when a tracked metric is NaN/inf or an
iterate entry grew past a stated bound. Files are written atomically.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union


from .checkpoint import atomic_write
from .solve import Result

Outcome = Union[Result, BaseException]


def divergence(result: Result, metrics: Sequence[str], bound: float) -> Optional[str]:
    """Why a finished run counts as diverged, or None: a tracked metric that is NaN/inf in the
    final record, or an entry of x or y larger than ``bound`` in absolute value."""
    final = result.final
    for metric in metrics:
        value = final.get(metric)
        if isinstance(value, float) and not math.isfinite(value):
            return f"diverged: metric {metric} is {value} at iteration {final.get('iteration')} (iterates finite)"
    for side, variables in (("x", result.x), ("y", result.y)):
        for key, value in variables.items():
            largest = float(value.detach().abs().max()) if value.numel() else 0.0
            if largest > bound:
                return f"diverged: |{side}[{key!r}]| reached {largest:.3g} > divergence_bound {bound:g}"
    return None


def history_row(name: str, status: str, history: Sequence[Dict[str, object]], metrics: Sequence[str]) -> Dict[str, object]:
    """One summary row from a solver's evaluation records (cumulative over resumed runs)."""
    row: Dict[str, object] = {"solver": name, "status": status}
    if not history:
        return row
    final = history[-1]
    row.update({m: final.get(m) for m in metrics})
    iterations = int(final.get("iteration", 0) or 0)
    row["wall_time_s"] = final.get("time")
    row["ms_per_iter"] = 1000 * float(final.get("time", 0.0)) / max(iterations, 1)
    row["iterations"] = iterations
    row["oracle_calls"] = final.get("calls/total")
    row.update({f"calls_{k[6:]}": v for k, v in final.items() if k.startswith("calls/") and k != "calls/total"})
    return row


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
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


class _Curves:
    """The part of a Result the plot reads, built from records."""

    def __init__(self, history):
        self.history = list(history)

    def metric(self, name):
        return [r[name] for r in self.history if name in r]


def plot_curves(outcomes: Mapping[str, object], metrics: Sequence[str], path: Path, title: str = "") -> bool:
    """One row per metric; columns: against oracle calls and against solver wall time.
    ``outcomes`` maps names to Results or to lists of evaluation records; solvers without
    records are left out. Returns whether a plot was written (False: nothing to plot)."""
    results = {n: (r if isinstance(r, Result) else _Curves(r)) for n, r in outcomes.items()
               if isinstance(r, (Result, list, tuple)) and (r.history if isinstance(r, Result) else r)}
    if not results:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(metrics) or ["calls/total"]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, (axis_key, label) in enumerate((("calls/total", "oracle calls"), ("time", "solver time (s)"))):
            ax = axes[i][j]
            for name, result in results.items():
                points = [(r[axis_key], r[metric]) for r in result.history  # NaN/inf: not drawable
                          if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]) and axis_key in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker=".", label=name)
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            if metric in ("grad_norm_sq", "inner_distance") and any(
                    isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                    for r in results.values() for v in r.metric(metric)):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return True
