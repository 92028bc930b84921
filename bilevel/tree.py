"""Arithmetic on parameter trees.

A *tree* is a ``dict[str, Tensor]``: the form every variable (x, y, z, momenta) takes in
bilevel. These helpers keep solver code close to the equations, e.g. ``axpy(-lr, g, y)`` for
``y - lr * g``. Every function returns new tensors; nothing is modified in place.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping

import torch
from torch import Tensor

Tree = Dict[str, Tensor]

__all__ = [
    "Tree", "map", "add", "sub", "scale", "axpy", "lerp", "mul", "dot", "sq_norm", "norm",
    "zeros_like", "clone", "detach", "flatten", "unflatten", "numel", "all_finite", "as_tree",
]


def as_tree(value, name: str = "value") -> Tree:
    """Return ``value`` as a tree, accepting a single tensor (stored under ``"w"``)."""
    if type(value) is dict and all(isinstance(v, Tensor) for v in value.values()):
        return dict(value)  # the common case first: no abstract-base-class check
    if isinstance(value, Tensor):
        return {"w": value}
    if isinstance(value, Mapping) and all(isinstance(v, Tensor) for v in value.values()):
        return dict(value)
    raise TypeError(f"{name} must be a dict of tensors or a tensor, got {type(value).__name__}")


def _check_keys(a: Mapping, b: Mapping) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"trees have different keys: {sorted(a)} vs {sorted(b)}")


def map(fn: Callable[..., Tensor], tree: Tree, *others: Tree) -> Tree:  # noqa: A001
    """Apply ``fn`` leaf-wise: ``{k: fn(tree[k], *(o[k] for o in others))}``."""
    for other in others:
        _check_keys(tree, other)
    return {k: fn(v, *(o[k] for o in others)) for k, v in tree.items()}


# The arithmetic below is written out per function rather than through :func:`map`: these run
# once or twice per Hessian-vector product inside CG and Neumann loops, where a lambda and a
# call per leaf cost about as much as the tensor operation itself on small problems
# (bench/hypergradient.py).

def add(a: Tree, b: Tree) -> Tree:
    """a + b."""
    _check_keys(a, b)
    return {k: v + b[k] for k, v in a.items()}


def sub(a: Tree, b: Tree) -> Tree:
    """a - b."""
    _check_keys(a, b)
    return {k: v - b[k] for k, v in a.items()}


def mul(a: Tree, b: Tree) -> Tree:
    """Element-wise a * b."""
    _check_keys(a, b)
    return {k: v * b[k] for k, v in a.items()}


def scale(a: Tree, s) -> Tree:
    """s * a for a scalar (float or 0-d tensor) s."""
    return {k: v * s for k, v in a.items()}


def axpy(alpha, x: Tree, y: Tree) -> Tree:
    """alpha * x + y (two kernels, ``y + alpha * x``: ``torch.add(y, x, alpha=)`` fuses them but
    rounds differently where it uses a fused multiply-add)."""
    _check_keys(x, y)
    return {k: y[k] + alpha * xv for k, xv in x.items()}  # keys in x's order, as map gives


def lerp(a: Tree, b: Tree, weight) -> Tree:
    """(1 - weight) * a + weight * b."""
    _check_keys(a, b)
    return {k: av + weight * (b[k] - av) for k, av in a.items()}


def dot(a: Tree, b: Tree) -> Tensor:
    """Sum over leaves of <a_k, b_k>, a 0-d tensor."""
    _check_keys(a, b)
    if len(a) == 1:  # one leaf: its sum as is (stacking and summing one number is exact but costs two ops)
        for k, v in a.items():
            return (v * b[k]).sum()
    terms = [(v * b[k]).sum() for k, v in a.items()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def sq_norm(a: Tree) -> Tensor:
    """Squared Euclidean norm of the whole tree."""
    return dot(a, a)


def norm(a: Tree) -> Tensor:
    """Euclidean norm of the whole tree (all leaves concatenated)."""
    return sq_norm(a).sqrt()


def zeros_like(a: Tree) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def clone(a: Tree) -> Tree:
    return {k: v.clone() for k, v in a.items()}


def detach(a: Tree) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def numel(a: Tree) -> int:
    return sum(v.numel() for v in a.values())


def flatten(a: Tree) -> Tensor:
    """Concatenate the leaves (in key order) into one vector."""
    return torch.cat([v.reshape(-1) for v in a.values()]) if a else torch.zeros(0)


def unflatten(vector: Tensor, like: Tree) -> Tree:
    """Inverse of :func:`flatten`: split ``vector`` into the shapes of ``like``."""
    if vector.numel() != numel(like):
        raise ValueError(f"vector has {vector.numel()} entries, tree has {numel(like)}")
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = vector[offset: offset + v.numel()].reshape(v.shape)
        offset += v.numel()
    return out


def all_finite(a: Tree) -> bool:
    """True when no leaf holds NaN or inf."""
    return all(bool(torch.isfinite(v).all()) for v in a.values())


def is_close(a: Tree, b: Tree, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    _check_keys(a, b)
    return all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def relative_error(estimate: Tree, reference: Tree) -> float:
    """||estimate - reference|| / ||reference|| over the whole tree."""
    ref = float(norm(reference))
    err = float(norm(sub(estimate, reference)))
    return err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
