"""BSA: bilevel stochastic approximation with a randomized Neumann hypergradient.

Ghadimi, Wang. Approximation Methods for Bilevel Programming. arXiv 1802.02246, 2018
(Algorithm 2, BSA, with the hypergradient estimator of its Algorithm 3).

    b_t     = lower_lr / (t + 1)^lower_lr_decay,    a_t = upper_lr / (t + 1)^upper_lr_decay
    y_t     = inner_steps SGD steps on g(x_t, .) from y_{t-1}, step b_t, a fresh batch each
    q ~ U{0, ..., Q},   v_t = (Q + 1) eta prod_{j<=q} (I - eta H_j) grad_y f(x_t, y_t)
                        (Q = neumann_steps, eta = neumann_lr)
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . v_t
    x_{t+1} = x_t - a_t h_t

The paper's eta is 1/L_g; its inner step decays within each inner loop, here it is the constant
b_t of the outer iteration (as in benchopt). Upper, Hessian and cross batches are independent;
each of the q Hessian products draws a fresh batch H_j, as in the paper
(``fresh_hessian_batches=False``: one batch for all of them).

Defaults: benchopt bilevel benchmark: step 0.1 for y and x (outer_ratio 1), 10 inner steps,
decay exponents 0.5 (y), 0 (Neumann, constant) and 0.5 (x), and neumann_steps 9: benchopt's
n_hia_steps 10 draws q from {0..9}. neumann_lr defaults to "auto", the paper's eta = 1/L_g with
L_g estimated on a batch Hessian after init (bilevel.spectrum; benchopt uses 0.1). Any step size may instead be a
schedule (bilevel.schedules; used as given, its ``*_decay`` then ignored); neumann_lr is
resolved at iteration t.

Cost per iteration: inner_steps lower gradients, q HVPs (random, Q/2 on average), one cross
product, one upper gradient; init: 20 HVPs for the "auto" step.
"""
from dataclasses import dataclass
from typing import Any

from bilevel import lower, upper
from bilevel.estimators import Neumann
from bilevel.registry import register_solver
from bilevel.schedules import decayed
from bilevel.solver import ComposedSolver

from bilevel.validation import check_count, check_exponent, check_positive, check_positive_or_auto


@register_solver("bsa", paper="Ghadimi, Wang. Approximation Methods for Bilevel Programming. arXiv 1802.02246, 2018")
@dataclass
class BSA(ComposedSolver):
    """Warm-started multi-step lower SGD, randomized Neumann hypergradient, decaying SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    inner_steps: int = 10
    neumann_steps: int = 9
    neumann_lr: Any = "auto"
    lower_lr_decay: float = 0.5
    upper_lr_decay: float = 0.5
    share_lower_batch: bool = False
    fresh_hessian_batches: bool = True

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr")
        check_count(self, "inner_steps")
        check_count(self, "neumann_steps", minimum=0)
        check_exponent(self, "lower_lr_decay", "upper_lr_decay")

    def lower_loop(self):
        return lower.SGD(decayed(self.lower_lr, self.lower_lr_decay), self.inner_steps)

    def estimator(self):
        return Neumann(lr=self.neumann_lr, steps=self.neumann_steps, variant="randomized",
                       resample=self.fresh_hessian_batches)

    def upper_update(self):
        return upper.sgd(decayed(self.upper_lr, self.upper_lr_decay))
