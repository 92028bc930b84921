"""StocBiO: stochastic bilevel optimizer with a Neumann-series hypergradient.

Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021
(Algorithm 2).

    y_t     = inner_steps SGD steps on g(x_t, .) from y_{t-1}      (lower_lr, fresh batches)
    v_t     = neumann_lr sum_{q=0}^{Q} prod_{j<=q} (I - neumann_lr H_j) grad_y f     (Q = neumann_steps)
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . v_t
    x_{t+1} = x_t - upper_lr h_t

Q Hessian-vector products, the j-th on its own fresh lower batch H_j (the paper's Q + 1 terms,
benchopt's ``shia`` with n_shia_steps = Q); grad f and the cross product on independent batches.

Defaults: the benchopt bilevel benchmark's StocBiO: upper and lower step 0.1, 10 inner steps,
10 Neumann products (n_shia_steps), batches drawn in benchopt's order (lower steps, upper batch,
the Q product batches, cross batch). The library's default neumann_lr "auto" is 1/L of a batch
Hessian, estimated after init by power iteration (bilevel.spectrum); the paper's analysis takes
eta <= 1/L without fixing a value, benchopt uses 0.1 (neumann_lr=0.1 reproduces it).
``fresh_hessian_batches=False``: all Q products on one batch (biased, see
bilevel.estimators.Neumann).

Cost per iteration: inner_steps lower gradients, Q HVPs, one cross product, one upper gradient;
init: 20 HVPs for the "auto" step.
"""
from dataclasses import dataclass
from typing import Any

from bilevel import lower, upper
from bilevel.estimators import Neumann
from bilevel.registry import register_solver
from bilevel.solver import ComposedSolver
from bilevel.validation import check_count, check_positive, check_positive_or_auto


@register_solver("stocbio", paper="Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021")
@dataclass
class StocBiO(ComposedSolver):
    """Multi-step lower SGD, Neumann-sum hypergradient, SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    inner_steps: int = 10
    neumann_steps: int = 10
    neumann_lr: Any = "auto"
    share_lower_batch: bool = False
    fresh_hessian_batches: bool = True

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr")
        check_count(self, "inner_steps")
        check_count(self, "neumann_steps", minimum=0)

    def lower_loop(self):
        return lower.SGD(self.lower_lr, self.inner_steps)

    def estimator(self):
        return Neumann(lr=self.neumann_lr, steps=self.neumann_steps, variant="sum", resample=self.fresh_hessian_batches)

    def upper_update(self):
        return upper.sgd(self.upper_lr)
