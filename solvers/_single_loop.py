"""The SOBA family's single loop: with a lower batch i and an upper batch j per iteration, all
directions at the current (x_t, y_t, z_t),

    D_y = grad_y g(x_t, y_t; i)
    D_z = d2_yy g(x_t, y_t; i) . z_t - grad_y f(x_t, y_t; j)
    D_x = grad_x f(x_t, y_t; j) - d2_xy g(x_t, y_t; i) . z_t
    y_{t+1} = y_t - lower_lr_t D_y
    z_{t+1} = Proj_{||z|| <= z_radius}(z_t - z_lr_t D_z)        (when z_radius is not None)
    x_{t+1} = x_t - upper_update(D_x)                          (upper_lr_t)

with each step size a number or a schedule of t (bilevel.schedules).

D_y, the HVP and the cross product come from one double-backward pass on batch i (as in the
benchopt implementation). Subclasses choose ``upper_update``: SGD for SOBA, a moving average for
MA-SOBA. Cost per iteration: one lower gradient, one HVP, one cross product, one upper gradient.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

from typing import NamedTuple

from bilevel import oracles, tree, upper
from bilevel.batches import SingleLoopBatches
from bilevel.linear_system import project_ball
from bilevel.schedules import StepSize, at
from bilevel.solver import Solver
from bilevel.tree import Tree
from bilevel.validation import check_positive


class SingleLoopState(NamedTuple):
    """x, y, the linear-system variable z (-v of the paper) and the upper transform's state."""
    x: Tree
    y: Tree
    z: Tree
    upper: object


@dataclass
class SingleLoopSolver(Solver):
    upper_lr: StepSize = 0.1
    lower_lr: StepSize = 0.1
    z_lr: StepSize = 0.1
    #: a class attribute, not a field: no projection of z unless a subclass declares the field
    z_radius = None

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr", "z_lr")

    @abc.abstractmethod
    def upper_update(self) -> upper.Transform:
        """How x moves along D_x."""

    def init(self, problem, x, y, generator):
        return self.start(SingleLoopState(x=x, y=tree.clone(y), z=tree.zeros_like(y),
                                          upper=self.upper_update().init(x)), generator)

    def sample(self, problem, t, generator) -> SingleLoopBatches:
        lower_batch = problem.sample("lower", generator)
        return SingleLoopBatches(t, lower_batch, problem.sample("upper", generator))

    def update(self, problem, s: SingleLoopState, batches: SingleLoopBatches) -> SingleLoopState:
        t, y, z = batches.t, s.y, s.z
        hz, cross_z, grad_y_g = oracles.hvp_and_cross(problem, s.x, y, z, batches.lower)
        grad_x_f, grad_y_f = oracles.grad_upper(problem, s.x, y, batches.upper)
        z = tree.axpy(-at(self.z_lr, t), tree.sub(hz, grad_y_f), z)
        if self.z_radius is not None:
            z = project_ball(z, self.z_radius)
        direction, upper_state = self.upper_update().update(tree.sub(grad_x_f, cross_z), s.upper, t=t)
        y = tree.axpy(-at(self.lower_lr, t), grad_y_g, y)
        return SingleLoopState(x=upper.apply(s.x, direction), y=y, z=z, upper=upper_state)
