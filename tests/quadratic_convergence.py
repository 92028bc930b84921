"""The shared convergence check of the solver tests: on a small benchopt quadratic (n = 256,
d_y = 10, d_x = 5), ``steps`` iterations of ``solver`` must cut ||grad h(x)||^2 (closed form) by
``factor``. Each test file keeps its own table of step budgets and hyperparameters."""
import bilevel
from bilevel.problems.quadratic import Quadratic


def assert_reduces_hypergradient_norm(solver, batch_size, steps, hyperparameters, factor=100.0):
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=batch_size)
    result = bilevel.solve(problem, solver, steps=steps, seed=0, eval_every=steps, **hyperparameters)
    start, end = result.history[0]["grad_norm_sq"], result.final["grad_norm_sq"]
    assert end < start / factor, f"{solver}: {start:.3e} -> {end:.3e}"
