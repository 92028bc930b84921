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
  "neumann" (default, the paper's analysis):  v_t = neumann_lr sum_{q=0}^{Q} prod_{j<=q} (I - neumann_lr H_j) grad_y f
      with Q = neumann_steps products on fresh batches H_j ("sum"), or
      (Q + 1) neumann_lr prod_{j<=q} (I - neumann_lr H_j) grad_y f with q ~ U{0..Q}
      (neumann_variant="randomized");
  "linear_sgd" (the official code): z_t = z_{t-1} - z_lr (H_t z_{t-1} - grad_y f), v_t = z_t.
``normalization="global"`` divides by one norm over all upper tensors (the paper and BOREP code);
``"per_tensor"`` divides each tensor by its own norm (the AccBO repo's BO-REP baseline).
The paper's refinement is epoch-SGD (Hazan-Kale); here it is plain SGD at lower_lr.

Defaults: the official code's data-cleaning settings (BOREP, SLIP and AccBO repositories):
upper_lr 5e-2, lower_lr 5e-2, z_lr 1e-2, beta 0.9, period 2, inner_steps 3 (the SLIP repo's and
AccBO repo's BO-REP; BOREP's own code uses 10), warm_steps 3 (the code's y_warm_start in the
SLIP/ADAMBO repos). The code never uses Neumann (its hessian_q is dead), so the Neumann settings
are the library's: neumann_steps 10 products (benchopt's StocBiO; the lab's later code uses
Q = 3) and neumann_lr "auto", 1/L of a batch Hessian estimated after the warm start
(bilevel.spectrum; the paper's analysis takes a step below 1/L).

Cost per iteration: inner_steps lower gradients when t % period == 0 (else none), one upper
gradient, one cross product, and neumann_steps HVPs ("sum"; q for "randomized") or one HVP
("linear_sgd"). init: warm_steps lower gradients and 20 HVPs for an "auto" step.
"""
from dataclasses import dataclass

from bilevel import lower
from bilevel.solvers._normalized_momentum import NormalizedMomentumSolver
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
