"""A synthetic problem that is (L0, L1)-smooth but not L-smooth: Phi(x) = sum_i cosh(x_i).

    g(x, y; zeta) = 1/2 (y - x)^T A (y - x) + <zeta, y>   y*(x) = x (for the mean, zeta = 0)
    f(x, y; xi)   = sum_i cosh(y_i) + <xi, y>             Phi(x) = f(x, y*(x)) = sum_i cosh(x_i)

A is the identity by default (``lower_condition=1``). With ``lower_condition=kappa > 1`` it is a
fixed well-conditioned SPD matrix A = U diag(lambda) U^T, U a seeded random rotation and lambda
geometric from kappa^{-1/2} to kappa^{1/2} (condition number kappa, det A = 1). Phi and its
gradient are unchanged (grad Phi = -d2_xy g [d2_yy g]^{-1} grad_y f = A A^{-1} sinh(x) = sinh(x)),
but the lower level is no longer trivial: SGD on y contracts at rates 1 - lr lambda_i, and a
hypergradient estimator must actually invert A (a Neumann series with step lr leaves the factor
(I - lr A)^Q on the implicit term).

with zeta, xi drawn uniformly from fixed tables of ``n_noise`` perturbations per level: Gaussian
N(0, noise^2 I) draws, centred so that each table averages to exactly zero. The problem is thus a
finite sum (``n_samples``; SAGA-type solvers apply) whose mean is the noiseless problem, and a batch
is a LongTensor of table rows (the loss uses their mean perturbation). Phi'' = cosh <= 1 + |sinh| = 1 + |Phi'| coordinate-wise, so Phi is
(L0, L1)-smooth with L0 = L1 = 1 (Zhang et al., ICLR 2020), but its curvature is unbounded:
from x0 = 6 (|grad Phi| = sinh 6 ~ 200) an un-normalized step of 0.1 overshoots to |x| ~ 14 and
the next one overflows. This is the regime that BO-REP, SLIP and AccBO (Hao, Gong, Liu 2024;
Gong, Hao, Liu 2024) are built for: their normalized upper steps have length upper_lr whatever
the gradient's size.

Metrics: grad_norm_sq = ||sinh(x)||^2 (exact), inner_distance = ||y - x||^2, x_norm.
experiments/unbounded_smoothness.py measures the iterations each method needs from x0 = 4, 8, 12.
"""
from typing import Optional

import torch

from bilevel.problem import BilevelProblem, check_level
from bilevel.registry import register_problem

from .options import check_dtype, check_int, check_real
from .runs import default_run

NAME = "cosh"


@register_problem(NAME, paper="synthetic (L0, L1)-smooth, not L-smooth, test problem (Zhang et al., ICLR 2020 smoothness class)")
class Cosh(BilevelProblem):
    """Synthetic unbounded-smoothness problem: Phi(x) = sum cosh(x_i), y*(x) = x, lower Hessian A."""
    name = NAME
    headline_metrics = ("grad_norm_sq", "x_norm")

    #: "tiny": the deterministic 1-d case; "paper": the noisy 3-d case of the unbounded-smoothness tests.
    PRESETS = {"tiny": {"dim": 1, "noise": None}, "paper": {"dim": 3, "noise": 0.1}}

    #: Default run of ``bilevel run problem=cosh preset=tiny`` (bilevel.config.default_run). At
    #: x0 = 6, cosh'' = cosh(6) = 202: a gradient step is stable only for upper_lr < 2/202, hence
    #: 0.005 for the SGD-type solvers (their default 0.1 overflows: the point of this problem);
    #: normalized steps of length 0.05 need no such care. Measured (seed 0): ||Phi'||^2 4.1e4
    #: (lower-only) -> 0.01-0.7.
    RUNS = {
        "tiny": default_run(steps=200, eval_every=20, solver_options={
            "lower-only": dict(lower_lr=0.5),
            "soba": dict(upper_lr=0.005, lower_lr=0.5, z_lr=0.5),
            "stocbio": dict(upper_lr=0.005, lower_lr=0.5),
            "aid-cg": dict(upper_lr=0.005, lower_lr=0.5),
            "bo-rep": dict(upper_lr=0.05, lower_lr=0.5),
            "slip": dict(upper_lr=0.05, lower_lr=0.5)}),
    }

    def __init__(self, dim: int = 3, x0: float = 6.0, noise: Optional[float] = 0.1, n_noise: int = 1000,
                 seed: int = 0, dtype: str = "float64", lower_condition: float = 1.0):
        """dim: size of x and y; x0: initial value of every x_i and y_i; noise: standard deviation
        of the Gaussian gradient noise of both losses (None or 0: deterministic); n_noise: rows of
        each level's perturbation table; seed: seed of the tables (and of A's rotation);
        lower_condition: condition number kappa >= 1 of the lower Hessian A (1: the identity)."""
        check_int(NAME, "dim", dim)
        check_real(NAME, "noise", noise, 0.0, include_low=True, allow_none=True, rule="a number >= 0 or None")
        check_int(NAME, "n_noise", n_noise)
        check_real(NAME, "x0", x0, rule="a finite number")
        self.lower_condition = check_real(NAME, "lower_condition", lower_condition, 1.0, include_low=True,
                                          rule="a finite number >= 1")
        self.dim, self.x0, self.noise, self.dtype = dim, float(x0), noise or 0.0, check_dtype(NAME, dtype)
        self.n_noise = n_noise
        generator = torch.Generator().manual_seed(seed)
        self.tables = {}
        for level in ("upper", "lower"):
            table = self.noise * torch.randn(n_noise, dim, generator=generator, dtype=self.dtype,
                                             device=generator.device)
            self.tables[level] = table - table.mean(dim=0) if n_noise > 1 else torch.zeros_like(table)
        self.A = None if self.lower_condition == 1.0 else self._hessian(generator)

    def _hessian(self, generator) -> torch.Tensor:
        """U diag(kappa^{-1/2} ... kappa^{1/2}) U^T, U from the QR of a Gaussian matrix."""
        half = 0.5 * torch.log(torch.tensor(self.lower_condition, dtype=self.dtype))
        eigenvalues = torch.exp(torch.linspace(-1.0, 1.0, self.dim, dtype=self.dtype) * half) if self.dim > 1 \
            else torch.ones(1, dtype=self.dtype)
        q, r = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=generator, dtype=self.dtype,
                                           device=generator.device))
        u = q * torch.sign(torch.diagonal(r))
        return (u * eigenvalues) @ u.T

    def init(self, generator):
        start = torch.full((self.dim,), self.x0, dtype=self.dtype, device=self.tables["lower"].device)
        return {"x": start.clone()}, {"y": start.clone()}

    def sample(self, level, generator):
        """One uniformly drawn row of the level's perturbation table; None when noiseless."""
        check_level(level)
        if not self.noise:
            return None
        return torch.randint(self.n_noise, (1,), generator=generator, device=generator.device)

    def n_samples(self, level: str) -> int:
        check_level(level)
        return self.n_noise

    def _linear(self, level, batch, y):
        """<mean perturbation of the batch's rows, y> (0 for the full sum, batch None)."""
        return 0.0 if batch is None else self.tables[level][batch].mean(dim=0) @ y

    def upper_loss(self, x, y, batch):
        return torch.cosh(y["y"]).sum() + self._linear("upper", batch, y["y"])

    def lower_loss(self, x, y, batch):
        d = y["y"] - x["x"]
        quadratic = (d ** 2).sum() if self.A is None else d @ self.A @ d
        return 0.5 * quadratic + self._linear("lower", batch, y["y"])

    def evaluate(self, x, y):
        return {"grad_norm_sq": float((torch.sinh(x["x"]) ** 2).sum()),
                "inner_distance": float(((y["y"] - x["x"]) ** 2).sum()),
                "x_norm": float(x["x"].norm())}
