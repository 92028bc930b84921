"""BSA: bilevel stochastic approximation with a randomized Neumann hypergradient.

Ghadimi, Wang. Approximation Methods for Bilevel Programming. arXiv 1802.02246, 2018
(Algorithm 2, BSA, with the hypergradient estimator of its Algorithm 3).

    b_t     = lower_lr / (t + 1)^lower_lr_decay,    a_t = upper_lr / (t + 1)^upper_lr_decay
    y_t     = inner_steps SGD steps on g(x_t, .) from y_{t-1}, step b_t, a fresh batch each
    q ~ U{0, ..., Q-1},   v_t = Q eta (I - eta H_t)^q grad_y f(x_t, y_t)        (Q = neumann_steps,
                                                                               eta = neumann_lr)
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . v_t
    x_{t+1} = x_t - a_t h_t

The paper's eta is 1/L_g; its inner step decays within each inner loop, here it is the constant
b_t of the outer iteration (as in benchopt). Upper, Hessian and cross batches are independent;
each of the q Hessian products draws a fresh batch, as in the paper
(bilevel.estimators.Neumann with resample=True).

Defaults: benchopt bilevel benchmark (research/peers.md section 3.3): step 0.1 for y, for the
Neumann series and for x (outer_ratio 1), 10 inner steps, n_hia_steps 10, decay exponents 0.5
(y), 0 (Neumann, constant) and 0.5 (x). Any step size may instead be a schedule
(bilevel.schedules; used as given, its ``*_decay`` then ignored); neumann_lr is resolved at
iteration t.

Cost per iteration: inner_steps lower gradients, q HVPs (random, (Q - 1)/2 on average), one
cross product, one upper gradient.
"""
from dataclasses import dataclass

from bilevel import lower, upper
from bilevel.estimators import Neumann
from bilevel.registry import register_solver
from bilevel.schedules import decayed
from bilevel.solver import ComposedSolver

from bilevel.validation import check_count, check_exponent, check_positive


@register_solver("bsa", paper="Ghadimi, Wang. Approximation Methods for Bilevel Programming. arXiv 1802.02246, 2018")
@dataclass
class BSA(ComposedSolver):
    """Warm-started multi-step lower SGD, randomized Neumann hypergradient, decaying SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    inner_steps: int = 10
    neumann_steps: int = 10
    neumann_lr: float = 0.1
    lower_lr_decay: float = 0.5
    upper_lr_decay: float = 0.5
    share_lower_batch: bool = False

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr", "neumann_lr")
        check_count(self, "inner_steps", "neumann_steps")
        check_exponent(self, "lower_lr_decay", "upper_lr_decay")

    def lower_loop(self):
        return lower.SGD(decayed(self.lower_lr, self.lower_lr_decay), self.inner_steps)

    def estimator(self):
        return Neumann(lr=self.neumann_lr, steps=self.neumann_steps, variant="randomized", resample=True)

    def upper_update(self):
        return upper.sgd(decayed(self.upper_lr, self.upper_lr_decay))
