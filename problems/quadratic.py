"""Stochastic quadratic bilevel problem of the benchopt bilevel benchmark.

Reference: Dagreou et al., "A framework for bilevel optimization that enables stochastic and
global variance reduction algorithms", NeurIPS 2022 (benchopt bilevel benchmark, dataset
``quadratic``). With outer variable x (dim_outer) and inner variable z (dim_inner), each sample
is the quadratic

    q(z, x; A, B, C, a, b) = 1/2 z^T A z + 1/2 x^T B x + x^T C z + a^T z + b^T x

    g(x, z) = mean_i q(z, x; A_i, B_i, C_i, a_i, b_i)         (lower loss, n_samples_inner)
    f(x, z) = mean_j q(z, x; F_j, H_j, K_j, f_j, h_j)         (upper loss, n_samples_outer)

Every per-sample matrix has rank one: A_i = r_i r_i^T, B_i = s_i s_i^T and C_i = p_i q_i^T, with
r_i = R1 g_i, E[A_i] = R1^2 of spectrum logspace(mu, L_inner), s_i likewise with one zero
eigenvalue, p_i = U3 D3 w_i and q_i = Vh3^T w_i (U3 D3 Vh3: a random SVD with singular values
logspace(mu, L_cross)). Only the factors are stored (n x d); mini-batch losses are means of
1/2 (r.z)^2 + 1/2 (s.x)^2 + (p.x)(q.z) + a.z + b.x. With full-batch means Abar, Cbar, ...:

    z*(x) = -Abar^{-1} (abar + Cbar^T x),     h(x) = f(x, z*(x)),
    grad h(x) = grad_x f(x, z*) + Cbar v*,    v* = -Abar^{-1} grad_z f(x, z*).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from bilevel.problem import BilevelProblem, check_level
from bilevel.registry import register_problem
from bilevel.sampling import SAMPLINGS, draw_indices

from .options import check_choice, check_dtype, check_int, check_real
from .runs import default_run

NAME = "quadratic"
MAX_TRIES = 20


class Quad(NamedTuple):
    """One quadratic q(z, x; A, B, C, a, b) with dense (mean) matrices; C is dim_outer x dim_inner."""
    A: Tensor
    B: Tensor
    C: Tensor
    a: Tensor
    b: Tensor

    def loss(self, x: Tensor, z: Tensor) -> Tensor:
        return 0.5 * z @ (self.A @ z) + 0.5 * x @ (self.B @ x) + x @ (self.C @ z) + self.a @ z + self.b @ x

    def grads(self, x: Tensor, z: Tensor):
        """(grad_x q, grad_z q)."""
        return self.B @ x + self.C @ z + self.b, self.A @ z + self.C.T @ x + self.a

    def to(self, dtype: torch.dtype) -> "Quad":
        return Quad(*(t.to(dtype) for t in self))


def _gram(u: Tensor) -> Tensor:
    """u^T u, made exactly symmetric (a matmul's rounding is not)."""
    m = u.T @ u
    return (m + m.T) / 2


class Samples(NamedTuple):
    """Rank-one factors of n per-sample quadratics (rows): A_i = r_i r_i^T, B_i = s_i s_i^T,
    C_i = p_i q_i^T, linear terms a_i, b_i."""
    r: Tensor
    s: Tensor
    p: Tensor
    q: Tensor
    a: Tensor
    b: Tensor

    def loss(self, x: Tensor, z: Tensor, idx: Tensor) -> Tensor:
        """Mean of the per-sample quadratics over the indices ``idx``."""
        r, s, p, q, a, b = (t[idx] for t in self)
        per_sample = 0.5 * (r @ z) ** 2 + 0.5 * (s @ x) ** 2 + (p @ x) * (q @ z) + a @ z + b @ x
        return per_sample.mean()

    def mean(self) -> Quad:
        n = self.r.shape[0]
        return Quad(_gram(self.r) / n, _gram(self.s) / n, self.p.T @ self.q / n, self.a.mean(0), self.b.mean(0))

    def to(self, dtype: torch.dtype) -> "Samples":
        return Samples(*(t.to(dtype) for t in self))


def _sqrt_covariance(rng: np.random.RandomState, spectrum: np.ndarray) -> np.ndarray:
    """U diag(spectrum) U^T, U the full left singular vectors of a (dim, 1) Gaussian draw."""
    u = np.linalg.svd(rng.randn(len(spectrum), 1), full_matrices=True)[0]
    return u @ np.diag(spectrum) @ u.T


def gen_samples(n: int, d_in: int, d_out: int, L_in: float, L_out: float, L_cross: float,
                mu: float, seed: int) -> Samples:
    """benchopt's ``gen_matrices`` with numpy ``RandomState(seed)`` and its draw order, returned as
    rank-one factors (float64) instead of n dense matrices."""
    rng = np.random.RandomState(seed)
    root_in = _sqrt_covariance(rng, np.logspace(np.log10(mu) / 2, np.log10(L_in) / 2, d_in))
    r = rng.randn(n, 1, d_in)[:, 0] @ root_in
    root_out = _sqrt_covariance(rng, np.r_[0.0, np.logspace(np.log10(mu) / 2, np.log10(L_out) / 2, d_out - 1)])
    s = rng.randn(n, 1, d_out)[:, 0] @ root_out
    u3, _, vh3 = np.linalg.svd(rng.randn(d_out, d_in), full_matrices=True)
    k = min(d_out, d_in)
    d3 = np.zeros((d_out, d_in))
    d3[:k, :k] = np.diag(np.logspace(np.log10(mu), np.log10(L_cross), k))
    w = rng.randn(n, 1, d_in)[:, 0]
    p, q = w @ (u3 @ d3).T, w @ vh3.T
    a, b = rng.randn(n, d_in), rng.randn(n, d_out)
    return Samples(*(torch.from_numpy(t) for t in (r, s, p, q, a, b)))


def value_hessian_min_eig(inner: Quad, outer: Quad) -> float:
    """Smallest eigenvalue of benchopt's proxy J^T F J + H + sym(K J), J = -A^{-1} C^T (acceptance test)."""
    jac = -torch.linalg.solve(inner.A, inner.C.T)
    kj = outer.C @ jac
    proxy = jac.T @ outer.A @ jac + outer.B + 0.5 * (kj + kj.T)
    return float(torch.linalg.eigvalsh(proxy)[0])


@register_problem(NAME, paper="Dagreou et al., A framework for bilevel optimization that enables "
                  "stochastic and global variance reduction algorithms, NeurIPS 2022 (benchopt bilevel benchmark)")
class Quadratic(BilevelProblem):
    """Stochastic quadratic bilevel problem with rank-one per-sample Hessians (benchopt benchmark).

    Args:
        n_samples_inner: number of lower (inner) samples, at least dim_inner.
        n_samples_outer: number of upper (outer) samples.
        dim_inner: dimension of the lower variable z.
        dim_outer: dimension of the upper variable x.
        L_inner_inner: largest eigenvalue of E[d2_zz g].
        L_inner_outer: largest eigenvalue of E[d2_xx g].
        L_cross_inner: largest singular value of E[d2_xz g].
        L_outer_inner: largest eigenvalue of E[d2_zz f].
        L_outer_outer: largest eigenvalue of E[d2_xx f].
        L_cross_outer: largest singular value of E[d2_xz f].
        mu_inner: smallest eigenvalue / singular value of every spectrum (strong convexity of g).
        batch_size: number of sample indices of a batch drawn by ``sample``; None for full batches.
        sampling: "blocks" (default): the samples cut into fixed blocks of ``batch_size``
            consecutive indices, served in a fresh random order every epoch (benchopt's sampler,
            :mod:`bilevel.sampling`); "replacement": ``batch_size`` i.i.d. uniform indices.
        seed: seed of the numpy RandomState that draws the (inner, outer) generator seeds.
        dtype: "float32" or "float64", dtype of the variables and losses.
    """

    name = NAME
    headline_metrics = ("grad_norm_sq", "inner_distance")

    #: "tiny": seconds, for tests; "paper": benchopt's quadratic benchmark (d = 100, n = 1024, batch 64).
    PRESETS = {
        "tiny": {"n_samples_inner": 64, "n_samples_outer": 64, "dim_inner": 5, "dim_outer": 3, "batch_size": 16,
                 "seed": 4},
        "paper": {"n_samples_inner": 1024, "n_samples_outer": 1024, "dim_inner": 100, "dim_outer": 100,
                  "batch_size": 64},
    }

    #: Default run of ``bilevel run problem=quadratic preset=tiny`` (bilevel.config.default_run):
    #: 200 steps; SGD-type solvers at their papers' steps, normalized ones with a shorter or
    #: decaying step length (a constant 0.05 ends oscillating above lower-only's ||grad h||^2).
    #: Measured (seed 0): ||grad h(x)||^2 1.30 (lower-only) -> 0.03-0.15 for every bilevel solver.
    RUNS = {
        "tiny": default_run(steps=200, eval_every=20, solver_options={
            "lower-only": dict(lower_lr=0.5),
            "soba": dict(upper_lr=dict(value=0.1, decay=0.5), lower_lr=dict(value=0.1, decay=0.5),
                         z_lr=dict(value=0.1, decay=0.5)),
            "stocbio": dict(upper_lr=0.1, lower_lr=0.1, inner_steps=5, neumann_steps=10),
            "aid-cg": dict(upper_lr=0.1, lower_lr=0.1, inner_steps=5, cg_steps=5),
            "bo-rep": dict(upper_lr=dict(value=0.1, decay=0.5), lower_lr=0.5),
            "slip": dict(upper_lr=0.01, lower_lr=0.5)}),
    }

    def __init__(self, n_samples_inner: int = 1024, n_samples_outer: int = 1024, dim_inner: int = 100,
                 dim_outer: int = 100, L_inner_inner: float = 1.0, L_inner_outer: float = 1.0,
                 L_cross_inner: float = 0.1, L_outer_inner: float = 1.0, L_outer_outer: float = 1.0,
                 L_cross_outer: float = 0.1, mu_inner: float = 0.1, batch_size: Optional[int] = 64,
                 seed: int = 2442, dtype: str = "float64", sampling: str = "blocks"):
        sizes = dict(n_samples_inner=n_samples_inner, n_samples_outer=n_samples_outer, dim_inner=dim_inner,
                     dim_outer=dim_outer, **({} if batch_size is None else {"batch_size": batch_size}))
        scales = dict(L_inner_inner=L_inner_inner, L_inner_outer=L_inner_outer, L_cross_inner=L_cross_inner,
                      L_outer_inner=L_outer_inner, L_outer_outer=L_outer_outer, L_cross_outer=L_cross_outer,
                      mu_inner=mu_inner)
        for key, val in sizes.items():
            check_int(NAME, key, val)
        for key, val in scales.items():
            check_real(NAME, key, val, 0.0, rule="a positive number")
        if n_samples_inner < dim_inner:
            raise ValueError(f"quadratic: option n_samples_inner ({n_samples_inner}) must be >= dim_inner "
                             f"({dim_inner}), else the mean lower Hessian of rank-one samples is singular")
        self.dtype, self.batch_size = check_dtype(NAME, dtype), batch_size
        self.sampling = check_choice(NAME, "sampling", sampling, SAMPLINGS)
        self.dim_inner, self.dim_outer = dim_inner, dim_outer

        rng = np.random.RandomState(seed)
        for trial in range(1, MAX_TRIES + 1):
            inner_seed, outer_seed = (int(s) for s in rng.randint(2**31 - 1, size=2))
            lower = gen_samples(n_samples_inner, dim_inner, dim_outer, L_inner_inner, L_inner_outer,
                                L_cross_inner, mu_inner, inner_seed)
            upper = gen_samples(n_samples_outer, dim_inner, dim_outer, L_outer_inner, L_outer_outer,
                                L_cross_outer, mu_inner, outer_seed)
            lower_mean, upper_mean = lower.mean(), upper.mean()
            chol, info = torch.linalg.cholesky_ex(lower_mean.A)
            if int(info) == 0 and value_hessian_min_eig(lower_mean, upper_mean) >= 1e-12:
                break
        else:
            raise ValueError(f"quadratic: no draw among {MAX_TRIES} (seed={seed}) gave a positive definite "
                             "value-function Hessian; try another seed or a larger mu_inner")
        self.seeds, self.trials = (inner_seed, outer_seed), trial
        #: float64 full-batch means (closed form) and the Cholesky factor of Abar.
        self.lower_mean, self.upper_mean, self._chol = lower_mean, upper_mean, chol
        #: per-sample factors and full-batch means in the problem's dtype (losses).
        self.lower_samples, self.upper_samples = lower.to(self.dtype), upper.to(self.dtype)
        self._means = {"lower": lower_mean.to(self.dtype), "upper": upper_mean.to(self.dtype)}

    # -- protocol ------------------------------------------------------------------------------

    def init(self, generator: torch.Generator):
        device = self._chol.device  # where the problem lives (the generator is not needed)
        return ({"x": torch.full((self.dim_outer,), -2.0, dtype=self.dtype, device=device)},
                {"z": torch.zeros(self.dim_inner, dtype=self.dtype, device=device)})

    def sample(self, level: str, generator: torch.Generator) -> Optional[Tensor]:
        return draw_indices(self.n_samples(level), self.batch_size, level, generator, self.sampling)

    def _loss(self, level: str, x, y, batch: Optional[Tensor]) -> Tensor:
        if batch is None:
            return self._means[level].loss(x["x"], y["z"])
        samples = self.lower_samples if level == "lower" else self.upper_samples
        return samples.loss(x["x"], y["z"], batch)

    def n_samples(self, level: str) -> int:
        """Number of per-sample quadratics of the upper or lower loss: the problem is a finite sum
        whose losses take any LongTensor of sample indices as a batch (used by SABA)."""
        check_level(level)
        return (self.lower_samples if level == "lower" else self.upper_samples).r.shape[0]

    def upper_loss(self, x, y, batch):
        return self._loss("upper", x, y, batch)

    def lower_loss(self, x, y, batch):
        return self._loss("lower", x, y, batch)

    # -- closed form (full batch, float64) -----------------------------------------------------

    def _solve(self, rhs: Tensor) -> Tensor:
        """Abar^{-1} rhs by the cached Cholesky factor."""
        return torch.cholesky_solve(rhs.unsqueeze(-1), self._chol).squeeze(-1)

    def _z_star(self, x64: Tensor) -> Tensor:
        m = self.lower_mean
        return -self._solve(m.a + m.C.T @ x64)

    def y_star(self, x):
        """Lower solution z*(x) = -Abar^{-1} (abar + Cbar^T x)."""
        return {"z": self._z_star(x["x"].to(torch.float64)).to(x["x"].dtype)}

    def value(self, x) -> Tensor:
        """h(x) = f(x, z*(x)) on the full batch, a float64 0-d tensor."""
        x64 = x["x"].to(torch.float64)
        return self.upper_mean.loss(x64, self._z_star(x64))

    def _hypergradient(self, x64: Tensor) -> Tensor:
        grad_x, grad_z = self.upper_mean.grads(x64, self._z_star(x64))
        return grad_x - self.lower_mean.C @ self._solve(grad_z)

    def hypergradient_closed_form(self, x):
        """grad h(x) = grad_x f(x, z*) + Cbar v*,  v* = -Abar^{-1} grad_z f(x, z*)."""
        return {"x": self._hypergradient(x["x"].to(torch.float64)).to(x["x"].dtype)}

    def evaluate(self, x, y):
        with torch.no_grad():
            x64 = x["x"].detach().to(torch.float64)
            z_star, grad = self._z_star(x64), self._hypergradient(x64)
            gap = y["z"].detach().to(torch.float64) - z_star
            return {"grad_norm_sq": float(grad @ grad), "inner_distance": float(gap @ gap),
                    "value": float(self.upper_mean.loss(x64, z_star))}
