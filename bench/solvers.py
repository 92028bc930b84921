"""Every registered solver on the quadratic and on digits hyper-cleaning: a fixed step budget,
several seeds; prints final metrics (median over seeds), time per iteration (also as a ratio to
SOBA's, measured in this process) and oracle calls per iteration.

    python bench/solvers.py [--steps 300] [--seeds 3] [--problems quadratic hyperclean-digits]
                            [--solvers soba stocbio ...]

Hyperparameters per problem are in SETTINGS below (solver defaults where absent). Solvers that
fail (NaN) are reported as such, not dropped.

    python bench/solvers.py --jax [--steps 200] [--solvers soba saba ...]

times one step per iteration, eager and compiled (``torch.compile``, bilevel.compiled), of the
seven solvers that benchopt's bilevel benchmark also runs in JAX, on its quadratic instance
(problem ``quadratic`` with its defaults: n = 1024, d = 100, batch 64; float32; each solver's
defaults, which are benchopt's), against the fixed JAX figures in JAX_MS (benchopt's
jit-compiled lax.scan on this 2-core machine), and the compiled step against the eager one
measured in the same run. A step is the solver's whole iteration, its sampling included (the
JAX scan samples inside too); the first steps (the eager one that records the sampling, the
compiles) are not timed. ``compiled`` is the median step, ``min`` the fastest of them (under
load a millisecond step is often preempted: the fastest is closer to its cost on a quiet
machine). Columns ``sample`` and ``call`` (medians) split the compiled step into the eager batch
draws and the compiled call on fixed batches (guards, graph).
"""
import argparse
import statistics
import time
import warnings

import torch

import bilevel
from bilevel import SOLVERS, compiled, make_problem, make_solver
from bilevel.sampling import run_generator

#: ms per iteration of benchopt bilevel's JAX solvers (jit-compiled lax.scan) on the benchmark's
#: quadratic (d = 100, n = 1024, batch 64, float32, rank-one factored oracles), this machine.
JAX_MS = {"soba": 0.069, "saba": 0.059, "amigo": 0.261, "stocbio": 0.197, "mrbo": 0.084, "ttsa": 0.068,
          "f2sa": 0.647}

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


def _median_ms(step, state, steps, best=False):
    """Median over ``steps`` single steps (ms) and the final state; with ``best``, also the
    fastest step (ms): on a loaded machine a millisecond step is often preempted, and the fastest
    of a few hundred is the better estimate of its cost on a quiet one."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state = step(state)
        times.append(time.perf_counter() - started)
    if best:
        return 1000 * statistics.median(times), 1000 * min(times), state
    return 1000 * statistics.median(times), state


def time_steps(problem, name, steps, warmup=3):
    """Eager and compiled ms per step of solver ``name`` (its defaults), compile seconds, and the
    compiled step split into sampling and compiled call; None for compiled when it fell back."""
    solver = make_solver(name)
    generator = run_generator(0)
    x, y = problem.init(generator)
    state = solver.init(problem, x, y, generator)
    eager_ms, state = _median_ms(lambda s: solver.step(problem, s), state, steps)
    step = compiled.CompiledStep(solver, problem)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compiled.CompileFallback)
        for _ in range(warmup):  # the recording step, the first compile, the dynamic-int recompile
            state = step(state)
    compile_s = time.perf_counter() - started
    compiled_ms, best_ms, state = _median_ms(step, state, steps, best=True)
    out = dict(eager=eager_ms, compiled=None, compile_s=compile_s, compiles=step.compiles, reason=step.reason)
    if step.reason is None:
        out["compiled"], out["best"] = compiled_ms, best_ms
        # the parts of a compiled step: the eager draws, then the compiled call on fixed batches
        solver, generator = step.resolved_solver(state), state.generator
        out["sample"], _ = _median_ms(lambda g: solver.sample(problem, state.iteration, g) and g, generator, steps)
        batches = solver.sample(problem, state.iteration, generator)
        deferred = compiled.oracles.DEFERRED

        def call(core):
            deferred.clear()  # as CompiledStep does (its guard: the list is empty on entry)
            step._compiled(solver, core, batches)
            return core
        out["call"], _ = _median_ms(call, state.core, steps)
        deferred.clear()
    return out


def jax_table(steps, solvers):
    problem = make_problem("quadratic", dtype="float32", batch_size=64)
    print(f"benchopt quadratic (n = 1024, d = 100, batch 64, float32), solver defaults, median of {steps} steps;"
          " ratios to the fixed JAX figures and to eager in this run")
    print(f"{'solver':<9s}{'JAX ms':>8s}{'eager':>8s}{'x JAX':>7s}{'compiled':>10s}{'x JAX':>7s}{'x eager':>9s}"
          f"{'min':>7s}{'x JAX':>7s}{'sample':>8s}{'call':>7s}{'compile s':>11s}  status")
    for name in solvers:
        r = time_steps(problem, name, steps)
        jax = JAX_MS.get(name, float("nan"))
        if r["compiled"] is None:
            print(f"{name:<9s}{jax:>8.3f}{r['eager']:>8.3f}{r['eager'] / jax:>7.1f}{'-':>10s}{'-':>7s}{'-':>9s}"
                  f"{'-':>7s}{'-':>7s}{'-':>8s}{'-':>7s}{r['compile_s']:>11.1f}  eager: {r['reason']}")
            continue
        print(f"{name:<9s}{jax:>8.3f}{r['eager']:>8.3f}{r['eager'] / jax:>7.1f}{r['compiled']:>10.3f}"
              f"{r['compiled'] / jax:>7.1f}{r['compiled'] / r['eager']:>9.2f}{r['best']:>7.3f}{r['best'] / jax:>7.1f}"
              f"{r['sample']:>8.3f}{r['call']:>7.3f}"
              f"{r['compile_s']:>11.1f}  compiled ({r['compiles']} graphs)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    parser.add_argument("--solvers", nargs="+", default=None)
    parser.add_argument("--jax", action="store_true", help="eager and compiled steps against the JAX figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.jax:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
        jax_table(args.steps, args.solvers or list(JAX_MS))
        return
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
