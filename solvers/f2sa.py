"""F2SA: fully first-order stochastic approximation for bilevel optimization (no HVPs).

Kwon, Kwon, Wright, Nowak. A Fully First-Order Method for Stochastic Bilevel Optimization.
ICML 2023 (arXiv 2301.10945).

Penalty reformulation: with L_lambda(x) = min_y [f(x, y) + lambda g(x, y)] - lambda min_z g(x, z),

    grad L_lambda(x) = grad_x f(x, y_lambda) + lambda (grad_x g(x, y_lambda) - grad_x g(x, z*)),

which tends to grad Phi(x) as lambda grows. Two lower copies: z tracks z*(x) = argmin g(x, .) and
y tracks y_lambda(x) = argmin f(x, .) + lambda g(x, .) (the paper's names). At outer iteration t,
with gamma_t = lower_lr / (t+1)^lower_lr_decay, alpha_t = lower_lr / (t+1)^penalty_lr_decay and
xi_t = upper_lr / (t+1)^upper_lr_decay:

    repeat inner_steps times (fresh batches for every gradient):
        z <- z - gamma_t grad_y g(x_t, z)
        y <- y - alpha_t (grad_y f(x_t, y) + lambda_t grad_y g(x_t, y))
    h_t = grad_x f(x_t, y) + lambda_t (grad_x g(x_t, y) - grad_x g(x_t, z))
    x_{t+1} = x_t - xi_t h_t
    lambda_{t+1} = lambda_t + delta_lambda / (t+1)^lambda_decay

The y step is on f + lambda g, as in the paper's algorithm box (alpha_k (h_fy + lambda_k h_gy)) and
the benchopt code, not on f / lambda + g: the effective step on g is alpha_t lambda_t, which is why
alpha_t decays faster than gamma_t. All inner_steps z steps are drawn before the y steps (the two
loops are independent). The outer step is a separate upper_lr (benchopt's step_size/outer_ratio)
rather than the paper's ratio xi times alpha_k.

State: ``lower.y`` is z, the lower solution (what ``point`` returns and metrics such as
inner_distance see, as benchopt reports); ``estimator`` is the penalized copy y; ``extra`` is
lambda_t. Both copies start at y_0.

Defaults (benchopt bilevel benchmark f2sa.py, research/peers.md section 3.3): step 0.01, ratio 1
(upper_lr = lower_lr = 0.01), lambda0 1, delta_lambda 0.1, inner_steps 10; decays 5/7 for the
penalized copy (benchopt's inner_var), 4/7 for the lower copy (its inner_approx_star), 4/7 outer,
1/7 for the lambda increments. A step size may instead be a schedule (bilevel.schedules), used
as given: a schedule for lower_lr then sets both gamma_t and alpha_t (the decays are ignored).

Cost per iteration: 2 inner_steps + 2 lower gradients, inner_steps + 1 upper gradients, no HVP.
"""
from dataclasses import dataclass

from bilevel import lower, oracles, tree, upper
from bilevel.registry import register_solver
from bilevel.solver import Solver, State
from bilevel.schedules import at, decayed
from bilevel.validation import check_count, check_exponent, check_positive


@register_solver("f2sa", paper="Kwon, Kwon, Wright, Nowak. A Fully First-Order Method for Stochastic Bilevel Optimization. ICML 2023")
@dataclass
class F2SA(Solver):
    """Penalty method with two lower copies (lower solution and penalized); first order only."""
    upper_lr: float = 0.01
    lower_lr: float = 0.01
    inner_steps: int = 10
    lambda0: float = 1.0
    delta_lambda: float = 0.1
    lower_lr_decay: float = 4 / 7
    penalty_lr_decay: float = 5 / 7
    upper_lr_decay: float = 4 / 7
    lambda_decay: float = 1 / 7

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr", "lambda0")
        check_count(self, "inner_steps")
        check_exponent(self, "delta_lambda", "lower_lr_decay", "penalty_lr_decay", "upper_lr_decay", "lambda_decay")

    def init(self, problem, x, y, generator):
        return State(x=x, lower=lower.SGD(self.lower_lr).init(y), iteration=0, generator=generator,
                     estimator=tree.clone(y), upper=self._upper().init(x), extra=float(self.lambda0))

    def step(self, problem, s):
        t, lam, gen = s.iteration, s.extra, s.generator
        z_loop = lower.SGD(decayed(self.lower_lr, self.lower_lr_decay), self.inner_steps)
        lower_state = z_loop.update(problem, s.x, s.lower, gen, t)
        y, alpha = s.estimator, at(decayed(self.lower_lr, self.penalty_lr_decay), t)
        for _ in range(self.inner_steps):
            _, grad_y_f = oracles.grad_upper(problem, s.x, y, problem.sample("upper", gen))
            grad_y_g = oracles.grad_lower_y(problem, s.x, y, problem.sample("lower", gen))
            y = tree.axpy(-alpha, tree.axpy(lam, grad_y_g, grad_y_f), y)
        z = lower_state.y
        grad_x_f, _ = oracles.grad_upper(problem, s.x, y, problem.sample("upper", gen))
        grad_x_g_y, _ = oracles.grad_lower(problem, s.x, y, problem.sample("lower", gen))
        grad_x_g_z, _ = oracles.grad_lower(problem, s.x, z, problem.sample("lower", gen))
        h = tree.axpy(lam, tree.sub(grad_x_g_y, grad_x_g_z), grad_x_f)
        direction, upper_state = self._upper().update(h, s.upper)
        return s._replace(x=upper.apply(s.x, direction), lower=lower_state, estimator=y, upper=upper_state,
                          extra=lam + self.delta_lambda / (t + 1) ** self.lambda_decay, iteration=t + 1)

    def _upper(self):
        return upper.sgd(decayed(self.upper_lr, self.upper_lr_decay))
