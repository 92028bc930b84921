"""A synthetic problem that is (L0, L1)-smooth but not L-smooth: Phi(x) = sum_i cosh(x_i).

    g(x, y; zeta) = 1/2 ||y - x||^2 + <zeta, y>         y*(x) = x (for the mean, zeta = 0)
    f(x, y; xi)   = sum_i cosh(y_i) + <xi, y>           Phi(x) = f(x, y*(x)) = sum_i cosh(x_i)

with zeta, xi ~ N(0, noise^2 I). Phi'' = cosh <= 1 + |sinh| = 1 + |Phi'| coordinate-wise, so Phi is
(L0, L1)-smooth with L0 = L1 = 1 (Zhang et al., ICLR 2020), but its curvature is unbounded:
from x0 = 6 (|grad Phi| = sinh 6 ~ 200) an un-normalized step of 0.1 overshoots to |x| ~ 14 and
the next one overflows. This is the regime that BO-REP, SLIP and AccBO (Hao, Gong, Liu 2024;
Gong, Hao, Liu 2024) are built for: their normalized upper steps have length upper_lr whatever
the gradient's size.

Metrics: grad_norm_sq = ||sinh(x)||^2 (exact), inner_distance = ||y - x||^2, x_norm.
"""
from typing import Optional

import torch

from bilevel.problem import BilevelProblem, check_level
from bilevel.registry import register_problem

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@register_problem("cosh", paper="synthetic (L0, L1)-smooth, not L-smooth, test problem (Zhang et al., ICLR 2020 smoothness class)")
class Cosh(BilevelProblem):
    """Synthetic unbounded-smoothness problem: Phi(x) = sum cosh(x_i), y*(x) = x."""
    name = "cosh"
    headline_metrics = ("grad_norm_sq", "x_norm")

    #: "tiny": the deterministic 1-d case; "paper": the noisy 3-d case of the unbounded-smoothness tests.
    PRESETS = {"tiny": {"dim": 1, "noise": None}, "paper": {"dim": 3, "noise": 0.1}}

    def __init__(self, dim: int = 3, x0: float = 6.0, noise: Optional[float] = 0.1, dtype: str = "float64"):
        """dim: size of x and y; x0: initial value of every x_i and y_i; noise: standard deviation
        of the Gaussian gradient noise of both losses (None or 0: deterministic)."""
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"cosh: option dim must be a positive integer, got {dim!r}")
        if noise is not None and noise < 0:
            raise ValueError(f"cosh: option noise must be >= 0, got {noise!r}")
        if dtype not in DTYPES:
            raise ValueError(f"cosh: option dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dim, self.x0, self.noise, self.dtype = dim, float(x0), noise or 0.0, DTYPES[dtype]

    def init(self, generator):
        start = torch.full((self.dim,), self.x0, dtype=self.dtype)
        return {"x": start.clone()}, {"y": start.clone()}

    def sample(self, level, generator):
        check_level(level)
        if not self.noise:
            return None
        return self.noise * torch.randn(self.dim, generator=generator, dtype=self.dtype)

    @staticmethod
    def _linear(batch, y):
        return 0.0 if batch is None else batch @ y

    def upper_loss(self, x, y, batch):
        return torch.cosh(y["y"]).sum() + self._linear(batch, y["y"])

    def lower_loss(self, x, y, batch):
        return 0.5 * ((y["y"] - x["x"]) ** 2).sum() + self._linear(batch, y["y"])

    def evaluate(self, x, y):
        return {"grad_norm_sq": float((torch.sinh(x["x"]) ** 2).sum()),
                "inner_distance": float(((y["y"] - x["x"]) ** 2).sum()),
                "x_norm": float(x["x"].norm())}
