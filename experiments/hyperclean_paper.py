"""Data hyper-cleaning with the BO-REP paper's protocol: a step-size grid, several seeds, the
best grid point per method chosen on validation, then its test metrics as mean +- std.

Hao, Gong, Liu. Bilevel Optimization under Unbounded Smoothness: A New Algorithm and Convergence
Analysis. ICLR 2024. Section 5: "We use grid search to tune the lower-level and upper-level step
sizes from {0.001, 0.005, 0.01, 0.05, 0.1, 0.5} for all methods"; the official data-cleaning
script runs seeds 0-4 with noise rate 0.1 (MingruiLiu-ML-Lab/Bilevel-Optimization-under-
Unbounded-Smoothness, data_cleaning/run.sh).

Here, at a CPU-feasible size, on the offline stand-in: digits hyper-cleaning (scikit-learn's
digits, 1000 training samples with noise_rate 0.1 of flipped labels, 300 clean validation and
497 test samples; a linear classifier instead of the paper's RNN on Sentiment140). Every
method's grid x seeds runs as ONE batched ``bilevel.solve(..., seeds=..., grid=...)``
(bilevel.many: torch.func.vmap over the copies). The paper's grid is used as it is for the
lower step and for BO-REP's normalized upper step (a step length); for the plain-SGD upper
updates (SOBA, StocBiO) the upper grid is multiplied by ``--sgd-upper-scale`` (default 1000 =
n_train: the hypergradient entries of per-sample weights scale as 1 / n_train, so the paper's
values would leave x where it starts). Selection: the lowest mean final ``val_loss`` over seeds
(the problem's ``selection``); a grid point where any seed diverged is not eligible.

    python experiments/hyperclean_paper.py [--steps 300] [--seeds 0 1 2 3 4]
        [--lower 0.05 0.1 0.5] [--upper 0.001 0.005 0.01 0.05 0.1 0.5] [--out DIR]

Prints the full grid table and the table per method; writes ``curves.png`` (the chosen points,
mean with a band over seeds, against iterations, time and oracle calls) into ``--out``.
"""
import argparse
import time
from pathlib import Path

import torch

import bilevel
from bilevel import report

PAPER_GRID = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5]
#: method -> (fixed options, whether the upper update is plain SGD, so its grid is scaled)
METHODS = {
    "lower-only": ({}, False),
    "soba": ({"z_lr": 0.5}, True),
    "stocbio": ({"neumann_lr": 0.5, "neumann_steps": 5, "inner_steps": 5}, True),
    "bo-rep": ({"neumann_lr": 0.5}, False),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lower", type=float, nargs="+", default=[0.05, 0.1, 0.5],
                        help="lower step grid (the paper's: 0.001 ... 0.5; the smallest barely move y here)")
    parser.add_argument("--upper", type=float, nargs="+", default=PAPER_GRID)
    parser.add_argument("--sgd-upper-scale", type=float, default=1000.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default="results/hyperclean_paper")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = bilevel.make_problem("hyperclean-digits", noise_rate=0.1, device="cpu")
    validation, mode, test = problem.selection
    all_runs = {}
    started = time.perf_counter()
    for name in args.methods:
        options, sgd_upper = METHODS[name]
        grid = {"lower_lr": args.lower}
        if name != "lower-only":
            grid["upper_lr"] = [v * args.sgd_upper_scale for v in args.upper] if sgd_upper else list(args.upper)
        t0 = time.perf_counter()
        runs = bilevel.solve(problem, name, steps=args.steps, seeds=args.seeds, grid=grid,
                             eval_every=args.eval_every, **options)
        all_runs[name] = runs
        how = "vmapped" if runs.batched else f"partly looped ({runs.reason})"
        print(f"{name}: {len(runs)} copies ({len(runs.points)} grid points x {len(args.seeds)} seeds), {how}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    metrics = [validation, test, "f1"]
    rows = [row for name, runs in all_runs.items() for row in report.many_rows(name, runs, metrics)]
    print("\nEvery grid point, final metrics, mean +- std over seeds:\n")
    print(report.format_table(rows, ["solver", "grid point", "seeds", *metrics, "diverged"]))
    best = report.best_rows(all_runs, validation, mode, test)
    for row in best:  # the chosen point's F1 too
        runs = all_runs[row["solver"]]
        chosen = [r for r in runs if report.point_label(r.point) == row["best grid point"]]
        row["f1"] = report.mean_std([r.final.get("f1") for r in chosen if r.error is None])
    print(f"\nPer method: the grid point with the {mode} mean {validation}, then its test metrics "
          f"(mean +- std over seeds {args.seeds}), {args.steps} steps:\n")
    print(report.format_table(best, ["solver", "best grid point", validation, test, "f1", "seeds"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen_runs = {}
    for row in best:
        runs = all_runs[row["solver"]]
        point = next((p for p in runs.points if report.point_label(p) == row["best grid point"]), None)
        if point is not None:
            chosen_runs[row["solver"]] = _only(runs, point)
    if report.plot_bands(chosen_runs, [test, "f1"], out / "curves.png", title="digits hyper-cleaning, chosen points"):
        print(f"\nwrote {out / 'curves.png'}; total {time.perf_counter() - started:.0f} s")


def _only(runs, point):
    """The copies of one grid point, as a Runs (for plotting)."""
    import dataclasses
    return dataclasses.replace(runs, results=[r for r in runs if r.point == point], points=[point])


if __name__ == "__main__":
    main()
