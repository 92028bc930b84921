"""Replaying fixed minibatch streams, as the benchopt comparison of issue 8 does.

:class:`Replay` wraps a finite-sum problem and serves, per level, the next batch of a given list
(a test-only cursor: the list is consumed in the order the solver asks). :func:`benchopt_blocks`
writes out the block indices that benchopt's JAX sampler (``benchmark_utils/minibatch_sampler.py``)
serves for given epoch permutations: its order starts as 0..K-1, an epoch reads K + 1 entries
(the index reaches K before the reset, and JAX clamps the read to the last entry), then the
order is replaced by the next permutation. ``quadratic_grads`` are the benchopt quadratic's
gradients on a batch, written out from the per-sample losses

    1/2 (r.z)^2 + 1/2 (s.x)^2 + (p.x)(q.z) + a.z + b.x.
"""
from typing import Dict, Iterable, List, Sequence

import torch

from bilevel.problem import BilevelProblem
from bilevel.sampling import Blocks


def benchopt_blocks(n_batches: int, permutations: Iterable[Sequence[int]], count: int) -> List[int]:
    order, position, out, perms = list(range(n_batches)), 0, [], iter(permutations)
    while len(out) < count:
        out.append(order[min(position, n_batches - 1)])
        if position == n_batches:
            position, order = 0, list(next(perms))
        else:
            position += 1
    return out


class Replay(BilevelProblem):
    """``problem`` with ``sample(level, ...)`` serving the next batch of ``streams[level]``."""

    def __init__(self, problem, streams: Dict[str, List[torch.Tensor]]):
        self.problem, self.streams, self.name = problem, {k: list(v) for k, v in streams.items()}, problem.name

    def sample(self, level, generator):
        return self.streams[level].pop(0)

    def upper_loss(self, x, y, batch):
        return self.problem.upper_loss(x, y, batch)

    def lower_loss(self, x, y, batch):
        return self.problem.lower_loss(x, y, batch)

    def init(self, generator):
        return self.problem.init(generator)

    def n_samples(self, level):
        return self.problem.n_samples(level)


def block_streams(problem, permutations: Dict[str, Iterable[Sequence[int]]], count: int):
    """Per level, the index batches of benchopt's sampler over the problem's blocks."""
    out = {}
    for level in ("lower", "upper"):
        blocks = Blocks(problem.n_samples(level), problem.batch_size, level)
        out[level] = [blocks.batch(k) for k in benchopt_blocks(blocks.n_batches, permutations[level], count)]
    return out


def quadratic_grads(samples, idx, x, z):
    """(grad_x, grad_z) of the mean over ``idx`` of the per-sample quadratics."""
    r, s, p, q, a, b = (t[idx] for t in samples)
    grad_x = (s * (s @ x)[:, None] + p * (q @ z)[:, None] + b).mean(0)
    grad_z = (r * (r @ z)[:, None] + q * (p @ x)[:, None] + a).mean(0)
    return grad_x, grad_z


def quadratic_products(samples, idx, v):
    """(d2_zz g . v, d2_xz g . v) on the batch ``idx`` (v shaped like z)."""
    r, _, p, q, _, _ = (t[idx] for t in samples)
    return (r * (r @ v)[:, None]).mean(0), (p * (q @ v)[:, None]).mean(0)
