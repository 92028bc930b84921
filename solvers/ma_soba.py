"""MA-SOBA: SOBA with a moving-average hypergradient (and an optional projection of z).

Chen, Xiao, Balasubramanian. Optimal Algorithms for Stochastic Bilevel Optimization under Relaxed
Smoothness Conditions. arXiv 2306.12067, 2023 (JMLR 2024), Algorithm 1 (MA-SOBA).

With a lower batch i and an upper batch j drawn each iteration, and all directions taken at the
current (x_t, y_t, z_t), as in SOBA:

    D_y = grad_y g(x_t, y_t; i)
    D_z = d2_yy g(x_t, y_t; i) . z_t - grad_y f(x_t, y_t; j)
    D_x = grad_x f(x_t, y_t; j) - d2_xy g(x_t, y_t; i) . z_t
    y_{t+1} = y_t - lower_lr_t D_y
    z_{t+1} = Proj_{||z|| <= z_radius}(z_t - z_lr_t D_z)          (no projection if z_radius is None)
    m_t     = beta m_{t-1} + (1 - beta) D_x                        (m_{-1} = 0; the paper's theta = 1 - beta)
    x_{t+1} = x_t - upper_lr_t m_t

Here x moves with the average that already includes D_x of step t; the paper's Algorithm 1 may
instead step x with the previous average (x_{t+1} = x_t - alpha_t h_t, then h_{t+1} =
(1 - theta_t) h_t + theta_t D_x), a one-step lag not verified here. The projection is part of
the paper's analysis; the MA-SOBA baselines in the official code of the unbounded-smoothness
papers (github.com/MingruiLiu-ML-Lab/Single-Loop-bilevel-Optimizer-under-Unbounded-Smoothness,
.../Accelerated-Bilevel-Optimization-Unbounded-Smoothness, github.com/jhao6/d3x645) have none,
hence off by default.
D_y, the HVP and the cross product come from one double-backward pass on batch i.

Defaults: upper_lr, lower_lr, z_lr 0.1, constant. benchopt has no MA-SOBA: the value 0.1 is
benchopt's SOBA step_size, but not its decay (benchopt's SOBA uses 0.1 / sqrt(t + 1)); the
constant steps are the paper's (its analysis takes constant alpha, beta, gamma, theta). beta 0.9
is the official code's MA-SOBA momentum. Each step size may be a schedule (bilevel.schedules),
e.g. upper_lr = lower_lr = z_lr = PolyDecay(0.1, 0.5) for benchopt's SOBA schedule.

Cost per iteration: one lower gradient, one HVP, one cross product, one upper gradient.
"""
from dataclasses import dataclass
from typing import Optional

from bilevel import upper
from bilevel.registry import register_solver
from bilevel.schedules import StepSize
from bilevel.solvers._single_loop import SingleLoopSolver
from bilevel.validation import check_positive, check_unit


@register_solver("ma-soba", paper="Chen, Xiao, Balasubramanian. Optimal Algorithms for Stochastic Bilevel Optimization under Relaxed Smoothness Conditions. arXiv 2306.12067, 2023")
@dataclass
class MASOBA(SingleLoopSolver):
    """Single loop: SGD on y and z, moving-average hypergradient step on x."""
    upper_lr: StepSize = 0.1
    lower_lr: StepSize = 0.1
    z_lr: StepSize = 0.1
    beta: float = 0.9
    z_radius: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        check_unit(self, "beta")
        if self.z_radius is not None:
            check_positive(self, "z_radius")

    def upper_update(self):
        return upper.chain(upper.ema(self.beta), upper.scale(self.upper_lr))
