"""AccBO: normalized recursive momentum on x, stochastic Nesterov with averaging on y.

Gong, Hao, Liu. An Accelerated Algorithm for Stochastic Bilevel Optimization under Unbounded
Smoothness. NeurIPS 2024 (arXiv 2409.19212).

    y_0 = warm_steps SNAG steps at x_0;   y_{-1} = y_0;   yhat_0 = y_0
    for t = 0, 1, ...
        if t % period == 0, inner_steps times (paper: period = inner_steps = 1):
            w = y + momentum (y - y_prev);  y_prev = y;  y = w - lower_lr grad_y g(x_t, w; fresh batch)
        yhat_{t+1} = (1 - averaging) yhat_t + averaging y      (once per outer iteration, skipped ones too)
        xi_t       = (Neumann term q ~ U{0..Q}, upper batch, q Hessian batches, cross batch)
        h_t        = grad_x f - d2_xy g . v   at (x_t, yhat_{t+1}) on xi_t,
                     v = (Q + 1) neumann_lr prod_{j<=q} (I - neumann_lr H_j) grad_y f  (Ghadimi-Wang, Q = neumann_steps)
        h'_t       = the same estimate at (x_{t-1}, yhat_t) on the SAME xi_t (same batches, same q)
        m_t        = beta m_{t-1} + (1 - beta) h_t + beta (h_t - h'_t)          (m_0 = h_0)
        x_{t+1}    = x_t - upper_lr m_t / ||m_t||

The evaluated point is (x_t, yhat_t). Defaults: the official code's deep-AUC settings
(github.com/MingruiLiu-ML-Lab/Accelerated-Bilevel-Optimization-Unbounded-Smoothness,
auc_maximization/): upper_lr 5e-3, lower_lr 5e-3,
momentum 0.5, averaging 0.5, beta 0.9, neumann_steps 3, warm_steps 3, period 1, inner_steps 1;
a fresh batch per Hessian product and an independent cross batch (the code draws two train
batches). neumann_lr "auto" (1/L of a batch Hessian after the warm start, bilevel.spectrum) is
the library's; the code's 0.1 is neumann_lr=0.1.

Options reproducing the code, off by default: ``lazy_storm`` takes h'_t := h_{t-1}, the previous
iteration's estimate on its own (different) sample -- cheaper, but NOT the paper's estimator;
``normalization="per_tensor"`` (the AUC code); ``neumann_variant="sum"`` (textbook truncated sum).

Cost per iteration: inner_steps lower gradients (when t % period == 0) and two hypergradients
(one with lazy_storm, and one at t = 0), each one upper gradient, q HVPs (Q - 1 with "sum") and
one cross product.
"""
from dataclasses import dataclass
from typing import Any, NamedTuple

from bilevel import lower, tree, upper
from bilevel.batches import ComposedBatches
from bilevel.estimators import Neumann
from bilevel.linear_system import NEUMANN_VARIANTS
from bilevel.lower import NesterovState, warm_start
from bilevel.registry import register_solver
from bilevel.solver import ComposedSolver, core_of
from bilevel.tree import Tree
from bilevel.validation import check_choice, check_count, check_positive, check_positive_or_auto, check_unit


class Previous(NamedTuple):
    """What the STORM correction needs: the previous point (x_{t-1}, yhat_t), or with lazy_storm
    the previous estimate h_{t-1} (all three kept, so the state's structure never changes; at
    t = 0 they hold the initial point and zeros and are not read)."""
    x: Tree
    y: Tree
    h: Tree


class AccBOState(NamedTuple):
    """x, SNAG's state (its average is the point), STORM's state and the previous point."""
    x: Tree
    lower: NesterovState
    upper: Any
    previous: Previous

    @property
    def y(self) -> Tree:
        return self.lower.y


@register_solver("accbo", paper="Gong, Hao, Liu. An Accelerated Algorithm for Stochastic Bilevel Optimization under Unbounded Smoothness. NeurIPS 2024")
@dataclass
class AccBO(ComposedSolver):
    """Normalized STORM on x with a same-sample correction, SNAG with averaging on y."""
    upper_lr: float = 5e-3                # eta (number or schedule t -> lr_t)
    lower_lr: float = 5e-3                # SNAG step alpha (number or schedule)
    momentum: float = 0.5                 # SNAG extrapolation gamma, in [0, 1)
    averaging: float = 0.5                # tau of yhat, in (0, 1]; 1 = no averaging
    beta: float = 0.9                     # STORM weight, in [0, 1)
    neumann_steps: int = 3                # Q
    neumann_lr: Any = "auto"              # "auto": 1/L of a batch Hessian (bilevel.spectrum), or a number
    warm_steps: int = 3                   # T0 SNAG steps at x_0
    period: int = 1                       # lower update every `period` iterations ...
    inner_steps: int = 1                  # ... of `inner_steps` SNAG steps
    normalization: str = "global"         # or "per_tensor" (AUC code)
    neumann_variant: str = "randomized"   # Ghadimi-Wang; or "sum" (textbook truncated series)
    lazy_storm: bool = False              # True: h'_t := h_{t-1} (code; not the paper)
    share_lower_batch: bool = False       # True: one lower batch for the HVPs and the cross product

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr")
        check_unit(self, "momentum", "beta")
        if not 0 < self.averaging <= 1:
            raise ValueError(f"averaging must lie in (0, 1], got {self.averaging!r}")
        check_count(self, "period", "inner_steps")
        check_count(self, "neumann_steps", minimum=0)
        check_count(self, "warm_steps", minimum=0)
        check_choice(self, "normalization", upper.NORMALIZATIONS)
        check_choice(self, "neumann_variant", NEUMANN_VARIANTS)

    def lower_loop(self):
        nesterov = lower.Nesterov(self.lower_lr, self.momentum, self.averaging, self.inner_steps)
        return lower.Periodic(nesterov, self.period)

    def estimator(self):
        return Neumann(lr=self.neumann_lr, steps=self.neumann_steps, variant=self.neumann_variant)

    def upper_update(self):
        return upper.chain(upper.storm(self.beta), upper.normalize(self.normalization), upper.scale(self.upper_lr))

    def init(self, problem, x, y, generator):
        loop = self.lower_loop()
        y0 = warm_start(loop, problem, x, loop.init(y), self.warm_steps, generator).y
        previous = Previous(x=tree.clone(x), y=tree.clone(y0), h=tree.zeros_like(x))
        core = AccBOState(x=x, lower=NesterovState(y=y0, y_prev=y0, y_avg=y0), upper=self.upper_update().init(x),
                          previous=previous)
        return self.start(core, generator, self.resolve_steps(problem, x, y0, generator))

    def update(self, problem, s: AccBOState, batches: ComposedBatches) -> AccBOState:
        t, loop, estimate = batches.t, self.lower_loop(), self.estimator_at(batches.t)
        lower_state = loop.update(problem, s.x, s.lower, batches.lower)
        y_avg = loop.point(lower_state)
        h, _ = estimate(problem, s.x, y_avg, None, batches.draw)
        previous = None
        if t > 0:  # m_0 = h_0
            previous = s.previous.h if self.lazy_storm else estimate(problem, s.previous.x, s.previous.y, None,
                                                                     batches.draw)[0]
        direction, upper_state = self.upper_update().update(h, s.upper, previous=previous, t=t)
        return AccBOState(x=upper.apply(s.x, direction), lower=lower_state, upper=upper_state,
                          previous=Previous(x=s.x, y=y_avg, h=h))

    def point(self, state):
        core = core_of(state)
        return core.x, self.lower_loop().point(core.lower)
