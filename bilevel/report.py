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
    _save_figure(fig, axes, path, title)
    return True


# -- many runs (seeds and grids, bilevel.many) ------------------------------------------------------

def mean_std(values: Sequence[float]) -> str:
    """"mean +- std" over seeds (sample standard deviation; a lone value alone); "-" when empty."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4g} +- {std:.2g}"


def point_label(point: Mapping[str, float]) -> str:
    """A grid point as ``upper_lr=0.1 lower_lr=0.5`` ("-" for no grid)."""
    return " ".join(f"{k}={v:g}" for k, v in point.items()) or "-"


def many_rows(solver: str, runs, metrics: Sequence[str]) -> List[Dict[str, object]]:
    """One row per grid point of a :class:`bilevel.many.Runs`: each metric's final value as
    mean +- std over the seeds that stayed finite, and how many seeds diverged."""
    rows = []
    for point, results in runs.groups():
        ok = [r for r in results if r.error is None]
        row: Dict[str, object] = {"solver": solver, "grid point": point_label(point), "seeds": len(results)}
        for m in metrics:
            row[m] = mean_std([r.final.get(m) for r in ok])
        row["diverged"] = len(results) - len(ok)
        rows.append(row)
    return rows


def selection(problem) -> Optional[tuple]:
    """(validation metric, "min" or "max", test metric) the problem names for choosing a grid
    point (its ``selection`` attribute), or None."""
    chosen = getattr(problem, "selection", None)
    if chosen is None:
        return None
    metric, mode, test = chosen
    if mode not in ("min", "max"):
        raise ValueError(f"problem selection: mode must be 'min' or 'max', got {mode!r}")
    return metric, mode, test


def best_rows(all_runs: Mapping[str, object], validation: str, mode: str, test: str) -> List[Dict[str, object]]:
    """Per solver, the grid point with the best mean final ``validation`` metric over seeds
    (points where a seed diverged are skipped), then its ``test`` metric as mean +- std: the
    grid search of the BO-REP paper (Hao et al., ICLR 2024), step sizes picked on validation."""
    rows = []
    for solver, runs in all_runs.items():
        try:
            best = runs.best(validation, mode)
        except ValueError:
            rows.append({"solver": solver, "best grid point": "none finite", validation: "-", test: "-"})
            continue
        results = [r for r in runs if r.point == best["point"]]
        rows.append({"solver": solver, "best grid point": point_label(best["point"]),
                     validation: mean_std([r.final.get(validation) for r in results]),
                     test: mean_std([r.final.get(test) for r in results]), "seeds": len(results)})
    return rows


BAND_AXES = (("iteration", "iterations"), ("time", "solver time (s)"), ("calls/total", "oracle calls"))


def plot_bands(all_runs: Mapping[str, object], metrics: Sequence[str], path: Path, title: str = "",
               axes: Sequence[tuple] = BAND_AXES) -> bool:
    """Curves with a band over seeds: for each solver and grid point, the mean of each metric
    over its finite seeds, shaded between min and max, against each ``axes`` entry (record key,
    label; default iterations, solver time and oracle calls), one row per metric. Returns
    whether a plot was written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for solver, runs in all_runs.items():
        for point, results in runs.groups():
            ok = [r for r in results if r.error is None and r.history]
            if ok:
                label = solver if len(runs.points) == 1 else f"{solver} {point_label(point)}"
                curves.append((label, ok))
    if not curves or not metrics:
        return False
    axes_keys = tuple(axes)
    fig, axes = plt.subplots(len(metrics), len(axes_keys), figsize=(4.7 * len(axes_keys), 3.2 * len(metrics)),
                             squeeze=False)
    for i, metric in enumerate(metrics):
        for j, (key, label) in enumerate(axes_keys):
            ax = axes[i][j]
            for name, results in curves:
                length = min(len(r.history) for r in results)
                xs = [sum(r.history[k][key] for r in results) / len(results) for k in range(length)]
                columns = [[r.history[k].get(metric) for r in results] for k in range(length)]
                keep = [k for k in range(length) if all(isinstance(v, (int, float)) and math.isfinite(v)
                                                        for v in columns[k])]
                if not keep:
                    continue
                mean = [sum(columns[k]) / len(columns[k]) for k in keep]
                line = ax.plot([xs[k] for k in keep], mean, label=name)[0]
                ax.fill_between([xs[k] for k in keep], [min(columns[k]) for k in keep],
                                [max(columns[k]) for k in keep], color=line.get_color(), alpha=0.2)
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    _save_figure(fig, axes, path, title)
    return True


def _save_figure(fig, axes, path, title) -> None:
    """Legend on the first panel, the title, then the PNG written atomically to ``path``."""
    import matplotlib.pyplot as plt
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
