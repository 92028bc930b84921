"""AID-BiO with conjugate gradient: approximate implicit differentiation.

Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021
(AID-BiO; the CG variant of Pedregosa, ICML 2016 and Grazzi et al., ICML 2020).

    y_t     = inner_steps SGD steps on g(x_t, .) from y_{t-1}                (warm start)
    v_t     = cg_steps conjugate-gradient steps on d2_yy g . v = grad_y f, from v_{t-1}
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . v_t
    x_{t+1} = x_t - upper_lr h_t

With full batches (``batch_size=None`` in the problem) this is the deterministic AID-BiO.
On a non-convex lower level (neural networks) the batch Hessian can be indefinite; with
``cg_negative_curvature="truncate"`` (default) CG then returns its current iterate (truncated CG),
with "raise" the run stops with an error naming the curvature. ``cg_tol`` (default 0: all
cg_steps products) stops CG early at ||r|| <= cg_tol ||b|| (bilevel.linear_system.conjugate_gradient).
Cost per iteration: inner_steps lower gradients, cg_steps + 1 HVPs (one for the warm-start
residual), one cross product, one upper gradient.
"""
from dataclasses import dataclass

from bilevel import lower, upper
from bilevel.estimators import ConjugateGradient
from bilevel.registry import register_solver
from bilevel.linear_system import NEGATIVE_CURVATURE
from bilevel.solver import ComposedSolver
from bilevel.validation import check_choice, check_count, check_positive, check_tolerance


@register_solver("aid-cg", paper="Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021")
@dataclass
class AIDCG(ComposedSolver):
    """AID-BiO: warm-started lower SGD and CG linear solve, SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    inner_steps: int = 10
    cg_steps: int = 10
    warm_start_v: bool = True
    share_lower_batch: bool = False
    cg_negative_curvature: str = "truncate"
    cg_tol: float = 0.0

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")
        check_count(self, "inner_steps", "cg_steps")
        check_choice(self, "cg_negative_curvature", NEGATIVE_CURVATURE)
        check_tolerance(self, "cg_tol")

    def lower_loop(self):
        return lower.SGD(self.lower_lr, self.inner_steps)

    def estimator(self):
        return ConjugateGradient(steps=self.cg_steps, warm_start=self.warm_start_v,
                                 negative_curvature=self.cg_negative_curvature, tol=self.cg_tol)

    def upper_update(self):
        return upper.sgd(self.upper_lr)
