"""SOBA: stochastic single-loop bilevel optimization with a warm-started linear-system variable.

Dagreou, Ablin, Vaiter, Moreau. A framework for bilevel optimization that enables stochastic and
global variance reduction algorithms. NeurIPS 2022.

With a lower batch i and an upper batch j drawn each iteration, and all directions taken at the
current (x_t, y_t, z_t):

    D_y = grad_y g(x_t, y_t; i)
    D_z = d2_yy g(x_t, y_t; i) . z_t - grad_y f(x_t, y_t; j)
    D_x = grad_x f(x_t, y_t; j) - d2_xy g(x_t, y_t; i) . z_t
    y_{t+1} = y_t - lower_lr_t D_y,   z_{t+1} = z_t - z_lr_t D_z,   x_{t+1} = x_t - upper_lr_t D_x

(z here is -v of the paper.) D_y, the HVP and the cross product come from one double-backward
pass on batch i, as in the benchopt implementation (the loop is solvers/_single_loop.py).

Defaults are benchopt's (benchmark_bilevel solvers/soba.py: step_size 0.1, outer_ratio 1,
exponents 0.5 for the inner/v step and for the outer step): upper_lr = lower_lr = z_lr =
PolyDecay(0.1, 0.5), i.e. 0.1 / sqrt(t + 1), the same decaying step for y, z and x. The paper
analyses decreasing steps too; these exponents are benchopt's choice, not taken from the paper.
Any field may be a number (constant step) or another schedule (bilevel.schedules).

Cost per iteration: one lower gradient, one HVP, one cross product, one upper gradient.
"""
from dataclasses import dataclass

from bilevel import upper
from bilevel.registry import register_solver
from bilevel.schedules import PolyDecay, StepSize
from bilevel.solvers._single_loop import SingleLoopSolver

#: benchopt's SOBA step: 0.1 / sqrt(t + 1) on y, z and x.
BENCHOPT_STEP = PolyDecay(0.1, 0.5)


@register_solver("soba", paper="Dagreou, Ablin, Vaiter, Moreau. A framework for bilevel optimization that enables stochastic and global variance reduction algorithms. NeurIPS 2022")
@dataclass
class SOBA(SingleLoopSolver):
    """Single loop: simultaneous SGD steps on y, on the linear-system variable z, and on x."""
    upper_lr: StepSize = BENCHOPT_STEP
    lower_lr: StepSize = BENCHOPT_STEP
    z_lr: StepSize = BENCHOPT_STEP

    def upper_update(self):
        return upper.sgd(self.upper_lr)
