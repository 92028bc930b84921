"""Mini-batches of a finite sum: fixed blocks served in a fresh random order every epoch.

A finite sum of n samples is cut into K = ceil(n / b) fixed consecutive blocks

    B_k = [k b, min(n, (k + 1) b)),        k = 0 .. K-1     (the last one may be smaller),

with weights w_k = |B_k| / n. ``sampling="blocks"`` (the default of the finite-sum problems)
serves the blocks epoch by epoch: at the start of each epoch the block ORDER is drawn afresh,
``torch.randperm(K)`` from the run's generator, and the next K draws return the blocks in that
order. The samples inside a block never change, so a SAGA memory indexed by block (SABA,
:mod:`bilevel.memory`) sees the very batches the problem serves. This is the sampler of the
benchopt bilevel benchmark (``benchmark_utils/minibatch_sampler.py``: fixed blocks of
``batch_size`` consecutive samples, their order permuted every epoch), with two differences:
benchopt's first epoch runs the blocks in the order 0..K-1 (its order starts as ``arange`` and
is permuted only at the first epoch boundary), and its epochs serve K + 1 blocks, the last one
twice (its index reaches K before the reset and JAX clamps the out-of-range read); its last,
incomplete block is also the slice [n - b, n) with weight (n mod b) / n. Here every epoch,
the first included, is a permutation of the K blocks, each served once.

``sampling="replacement"`` draws every batch afresh (:func:`draw_indices`: b i.i.d. uniform
sample indices; :meth:`Blocks.draw`: a uniform block index).

Where the epoch position lives. A draw needs the current epoch's order and the position in
it. They are kept by the run's generator, a :class:`RunGenerator` (a ``torch.Generator`` that
also holds one :class:`Epoch` per stream), not by the problem: two runs on one problem object
do not share a cursor, and a checkpoint (``torch.save(state)``; ``solve(..., state=...)`` copies
the generator with :func:`copy_generator`) resumes bit-identically in mid-epoch. Streams are
keyed by (level, n, b): the lower and upper levels have separate epochs, as benchopt's inner
and outer samplers. A plain ``torch.Generator`` carries no epoch: each block draw is then one
uniformly random block (``torch.randint``), the first draw of a fresh epoch in distribution.
Random numbers are drawn only when an epoch starts (one ``randperm``), never ahead of need.

Devices. Every draw happens on the generator's device (``device=generator.device``), and the
index tensors are made there too, so a run on CUDA (the run's generator lives on the problem's
device, :mod:`bilevel.device`) never copies indices from the host. The block order of an epoch
is read back to the host once per epoch (K block numbers; the block sizes are shapes, which the
host must know); "replacement" batches never leave the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

SAMPLINGS = ("blocks", "replacement")

StreamKey = Tuple[str, int, int]


class Epoch(NamedTuple):
    """The block order of the current epoch of one stream and how many blocks it has served."""
    order: Tuple[int, ...]
    position: int


class RunGenerator(torch.Generator):
    """The run's ``torch.Generator`` plus the :class:`Epoch` of every block stream it serves.

    Usable wherever a ``torch.Generator`` is (``torch.randint(..., generator=g)``). ``copy()``
    and pickling (``torch.save``) keep the random state and the epoch positions together.
    """

    def __init__(self, device="cpu"):  # torch.Generator.__new__ takes the device
        self.streams: Dict[StreamKey, Epoch] = {}

    def copy(self) -> "RunGenerator":
        return restore_generator(str(self.device), self.get_state(), dict(self.streams))

    def __reduce__(self):
        return restore_generator, (str(self.device), self.get_state(), dict(self.streams))


def restore_generator(device: str, state: Tensor, streams: Dict[StreamKey, Epoch]) -> RunGenerator:
    """A :class:`RunGenerator` on ``device`` with random state ``state`` and the epochs ``streams``
    (pairs ``(order, position)`` by stream key; checkpoints store them as plain data)."""
    generator = RunGenerator(device)
    generator.set_state(state)
    generator.streams = {key: Epoch(tuple(epoch[0]), int(epoch[1])) for key, epoch in streams.items()}
    return generator


def run_generator(seed: int, device="cpu") -> RunGenerator:
    """A seeded :class:`RunGenerator` with no epoch started."""
    return RunGenerator(device).manual_seed(seed)


def copy_generator(generator: torch.Generator) -> RunGenerator:
    """An independent copy: same random state and epoch positions (none for a plain generator)."""
    if isinstance(generator, RunGenerator):
        return generator.copy()
    return restore_generator(str(generator.device), generator.get_state(), {})


def check_sampling(sampling: str, owner: str = "sampling") -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"{owner}: option sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
    return sampling


def mode(problem) -> str:
    """The problem's ``sampling`` attribute ("blocks" when it has none)."""
    return check_sampling(getattr(problem, "sampling", "blocks"), f"problem {getattr(problem, 'name', '?')!r}")


@dataclass(frozen=True)
class Blocks:
    """Fixed consecutive blocks of ``batch_size`` indices out of ``n`` (the last may be smaller),
    drawn as the stream ``level`` with ``sampling`` "blocks" (epoch-shuffled) or "replacement"."""
    n: int
    batch_size: int
    level: str = "lower"
    sampling: str = "blocks"

    def __post_init__(self):
        for name in ("n", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_sampling(self.sampling, "Blocks")

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def size(self, k: int) -> int:
        return min(self.n, (k + 1) * self.batch_size) - k * self.batch_size

    def batch(self, k: int, device=None) -> Tensor:
        """The indices of block k, a LongTensor on ``device`` (default: the CPU)."""
        return torch.arange(k * self.batch_size, k * self.batch_size + self.size(k), device=device)

    def weight(self, k: int) -> float:
        """w_k = |B_k| / n: the full-batch mean is sum_k w_k (mean over B_k)."""
        return self.size(k) / self.n

    def draw(self, generator: torch.Generator) -> int:
        """The index of the next block: the next one of the epoch ("blocks", a new
        ``randperm(K)`` when an epoch starts), or ``randint(K)`` ("replacement", or a plain
        generator, which holds no epoch)."""
        if self.sampling == "replacement" or not isinstance(generator, RunGenerator):
            return int(torch.randint(self.n_batches, (1,), generator=generator, device=generator.device))
        key = (self.level, self.n, self.batch_size)
        epoch = generator.streams.get(key)
        if epoch is None or epoch.position == len(epoch.order):
            order = torch.randperm(self.n_batches, generator=generator, device=generator.device)
            epoch = Epoch(tuple(order.tolist()), 0)
        generator.streams[key] = Epoch(epoch.order, epoch.position + 1)
        return epoch.order[epoch.position]


def draw_indices(n: int, batch_size: Optional[int], level: str, generator: torch.Generator,
                 sampling: str = "blocks") -> Optional[Tensor]:
    """A batch of sample indices of a finite sum of ``n``: None when ``batch_size`` is None (the
    whole sum), the next epoch-shuffled block ("blocks"), or ``batch_size`` i.i.d. uniform
    indices ("replacement"); on the generator's device."""
    if batch_size is None:
        return None
    if check_sampling(sampling) == "replacement":
        return torch.randint(n, (batch_size,), generator=generator, device=generator.device)
    blocks = Blocks(n, batch_size, level, sampling)
    return blocks.batch(blocks.draw(generator), generator.device)
