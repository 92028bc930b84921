"""AmIGO: amortized implicit gradient optimization (warm-started y and z).

Arbel, Mairal. Amortized Implicit Differentiation for Stochastic Bilevel Optimization. ICLR 2022
(Algorithm 1, AmIGO, with SGD as the linear-system solver).

    y_t     = inner_steps SGD steps on g(x_t, .) from y_{t-1}                 (lower_lr, fresh batches)
    z_t     = linear_steps SGD steps on 1/2 z^T H_t z - z^T grad_y f(x_t, y_t) from z_{t-1}:
                  z <- z - z_lr (H_t z - grad_y f)                          (z_{-1} = 0)
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . z_t
    x_{t+1} = x_t - upper_lr h_t

Both inner problems are warm-started from the previous iteration ("amortized"). One upper batch
gives grad_y f and grad_x f; ``z_radius`` (default None) projects each z step onto
{||z|| <= z_radius}; each of the linear_steps z steps draws a fresh lower batch for its
Hessian product, as in the paper and benchopt, and the cross product uses an independent one
(bilevel.estimators.LinearSystemSGD with resample=True). Step sizes are constant by default; ``lower_lr_decay`` and
``upper_lr_decay`` give lr_t = lr / (t + 1)^decay; any step size may instead be a schedule
(bilevel.schedules; used as given, its ``*_decay`` then ignored), z_lr resolved at iteration t.

Defaults: benchopt bilevel benchmark (github.com/benchopt/benchmark_bilevel): step 0.1 for y, z and x
(outer_ratio 1), 10 inner steps and 10 z steps (benchopt uses n_inner_steps for both), constant.

Cost per iteration: inner_steps lower gradients, linear_steps HVPs, one cross product, one upper
gradient.
"""
from dataclasses import dataclass
from typing import Optional

from bilevel import lower, upper
from bilevel.estimators import LinearSystemSGD
from bilevel.registry import register_solver
from bilevel.schedules import decayed
from bilevel.solver import ComposedSolver

from bilevel.validation import check_count, check_exponent, check_positive, check_radius


@register_solver("amigo", paper="Arbel, Mairal. Amortized Implicit Differentiation for Stochastic Bilevel Optimization. ICLR 2022")
@dataclass
class AmIGO(ComposedSolver):
    """Warm-started lower SGD, warm-started SGD on the linear system, SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    z_lr: float = 0.1
    inner_steps: int = 10
    linear_steps: int = 10
    lower_lr_decay: float = 0.0
    upper_lr_decay: float = 0.0
    share_lower_batch: bool = False
    z_radius: Optional[float] = None

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr", "z_lr")
        check_count(self, "inner_steps", "linear_steps")
        check_exponent(self, "lower_lr_decay", "upper_lr_decay")
        check_radius(self, "z_radius")

    def lower_loop(self):
        return lower.SGD(decayed(self.lower_lr, self.lower_lr_decay), self.inner_steps)

    def estimator(self):
        return LinearSystemSGD(lr=self.z_lr, steps=self.linear_steps, resample=True, radius=self.z_radius)

    def upper_update(self):
        return upper.sgd(decayed(self.upper_lr, self.upper_lr_decay))
