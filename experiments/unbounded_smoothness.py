"""Iterations to an approximate stationary point of Phi(x) = sum_i cosh(x_i) from x0 far out.

The unbounded-smoothness papers (BO-REP: Hao, Gong, Liu, ICLR 2024; SLIP: Gong, Hao, Liu, ICML
2024; AccBO: Gong, Hao, Liu, NeurIPS 2024; AdamBO: Gong, Hao, Liu 2024) study upper functions
that are (L0, L1)-smooth, ||Hess Phi|| <= L0 + L1 ||grad Phi|| (Zhang et al., ICLR 2020), but not
L-smooth. Their claim: a gradient-scaled upper step (StocBiO, SOBA) must take a step size below
about 1 / L(x0) ~ 1 / cosh(x0) to stay stable, so it needs on the order of cosh(x0) iterations,
while a normalized (or Adam, or clipped) step of length eta crosses the distance x0 in about
x0 / eta iterations whatever the gradient's size.

The experiment (``python experiments/unbounded_smoothness.py``):

* problem: ``cosh`` with dim 3, every x_i and y_i starting at x0, gradient noise 0.1 on both
  levels, and a non-identity lower Hessian A (condition number LOWER_CONDITION, eigenvalues
  2^{-1/2}, 1, 2^{1/2}); Phi = sum cosh and grad Phi = sinh(x) in closed form;
* measure: the first iteration t at which ||grad Phi(x_t)||^2 = ||sinh(x_t)||^2 < TARGET (x_t
  the solver's evaluated upper iterate), "never" when not reached within the cap or when the run
  diverges (non-finite or some |x_i| > DIVERGED);
* methods: BO-REP, SLIP, AccBO, AdamBO (normalized / adaptive upper steps) against StocBiO and
  SOBA (SGD upper steps), and clipped SGD as a control: StocBiO whose upper step is
  upper_lr * h * min(1, CLIP / ||h||) (Zhang et al. 2020), composed here from bilevel.upper;
* the same lower level for all: lower_lr LOWER_LR (all lower steps), Neumann series with step
  LOWER_LR and NEUMANN_STEPS terms (SOBA: z_lr LOWER_LR), the solvers' own defaults otherwise;
* tuning: each (method, x0) at its best upper_lr from GRID (the median over seeds decides; runs
  that cannot beat the best so far stop at its count, which does not change the argmin).

Prints the table (best upper_lr, median iterations, per-seed iterations) and draws the median
iterations to target against x0, one line per method, on a log scale ("never" drawn at the cap).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

import bilevel
import bilevel.solvers.stocbio  # noqa: F401  (registers the solvers used below)
from bilevel import upper
from bilevel.problems.cosh import Cosh
from bilevel.solvers.stocbio import StocBiO

TARGET = 1e-2            # ||grad Phi||^2 below this counts as reached
DIVERGED = 50.0          # |x_i| beyond this: the next SGD step of any grid size overflows
LOWER_CONDITION = 2.0    # condition number of the lower Hessian A
LOWER_LR = 0.7           # lower SGD step and Neumann step (< 2 / lambda_max(A) = 1.41)
NEUMANN_STEPS = 5        # (1 - 0.7 / sqrt 2)^5 = 3% truncation bias on the implicit term
CLIP = 1.0               # clipped SGD: at most one upper_lr per step
GRID = tuple(float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 3))[:-1]  # 1e-6, 3e-6, ..., 0.3, 1
X0S = (4.0, 6.0, 8.0, 10.0, 12.0)
SEEDS = (0, 1, 2)
CAP = 20000


@dataclass
class ClippedSGD(StocBiO):
    """Control: StocBiO with a clipped upper step x <- x - upper_lr h min(1, clip / ||h||)."""
    clip: float = CLIP

    def upper_update(self):
        return upper.chain(upper.clip(self.clip), upper.scale(self.upper_lr))


NEUMANN = dict(neumann_lr=LOWER_LR, neumann_steps=NEUMANN_STEPS)
#: method -> (kind, solver factory of upper_lr). kind "sgd": gradient-scaled upper step.
METHODS = {
    "bo-rep": ("normalized", lambda lr: bilevel.make_solver("bo-rep", upper_lr=lr, lower_lr=LOWER_LR, **NEUMANN)),
    "slip": ("normalized", lambda lr: bilevel.make_solver("slip", upper_lr=lr, lower_lr=LOWER_LR, **NEUMANN)),
    "accbo": ("normalized", lambda lr: bilevel.make_solver("accbo", upper_lr=lr, lower_lr=LOWER_LR, **NEUMANN)),
    "adambo": ("adaptive", lambda lr: bilevel.make_solver("adambo", upper_lr=lr, lower_lr=LOWER_LR, **NEUMANN)),
    "clipped-sgd": ("clipped", lambda lr: ClippedSGD(upper_lr=lr, lower_lr=LOWER_LR, inner_steps=1, **NEUMANN)),
    "stocbio": ("sgd", lambda lr: bilevel.make_solver("stocbio", upper_lr=lr, lower_lr=LOWER_LR, inner_steps=1,
                                                      **NEUMANN)),
    "soba": ("sgd", lambda lr: bilevel.make_solver("soba", upper_lr=lr, lower_lr=LOWER_LR, z_lr=LOWER_LR)),
}


def make_problem(x0: float) -> Cosh:
    return Cosh(dim=3, x0=x0, noise=0.1, lower_condition=LOWER_CONDITION)


def run_to_target(problem, solver, seed: int, cap: int, target: float = TARGET):
    """(t, outcome): the first t <= cap with ||sinh(x_t)||^2 < target (x_t = solver.point's upper
    part) and "reached", or (None, "cap") when not reached by then, or (None, "diverged") when x
    becomes non-finite or leaves the box |x_i| <= DIVERGED."""
    generator = torch.Generator().manual_seed(seed)
    state = solver.init(problem, *problem.init(generator), generator)
    for t in range(cap + 1):
        x = solver.point(state)[0]["x"]
        if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > DIVERGED:
            return None, "diverged"
        if float((torch.sinh(x) ** 2).sum()) < target:
            return t, "reached"
        if t < cap:
            state = solver.step(problem, state)
    return None, "cap"


def iterations_to_target(problem, solver, seed: int, cap: int, target: float = TARGET) -> Optional[int]:
    """First t <= cap with ||grad Phi(x_t)||^2 < target; None when not reached or diverged."""
    return run_to_target(problem, solver, seed, cap, target)[0]


def median(values: Sequence[Optional[int]]) -> float:
    """Median with None (never) as +inf."""
    return statistics.median(math.inf if v is None else v for v in values)


def search_order(grid: Sequence[float], kind: str) -> List[float]:
    """Order in which the grid is tried (only the speed depends on it): gradient-scaled steps from
    the largest (unstable ones diverge at once), the others outwards from 0.1."""
    if kind == "sgd":
        return sorted(grid, reverse=True)
    return sorted(grid, key=lambda lr: (abs(math.log(lr / 0.1)), -lr))


def tune(method: str, x0: float, grid: Sequence[float] = GRID, seeds: Sequence[int] = SEEDS,
         cap: int = CAP) -> Dict:
    """The best upper_lr of ``grid`` for (method, x0): lowest median iterations over ``seeds``.
    Returns best_lr, median (inf: never), runs {seed: iterations or None} at best_lr, and tried
    {lr: median} (inf: never within the cap; -b: stopped at the best so far b, so > b)."""
    kind, factory = METHODS[method]
    problem = make_problem(x0)
    best = dict(best_lr=None, median=math.inf, runs={s: None for s in seeds}, tried={})
    for lr in search_order(grid, kind):
        budget = cap if best["median"] == math.inf else int(best["median"]) - 1
        runs, needed = {}, len(seeds) // 2 + 1  # the median is reached only if a majority reaches
        for seed in seeds:
            runs[seed] = iterations_to_target(problem, factory(lr), seed, budget) if budget >= 0 else None
            if sum(r is None for r in runs.values()) > len(seeds) - needed:
                break  # a majority cannot reach within the budget: the median cannot beat the best
        m = median(runs.values()) if len(runs) == len(seeds) else math.inf
        best["tried"][lr] = m if m < math.inf or budget >= cap else -budget  # -b: cut, > b
        if m < best["median"]:
            best.update(best_lr=lr, median=m, runs=runs)
    return best


def fmt(value) -> str:
    if value is not None and value < 0:
        return f">{int(-value)}"
    return "never" if value is None or value == math.inf else str(int(value))


def table(results: Dict[str, Dict[float, Dict]], x0s: Sequence[float]) -> str:
    head = "| method | " + " | ".join(f"x0 = {x0:g} (cosh {math.cosh(x0):.3g})" for x0 in x0s) + " |"
    lines = [head, "|---" * (len(x0s) + 1) + "|"]
    for method, by_x0 in results.items():
        cells = []
        for x0 in x0s:
            r = by_x0[x0]
            seeds = ", ".join(fmt(v) for v in r["runs"].values())
            lr = "-" if r["best_lr"] is None else f"{r['best_lr']:g}"
            cells.append(f"{fmt(r['median'])} (lr {lr}; {seeds})")
        lines.append(f"| {method} ({METHODS[method][0]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, x0s, cap, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"normalized": "-", "adaptive": "-", "clipped": "--", "sgd": ":"}
    for method, by_x0 in results.items():
        ys = [min(by_x0[x0]["median"], cap) for x0 in x0s]
        ax.plot(x0s, ys, styles[METHODS[method][0]], marker="o", label=method)
    ax.plot(x0s, [math.cosh(x0) for x0 in x0s], color="grey", lw=0.8, label="cosh(x0)")
    ax.axhline(cap, color="k", lw=0.6)
    ax.text(x0s[0], cap * 1.15, f"cap {cap} (= never)", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("x0 (every coordinate)")
    ax.set_ylabel(f"iterations to ||grad Phi||^2 < {TARGET:g} (median, best upper_lr)")
    ax.set_title("Phi = sum cosh(x_i), lower Hessian condition 2, noise 0.1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x0", type=float, nargs="+", default=list(X0S))
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--cap", type=int, default=CAP)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="experiments/unbounded_smoothness.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"grid {list(GRID)}; seeds {list(range(args.seeds))}; cap {args.cap}; target {TARGET:g}")
    results: Dict[str, Dict[float, Dict]] = {}
    for method in args.methods:
        results[method] = {}
        for x0 in args.x0:
            started = time.perf_counter()
            r = tune(method, x0, seeds=range(args.seeds), cap=args.cap)
            results[method][x0] = r
            tried = ", ".join(f"{lr:g}: {fmt(m)}" for lr, m in sorted(r["tried"].items()))
            print(f"{method:12s} x0 {x0:5g}: best lr {r['best_lr']}, median {fmt(r['median'])} "
                  f"({time.perf_counter() - started:.0f} s)  tried {{{tried}}}", flush=True)
    print()
    print(table(results, args.x0))
    if args.out:
        plot(results, args.x0, args.cap, args.out)
        print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
