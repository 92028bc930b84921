"""AdamBO: Adam on the upper level, warm-started single-step SGD on the lower level.

Gong, Hao, Liu. On the Convergence of Adam-Type Algorithms for Bilevel Optimization under
Unbounded Smoothness. TMLR 2025 (arXiv 2503.03908).

    y_0     = warm_steps SGD steps on g(x_0, .)                     (initialization refinement)
    y_{t+1} = y_t - lower_lr grad_y g(x_t, y_t; fresh batch)        (before the hypergradient)
    v       = neumann_lr sum_{q=0}^{Q} prod_{j<=q} (I - neumann_lr H_j) grad_y f
                                           (Q = neumann_steps products, fresh batches H_j, at y_{t+1})
    h_t     = grad_x f(x_t, y_{t+1}) - d2_xy g(x_t, y_{t+1}) . v  [+ weight_decay x_t]
    m_t     = beta m_{t-1} + (1 - beta) h_t,       s_t = beta_sq s_{t-1} + (1 - beta_sq) h_t^2
    x_{t+1} = x_t - upper_lr (m_t / (1 - beta^k)) / (sqrt(s_t / (1 - beta_sq^k)) + adam_eps)
                                                                     (k = t + 1, bias-corrected)

``adam_eps`` is the paper's lambda (the code's ``--lambd``, "eps for adam"). beta and beta_sq are
torch's Adam betas as in the code; in the paper's notation (Li-Rakhlin-Jadbabaie style,
m_t = (1 - beta) m_{t-1} + beta h_t) its beta and beta_sq are 1 - beta and 1 - beta_sq here.
``weight_decay`` adds the code's coupled L2 term (torch.optim.Adam's weight_decay, not AdamW)
to h_t before Adam; off by default, as in the paper.

Defaults are generic, not the code's transformer tuning (the AdamBO repository: upper_lr 5e-3,
lower_lr 1e-4, neumann_lr 1e-4, Q 3, lambda 1e-8, betas (0.9, 0.999), weight decay 0.01, warm
start 3): upper_lr 5e-3, beta 0.9, beta_sq 0.999, adam_eps 1e-8 and warm_steps 3 follow the
code; lower_lr 5e-2 follows BO-REP/SLIP; neumann_steps 10 is the benchopt StocBiO default; the
library's neumann_lr "auto" is 1/L of a batch Hessian estimated after the warm start
(bilevel.spectrum; the paper leaves it to the user; the code's 1e-4 makes v about 3e-4 grad_y f,
far from H^{-1} grad_y f).

Cost per iteration: one lower gradient, one upper gradient, one cross product, neumann_steps
HVPs ("sum"). init: warm_steps lower gradients and 20 HVPs for the "auto" step.
"""
from dataclasses import dataclass
from typing import Any

from bilevel import lower, tree, upper
from bilevel.estimators import Neumann, draw_for
from bilevel.linear_system import NEUMANN_VARIANTS
from bilevel.registry import register_solver
from bilevel.solver import ComposedSolver

from bilevel.validation import check_choice, check_count, check_positive, check_positive_or_auto, check_unit


@register_solver("adambo", paper="Gong, Hao, Liu. On the Convergence of Adam-Type Algorithms for Bilevel Optimization under Unbounded Smoothness. TMLR 2025")
@dataclass
class AdamBO(ComposedSolver):
    """Warm start, one lower SGD step, then a Neumann hypergradient fed to Adam on x."""
    update_lower_first = True

    upper_lr: float = 5e-3
    lower_lr: float = 5e-2
    beta: float = 0.9
    beta_sq: float = 0.999
    adam_eps: float = 1e-8
    warm_steps: int = 3
    neumann_steps: int = 10
    neumann_lr: Any = "auto"
    neumann_variant: str = "sum"
    weight_decay: float = 0.0
    share_lower_batch: bool = False
    fresh_hessian_batches: bool = True

    def __post_init__(self):
        check_unit(self, "beta")
        check_unit(self, "beta_sq")
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr")
        if not self.adam_eps >= 0:
            raise ValueError(f"adam_eps must be >= 0, got {self.adam_eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check_count(self, "neumann_steps", minimum=0)
        check_count(self, "warm_steps", minimum=0)
        check_choice(self, "neumann_variant", NEUMANN_VARIANTS)

    def lower_loop(self):
        return lower.SGD(self.lower_lr, steps=1)

    def estimator(self):
        neumann = Neumann(lr=self.neumann_lr, steps=self.neumann_steps, variant=self.neumann_variant,
                          resample=self.fresh_hessian_batches)
        return CoupledWeightDecay(neumann, self.weight_decay) if self.weight_decay else neumann

    def upper_update(self):
        return upper.chain(upper.adam(b1=self.beta, b2=self.beta_sq, eps=self.adam_eps), upper.scale(self.upper_lr))


@dataclass(frozen=True)
class CoupledWeightDecay:
    """An estimator returning h + weight_decay x: L2 decay coupled into Adam's input."""
    inner: Any
    weight_decay: float

    def init(self, x, y):
        return self.inner.init(x, y)

    def draw(self, problem, generator, share_lower_batch=False):
        return draw_for(self.inner, problem, generator, share_lower_batch)

    def __call__(self, problem, x, y, state, sample):
        h, state = self.inner(problem, x, y, state, sample)
        return tree.axpy(self.weight_decay, x, h), state
