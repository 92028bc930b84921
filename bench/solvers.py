"""Every registered solver on the quadratic and on digits hyper-cleaning: a fixed step budget,
several seeds; prints final metrics (median over seeds), time per iteration (also as a ratio to
SOBA's, measured in this process) and oracle calls per iteration.

    python bench/solvers.py [--steps 300] [--seeds 3] [--problems quadratic hyperclean-digits]
                            [--solvers soba stocbio ...]

Hyperparameters per problem are in SETTINGS below (solver defaults where absent). Solvers that
fail (NaN) are reported as such, not dropped.
"""
import argparse
import statistics

import torch

import bilevel
from bilevel import SOLVERS, make_problem

PROBLEMS = {
    "quadratic": dict(options=dict(n_samples_inner=1024, n_samples_outer=1024, dim_inner=100, dim_outer=10,
                                   batch_size=64), metric="grad_norm_sq"),
    "hyperclean-digits": dict(options=dict(), metric="test_accuracy"),
}

# Step sizes known to work per problem; a solver not listed runs with its defaults.
SETTINGS = {
    "quadratic": {  # lower Hessian spectrum in [0.1, 1]: Neumann and lower steps of 0.1 are safe
        "soba": dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1),
        "saba": dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1),
        "ma-soba": dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1),
        "stocbio": dict(upper_lr=0.1, lower_lr=0.1, neumann_lr=0.1),
        "aid-cg": dict(upper_lr=0.1, lower_lr=0.1, cg_steps=3),
        "itd-bio": dict(upper_lr=0.1, lower_lr=0.1),
        "amigo": dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1),
        "bo-rep": dict(upper_lr=0.05, lower_lr=0.1, neumann_lr=0.1),
        "slip": dict(upper_lr=0.05, lower_lr=0.1, neumann_lr=0.1),
        "accbo": dict(upper_lr=0.05, lower_lr=0.1, neumann_lr=0.1),
        "adambo": dict(upper_lr=0.02, lower_lr=0.1, neumann_lr=0.1),
        "lower-only": dict(lower_lr=0.1),
    },
    "hyperclean-digits": {  # x has 1000 coordinates: normalized steps of length ~1
        "soba": dict(upper_lr=50.0, lower_lr=0.5, z_lr=0.5),
        "saba": dict(upper_lr=50.0, lower_lr=0.5, z_lr=0.5),
        "ma-soba": dict(upper_lr=50.0, lower_lr=0.5, z_lr=0.5),
        "stocbio": dict(upper_lr=50.0, lower_lr=0.5, inner_steps=5, neumann_lr=0.5),
        "aid-cg": dict(upper_lr=50.0, lower_lr=0.5, inner_steps=5, cg_steps=5),
        "itd-bio": dict(upper_lr=50.0, lower_lr=0.5, inner_steps=5),
        "amigo": dict(upper_lr=50.0, lower_lr=0.5, z_lr=0.5, inner_steps=5, linear_steps=5),
        "ttsa": dict(upper_lr=50.0, lower_lr=0.5, neumann_lr=0.5, lower_lr_decay=0.0, upper_lr_decay=0.0),
        "bsa": dict(upper_lr=50.0, lower_lr=0.5, neumann_lr=0.5, inner_steps=5, lower_lr_decay=0.0,
                    upper_lr_decay=0.0),
        "sustain": dict(upper_lr=50.0, lower_lr=0.5, neumann_lr=0.5),
        "mrbo": dict(upper_lr=50.0, lower_lr=0.5, neumann_lr=0.5),
        "vrbo": dict(upper_lr=50.0, lower_lr=0.5, neumann_lr=0.5, inner_steps=2),
        "f2sa": dict(upper_lr=5.0, lower_lr=0.5, inner_steps=5, lower_lr_decay=0.0, penalty_lr_decay=0.0, upper_lr_decay=0.0),
        "bo-rep": dict(upper_lr=1.0, lower_lr=0.5, neumann_lr=0.5),
        "slip": dict(upper_lr=1.0, lower_lr=0.5, neumann_lr=0.5),
        "accbo": dict(upper_lr=1.0, lower_lr=0.5, neumann_lr=0.5),
        "adambo": dict(upper_lr=0.2, lower_lr=0.5, neumann_lr=0.5),
        "lower-only": dict(lower_lr=0.5),
    },
}


def run(problem_name, solver, steps, seeds):
    spec = PROBLEMS[problem_name]
    problem = make_problem(problem_name, **spec["options"])
    finals, times, calls, failures = [], [], [], 0
    for seed in range(seeds):
        try:
            result = bilevel.solve(problem, solver, steps, seed=seed, eval_every=steps,
                                   **SETTINGS[problem_name].get(solver, {}))
        except FloatingPointError:
            failures += 1
            continue
        finals.append(result.final[spec["metric"]])
        times.append(result.wall_time / steps)
        calls.append(result.counts.total / steps)
    if not finals:
        return dict(metric=float("nan"), ms=float("nan"), calls=float("nan"), failures=failures)
    return dict(metric=statistics.median(finals), ms=1000 * statistics.median(times),
                calls=statistics.median(calls), failures=failures)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    parser.add_argument("--solvers", nargs="+", default=None)
    args = parser.parse_args()
    solvers = args.solvers or SOLVERS.names()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, {args.seeds} seeds")
    for problem_name in args.problems:
        metric = PROBLEMS[problem_name]["metric"]
        rows = {s: run(problem_name, s, args.steps, args.seeds) for s in solvers}
        base = rows.get("soba", {}).get("ms")
        print(f"\n{problem_name}: median final {metric}")
        print(f"{'solver':<14s}{metric:>16s}{'ms/iter':>10s}{'x soba':>8s}{'calls/iter':>12s}{'failed':>8s}")
        for s, r in rows.items():
            ratio = r["ms"] / base if base else float("nan")
            print(f"{s:<14s}{r['metric']:>16.4g}{r['ms']:>10.2f}{ratio:>8.2f}{r['calls']:>12.1f}{r['failures']:>8d}")


if __name__ == "__main__":
    main()
