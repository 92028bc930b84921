"""SUSTAIN: STORM (double momentum) on both levels with a randomized Neumann hypergradient.

Khanduri, Zeng, Hong, Wai, Wang, Yang. A Near-Optimal Algorithm for Stochastic Bilevel
Optimization via Double-Momentum. NeurIPS 2021 (Algorithm 1).

Both variables move together from the estimates at (x_t, y_t); the new estimates are then
formed at (x_{t+1}, y_{t+1}) and corrected at the previous pair (x_t, y_t), which is the paper's
order (its y_t is paired with x_t, never with x_{t+1}). With xi_{t+1} one fresh sample (a lower
batch zeta, and a Draw: upper, Hessian and cross batches and the Neumann term q):

    x_{t+1}   = x_t - upper_lr_t d^x_t,                 y_{t+1} = y_t - lower_lr_t d^y_t
    d^y_{t+1} = grad_y g(x_{t+1}, y_{t+1}; zeta) + (1 - eta_{t+1}) (d^y_t - grad_y g(x_t, y_t; zeta))
    d^x_{t+1} = h(x_{t+1}, y_{t+1}; xi)          + (1 - eta_{t+1}) (d^x_t - h(x_t, y_t; xi))
    h(x, y; xi) = grad_x f - d2_xy g . v,   v = (Q + 1) neumann_lr prod_{j<=q} (I - neumann_lr H_j) grad_y f
    d_0 = (grad_y g, h) at (x_0, y_0) on a fresh sample

h is Ghadimi and Wang's randomized Neumann estimator (HIA), q ~ U{0..Q}, Q = neumann_steps the
largest number of Hessian-vector products, the j-th on its own lower batch H_j; the SAME q and
batches are used at both points (bilevel.recursive.recursive_update; benchopt's joint_hia).
Schedules c_t = c / (t + 1)^decay for upper_lr, lower_lr, neumann_lr and eta.

Defaults: the benchopt bilevel benchmark's SUSTAIN: step 0.1 for both levels, eta 0.5, decays
(lower 1/3, neumann 0, eta 2/3, upper 1/3), matching the paper's alpha_t ~ t^{-1/3},
eta_t ~ alpha_t^2, and neumann_steps 9: benchopt's n_hia_steps 10 draws q from {0..9}. The
library's default neumann_lr "auto" is 1/L of a batch Hessian estimated at (x_0, y_0)
(bilevel.spectrum; Ghadimi-Wang take 1/L_g; benchopt uses 0.1). Not copied from the official
AccBO-repo baseline: its STORM used d_{t-2} instead of d_{t-1} and drew different q at the two
points. Deviation from the paper: one eta for both levels (benchopt).
``fresh_hessian_batches=False`` puts all q products on one batch.

Cost per iteration: 2 lower gradients, 2 upper gradients, 2q HVPs for the step's q (Q/2 on
average), 2 cross products; init: one of each of the gradients and the cross product, q HVPs,
and 20 HVPs for the "auto" step.
"""
from dataclasses import dataclass

from bilevel.estimators import Neumann
from bilevel.solvers._double_momentum import DoubleMomentum
from bilevel.registry import register_solver


@register_solver("sustain", paper="Khanduri, Zeng, Hong, Wai, Wang, Yang. A Near-Optimal Algorithm for Stochastic Bilevel Optimization via Double-Momentum. NeurIPS 2021")
@dataclass
class SUSTAIN(DoubleMomentum):
    """STORM on x and y, randomized Neumann (HIA) hypergradient evaluated on one draw at both points."""

    neumann_steps: int = 9

    def estimator(self, iteration):
        return Neumann(lr=self.neumann_lr_at(iteration), steps=self.neumann_steps, variant="randomized",
                       resample=self.fresh_hessian_batches)
