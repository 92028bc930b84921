"""SLIP: single-loop bilevel optimizer under unbounded smoothness.

Gong, Hao, Liu. A Nearly Optimal Single Loop Algorithm for Stochastic Bilevel Optimization under
Unbounded Smoothness. ICML 2024 (arXiv 2412.20017).

    y_0     = warm_steps SGD steps on g(x_0, .)                     (initialization refinement)
    h_t     = grad_x f(x_t, y_t) - d2_xy g(x_t, y_t) . v_t            (at y_t, before y moves)
    y_{t+1} = y_t - lower_lr grad_y g(x_t, y_t; fresh batch)           (simultaneous with x)
    m_t     = beta m_{t-1} + (1 - beta) h_t                          (m_{-1} = 0)
    x_{t+1} = x_t - upper_lr m_t / ||m_t||

v_t, by ``hypergradient``: "neumann" (default; the paper's analysis uses BO-REP's Neumann
estimator), v_t = neumann_lr sum_{q=0}^{Q} prod_{j<=q} (I - neumann_lr H_j) grad_y f with
Q = neumann_steps products on fresh batches H_j (or the randomized single term,
neumann_variant="randomized"); or "linear_sgd" (the official
code), z_t = z_{t-1} - z_lr (H_t z_{t-1} - grad_y f), v_t = z_t. ``normalization`` "global"
(paper and code) or "per_tensor".

Defaults: the SLIP repository's README (data hyper-cleaning): upper_lr 5e-2, lower_lr 5e-2,
z_lr 1e-2, beta 0.9, warm_steps 3 (y_warm_start; the code repeats these extra lower steps on
every iteration of epoch 0, the clean version runs them once at x_0). The code has no Neumann
path for SLIP, so the Neumann settings are the library's: neumann_steps 10 products (benchopt's
StocBiO) and neumann_lr "auto", 1/L of a batch Hessian estimated after the warm start
(bilevel.spectrum).

Cost per iteration: one lower gradient, one upper gradient, one cross product, and
neumann_steps HVPs ("sum") or one HVP ("linear_sgd"). init: warm_steps lower gradients and
20 HVPs for an "auto" step.
"""
from dataclasses import dataclass

from bilevel import lower
from bilevel.solvers._normalized_momentum import NormalizedMomentumSolver
from bilevel.registry import register_solver


@register_solver("slip", paper="Gong, Hao, Liu. A Nearly Optimal Single Loop Algorithm for Stochastic Bilevel Optimization under Unbounded Smoothness. ICML 2024")
@dataclass
class SLIP(NormalizedMomentumSolver):
    """Warm start, then one lower SGD step and one normalized-momentum step on x per iteration."""
    update_lower_first = False  # h_t at y_t; y_{t+1} from y_t

    def lower_loop(self):
        return lower.SGD(self.lower_lr, steps=1)
