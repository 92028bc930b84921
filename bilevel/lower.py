"""Lower-level loops: how y tracks y*(x) = argmin_y g(x, y).

Each loop is a small object with

    init(y) -> state                                        a typed, tensor-only state
    sample(problem, t, generator) -> LowerBatches           the batches of iteration t, drawn up front
    update(problem, x, state, batches) -> state             pure: no generator
    step(problem, x, state, generator, iteration) -> state  update(sample(...)), the convenience
    point(state)                                            the iterate hypergradients are taken at

(:mod:`bilevel.batches`). Every SGD step uses its own lower batch. Step sizes ``lr`` are numbers
or schedules ``t -> lr_t`` of the outer iteration t (see :mod:`bilevel.schedules`), t being the
``t`` of the batches.

* :class:`SGD`       k steps  y <- y - lr grad_y g(x, y; batch k).                  state :class:`SGDState`
* :class:`Nesterov`  stochastic Nesterov accelerated gradient with averaging (AccBO):
                         ``steps`` times  w = y + gamma (y - y_prev),  y_prev <- y,  y <- w - lr grad_y g(x, w)
                         then once        y_avg <- (1 - tau) y_avg + tau y          point = y_avg
                                                                                    state :class:`NesterovState`
* :class:`Periodic`  runs another loop only when iteration % period == 0 (BO-REP): it draws no
                     batch on the other iterations and calls the loop's ``idle(state)`` when it
                     has one (Nesterov: the averaging alone), so per-outer-iteration bookkeeping
                     is never skipped. Its state is the inner loop's.
* :func:`warm_start` runs a loop's single steps T0 times before the first upper step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from . import tree
from .batches import LowerBatches
from .oracles import grad_lower_y
from .schedules import at
from .tree import Tree


class SGDState(NamedTuple):
    """The lower iterate y."""
    y: Tree


class NesterovState(NamedTuple):
    """SNAG's iterate y, its previous iterate y_prev and the running average y_avg (the point)."""
    y: Tree
    y_prev: Tree
    y_avg: Tree


def sgd_step(problem, x: Tree, y: Tree, lr: float, generator: torch.Generator) -> Tree:
    """y - lr grad_y g(x, y; fresh lower batch)."""
    return sgd_update(problem, x, y, lr, problem.sample("lower", generator))


def sgd_update(problem, x: Tree, y: Tree, lr: float, batch: Any) -> Tree:
    """y - lr grad_y g(x, y; batch)."""
    return tree.axpy(-lr, grad_lower_y(problem, x, y, batch), y)


def sgd_steps(problem, x: Tree, y: Tree, *, lr: float, steps: int, generator: torch.Generator) -> Tree:
    """``steps`` SGD steps on g(x, .) from y, a fresh batch each."""
    for _ in range(steps):
        y = sgd_step(problem, x, y, lr, generator)
    return y


def draw_lower(problem, t: int, generator: torch.Generator, steps: int) -> LowerBatches:
    """``steps`` fresh lower batches for iteration ``t``."""
    return LowerBatches(t, tuple(problem.sample("lower", generator) for _ in range(steps)))


class _Loop:
    """``step`` = ``update(sample(...))``, shared by the loops."""

    def step(self, problem, x, state, generator, iteration: int = 0):
        return self.update(problem, x, state, self.sample(problem, iteration, generator))


@dataclass(frozen=True)
class SGD(_Loop):
    """``steps`` SGD steps per outer iteration with step size ``lr`` (number or schedule)."""
    lr: Any
    steps: int = 1

    def init(self, y: Tree) -> SGDState:
        return SGDState(y=tree.clone(y))

    def sample(self, problem, t: int, generator) -> LowerBatches:
        return draw_lower(problem, t, generator, self.steps)

    def update(self, problem, x, state: SGDState, batches: LowerBatches) -> SGDState:
        lr, y = at(self.lr, batches.t), state.y
        for batch in batches.steps:
            y = sgd_update(problem, x, y, lr, batch)
        return state._replace(y=y)

    def point(self, state: SGDState) -> Tree:
        return state.y


@dataclass(frozen=True)
class Nesterov(_Loop):
    """Stochastic Nesterov accelerated gradient with averaging (AccBO's lower level).

    ``momentum`` is the extrapolation gamma, ``averaging`` the weight tau of the running average.
    One ``update`` (one outer iteration) runs ``steps`` SNAG steps and then averages ONCE,

        yhat_{t+1} = (1 - tau) yhat_t + tau y,

    as in AccBO (Gong, Hao, Liu, NeurIPS 2024, Algorithm 1 and its official code): the average is
    a per-outer-iteration quantity. ``idle`` is the outer iteration without SNAG steps (periodic
    updates): the average still moves, towards the unchanged y.
    """
    lr: Any
    momentum: float = 0.5
    averaging: float = 0.5
    steps: int = 1

    def init(self, y: Tree) -> NesterovState:
        return NesterovState(y=tree.clone(y), y_prev=tree.clone(y), y_avg=tree.clone(y))

    def sample(self, problem, t: int, generator) -> LowerBatches:
        return draw_lower(problem, t, generator, self.steps)

    def update(self, problem, x, state: NesterovState, batches: LowerBatches) -> NesterovState:
        y, y_prev, y_avg = state
        lr = at(self.lr, batches.t)
        for batch in batches.steps:
            w = tree.map(lambda a, b: a + self.momentum * (a - b), y, y_prev)
            y_prev, y = y, sgd_update(problem, x, w, lr, batch)
        return self.idle(NesterovState(y, y_prev, y_avg))

    def idle(self, state: NesterovState) -> NesterovState:
        """The once-per-outer-iteration averaging yhat <- (1 - tau) yhat + tau y, no SNAG step."""
        return state._replace(y_avg=tree.lerp(state.y_avg, state.y, self.averaging))

    def point(self, state: NesterovState) -> Tree:
        return state.y_avg


@dataclass(frozen=True)
class Periodic(_Loop):
    """Run ``loop`` only on iterations t with t % period == 0 (BO-REP's periodic updates); on the
    others draw nothing and call ``loop.idle(state)`` when the loop defines it (else the state is
    unchanged)."""
    loop: Any
    period: int = 1

    def __post_init__(self):
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period}")

    def init(self, y: Tree):
        return self.loop.init(y)

    def active(self, t: int) -> bool:
        return t % self.period == 0

    def sample(self, problem, t: int, generator) -> LowerBatches:
        return self.loop.sample(problem, t, generator) if self.active(t) else LowerBatches(t, ())

    def update(self, problem, x, state, batches: LowerBatches):
        if not self.active(batches.t):
            idle = getattr(self.loop, "idle", None)
            return state if idle is None else idle(state)
        return self.loop.update(problem, x, state, batches)

    def point(self, state) -> Tree:
        return self.loop.point(state)


def warm_start(loop, problem, x: Tree, state, steps: int, generator):
    """Initialization refinement: ``steps`` single steps of ``loop`` at the fixed x0 (iteration 0)."""
    inner = loop.loop if isinstance(loop, Periodic) else loop
    single = replace(inner, steps=1)
    for _ in range(steps):
        state = single.step(problem, x, state, generator)
    return state
