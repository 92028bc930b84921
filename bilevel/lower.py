"""Lower-level loops: how y tracks y*(x) = argmin_y g(x, y).

Each loop is a small object with ``init(y) -> LowerState``, ``update(problem, x, state,
generator, iteration) -> LowerState`` (one call per outer iteration) and ``point(state)``, the
iterate at which hypergradients are evaluated. Every SGD step draws a fresh lower batch. Step
sizes ``lr`` are numbers or schedules ``t -> lr_t`` of the outer iteration t (see
:mod:`bilevel.schedules`).

* :class:`SGD`       k steps  y <- y - lr grad_y g(x, y; fresh batch).
* :class:`Nesterov`  stochastic Nesterov accelerated gradient with averaging (AccBO):
                         ``steps`` times  w = y + gamma (y - y_prev),  y_prev <- y,  y <- w - lr grad_y g(x, w)
                         then once        y_avg <- (1 - tau) y_avg + tau y          point = y_avg
* :class:`Periodic`  runs another loop only when iteration % period == 0 (BO-REP); on the other
                     iterations it calls the loop's ``idle(state)`` when it has one (Nesterov: the
                     averaging alone), so per-outer-iteration bookkeeping is never skipped.
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


@dataclass(frozen=True)
class SGD:
    """``steps`` SGD steps per outer iteration with step size ``lr`` (number or schedule)."""
    lr: Any
    steps: int = 1

    def init(self, y: Tree) -> LowerState:
        return LowerState(y=tree.clone(y))

    def update(self, problem, x, state: LowerState, generator, iteration: int = 0) -> LowerState:
        lr = at(self.lr, iteration)
        return state._replace(y=sgd_steps(problem, x, state.y, lr=lr, steps=self.steps, generator=generator))

    def point(self, state: LowerState) -> Tree:
        return state.y


@dataclass(frozen=True)
class Nesterov:
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

    def init(self, y: Tree) -> LowerState:
        return LowerState(y=tree.clone(y), y_prev=tree.clone(y), y_avg=tree.clone(y))

    def update(self, problem, x, state: LowerState, generator, iteration: int = 0) -> LowerState:
        y, y_prev, y_avg = state
        lr = at(self.lr, iteration)
        for _ in range(self.steps):
            w = tree.map(lambda a, b: a + self.momentum * (a - b), y, y_prev)
            y_prev, y = y, sgd_step(problem, x, w, lr, generator)
        return self.idle(LowerState(y, y_prev, y_avg))

    def idle(self, state: LowerState) -> LowerState:
        """The once-per-outer-iteration averaging yhat <- (1 - tau) yhat + tau y, no SNAG step."""
        return state._replace(y_avg=tree.lerp(state.y_avg, state.y, self.averaging))

    def point(self, state: LowerState) -> Tree:
        return state.y_avg


@dataclass(frozen=True)
class Periodic:
    """Run ``loop`` only on iterations t with t % period == 0 (BO-REP's periodic updates); on the
    others call ``loop.idle(state)`` when the loop defines it (else the state is unchanged)."""
    loop: Any
    period: int = 1

    def __post_init__(self):
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period}")

    def init(self, y: Tree) -> LowerState:
        return self.loop.init(y)

    def update(self, problem, x, state: LowerState, generator, iteration: int = 0) -> LowerState:
        if iteration % self.period:
            idle = getattr(self.loop, "idle", None)
            return state if idle is None else idle(state)
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
