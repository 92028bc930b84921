"""TTSA: two-timescale stochastic approximation, one lower SGD step per outer step.

Hong, Wai, Wang, Yang. A Two-Timescale Stochastic Algorithm Framework for Bilevel Optimization:
Complexity Analysis and Application to Actor-Critic. SIAM J. Optim. 33(1), 2023 (arXiv 2007.05170).

    b_t     = lower_lr / (t + 1)^lower_lr_decay,    a_t = upper_lr / (t + 1)^upper_lr_decay
    y_{t+1} = y_t - b_t grad_y g(x_t, y_t; fresh batch)
    q ~ U{0, ..., Q},   v_t = (Q + 1) eta prod_{j<=q} (I - eta H_j) grad_y f(x_t, y_{t+1})
                        (Q = neumann_steps, eta = neumann_lr; Ghadimi-Wang's estimator)
    h_t     = grad_x f(x_t, y_{t+1}) - d2_xy g(x_t, y_{t+1}) . v_t
    x_{t+1} = x_t - a_t h_t

Order: the lower step comes first and h_t is taken at y_{t+1}, as in the paper's Algorithm 1
(h_f^k estimates the surrogate gradient at (x^k, y^{k+1})) and in benchopt's ttsa.py. The
paper's projection of x onto a constraint set is omitted (x is unconstrained here). The upper,
Hessian and cross batches are independent draws, and each of the q Hessian products draws a
fresh batch H_j, as in Ghadimi and Wang's estimator (``fresh_hessian_batches=False``: one batch).
q and the batches come from the run's generator, in the order q, upper batch, the q Hessian
batches, cross batch.

Defaults: benchopt bilevel benchmark: step 0.1 for y and for x (outer_ratio 1), decay exponents
0.4 (y), 0 (Neumann, constant) and 0.6 (x) -- the two timescales b ~ t^{-2/5}, a ~ t^{-3/5} of
the paper's analysis -- and neumann_steps 9: benchopt's n_hia_steps 10 draws q from {0..9}.
The library's default neumann_lr "auto" is 1/L of a batch Hessian estimated after init
(bilevel.spectrum; Ghadimi and Wang take 1/L_g; benchopt uses 0.1, neumann_lr=0.1 reproduces it).
Any step size may instead be a schedule (bilevel.schedules; used as given, its ``*_decay`` then
ignored); neumann_lr is resolved at iteration t.

Compiled (``compile=True``): the random q is a tensor and the Neumann loop runs all Q products
with a mask (bilevel.masked_neumann.MaskedNeumann: the same v, the same draws), so the step is
one graph for every q; it then computes and counts Q HVPs per iteration instead of q.

Cost per iteration: one lower gradient, q HVPs (random, Q/2 on average), one cross product, one
upper gradient; init: 20 HVPs for the "auto" step.
"""
from dataclasses import dataclass
from typing import Any

from bilevel import lower, upper
from bilevel.masked_neumann import MaskedNeumann
from bilevel.registry import register_solver
from bilevel.schedules import decayed
from bilevel.solver import ComposedSolver

from bilevel.validation import check_count, check_exponent, check_positive, check_positive_or_auto


@register_solver("ttsa", paper="Hong, Wai, Wang, Yang. A Two-Timescale Stochastic Algorithm Framework for Bilevel Optimization: Complexity Analysis and Application to Actor-Critic. SIAM J. Optim. 2023")
@dataclass
class TTSA(ComposedSolver):
    """One decaying-step lower SGD step, randomized Neumann hypergradient, decaying-step SGD on x."""
    upper_lr: float = 0.1
    lower_lr: float = 0.1
    neumann_steps: int = 9
    neumann_lr: Any = "auto"
    lower_lr_decay: float = 0.4
    upper_lr_decay: float = 0.6
    share_lower_batch: bool = False
    fresh_hessian_batches: bool = True

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr")
        check_count(self, "neumann_steps", minimum=0)
        check_exponent(self, "lower_lr_decay", "upper_lr_decay")

    def lower_loop(self):
        return lower.SGD(decayed(self.lower_lr, self.lower_lr_decay), steps=1)

    def estimator(self):
        return MaskedNeumann(lr=self.neumann_lr, steps=self.neumann_steps, variant="randomized",
                       resample=self.fresh_hessian_batches)

    def upper_update(self):
        return upper.sgd(decayed(self.upper_lr, self.upper_lr_decay))
