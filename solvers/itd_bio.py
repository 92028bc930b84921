"""ITD-BiO: iterative differentiation through the unrolled lower loop.

Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021
(building on Maclaurin et al. 2015 and Franceschi et al. 2017).

    y_t^0 = y_{t-1}^K  (warm start),  y_t^{k+1} = y_t^k - lower_lr_t grad_y g(x_t, y_t^k; fresh batch)
    h_t     = d/dx f(x_t, y_t^K(x_t))      (reverse mode through the K = inner_steps steps;
                                            only the last ``truncate`` steps when set)
    x_{t+1} = x_t - upper_lr h_t

Cost per iteration: K lower gradients, one HVP and one cross product per differentiated step
(the reverse pass), one upper gradient.
"""
from dataclasses import dataclass
from typing import Optional

from bilevel import lower, upper
from bilevel.hypergrad import itd
from bilevel.registry import register_solver
from bilevel.schedules import at
from bilevel.solver import Solver, State
from bilevel.validation import check_positive


@register_solver("itd-bio", paper="Ji, Yang, Liang. Bilevel Optimization: Convergence Analysis and Enhanced Design. ICML 2021")
@dataclass
class ITDBiO(Solver):
    """Reverse-mode differentiation through K warm-started lower SGD steps, SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    inner_steps: int = 10
    truncate: Optional[int] = None

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")

    def init(self, problem, x, y, generator):
        return State(x=x, lower=lower.SGD(self.lower_lr).init(y), iteration=0, generator=generator,
                     upper=upper.sgd(self.upper_lr).init(x))

    def step(self, problem, s):
        lower_batches = [problem.sample("lower", s.generator) for _ in range(self.inner_steps)]
        h, y_last = itd(problem, s.x, s.lower.y, problem.sample("upper", s.generator), lower_batches,
                        lr=at(self.lower_lr, s.iteration), truncate=self.truncate)
        direction, upper_state = upper.sgd(self.upper_lr).update(h, s.upper)
        return s._replace(x=upper.apply(s.x, direction), lower=s.lower._replace(y=y_last),
                          upper=upper_state, iteration=s.iteration + 1)
