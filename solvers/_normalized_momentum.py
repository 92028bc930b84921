"""The parts BO-REP and SLIP share: a hypergradient by Neumann series or linear-system SGD, and
the normalized-momentum upper step

    m_t = beta m_{t-1} + (1 - beta) h_t,        x_{t+1} = x_t - upper_lr m_t / ||m_t||

(``normalization``: one norm over all upper tensors, "global", or one per tensor, "per_tensor").
Subclasses choose the lower loop; see solvers/borep.py and solvers/slip.py for the defaults'
sources. The Neumann series makes ``neumann_steps`` Hessian-vector products, each on a fresh
lower batch (``fresh_hessian_batches=False``: one batch); ``neumann_lr`` and ``z_lr`` accept
"auto" (1/L of a batch Hessian, estimated after the warm start; bilevel.spectrum). With
hypergradient="linear_sgd", ``z_radius`` (default None) projects z onto {||z|| <= z_radius}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from bilevel import upper
from bilevel.estimators import LinearSystemSGD, Neumann
from bilevel.linear_system import NEUMANN_VARIANTS
from bilevel.solver import ComposedSolver
from bilevel.validation import check_choice, check_count, check_positive, check_positive_or_auto, check_radius, check_unit

HYPERGRADIENTS = ("neumann", "linear_sgd")


@dataclass
class NormalizedMomentumSolver(ComposedSolver):
    """Neumann (default) or linear-system-SGD hypergradient, normalized momentum on x."""
    upper_lr: float = 5e-2
    lower_lr: float = 5e-2
    beta: float = 0.9
    warm_steps: int = 3
    hypergradient: str = "neumann"
    neumann_steps: int = 10
    neumann_lr: Any = "auto"
    neumann_variant: str = "sum"
    z_lr: Any = 1e-2
    normalization: str = "global"
    share_lower_batch: bool = False
    fresh_hessian_batches: bool = True
    z_radius: Optional[float] = None

    def __post_init__(self):
        check_unit(self, "beta")
        check_positive(self, "upper_lr", "lower_lr")
        check_positive_or_auto(self, "neumann_lr", "z_lr")
        check_count(self, "neumann_steps", minimum=0)
        check_count(self, "warm_steps", minimum=0)
        check_choice(self, "hypergradient", HYPERGRADIENTS)
        check_choice(self, "neumann_variant", NEUMANN_VARIANTS)
        check_choice(self, "normalization", upper.NORMALIZATIONS)
        check_radius(self, "z_radius")
        if self.z_radius is not None and self.hypergradient != "linear_sgd":
            raise ValueError(f"z_radius={self.z_radius!r} projects the z of hypergradient='linear_sgd'; with "
                             f"hypergradient={self.hypergradient!r} there is no z (leave z_radius None)")

    @property
    def auto_steps(self):
        """Only the step of the hypergradient in use is estimated when "auto"."""
        return ("z_lr",) if self.hypergradient == "linear_sgd" else ("neumann_lr",)

    def estimator(self):
        if self.hypergradient == "linear_sgd":
            return LinearSystemSGD(lr=self.z_lr, steps=1, radius=self.z_radius)
        return Neumann(lr=self.neumann_lr, steps=self.neumann_steps, variant=self.neumann_variant,
                       resample=self.fresh_hessian_batches)

    def upper_update(self):
        return upper.chain(upper.ema(self.beta), upper.normalize(self.normalization), upper.scale(self.upper_lr))
