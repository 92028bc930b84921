"""The randomized Neumann estimator in a fixed-length, masked form, so that a step holding it is
one graph whichever q is drawn (``compile=True``).

Ghadimi and Wang's estimator (Approximation Methods for Bilevel Programming, arXiv 1802.02246,
2018, Algorithm 3; the HIA of TTSA, Hong et al. 2023) draws q ~ U{0, ..., Q} and takes

    u_0 = grad_y f,   u_{k+1} = u_k - eta H_k u_k   (k < q),   v = (Q + 1) eta u_q

(``variant="code_n1"``: q + 1 products and v = eta u_{q+1}). The truncated loop makes q products,
a Python-int loop bound: a compiled step would need one graph per value of q. The masked form
runs all Q products (Q + 1 for code_n1) and keeps each only while k < q:

    u_{k+1} = where(k < q, u_k - eta H_k u_k, u_k)

``torch.where`` selects exactly, so v equals the truncated loop's bit for bit (the discarded
products are computed and counted, not used). The draw is the parent's (q first, then the upper
batch, the q per-product Hessian batches, the cross batch: the same random stream), with q kept
as a LongTensor and the per-product batches padded to Q with copies of the cross batch (copies,
not the same object: an aliasing pattern that changed with q would change the graph too).

Eagerly (``torch.compiler.is_compiling()`` false) the estimate is the parent's truncated loop on
the same draw (q products, exact oracle counts); traced, or under ``torch.func.vmap`` (copies
with their own q, bilevel.many), it is the masked loop (Q products counted per copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map

from . import linear_system, tree
from .estimators import Draw, Neumann
from .hypergrad import PerProduct, implicit


def _batched(term) -> bool:
    """True for q under ``torch.func.vmap`` (one q per copy: the loop bound cannot be read)."""
    return isinstance(term, torch.Tensor) and torch._C._functorch.is_batchedtensor(term)


def _copy(batch):
    return tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, batch)


def masked_power(matvec, b, *, steps: int, lr: float, term: torch.Tensor, variant: str = "randomized"):
    """The randomized Neumann value of :func:`bilevel.linear_system.neumann_series` for the drawn
    ``term`` (a tensor), by ``steps`` masked products (``steps + 1`` for "code_n1")."""
    if variant not in linear_system.RANDOMIZED_NEUMANN:
        raise ValueError(f"masked Neumann: variant must be one of {linear_system.RANDOMIZED_NEUMANN}, got {variant!r}")
    products = steps if variant == "randomized" else steps + 1
    used = term if variant == "randomized" else term + 1
    u = tree.clone(b)
    for k in range(products):
        stepped = tree.axpy(-lr, matvec(u), u)
        keep = used > k
        u = tree.map(lambda new, old: torch.where(keep, new, old), stepped, u)
    return tree.scale(u, (steps + 1) * lr if variant == "randomized" else lr)


@dataclass(frozen=True)
class MaskedNeumann(Neumann):
    """:class:`~bilevel.estimators.Neumann` with a randomized ``variant`` whose draw has a
    fixed structure (q a tensor, Q per-product batches) and whose traced estimate is the masked
    loop (:func:`masked_power`); the values are those of the truncated loop."""
    variant: str = "randomized"

    def __post_init__(self):
        super().__post_init__()
        if not self.randomized:
            raise ValueError(f"MaskedNeumann: variant must be one of {linear_system.RANDOMIZED_NEUMANN} "
                             f"(a fixed number of products needs no mask), got {self.variant!r}")

    def _fixed(self, sample: Draw, device=None) -> Draw:
        term = torch.tensor(int(sample.term), device=device)
        hessian = sample.hessian
        if isinstance(hessian, PerProduct):
            products = self.steps if self.variant == "randomized" else self.steps + 1
            hessian = PerProduct(list(hessian) + [_copy(sample.cross) for _ in range(products - len(hessian))])
        return Draw(sample.upper, hessian, sample.cross, term)

    def draw(self, problem, generator, share_lower_batch: bool = False) -> Draw:
        return self._fixed(super().draw(problem, generator, share_lower_batch), generator.device)

    def given(self, upper_batch, lower_batch, generator=None) -> Draw:
        return self._fixed(super().given(upper_batch, lower_batch, generator),
                           None if generator is None else generator.device)

    def __call__(self, problem, x, y, state, sample: Draw):
        if not (torch.compiler.is_compiling() or _batched(sample.term)):
            return super().__call__(problem, x, y, state, sample)

        def solve(matvec, b):
            return masked_power(matvec, b, steps=self.steps, lr=self.lr, term=sample.term, variant=self.variant)
        h, _ = implicit(problem, x, y, sample.upper, sample.hessian, sample.cross, solve, self.hvp_mode)
        return h, state
