"""MRBO: momentum-based recursive bilevel optimizer (STORM on both levels, Neumann-sum hypergradient).

Yang, Ji, Liang. Provably Faster Algorithms for Bilevel Optimization. NeurIPS 2021 (Algorithm 1).

x and y move together from the estimates at (x_t, y_t) (the paper's order); the recursive
estimates are then formed at (x_{t+1}, y_{t+1}) and corrected at (x_t, y_t) on the SAME fresh
sample B_{t+1} (a lower batch for grad_y g, and upper, Hessian and cross batches for h):

    x_{t+1}   = x_t - upper_lr_t u_t,                   y_{t+1} = y_t - lower_lr_t v_t
    v_{t+1}   = grad_y g(x_{t+1}, y_{t+1}; B) + (1 - eta_{t+1}) (v_t - grad_y g(x_t, y_t; B))
    u_{t+1}   = h(x_{t+1}, y_{t+1}; B)          + (1 - eta_{t+1}) (u_t - h(x_t, y_t; B))
    h(x, y; B) = grad_x f - d2_xy g . v,   v = neumann_lr sum_{q=0}^{Q} prod_{j<=q} (I - neumann_lr H_j) grad_y f
    (v_0, u_0) = eta_0 (grad_y g, h) at (x_0, y_0) on a fresh sample B_0       (zero_start)

with Q = neumann_steps Hessian-vector products, the j-th on its own lower batch H_j (StocBiO's
truncated sum, benchopt's "shia" with n_shia_steps = Q; the same Q batches at both points, as
benchopt's joint_shia), and the schedules c_t = c / (t + 1)^decay for upper_lr, lower_lr,
neumann_lr and eta.

Start (``zero_start=True``, the default): benchopt's MRBO starts from zero directions and applies
its recursion at the first iteration too, d_0 = G(x_0, y_0; B_0) + (1 - eta_0) (0 - G(old; B_0)).
Taking the "old" point to be (x_0, y_0) itself gives d_0 = eta_0 G(x_0, y_0; B_0), one evaluation.
Benchopt's memory of the old point starts at the origin instead of (x_0, y_0); the two agree
when x_0 = y_0 = 0, and evaluating g and f at the origin is an accident of initialization, so it
is not reproduced. ``zero_start=False``: d_0 = G(x_0, y_0; B_0), the paper's first estimate (a
large batch there).

Defaults: the benchopt bilevel benchmark's MRBO: step 0.1 for both levels, 10 Neumann
products (n_shia_steps 10), eta 0.5, decays (lower 1/3, neumann 0, eta 2/3, upper 1/3),
matching the paper's eta_k ~ k^{-1/3} steps and momentum weights ~ eta_k^2. The library's
default neumann_lr "auto" is 1/L of a batch Hessian, estimated at (x_0, y_0) by power iteration
(bilevel.spectrum; the paper's analysis takes eta <= 1/L; benchopt uses 0.1, neumann_lr=0.1
reproduces it). Deviation from the paper: one eta for both levels (benchopt).
``fresh_hessian_batches=False`` puts all Q products on one batch (biased; see
bilevel.estimators.Neumann).

Cost per iteration: 2 lower gradients, 2 upper gradients, 2Q HVPs, 2 cross products; init:
half of that (benchopt's first iteration: all of it, the second half at the origin) plus 20 HVPs for the "auto" step. All batches independent unless
share_lower_batch (the cross product on the first Hessian batch).
"""
from dataclasses import dataclass

from bilevel.estimators import Neumann
from bilevel.solvers._double_momentum import DoubleMomentum
from bilevel.registry import register_solver


@register_solver("mrbo", paper="Yang, Ji, Liang. Provably Faster Algorithms for Bilevel Optimization. NeurIPS 2021")
@dataclass
class MRBO(DoubleMomentum):
    """STORM on x and y, truncated Neumann-sum hypergradient evaluated on one sample at both points."""
    zero_start: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.zero_start, bool):
            raise ValueError(f"zero_start must be a bool, got {self.zero_start!r}")

    def estimator(self, iteration):
        return Neumann(lr=self.neumann_lr_at(iteration), steps=self.neumann_steps, variant="sum",
                       resample=self.fresh_hessian_batches)
