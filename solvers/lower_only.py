"""Lower-only baseline: x stays at x_0; y is trained on g(x_0, .) by SGD.

    y_{t+1} = inner_steps SGD steps on g(x_0, .) from y_t,     x_{t+1} = x_0

The reference every bilevel method must beat: for hyper-cleaning it is plain training on the
noisy set with uniform weights ("no cleaning"). Cost: inner_steps lower gradients per iteration.
"""
from dataclasses import dataclass
from typing import NamedTuple

from bilevel import lower
from bilevel.batches import LowerBatches
from bilevel.registry import register_solver
from bilevel.solver import Solver
from bilevel.tree import Tree


class LowerOnlyState(NamedTuple):
    """The fixed x_0 and the lower loop's state."""
    x: Tree
    lower: lower.SGDState

    @property
    def y(self) -> Tree:
        return self.lower.y


@register_solver("lower-only", paper="baseline (no upper-level update)")
@dataclass
class LowerOnly(Solver):
    """Baseline: train y with x frozen at its initial value (e.g. no data cleaning)."""
    lower_lr: float = 0.1
    inner_steps: int = 1

    def loop(self) -> lower.SGD:
        return lower.SGD(self.lower_lr, self.inner_steps)

    def init(self, problem, x, y, generator):
        return self.start(LowerOnlyState(x=x, lower=self.loop().init(y)), generator)

    def sample(self, problem, t, generator) -> LowerBatches:
        return self.loop().sample(problem, t, generator)

    def update(self, problem, s: LowerOnlyState, batches: LowerBatches) -> LowerOnlyState:
        return s._replace(lower=self.loop().update(problem, s.x, s.lower, batches))
