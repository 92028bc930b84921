"""F2SA: fully first-order stochastic approximation for bilevel optimization (no HVPs).

Kwon, Kwon, Wright, Nowak. A Fully First-Order Method for Stochastic Bilevel Optimization.
ICML 2023 (arXiv 2301.10945).

Penalty reformulation: with L_lambda(x) = min_y [f(x, y) + lambda g(x, y)] - lambda min_z g(x, z),

    grad L_lambda(x) = grad_x f(x, y_lambda) + lambda (grad_x g(x, y_lambda) - grad_x g(x, z*)),

which tends to grad Phi(x) as lambda grows. Two lower copies: z tracks z*(x) = argmin g(x, .) and
y tracks y_lambda(x) = argmin f(x, .) + lambda g(x, .) (the paper's names). At outer iteration t,
with gamma_t = lower_lr / (t+1)^lower_lr_decay, alpha_t = lower_lr / (t+1)^penalty_lr_decay and
xi_t = upper_lr / (t+1)^upper_lr_decay:

    repeat inner_steps times (fresh batches for every gradient, drawn in benchopt's order:
    lower batch b1, lower batch b2, upper batch b3):
        y <- y - alpha_t (grad_y f(x_t, y; b3) + lambda_t grad_y g(x_t, y; b1))
        z <- z - gamma_t grad_y g(x_t, z; b2)
    with an upper batch b4 and lower batches b5, b6 (in that order):
    h_t = grad_x f(x_t, y; b4) + lambda_t (grad_x g(x_t, y; b5) - grad_x g(x_t, z; b6))
    x_{t+1} = x_t - xi_t h_t
    lambda_{t+1} = lambda_t + delta_lambda / (t+1)^lambda_decay

The y step is on f + lambda g, as in the paper's algorithm box (alpha_k (h_fy + lambda_k h_gy)) and
the benchopt code, not on f / lambda + g: the effective step on g is alpha_t lambda_t. The outer
step is a separate upper_lr (benchopt's step_size/outer_ratio) rather than the paper's ratio xi
times alpha_k. Each gradient is asked only for the variable it moves (grad_y in the loop,
grad_x in h_t): nothing is computed and discarded.

Multiplier: this follows benchopt, not the paper's rate. With the default lambda_decay = 1/7,
lambda_t = lambda0 + delta_lambda sum_{s=1}^{t} s^{-1/7} ~ (7/6) delta_lambda t^{6/7}, so the
effective step on g, alpha_t lambda_t ~ t^{1/7}, grows slowly (benchopt's f2sa.py takes
1/7, the exponent of lambda itself in the paper, as the exponent of its increments). The
paper's stochastic step-size design (alpha_k ~ k^{-5/7}, gamma_k ~ k^{-4/7}) lets lambda_k grow
like k^{1/7}, so that alpha_k lambda_k ~ k^{-4/7} decays like gamma_k; lambda_decay = 6/7 gives that rate
(increments delta_lambda / (t+1)^{6/7}, lambda_t ~ 7 delta_lambda t^{1/7}). Benchopt is the
default because the other defaults and the benchmark numbers this solver is compared with are
benchopt's.

State (:class:`F2SAState`): ``y`` is z, the lower solution (what ``point`` returns and metrics
such as inner_distance see, as benchopt reports); ``penalized`` is the penalized copy y;
``multiplier`` is lambda_t, a 0-d float64 tensor (the Python float arithmetic of the schedule,
exactly). Both copies start at y_0.

Defaults: benchopt bilevel benchmark's f2sa.py (github.com/benchopt/benchmark_bilevel) for
lambda0 1, inner_steps 10 and the decays 5/7 for the penalized copy (benchopt's inner_var), 4/7
for the lower copy (its inner_approx_star), 4/7 outer, 1/7 for the lambda increments. The steps
and the increment are the library's: step 0.1, ratio 1 (upper_lr = lower_lr = 0.1) and
delta_lambda 0.01. Benchopt's solver-file values (step 0.01, delta_lambda 0.1) diverge on a
well-conditioned quadratic (lower Hessian eigenvalues in [0.5, 1]: ||grad Phi||^2 from 9.5 to
about 900 in 3000 steps, three seeds), because lambda grows faster than the slowly stepped lower
copy z converges and h_t carries lambda_t (grad_x g(y) - grad_x g(z)); with the library's values
the same runs cut ||grad Phi||^2 240x to 880x. A step size may instead be a schedule (bilevel.schedules), used
as given: a schedule for lower_lr then sets both gamma_t and alpha_t (the decays are ignored).

Cost per iteration: 2 inner_steps + 2 lower gradients, inner_steps + 1 upper gradients, no HVP;
each one with respect to one variable only (bilevel.oracles.grad_upper_y, grad_lower_x, ...).
"""
from dataclasses import dataclass
from typing import Any, NamedTuple, Tuple

import torch

from bilevel import oracles, tree, upper
from bilevel.registry import register_solver
from bilevel.solver import Solver
from bilevel.tree import Tree
from bilevel.schedules import at, decayed
from bilevel.validation import check_count, check_exponent, check_positive


class F2SAState(NamedTuple):
    """x, the lower copy z (``y``, the point), the penalized copy, lambda_t and the upper state."""
    x: Tree
    y: Tree
    penalized: Tree
    multiplier: torch.Tensor
    upper: Any


class F2SABatches(NamedTuple):
    """Iteration t's batches: (b1, b2, b3) per inner step, then b4 (upper), b5, b6 (lower)."""
    t: int
    inner: Tuple[Tuple[Any, Any, Any], ...]
    upper: Any
    lower_penalized: Any
    lower_solution: Any


@register_solver("f2sa", paper="Kwon, Kwon, Wright, Nowak. A Fully First-Order Method for Stochastic Bilevel Optimization. ICML 2023")
@dataclass
class F2SA(Solver):
    """Penalty method with two lower copies (lower solution and penalized); first order only."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    inner_steps: int = 10
    lambda0: float = 1.0
    delta_lambda: float = 0.01
    lower_lr_decay: float = 4 / 7
    penalty_lr_decay: float = 5 / 7
    upper_lr_decay: float = 4 / 7
    lambda_decay: float = 1 / 7

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr", "lambda0")
        check_count(self, "inner_steps")
        check_exponent(self, "delta_lambda", "lower_lr_decay", "penalty_lr_decay", "upper_lr_decay", "lambda_decay")

    def init(self, problem, x, y, generator):
        device = next(iter(x.values())).device if x else None
        multiplier = torch.tensor(float(self.lambda0), dtype=torch.float64, device=device)
        return self.start(F2SAState(x=x, y=tree.clone(y), penalized=tree.clone(y), multiplier=multiplier,
                                    upper=self._upper().init(x)), generator)

    def sample(self, problem, t, gen) -> F2SABatches:
        inner = tuple((problem.sample("lower", gen), problem.sample("lower", gen), problem.sample("upper", gen))
                      for _ in range(self.inner_steps))
        b4, b5, b6 = problem.sample("upper", gen), problem.sample("lower", gen), problem.sample("lower", gen)
        return F2SABatches(t, inner, b4, b5, b6)

    def update(self, problem, s: F2SAState, batches: F2SABatches) -> F2SAState:
        t, lam, x = batches.t, s.multiplier, s.x
        alpha = at(decayed(self.lower_lr, self.penalty_lr_decay), t)
        gamma = at(decayed(self.lower_lr, self.lower_lr_decay), t)
        y, z = s.penalized, s.y
        for b1, b2, b3 in batches.inner:
            grad_y = tree.axpy(lam, oracles.grad_lower_y(problem, x, y, b1), oracles.grad_upper_y(problem, x, y, b3))
            y, z = tree.axpy(-alpha, grad_y, y), tree.axpy(-gamma, oracles.grad_lower_y(problem, x, z, b2), z)
        h = tree.axpy(lam, tree.sub(oracles.grad_lower_x(problem, x, y, batches.lower_penalized),
                                    oracles.grad_lower_x(problem, x, z, batches.lower_solution)),
                      oracles.grad_upper_x(problem, x, y, batches.upper))
        direction, upper_state = self._upper().update(h, s.upper, t=t)
        return F2SAState(x=upper.apply(x, direction), y=z, penalized=y,
                         multiplier=lam + self.delta_lambda / (t + 1) ** self.lambda_decay, upper=upper_state)

    def _upper(self):
        return upper.sgd(decayed(self.upper_lr, self.upper_lr_decay))
