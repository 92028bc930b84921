"""The single-loop solver with STORM on both levels (SUSTAIN, MRBO): x and y move together along
running estimates carried by :func:`bilevel.recursive.recursive_update`; subclasses choose the
hypergradient estimator. Defaults are the benchopt bilevel benchmark's SUSTAIN and MRBO
(github.com/benchopt/benchmark_bilevel).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from typing import NamedTuple

from bilevel import tree
from bilevel.recursive import Estimates, Sample, evaluate, recursive_update, sample
from bilevel.schedules import at, decayed
from bilevel.solver import Solver
from bilevel.tree import Tree
from bilevel.validation import check_count, check_exponent, check_positive, check_positive_or_auto


class DoubleMomentumState(NamedTuple):
    """x, y and the running estimates d = (d^y, d^x) at (x, y)."""
    x: Tree
    y: Tree
    d: Estimates


class DoubleMomentumBatches(NamedTuple):
    """The one sample B_{t+1} that both points of iteration t's correction use."""
    t: int
    sample: Sample


@dataclass
class DoubleMomentum(Solver):
    """STORM on both levels; single loop, x and y moved together from estimates at (x_t, y_t):

        x_{t+1} = x_t - upper_lr_t d^x_t,            y_{t+1} = y_t - lower_lr_t d^y_t
        B_{t+1} = fresh (lower batch, Draw)
        d_{t+1} = G(x_{t+1}, y_{t+1}; B_{t+1}) + (1 - eta_{t+1}) (d_t - G(x_t, y_t; B_{t+1}))
        d_0     = G(x_0, y_0; B_0)                                        (in init)
        d_0     = eta_0 G(x_0, y_0; B_0)               (in init, when ``zero_start``)

    with G = (grad_y g, hypergradient from :meth:`estimator`) and the schedules
    c_t = c / (t + 1)^decay for upper_lr, lower_lr, neumann_lr and eta (a step size given as a
    schedule, bilevel.schedules.PolyDecay or t -> c_t, is used as is; its ``*_decay`` is ignored).
    The STORM weight on the past is beta_{t+1} = 1 - eta_{t+1}. Defaults are the benchopt bilevel
    benchmark's SUSTAIN and MRBO (identical): step 0.1 for both levels, eta 0.5, decays (lower 1/3,
    neumann 0, eta 2/3, upper 1/3), 10 Neumann products (n_shia_steps; SUSTAIN's n_hia_steps 10 is
    neumann_steps 9, see solvers/sustain.py), a fresh lower batch per Hessian-vector product, the
    same batches at both points (benchopt's joint_shia/joint_hia). The library's default
    neumann_lr "auto" is 1/L of a batch Hessian estimated at (x_0, y_0) (:mod:`bilevel.spectrum`;
    benchopt: 0.1). The lower batch of grad_y g and the upper, Hessian and cross batches are
    independent (``share_lower_batch=True``: the cross product on the first Hessian batch;
    ``fresh_hessian_batches=False``: one batch for every product).

    ``zero_start`` (a subclass field or class attribute; False here) starts the recursion from
    zero directions, d_{-1} = 0 at the point (x_0, y_0) itself, so that
    d_0 = G(x_0, y_0; B_0) + (1 - eta_0) (0 - G(x_0, y_0; B_0)) = eta_0 G(x_0, y_0; B_0).
    """
    upper_lr: Any = 0.1
    lower_lr: Any = 0.1
    eta: float = 0.5
    neumann_lr: Any = "auto"
    neumann_steps: int = 10
    upper_lr_decay: float = 1 / 3
    lower_lr_decay: float = 1 / 3
    neumann_lr_decay: float = 0.0
    eta_decay: float = 2 / 3
    share_lower_batch: bool = False
    fresh_hessian_batches: bool = True
    zero_start = False  # not a field: subclasses opt in (MRBO)

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr")
        check_count(self, "neumann_steps", minimum=0)
        check_exponent(self, "upper_lr_decay", "lower_lr_decay", "neumann_lr_decay", "eta_decay")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0 < self.eta <= 1:
            raise ValueError(f"eta must lie in (0, 1], got {self.eta!r}")

    @abc.abstractmethod
    def estimator(self, iteration: int):
        """The stateless hypergradient estimator used at ``iteration`` (its Neumann lr may decay)."""

    def neumann_lr_at(self, iteration: int) -> float:
        return at(decayed(self.neumann_lr, self.neumann_lr_decay), iteration)

    def init(self, problem, x, y, generator):
        resolved = self.resolve_steps(problem, x, y, generator)
        solver = self.with_steps(resolved)
        estimator = solver.estimator(0)
        estimates = evaluate(problem, estimator, x, y, sample(problem, generator, self.share_lower_batch, estimator))
        if self.zero_start:
            eta = at(decayed(self.eta, self.eta_decay), 0)
            estimates = Estimates(*(tree.scale(d, eta) for d in estimates))
        return self.start(DoubleMomentumState(x=tree.clone(x), y=tree.clone(y), d=estimates), generator, resolved)

    def sample(self, problem, t, generator) -> DoubleMomentumBatches:
        return DoubleMomentumBatches(t, sample(problem, generator, self.share_lower_batch, self.estimator(t + 1)))

    def update(self, problem, s: DoubleMomentumState, batches: DoubleMomentumBatches) -> DoubleMomentumState:
        t, d = batches.t, s.d
        x = tree.axpy(-at(decayed(self.upper_lr, self.upper_lr_decay), t), d.upper, s.x)
        y = tree.axpy(-at(decayed(self.lower_lr, self.lower_lr_decay), t), d.lower, s.y)
        beta = 1 - at(decayed(self.eta, self.eta_decay), t + 1)  # 1 - eta_{t+1}
        d = recursive_update(problem, self.estimator(t + 1), (x, y), (s.x, s.y), d, beta, batches.sample)
        return DoubleMomentumState(x=x, y=y, d=d)
