"""VRBO: variance-reduced bilevel optimizer (SPIDER estimators with periodic large-batch refreshes).

Yang, Ji, Liang. Provably Faster Algorithms for Bilevel Optimization. NeurIPS 2021 (Algorithm 2).

The running estimates (v, u) of (grad_y g, grad Phi) always refer to the current point. Each
SPIDER correction moves them from an old point to a new one on ONE fresh sample B (a lower batch,
and upper, Hessian and cross batches):  G(new; B) - G(old; B) is added, G = (grad_y g, h).

    if k % period == 0:   (v, u) = mean of G(x_k, y_k; S_j), j = 1..refresh_batches     (refresh)
    x_{k+1} = x_k - upper_lr u
    (v, u) += G(x_{k+1}, y_k; B_{k,0}) - G(x_k, y_k; B_{k,0})                  (x moved)
    y_{k,0} = y_k
    for i = 1..inner_steps:
        y_{k,i} = y_{k,i-1} - lower_lr v
        (v, u) += G(x_{k+1}, y_{k,i}; B_{k,i}) - G(x_{k+1}, y_{k,i-1}; B_{k,i})   (y moved)
    y_{k+1} = y_{k,inner_steps}

    h(x, y; B) = grad_x f - d2_xy g . v,   v = neumann_lr sum_{q=0}^{Q} prod_{j<=q} (I - neumann_lr H_j) grad_y f

with Q = neumann_steps Hessian-vector products, the j-th on its own lower batch H_j of B (StocBiO's
truncated sum, benchopt's "shia" with n_shia_steps = Q; one B at both points). The refresh averages
``refresh_batches`` independent samples, since the problem protocol has no dataset size; when
the problem is deterministic (sample() returns None) one evaluation is the full batch.

Defaults: the benchopt bilevel benchmark's VRBO: constant steps 0.1 for both levels,
inner_steps 10 (n_inner_steps), neumann_steps 10 products (n_shia_steps), a fresh batch per
product. The library's default neumann_lr "auto" is 1/L of a batch Hessian estimated at
(x_0, y_0) (bilevel.spectrum; the paper's analysis takes eta <= 1/L; benchopt uses 0.1).
benchopt refreshes on the full batch every period_frac (n_inner + n_outer) / batch_size
iterations (period_frac 128, i.e. every 128 epochs of batches); here ``period`` counts outer
iterations directly (period = period_frac (n_inner + n_outer) / batch_size), default 10, and
refresh_batches 10 are our choices. Step sizes may be schedules t -> lr_t (constant by default).
Unlike benchopt, the x move is corrected for too (benchopt compares y_{k,i} with y_{k,i-1} at
x_{k+1} only), and a refresh is a large batch, not the single batch of the AccBO-repo baseline.
``fresh_hessian_batches=False`` puts all Q products on one batch.

Cost per iteration: inner_steps + 1 corrections of two evaluations each, i.e.
2 (inner_steps + 1) lower gradients, upper gradients and cross products and 2 (inner_steps + 1)
Q HVPs; plus, on refresh iterations, refresh_batches evaluations (one each of lower
gradient, upper gradient and cross product, Q HVPs); init: 20 HVPs for the "auto" step.
"""
from dataclasses import dataclass
from typing import Any, NamedTuple, Tuple

from bilevel import tree
from bilevel.estimators import Neumann
from bilevel.recursive import Estimates, Sample, mean_estimates, recursive_update, refresh_samples, sample
from bilevel.registry import register_solver
from bilevel.schedules import at
from bilevel.solver import Solver
from bilevel.tree import Tree


class VRBOState(NamedTuple):
    """x, y and the SPIDER estimates d = (v, u) at (x, y) (zeros before the first refresh, at t = 0)."""
    x: Tree
    y: Tree
    d: Estimates


class VRBOBatches(NamedTuple):
    """Iteration t's refresh samples (none unless t % period == 0), then the inner_steps + 1
    correction samples, in the order they are used."""
    t: int
    refresh: Tuple[Sample, ...]
    corrections: Tuple[Sample, ...]
from bilevel.validation import check_count, check_positive, check_positive_or_auto


@register_solver("vrbo", paper="Yang, Ji, Liang. Provably Faster Algorithms for Bilevel Optimization. NeurIPS 2021")
@dataclass
class VRBO(Solver):
    """SPIDER estimates of grad_y g and the Neumann-sum hypergradient, refreshed every ``period`` iterations."""
    upper_lr: Any = 0.1
    lower_lr: Any = 0.1
    neumann_lr: Any = "auto"
    neumann_steps: int = 10
    inner_steps: int = 10
    period: int = 10
    refresh_batches: int = 10
    share_lower_batch: bool = False
    fresh_hessian_batches: bool = True

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr")
        check_count(self, "inner_steps", "period", "refresh_batches")
        check_count(self, "neumann_steps", minimum=0)

    def estimator(self, iteration):
        return Neumann(lr=at(self.neumann_lr, iteration), steps=self.neumann_steps, variant="sum",
                       resample=self.fresh_hessian_batches)

    def init(self, problem, x, y, generator):
        d = Estimates(tree.zeros_like(y), tree.zeros_like(x))
        core = VRBOState(x=tree.clone(x), y=tree.clone(y), d=d)
        return self.start(core, generator, self.resolve_steps(problem, x, y, generator))

    def sample(self, problem, t, generator) -> VRBOBatches:
        estimator = self.estimator(t)
        refreshing = ()
        if t % self.period == 0:
            refreshing = refresh_samples(problem, generator, self.refresh_batches, self.share_lower_batch, estimator)
        corrections = tuple(sample(problem, generator, self.share_lower_batch, estimator)
                            for _ in range(self.inner_steps + 1))
        return VRBOBatches(t, refreshing, corrections)

    def update(self, problem, s: VRBOState, batches: VRBOBatches) -> VRBOState:
        t, x, y, d = batches.t, s.x, s.y, s.d
        estimator = self.estimator(t)
        upper_lr, lower_lr = at(self.upper_lr, t), at(self.lower_lr, t)
        if batches.refresh:
            d = mean_estimates(problem, estimator, x, y, batches.refresh)
        first, *inner = batches.corrections
        x_new = tree.axpy(-upper_lr, d.upper, x)
        d = recursive_update(problem, estimator, (x_new, y), (x, y), d, 1.0, first)
        for batch in inner:
            y_new = tree.axpy(-lower_lr, d.lower, y)
            d = recursive_update(problem, estimator, (x_new, y_new), (x_new, y), d, 1.0, batch)
            y = y_new
        return VRBOState(x=x_new, y=y, d=d)
