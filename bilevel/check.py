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

from typing import Callable, Dict, List, Optional

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
                         seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, object]]:
    """Relative errors of each estimator against ``exact``, and of ``exact`` against finite
    differences. ``lr`` (Neumann / linear_sgd / fixed_point / itd step) defaults to ``lower_lr``.
    ``progress`` is called with a line before each phase. Returns rows
    ``{"method", "compared_with", "relative_error"}``."""
    say = progress or (lambda message: None)
    from .device import problem_device
    generator = torch.Generator(problem_device(problem)).manual_seed(seed)  # where the problem lives
    full = _FullBatch(problem)
    x, y0 = problem.init(generator)
    if eps is None:
        eps = 1e-5 if next(iter(x.values())).dtype == torch.float64 else 1e-2
    solve_lower = lambda xx: sgd_steps(full, xx, y0, lr=lower_lr, steps=lower_steps, generator=generator)  # noqa: E731
    say(f"lower solve: {lower_steps} full-batch gradient steps at x0")
    y = solve_lower(x)
    residual = float(tree.norm(grad_lower_y(full, x, y, None)))
    say("exact hypergradient (dense solve)")
    reference = hypergradient(full, x, y, method="exact")
    lr = lower_lr if lr is None else lr
    options = {"cg": dict(steps=steps), "neumann": dict(steps=steps, lr=lr), "linear_sgd": dict(steps=steps, lr=lr),
               "fixed_point": dict(steps=steps, lr=lr), "itd": dict(steps=steps, lr=lr)}
    rows = [{"method": "lower solve", "compared_with": f"||grad_y g|| after {lower_steps} steps (absolute)",
             "relative_error": residual}]
    for m, o in options.items():
        say(f"estimator {m}")
        rows.append({"method": m, "compared_with": "exact",
                     "relative_error": tree.relative_error(hypergradient(full, x, y, method=m, **o), reference)})
    errors = []
    for k in range(directions):
        say(f"finite differences, direction {k + 1} of {directions} (two lower solves)")
        d = tree.map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device), x)
        d = tree.scale(d, 1 / tree.norm(d))
        values = [full.upper_loss(xs, solve_lower(xs), None) for xs in (tree.axpy(eps, d, x), tree.axpy(-eps, d, x))]
        finite_difference = float(values[0] - values[1]) / (2 * eps)
        directional = float(tree.dot(reference, d))
        errors.append(abs(directional - finite_difference) / max(abs(finite_difference), 1e-12))
    rows.append({"method": "exact", "compared_with": f"finite differences ({directions} directions)",
                 "relative_error": max(errors)})
    return rows


def verdict(rows: List[Dict[str, object]], float64: bool) -> tuple:
    """(word, explanation) from the rows: "PASS" when the lower solve converged and ``exact``
    agrees with finite differences, "FAIL" when it converged and they disagree (the losses or
    their derivatives are wrong), "INCONCLUSIVE" when the lower solve did not converge.
    Tolerances: residual 1e-5 (float64) / 1e-3 (float32); finite differences 1e-4 / 5e-2."""
    by_method = {r["method"]: r["relative_error"] for r in rows}
    residual_tol, fd_tol = (1e-5, 1e-4) if float64 else (1e-3, 5e-2)
    residual, fd = by_method["lower solve"], by_method["exact"]
    if not residual < residual_tol:
        return "INCONCLUSIVE", (f"the lower solve did not converge (||grad_y g|| = {residual:.2e} >= {residual_tol:g}); "
                                "raise lower_steps or lower_lr")
    if not fd < fd_tol:
        return "FAIL", (f"the exact hypergradient differs from finite differences by {fd:.2e} (>= {fd_tol:g}): check "
                        "that upper_loss and lower_loss are differentiable functions of x and y"
                        + ("" if float64 else ", or rerun in float64 for a sharper test"))
    far = [m for m, e in by_method.items() if m not in ("lower solve", "exact") and not e < 1e-2]
    note = f"; farther than 1e-2 from exact: {', '.join(far)} (more steps or a smaller lr)" if far else ""
    return "PASS", f"exact agrees with finite differences ({fd:.1e} < {fd_tol:g}){note}"
