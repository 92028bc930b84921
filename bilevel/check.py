"""Hypergradient checks a user can run on their own problem.

    rows = check_hypergradients(problem)          # or: bilevel check problem=NAME

At the initial x, y is first brought close to y*(x) by ``lower_steps`` of full-batch gradient
descent (step ``lower_lr``). Every estimator is then compared with the ``exact`` dense implicit
hypergradient at that y (relative error), and ``exact`` itself with central finite differences of
x -> f(x, y_K(x)), where y_K(x) is the same lower solve restarted at each perturbed x, along
``directions`` random unit directions. Batches are ``None`` (full) throughout, and the problem's
own dtype is kept: use float64 problems for tight finite-difference agreement (the default
``eps`` is 1e-5 in float64 and 1e-2 in float32). The finite-difference row is only meaningful
when the lower solve has converged: the first row reports ||grad_y g(x, y_K)|| after it (raise
``lower_steps`` or ``lower_lr`` when it is not small). ``exact`` builds dense second-derivative
matrices, so large models (e.g. a recurrent net's embedding table) get a ValueError naming the
memory they would need.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from . import tree
from .hypergrad import hypergradient
from .lower import sgd_steps
from .oracles import grad_lower_y


class _FullBatch:
    """The problem with every batch replaced by None (deterministic losses)."""

    def __init__(self, problem):
        self._problem = problem

    def upper_loss(self, x, y, batch):
        return self._problem.upper_loss(x, y, None)

    def lower_loss(self, x, y, batch):
        return self._problem.lower_loss(x, y, None)

    def sample(self, level, generator):
        return None


def check_hypergradients(problem, *, lower_lr: float = 0.1, lower_steps: int = 2000, steps: int = 50,
                         lr: Optional[float] = None, directions: int = 3, eps: Optional[float] = None,
                         seed: int = 0) -> List[Dict[str, object]]:
    """Relative errors of each estimator against ``exact``, and of ``exact`` against finite
    differences. ``lr`` (Neumann / linear_sgd / fixed_point / itd step) defaults to ``lower_lr``.
    Returns rows ``{"method", "compared_with", "relative_error"}``."""
    generator = torch.Generator().manual_seed(seed)
    full = _FullBatch(problem)
    x, y0 = problem.init(generator)
    if eps is None:
        eps = 1e-5 if next(iter(x.values())).dtype == torch.float64 else 1e-2
    solve_lower = lambda xx: sgd_steps(full, xx, y0, lr=lower_lr, steps=lower_steps, generator=generator)  # noqa: E731
    y = solve_lower(x)
    residual = float(tree.norm(grad_lower_y(full, x, y, None)))
    reference = hypergradient(full, x, y, method="exact")
    lr = lower_lr if lr is None else lr
    options = {"cg": dict(steps=steps), "neumann": dict(steps=steps, lr=lr), "linear_sgd": dict(steps=steps, lr=lr),
               "fixed_point": dict(steps=steps, lr=lr), "itd": dict(steps=steps, lr=lr)}
    rows = [{"method": "lower solve", "compared_with": f"||grad_y g|| after {lower_steps} steps (absolute)",
             "relative_error": residual}]
    rows += [{"method": m, "compared_with": "exact",
             "relative_error": tree.relative_error(hypergradient(full, x, y, method=m, **o), reference)}
            for m, o in options.items()]
    errors = []
    for _ in range(directions):
        d = tree.map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype), x)
        d = tree.scale(d, 1 / tree.norm(d))
        values = [full.upper_loss(xs, solve_lower(xs), None) for xs in (tree.axpy(eps, d, x), tree.axpy(-eps, d, x))]
        finite_difference = float(values[0] - values[1]) / (2 * eps)
        directional = float(tree.dot(reference, d))
        errors.append(abs(directional - finite_difference) / max(abs(finite_difference), 1e-12))
    rows.append({"method": "exact", "compared_with": f"finite differences ({directions} directions)",
                 "relative_error": max(errors)})
    return rows
