"""StocBiO: stochastic bilevel optimizer with a Neumann-series hypergradient.

Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021.

    y_t     = inner_steps SGD steps on g(x_t, .) from y_{t-1}      (lower_lr, fresh batches)
    v_t     = neumann_lr sum_{q=0}^{Q-1} (I - neumann_lr H_t)^q grad_y f       (Q = neumann_steps)
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . v_t
    x_{t+1} = x_t - upper_lr h_t

Independent batches for grad f, the Hessian products (one batch for all Q-1 of them) and the
cross product. Defaults follow the benchopt bilevel benchmark (step 0.1, 10 inner steps, 10
Neumann terms). Cost per iteration: inner_steps lower gradients, Q-1 HVPs, one cross product,
one upper gradient.
"""
from dataclasses import dataclass

from bilevel import lower, upper
from bilevel.estimators import Neumann
from bilevel.registry import register_solver
from bilevel.solver import ComposedSolver


@register_solver("stocbio", paper="Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021")
@dataclass
class StocBiO(ComposedSolver):
    """Multi-step lower SGD, Neumann-sum hypergradient, SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    inner_steps: int = 10
    neumann_steps: int = 10
    neumann_lr: float = 0.1
    share_lower_batch: bool = False

    def lower_loop(self):
        return lower.SGD(self.lower_lr, self.inner_steps)

    def estimator(self):
        return Neumann(lr=self.neumann_lr, steps=self.neumann_steps, variant="sum")

    def upper_update(self):
        return upper.sgd(self.upper_lr)
