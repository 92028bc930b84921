"""BLISS: bilevel influence scoring for data selection (the bilevel phase).

Hao et al. "BLISS: A Lightweight Bilevel Influence Scoring Method for Data Selection in Language
Model Pretraining." ICML 2026 (arXiv:2510.06048); official code
MingruiLiu-ML-Lab/BLISS-Bilevel-Data-Selection, ``src/select_data/bilevel_selection.py``.

One outer iteration t (x the score model, y the proxy; problem ``data-selection``):

    y     <- K clipped AdamW steps on g(x_t, .), a fresh lower batch each      (lr lower_lr_t)
    b      = grad_y f(y; upper batch)
    z_0    = 0;  z_{q+1} = z_q - z_lr clip_each(H z_q + damping z_q - b)      q < z_steps
             (H = d2_yy g(x_t, y; one fresh lower batch B); clip_each: every tensor of the
             direction scaled to norm <= z_clip)
    h_t    = -d2_xy g(x_t, y; B) . z                    (grad_x f = 0 on this problem)
           = -grad_x sum_i P_i(x) <grad_y CE_i(y), z>   (the cross product, no per-sample loop)
    x_{t+1} = AdamW(x_t, clip_each(h_t, upper_clip))                          (lr upper_lr_t)

with cosine step sizes (warm-up 10 % of ``total_steps``) on both levels when ``total_steps`` is
set. The Hessian and the cross product share batch B, as in the official code (its cross term is
a loop over the same micro-batch); z starts from zero at every outer step (the official code
restarts it too, from the constant 1/numel).

Defaults: the official ``scripts/run.sh`` values (K = inner_steps 5, z_steps 3, z_lr 1e-2,
damping 1e-2, clip 1.0, AdamW betas (0.9, 0.95), weight decay 0.1 on both levels, gamma and reg
in the problem) except the step sizes, scaled for small models as the BLISS reduction plan says:
the official 1e-5 on both levels suits a 160M proxy; 1e-3 (lower) and 1e-4 (upper) here.

``previous_normalizer`` (off by default) reproduces an official-code quirk: the K lower steps
use weights exp(s_i - L) with L the log-sum-exp of the previous outer step's scores on its
Hessian batch (so they need not sum to one); the first step uses the exact softmax. (The
official code also uses those weights in the Hessian; here the Hessian and the cross product
always use the exact softmax, so that h_t is the implicit hypergradient of g as defined.)

Cost per outer iteration: K lower gradients, one upper gradient, z_steps HVPs and one cross
product on one shared graph (one lower forward).
"""
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from bilevel import linear_system, upper
from bilevel.batches import LowerBatches
from bilevel.hypergrad import implicit
from bilevel.lower_adamw import AdamW, AdamWState
from bilevel.registry import register_solver
from bilevel.schedules import at, cosine
from bilevel.solver import Solver
from bilevel.tree import Tree
from bilevel.validation import check_count, check_positive, check_unit


class BLISSState(NamedTuple):
    """x, the proxy's AdamW state, the upper transform's state, and L (the previous outer step's
    log-sum-exp of the scores, used only with ``previous_normalizer`` and from t = 1 on; 0 before)."""
    x: Tree
    lower: AdamWState
    upper: Any
    log_normalizer: torch.Tensor

    @property
    def y(self) -> Tree:
        return self.lower.y


class BLISSBatches(NamedTuple):
    """Iteration t's draws in the algorithm's order: the K lower batches, the upper batch, the
    Hessian batch and the cross batch (the Hessian batch itself when shared)."""
    t: int
    lower: LowerBatches
    upper: Any
    hessian: Any
    cross: Any


@register_solver("bliss", paper="Hao et al. BLISS: A Lightweight Bilevel Influence Scoring Method for Data Selection in Language Model Pretraining. ICML 2026")
@dataclass
class BLISS(Solver):
    """K AdamW steps on y, a damped few-step linear solve from zero, AdamW on x."""
    upper_lr: Any = 1e-4
    lower_lr: Any = 1e-3
    inner_steps: int = 5
    z_steps: int = 3
    z_lr: Any = 1e-2
    damping: float = 1e-2
    z_clip: float = 1.0
    upper_clip: float = 1.0
    lower_clip: float = 1.0
    beta: float = 0.9
    beta_sq: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    #: cosine schedules with 10 % warm-up over this many outer steps on both levels (None: constant)
    total_steps: Optional[int] = None
    warmup_fraction: float = 0.1
    share_lower_batch: bool = True
    previous_normalizer: bool = False

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr", "z_lr", "z_clip", "upper_clip", "lower_clip")
        check_count(self, "inner_steps", minimum=1)
        check_count(self, "z_steps", minimum=0)
        check_unit(self, "beta")
        check_unit(self, "beta_sq")
        for name in ("damping", "weight_decay", "adam_eps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.total_steps is not None:
            check_count(self, "total_steps", minimum=1)
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction!r}")

    def _schedule(self, lr):
        if self.total_steps is None or callable(lr):
            return lr
        return cosine(lr, self.total_steps, self.warmup_fraction)

    def lower_loop(self) -> AdamW:
        return AdamW(self._schedule(self.lower_lr), steps=self.inner_steps, b1=self.beta, b2=self.beta_sq,
                     eps=self.adam_eps, weight_decay=self.weight_decay, clip_norm=self.lower_clip)

    def upper_update(self):
        return upper.chain(upper.clip_per_tensor(self.upper_clip),
                           upper.adamw(self._schedule(self.upper_lr), self.beta, self.beta_sq, self.adam_eps,
                                       self.weight_decay))

    def linear_solve(self, iteration: int = 0):
        """The damped, clipped z steps from zero at outer iteration ``iteration``."""
        lr = at(self.z_lr, iteration)

        def solve(matvec, b):
            return linear_system.linear_sgd(matvec, b, steps=self.z_steps, lr=lr, damping=self.damping,
                                            clip=self.z_clip)
        return solve

    def init(self, problem, x, y, generator):
        if self.previous_normalizer and not hasattr(problem, "with_log_normalizer"):
            raise ValueError(f"previous_normalizer=True needs a problem with with_log_normalizer() (data-selection); "
                             f"got {type(problem).__name__}")
        first = next(iter(x.values()))
        core = BLISSState(x=x, lower=self.lower_loop().init(y), upper=self.upper_update().init(x),
                          log_normalizer=torch.zeros((), dtype=first.dtype, device=first.device))
        return self.start(core, generator)

    def sample(self, problem, t, generator) -> BLISSBatches:
        lower = self.lower_loop().sample(problem, t, generator)
        upper_batch = problem.sample("upper", generator)
        hessian = problem.sample("lower", generator)
        cross = hessian if self.share_lower_batch else problem.sample("lower", generator)
        return BLISSBatches(t, lower, upper_batch, hessian, cross)

    def update(self, problem, s: BLISSState, batches: BLISSBatches) -> BLISSState:
        quirk = self.previous_normalizer and batches.t > 0
        view = problem.with_log_normalizer(s.log_normalizer) if quirk else problem
        lower_state = self.lower_loop().update(view, s.x, s.lower, batches.lower)
        h, _ = implicit(problem, s.x, lower_state.y, batches.upper, batches.hessian, batches.cross,
                        self.linear_solve(batches.t))
        direction, upper_state = self.upper_update().update(h, s.upper, t=batches.t, params=s.x)
        log_normalizer = s.log_normalizer
        if self.previous_normalizer:
            with torch.no_grad():
                log_normalizer = torch.logsumexp(problem.batch_scores(s.x, batches.cross), 0)
        return BLISSState(x=upper.apply(s.x, direction), lower=lower_state, upper=upper_state,
                          log_normalizer=log_normalizer)
