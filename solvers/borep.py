"""BO-REP: bilevel optimization with lower-level initialization refinement and periodic updates.

Hao, Gong, Liu. Bilevel Optimization under Unbounded Smoothness: A New Algorithm and Convergence
Analysis. ICLR 2024 (arXiv 2401.09587).

    y_0     = warm_steps SGD steps on g(x_0, .)                     (initialization refinement)
    if t % period == 0:
        y_t = inner_steps SGD steps on g(x_t, .) from y_{t-1}      (lower_lr, fresh batches)
    else:
        y_t = y_{t-1}
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . v_t
    m_t     = beta m_{t-1} + (1 - beta) h_t                         (m_{-1} = 0)
    x_{t+1} = x_t - upper_lr m_t / ||m_t||                          (normalized momentum)

v_t, by ``hypergradient``:
  "neumann" (default, the paper's analysis):  v_t = neumann_lr sum_{q<Q} (I - neumann_lr H_t)^q grad_y f
      with Q = neumann_steps ("sum"), or Q neumann_lr (I - neumann_lr H_t)^q grad_y f with
      q ~ U{0..Q-1} (neumann_variant="randomized");
  "linear_sgd" (the official code): z_t = z_{t-1} - z_lr (H_t z_{t-1} - grad_y f), v_t = z_t.
``normalization="global"`` divides by one norm over all upper tensors (the paper and BOREP code);
``"per_tensor"`` divides each tensor by its own norm (the AccBO repo's BO-REP baseline).
The paper's refinement is epoch-SGD (Hazan-Kale); here it is plain SGD at lower_lr.

Defaults: research/official_algorithms.md section 12.2, data-cleaning column: upper_lr 5e-2,
lower_lr 5e-2, z_lr 1e-2, beta 0.9, period 2, inner_steps 3 (the SLIP repo's and AccBO repo's
BO-REP; BOREP's own code uses 10), warm_steps 3 (the code's y_warm_start in the SLIP/ADAMBO repos).
The code never uses Neumann (its hessian_q is dead); neumann_steps 10 and neumann_lr 0.1 are the
benchopt StocBiO defaults, as in this package's StocBiO (the lab's later code uses Q = 3).

Cost per iteration: inner_steps lower gradients when t % period == 0 (else none), one upper
gradient, one cross product, and neumann_steps - 1 HVPs ("sum"; q for "randomized") or one HVP
("linear_sgd"). init: warm_steps lower gradients.
"""
from dataclasses import dataclass

from bilevel import lower
from bilevel.normalized import NormalizedMomentumSolver
from bilevel.registry import register_solver
from bilevel.validation import check_count


@register_solver("bo-rep", paper="Hao, Gong, Liu. Bilevel Optimization under Unbounded Smoothness: A New Algorithm and Convergence Analysis. ICLR 2024")
@dataclass
class BOREP(NormalizedMomentumSolver):
    """Warm-started, periodically updated lower SGD; normalized momentum on x."""
    period: int = 2
    inner_steps: int = 3

    def __post_init__(self):
        super().__post_init__()
        check_count(self, "period", "inner_steps")

    def lower_loop(self):
        return lower.Periodic(lower.SGD(self.lower_lr, self.inner_steps), self.period)
