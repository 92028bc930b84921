"""Step sizes from the spectrum of the lower Hessian H = d2_yy g(x, y).

A Neumann series lr sum_q (I - lr H)^q b and SGD on the linear system H v = b both need
lr < 2/L, L the largest eigenvalue of the Hessians their products use, and both shrink their
error by (1 - lr mu) per product: lr = 1/L is the usual safe and fast choice (Ghadimi and Wang
2018 take eta = 1/L_g; Ji et al. 2021 eta <= 1/L). Papers state it in terms of constants the
user rarely knows, so a step given as ``"auto"`` is estimated here at the solver's initial point.

Power iteration on the Hessian of ONE lower batch, ``iterations`` Hessian-vector products
through one :class:`bilevel.oracles.LowerProducts` graph (counted as oracle calls like any other):

    u_0 ~ N(0, I) (from the run's generator),   w_k = H u_k,   u_{k+1} = w_k / ||w_k||
    L_hat = max_k ||w_k||         (<= max |eigenvalue of H|, >= the Rayleigh quotient <u_k, w_k>)
    lr    = 1 / L_hat

Safety: L_hat is measured on a batch Hessian, not the mean Hessian, so it already includes the
larger top eigenvalue of a mini-batch (1.9x to 2.4x the mean's on benchopt's quadratic, d = 100,
batch 64); the step 1/L_hat then leaves a factor 2 of headroom below the stability limit 2/L, which covers
the spread of the top eigenvalue between batches of the same size and power iteration's
underestimate (L_hat approaches L from below). On an indefinite Hessian (a non-convex lower
level) L_hat estimates the largest |eigenvalue|.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import tree
from .oracles import LowerProducts
from .tree import Tree

#: Hessian-vector products of the power iteration behind an "auto" step.
AUTO_ITERATIONS = 20
#: The value that asks for a step size estimated by :func:`auto_step`.
AUTO = "auto"


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def _normal_like(like: Tree, generator: Optional[torch.Generator]) -> Tree:
    device = generator.device if generator is not None else "cpu"
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype, device=device).to(v.device)
            for k, v in like.items()}


def largest_eigenvalue(problem, x: Tree, y: Tree, batch: Any, *, iterations: int = AUTO_ITERATIONS,
                       generator: Optional[torch.Generator] = None, hvp_mode: str = "reverse") -> float:
    """L_hat = max_k ||H u_k|| over ``iterations`` power-iteration steps on d2_yy g(x, y; batch),
    from a Gaussian start drawn from ``generator``. Counts ``iterations`` HVPs."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"power iterations must be an integer >= 1, got {iterations!r}")
    u = _normal_like(y, generator)
    u = tree.scale(u, 1.0 / float(tree.norm(u)))
    products, estimate = LowerProducts(problem, x, y, batch, mode=hvp_mode), 0.0
    for _ in range(iterations):
        w = products.hvp(u)
        size = float(tree.norm(w))
        if not torch.isfinite(torch.tensor(size)):
            raise ValueError(f"power iteration on the lower Hessian gave a non-finite product norm ({size})")
        estimate = max(estimate, size)
        if size == 0.0:
            break
        u = tree.scale(w, 1.0 / size)
    return estimate


def auto_step(problem, x: Tree, y: Tree, generator: torch.Generator, *, iterations: int = AUTO_ITERATIONS,
              hvp_mode: str = "reverse") -> float:
    """1 / L_hat on one fresh lower batch drawn from ``generator`` (then the power iteration's
    start, also from ``generator``). Counts ``iterations`` HVPs."""
    batch = problem.sample("lower", generator)
    estimate = largest_eigenvalue(problem, x, y, batch, iterations=iterations, generator=generator,
                                  hvp_mode=hvp_mode)
    if estimate <= 0.0:
        raise ValueError("an 'auto' step size needs the lower Hessian's largest eigenvalue, but d2_yy g "
                         "was zero along the power iteration; give the step size as a number")
    return 1.0 / estimate
