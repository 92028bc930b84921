"""Lower-level loops: how y tracks y*(x) = argmin_y g(x, y).

Each loop is a small object with ``init(y) -> LowerState``, ``update(problem, x, state,
generator, iteration) -> LowerState`` (one call per outer iteration) and ``point(state)``, the
iterate at which hypergradients are evaluated. Every SGD step draws a fresh lower batch. Step
sizes ``lr`` are numbers or schedules ``t -> lr_t`` of the outer iteration t (see
:mod:`bilevel.schedules`).

* :class:`SGD`       k steps  y <- y - lr grad_y g(x, y; fresh batch).
* :class:`Nesterov`  stochastic Nesterov accelerated gradient with averaging (AccBO):
                         w = y_t + gamma (y_t - y_{t-1}),   y_{t+1} = w - lr grad_y g(x, w)
                         y_avg <- (1 - tau) y_avg + tau y_{t+1}         point = y_avg
* :class:`Periodic`  runs another loop only when iteration % period == 0 (BO-REP).
* :func:`warm_start` runs a loop's single steps T0 times before the first upper step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional

import torch

from . import tree
from .oracles import grad_lower_y
from .schedules import at
from .tree import Tree


class LowerState(NamedTuple):
    y: Tree
    y_prev: Optional[Tree] = None
    y_avg: Optional[Tree] = None


def sgd_step(problem, x: Tree, y: Tree, lr: float, generator: torch.Generator) -> Tree:
    """y - lr grad_y g(x, y; fresh lower batch)."""
    batch = problem.sample("lower", generator)
    return tree.axpy(-lr, grad_lower_y(problem, x, y, batch), y)


def sgd_steps(problem, x: Tree, y: Tree, *, lr: float, steps: int, generator: torch.Generator) -> Tree:
    """``steps`` SGD steps on g(x, .) from y, a fresh batch each."""
    for _ in range(steps):
        y = sgd_step(problem, x, y, lr, generator)
    return y


#: ``lr`` at outer iteration ``iteration`` (a number, or a schedule called with it): the one
#: resolver of step sizes, :func:`bilevel.schedules.at`, under its former name.
step_size = at


@dataclass(frozen=True)
class SGD:
    """``steps`` SGD steps per outer iteration with step size ``lr`` (number or schedule)."""
    lr: Any
    steps: int = 1

    def init(self, y: Tree) -> LowerState:
        return LowerState(y=tree.clone(y))

    def update(self, problem, x, state: LowerState, generator, iteration: int = 0) -> LowerState:
        lr = step_size(self.lr, iteration)
        return state._replace(y=sgd_steps(problem, x, state.y, lr=lr, steps=self.steps, generator=generator))

    def point(self, state: LowerState) -> Tree:
        return state.y


@dataclass(frozen=True)
class Nesterov:
    """Stochastic Nesterov accelerated gradient with averaging (AccBO's lower level).

    ``momentum`` is the extrapolation gamma, ``averaging`` the weight tau of the running average.
    """
    lr: Any
    momentum: float = 0.5
    averaging: float = 0.5
    steps: int = 1

    def init(self, y: Tree) -> LowerState:
        return LowerState(y=tree.clone(y), y_prev=tree.clone(y), y_avg=tree.clone(y))

    def update(self, problem, x, state: LowerState, generator, iteration: int = 0) -> LowerState:
        y, y_prev, y_avg = state
        lr = step_size(self.lr, iteration)
        for _ in range(self.steps):
            w = tree.map(lambda a, b: a + self.momentum * (a - b), y, y_prev)
            y_prev, y = y, sgd_step(problem, x, w, lr, generator)
            y_avg = tree.lerp(y_avg, y, self.averaging)
        return LowerState(y, y_prev, y_avg)

    def point(self, state: LowerState) -> Tree:
        return state.y_avg


@dataclass(frozen=True)
class Periodic:
    """Run ``loop`` only on iterations t with t % period == 0 (BO-REP's periodic updates)."""
    loop: Any
    period: int = 1

    def __post_init__(self):
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period}")

    def init(self, y: Tree) -> LowerState:
        return self.loop.init(y)

    def update(self, problem, x, state: LowerState, generator, iteration: int = 0) -> LowerState:
        if iteration % self.period:
            return state
        return self.loop.update(problem, x, state, generator, iteration)

    def point(self, state: LowerState) -> Tree:
        return self.loop.point(state)


def warm_start(loop, problem, x: Tree, state: LowerState, steps: int, generator) -> LowerState:
    """Initialization refinement: ``steps`` single steps of ``loop`` at the fixed x0."""
    inner = loop.loop if isinstance(loop, Periodic) else loop
    single = replace(inner, steps=1)
    for _ in range(steps):
        state = single.update(problem, x, state, generator)
    return state
