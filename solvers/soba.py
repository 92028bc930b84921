"""SOBA: stochastic single-loop bilevel optimization with a warm-started linear-system variable.

Dagreou, Ablin, Vaiter, Moreau. A framework for bilevel optimization that enables stochastic and
global variance reduction algorithms. NeurIPS 2022.

With a lower batch i and an upper batch j drawn each iteration, and all directions taken at the
current (x_t, y_t, z_t):

    D_y = grad_y g(x_t, y_t; i)
    D_z = d2_yy g(x_t, y_t; i) . z_t - grad_y f(x_t, y_t; j)
    D_x = grad_x f(x_t, y_t; j) - d2_xy g(x_t, y_t; i) . z_t
    y_{t+1} = y_t - lower_lr D_y,   z_{t+1} = z_t - z_lr D_z,   x_{t+1} = x_t - upper_lr D_x

(z here is -v of the paper.) D_y, the HVP and the cross product come from one double-backward
pass on batch i, as in the benchopt implementation. Cost per iteration: one lower gradient, one
HVP, one cross product, one upper gradient.
"""
from dataclasses import dataclass

from bilevel import lower, oracles, tree, upper
from bilevel.registry import register_solver
from bilevel.solver import Solver, State


@register_solver("soba", paper="Dagreou, Ablin, Vaiter, Moreau. A framework for bilevel optimization that enables stochastic and global variance reduction algorithms. NeurIPS 2022")
@dataclass
class SOBA(Solver):
    """Single loop: simultaneous SGD steps on y, on the linear-system variable z, and on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    z_lr: float = 0.1

    def init(self, problem, x, y, generator):
        return State(x=x, lower=lower.SGD(self.lower_lr).init(y), iteration=0, generator=generator,
                     estimator=tree.zeros_like(y), upper=upper.sgd(self.upper_lr).init(x))

    def step(self, problem, s):
        lower_batch = problem.sample("lower", s.generator)
        upper_batch = problem.sample("upper", s.generator)
        y, z = s.lower.y, s.estimator
        hz, cross_z, grad_y_g = oracles.hvp_and_cross(problem, s.x, y, z, lower_batch)
        grad_x_f, grad_y_f = oracles.grad_upper(problem, s.x, y, upper_batch)
        direction, upper_state = upper.sgd(self.upper_lr).update(tree.sub(grad_x_f, cross_z), s.upper)
        return s._replace(
            x=upper.apply(s.x, direction),
            lower=s.lower._replace(y=tree.axpy(-self.lower_lr, grad_y_g, y)),
            estimator=tree.axpy(-self.z_lr, tree.sub(hz, grad_y_f), z),
            upper=upper_state, iteration=s.iteration + 1)
