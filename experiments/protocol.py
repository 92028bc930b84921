"""The papers' experiment protocol, shared by every ``experiments/*_paper.py`` script.

BO-REP (Hao, Gong, Liu, ICLR 2024, section 5): "We use grid search to tune the lower-level and
upper-level step sizes from {0.001, 0.005, 0.01, 0.05, 0.1, 0.5} for all methods"; the official
scripts run seeds 0-4 (MingruiLiu-ML-Lab/Bilevel-Optimization-under-Unbounded-Smoothness,
``data_cleaning/run.sh``, ``meta_learning/run.sh``). SLIP (ICML 2024) and AccBO (NeurIPS 2024)
report the same kind of curves. The protocol, for one problem and a list of methods:

1. every method runs its (lower_lr x upper_lr) grid crossed with the seeds as ONE batched
   ``bilevel.solve(problem, method, steps, seeds=..., grid=...)`` (:mod:`bilevel.many`: one
   ``torch.func.vmap`` call per iteration over the copies); a method whose upper update is plain
   SGD (``Method.sgd_upper``) gets the upper grid multiplied by ``--sgd-upper-scale``, because
   its step multiplies the hypergradient itself, while a normalized update's step is a length;
2. per method, the grid point with the best mean final *validation* metric over the seeds is
   chosen (the problem's ``selection = (validation, "min" | "max", test)``; a point where a seed
   diverged is not eligible), and its *test* metric is reported as mean +- sample std;
3. the table says whether the chosen point lies on the edge of the grid searched ("edge"
   column: ``interior``, or the axes where it is the smallest / largest value): a choice at the
   edge means the grid did not bracket the best step size;
4. figures: the chosen points' metrics (validation, test, the script's others) against epochs and against wall time (mean over seeds,
   shaded between min and max). An epoch is ``1 / epochs_per_step`` outer iterations (the
   official codes' loop over the training loader, one outer iteration per batch; inner steps
   are not counted). Time is the batch's wall time: all copies of a method advance together.

A script is an :class:`Experiment` (methods, how to build the problem from its options, how many
epochs one outer iteration is) and ``main(argv)`` = :func:`run`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

import bilevel
from bilevel import report

#: The BO-REP paper's step-size grid, for both levels.
PAPER_GRID = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5)
PAPER_SEEDS = (0, 1, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of an experiment: the registered ``solver`` with fixed ``options``.
    ``sgd_upper``: the upper update is plain SGD (x -= upper_lr h), so the upper grid is scaled
    by the script's ``--sgd-upper-scale``; ``lower_only``: no upper step (lower grid only)."""
    solver: str
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    sgd_upper: bool = False
    lower_only: bool = False


@dataclasses.dataclass
class Experiment:
    """One paper's experiment family.

    Attributes:
        title: figure title and first line of the help.
        description: the ``--help`` text (the script's docstring).
        methods: method name -> :class:`Method` (the paper's methods available here).
        build: (parsed options) -> the problem, built on the CPU or ``--device``.
        epochs_per_step: (problem) -> epochs one outer iteration covers.
        add_arguments: adds the script's own options (data set, sizes) to the parser.
        metrics: metrics shown next to the validation and test ones (tables and figures).
        epochs, lower, upper, sgd_upper_scale: the defaults of the common options.
        out: default output folder.
    """
    title: str
    description: str
    methods: Dict[str, Method]
    build: Callable[[argparse.Namespace], object]
    epochs_per_step: Callable[[object], float]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    metrics: Sequence[str] = ()
    epochs: float = 20.0
    lower: Sequence[float] = PAPER_GRID
    upper: Sequence[float] = PAPER_GRID
    sgd_upper_scale: float = 1.0
    out: str = "results/paper"


# -- pieces ---------------------------------------------------------------------------------------

def parser_for(experiment: Experiment) -> argparse.ArgumentParser:
    """The common options (epochs or steps, seeds, grids, methods, output) and the script's own."""
    parser = argparse.ArgumentParser(description=experiment.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=experiment.epochs,
                        help="training epochs (outer iterations = epochs / epochs per iteration)")
    parser.add_argument("--steps", type=int, default=None, help="outer iterations (overrides --epochs)")
    parser.add_argument("--evals", type=int, default=10, help="evaluations after the initial one")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS))
    parser.add_argument("--lower", type=float, nargs="+", default=list(experiment.lower), help="lower_lr grid")
    parser.add_argument("--upper", type=float, nargs="+", default=list(experiment.upper), help="upper_lr grid")
    parser.add_argument("--sgd-upper-scale", type=float, default=experiment.sgd_upper_scale,
                        help="factor on the upper grid of the plain-SGD upper updates")
    parser.add_argument("--methods", nargs="+", default=list(experiment.methods), choices=list(experiment.methods))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=experiment.out, help="folder of the figure and the tables")
    experiment.add_arguments(parser)
    return parser


def steps_for(epochs: float, epochs_per_step: float) -> int:
    """Outer iterations that cover ``epochs`` (at least 1)."""
    if not epochs > 0:
        raise ValueError(f"--epochs must be a positive number, got {epochs}")
    return max(1, math.ceil(epochs / epochs_per_step - 1e-9))


def epochs_per_batch(batch: Optional[int], n: int) -> float:
    """Epochs one batch of ``batch`` samples out of ``n`` covers (None: the whole split, 1)."""
    return 1.0 if batch is None else batch / n


def grid_for(method: Method, lower: Sequence[float], upper: Sequence[float], sgd_upper_scale: float) -> Dict:
    """The method's step-size grid: lower_lr always, upper_lr (scaled for plain SGD) unless lower-only."""
    grid = {"lower_lr": [float(v) for v in lower]}
    if not method.lower_only:
        scale = sgd_upper_scale if method.sgd_upper else 1.0
        grid["upper_lr"] = [float(v) * scale for v in upper]
    return grid


def edge(point: Mapping[str, float], grid: Mapping[str, Sequence[float]]) -> str:
    """``interior`` when the point lies strictly inside the range of every grid axis; else the
    axes where it is the smallest ("low") or largest ("high") value, and those that held a
    single value ("fixed": not searched)."""
    sides = []
    for name, value in point.items():
        values = grid.get(name, ())
        if len(values) < 2:
            sides.append(f"{name} fixed")
        elif value == min(values):
            sides.append(f"{name} low")
        elif value == max(values):
            sides.append(f"{name} high")
    return ", ".join(sides) or "interior"


def add_epochs(runs, epochs_per_step: float) -> None:
    """Write ``epoch`` = iteration x epochs_per_step into every evaluation record of ``runs``."""
    for result in runs:
        for record in result.history:
            record["epoch"] = record.get("iteration", 0) * epochs_per_step


def run_methods(problem, experiment: Experiment, names: Sequence[str], steps: int, seeds: Sequence[int],
                lower: Sequence[float], upper: Sequence[float], sgd_upper_scale: float, eval_every: int):
    """{method: (Runs, grid)}: each method's grid x seeds as one batched solve."""
    out = {}
    for name in names:
        method = experiment.methods[name]
        grid = grid_for(method, lower, upper, sgd_upper_scale)
        t0 = time.perf_counter()
        runs = bilevel.solve(problem, method.solver, steps=steps, seeds=list(seeds), grid=grid,
                             eval_every=eval_every, **dict(method.options))
        how = "vmapped" if runs.batched else "partly looped over copies (the warning says why)"
        print(f"{name}: {len(runs)} copies ({len(runs.points)} grid points x {len(seeds)} seeds), {how}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = (runs, grid)
    return out


def chosen_rows(all_runs: Mapping[str, tuple], validation: str, mode: str, test: str,
                metrics: Sequence[str]) -> List[Dict[str, object]]:
    """Per method: :func:`bilevel.report.best_rows` (the best grid point on ``validation``, its
    ``test`` metric as mean +- std) with the other ``metrics`` at that point and the ``edge``."""
    rows = report.best_rows({name: runs for name, (runs, _) in all_runs.items()}, validation, mode, test)
    for row in rows:
        runs, grid = all_runs[row["solver"]]
        point = chosen_point(runs, row["best grid point"])
        row["edge"] = "-" if point is None else edge(point, grid)
        results = [] if point is None else [r for r in runs if r.point == point and r.error is None]
        for metric in metrics:
            row[metric] = report.mean_std([r.final.get(metric) for r in results])
    return rows


def chosen_point(runs, label: str) -> Optional[Dict[str, float]]:
    """The grid point of ``runs`` whose label (:func:`bilevel.report.point_label`) is ``label``."""
    return next((p for p in runs.points if report.point_label(p) == label), None)


def only(runs, point):
    """The copies of one grid point, as a Runs (for plotting)."""
    return dataclasses.replace(runs, results=[r for r in runs if r.point == point], points=[point])


# -- the whole protocol ---------------------------------------------------------------------------

def run(experiment: Experiment, argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Parse ``argv``, build the problem, run every method's grid x seeds, print the full grid
    table and the per-method table, write ``table.md`` and ``curves.png`` into ``--out``.
    Returns the per-method rows."""
    args = parser_for(experiment).parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    problem = experiment.build(args)
    chosen = report.selection(problem)
    if chosen is None:
        raise ValueError(f"problem {problem.name!r} names no selection (validation metric, mode, test metric)")
    validation, mode, test = chosen
    per_step = experiment.epochs_per_step(problem)
    steps = args.steps if args.steps is not None else steps_for(args.epochs, per_step)
    eval_every = max(1, steps // max(1, args.evals))
    print(f"{experiment.title}: {steps} outer iterations ({steps * per_step:.3g} epochs, {per_step:.3g} per "
          f"iteration), seeds {args.seeds}, lower grid {args.lower}, upper grid {args.upper} "
          f"(x{args.sgd_upper_scale:g} for plain-SGD upper updates)", flush=True)
    all_runs = run_methods(problem, experiment, args.methods, steps, args.seeds, args.lower, args.upper,
                           args.sgd_upper_scale, eval_every)
    for runs, _ in all_runs.values():
        add_epochs(runs, per_step)
    metrics = [m for m in experiment.metrics if m not in (validation, test)]
    grid_rows = [row for name, (runs, _) in all_runs.items()
                 for row in report.many_rows(name, runs, [validation, test, *metrics])]
    grid_table = report.format_table(grid_rows, ["solver", "grid point", "seeds", validation, test, *metrics,
                                                 "diverged"])
    rows = chosen_rows(all_runs, validation, mode, test, metrics)
    table = report.format_table(rows, ["solver", "best grid point", "edge", validation, test, *metrics, "seeds"])
    heading = (f"Per method: the grid point with the {mode} mean final {validation}, then its metrics "
               f"(mean +- std over seeds {args.seeds}), {steps} outer iterations:")
    print("\nEvery grid point, final metrics, mean +- std over seeds:\n")
    print(grid_table)
    print(f"\n{heading}\n")
    print(table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{heading}\n\n{table}\n\nEvery grid point:\n\n{grid_table}\n")
    curves = {}
    for row in rows:
        runs, _ = all_runs[row["solver"]]
        point = chosen_point(runs, row["best grid point"])
        if point is not None:
            curves[row["solver"]] = only(runs, point)
    figure = out / "curves.png"
    if report.plot_bands(curves, [validation, test, *metrics], figure, title=f"{experiment.title}, chosen points",
                         axes=(("epoch", "epochs"), ("time", "wall time (s)"))):
        print(f"\nwrote {figure}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return rows
