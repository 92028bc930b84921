"""Lower-only baseline: x stays at x_0; y is trained on g(x_0, .) by SGD.

    y_{t+1} = inner_steps SGD steps on g(x_0, .) from y_t,     x_{t+1} = x_0

The reference every bilevel method must beat: for hyper-cleaning it is plain training on the
noisy set with uniform weights ("no cleaning"). Cost: inner_steps lower gradients per iteration.
"""
from dataclasses import dataclass

from bilevel import lower
from bilevel.registry import register_solver
from bilevel.solver import Solver, State


@register_solver("lower-only", paper="baseline (no upper-level update)")
@dataclass
class LowerOnly(Solver):
    """Baseline: train y with x frozen at its initial value (e.g. no data cleaning)."""
    lower_lr: float = 0.1
    inner_steps: int = 1

    def init(self, problem, x, y, generator):
        return State(x=x, lower=lower.SGD(self.lower_lr).init(y), iteration=0, generator=generator)

    def step(self, problem, s):
        loop = lower.SGD(self.lower_lr, self.inner_steps)
        return s._replace(lower=loop.update(problem, s.x, s.lower, s.generator, s.iteration), iteration=s.iteration + 1)
