"""FSDP sharding (``torch.distributed.fsdp.fully_shard``, "FSDP2") of the modules a problem only
evaluates, never differentiates: what can and cannot be sharded in a bilevel run.

Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB 2023;
FSDP2 is ``torch.distributed.fsdp.fully_shard`` (per-parameter sharding as ``DTensor``).

What FSDP2 does (torch 2.13; works on the CPU with gloo): each parameter is stored as this
rank's 1/N slice (a ``DTensor`` sharded on dim 0); a forward pre-hook all-gathers a block's
full parameters into *unsharded copies*, installs them on the module, and frees them after the
forward (``reshard_after_forward``); a post-backward hook reduce-scatters their gradients into
the shards' ``.grad``.

Why the differentiated variables (x, y) cannot be FSDP modules. The oracles
(:mod:`bilevel.oracles`) differentiate a loss w.r.t. explicit parameter trees, with
``torch.autograd.grad`` and ``torch.func`` on ``functional_call``, twice for the second-order
products. Against a ``fully_shard``-ed module (tests/test_fsdp.py reproduces each on 2 gloo ranks):

1. ``torch.autograd.grad(loss, sharded_params)`` fails ("The differentiated Tensor at
   index 0 appears to not have been used in the graph"): the forward ran on the unsharded copies,
   all-gathered outside autograd; gradients reach the shards only through the hook's
   reduce-scatter into ``.grad``.
2. ``loss.backward(create_graph=True)`` leaves each shard's ``.grad`` without a graph
   (``requires_grad=False``): the reduce-scatter cuts it, so no Hessian-vector or cross product
   can pass through FSDP's gradient.
3. ``torch.func.functional_call(sharded_module, params, ...)`` silently IGNORES ``params``: the
   pre-forward hook installs the module's own unsharded parameters over them, a wrong value with
   no error. :func:`require_unsharded` turns this into an error where the language models are
   called functionally (:func:`bilevel.problems.language_model.lm_logits`).

So a bilevel problem shards with FSDP the modules it only *evaluates*: data-selection's frozen
target LM in the KL term of g (``shard="fsdp"``), whose parameters are stored 1/N per rank and
all-gathered block by block inside each lower forward (under ``no_grad``: its logits are
constants of g). The proxy (y), the score model (x) and the solver state stay replicated on
every rank and are differentiated, twice, on their full (unsharded) values with
``functional_call``: the nearest correct alternative to sharding them, which would need the
solver state itself sharded (every norm and inner product of the updates reduced across ranks).
The per-sample work is still split across ranks by data parallelism (:mod:`bilevel.distributed`).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

from torch import Tensor, nn

from . import distributed

SHARD_MODES = ("none", "fsdp")


def check_shard(owner: str, value) -> str:
    """``value`` when it is one of :data:`SHARD_MODES`, else a ValueError naming ``owner``."""
    if value not in SHARD_MODES:
        raise ValueError(f"{owner}: shard={value!r} must be one of {list(SHARD_MODES)}")
    return value


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as exc:  # pragma: no cover - torch without FSDP2
        raise ImportError("shard='fsdp' needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from exc
    return FSDPModule, fully_shard


_FSDP_MODULE = []  # the FSDPModule class, imported on first use


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is a ``fully_shard``-ed (FSDP2) module (the root: :func:`shard_module`
    shards it with its blocks; a class check, cheap enough for every forward)."""
    if not _FSDP_MODULE:
        _FSDP_MODULE.append(_fsdp()[0] if distributed.available() else ())
    return isinstance(module, _FSDP_MODULE[0])


def require_unsharded(module: nn.Module, what: str) -> None:
    """A ValueError when ``module`` is FSDP-sharded: ``functional_call`` on it would silently use
    the module's own parameters instead of the given ones (module docstring, point 3)."""
    if is_sharded(module):
        raise ValueError(f"{what}: the module is sharded with FSDP (fully_shard); functional_call on it ignores "
                         "the given parameters (FSDP installs its own): call the module itself, or keep it unsharded")


def shard_module(module: nn.Module, blocks: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """``module`` sharded with ``fully_shard`` over the default process group: each of ``blocks``
    (e.g. the transformer layers) its own FSDP unit, gathered one at a time, then the rest with
    the root. In one process (no group of more than one rank) ``module`` is returned as is:
    sharding over one rank stores the same tensors. The parameters must already hold their
    final values (sharding copies them into the shards)."""
    if not distributed.active():
        return module
    _, fully_shard = _fsdp()
    for block in blocks or ():
        fully_shard(block, reshard_after_forward=True)
    # the root too: by default FSDP2 keeps the root's gathered parameters after a forward (for
    # the backward that usually follows); a frozen module's forward has none
    fully_shard(module, reshard_after_forward=True)
    return module


def full_parameters(module: nn.Module) -> Dict[str, Tensor]:
    """Detached full values of ``module``'s parameters (sharded ones all-gathered: a collective,
    every rank must call it)."""
    out = {}
    for name, p in module.named_parameters():
        value = p.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.clone()
    return out


def local_numel(module: nn.Module) -> int:
    """Number of parameter entries this rank stores (its shards' sizes for a sharded module)."""
    total = 0
    for p in module.parameters():
        total += (p.to_local() if hasattr(p, "to_local") else p).numel()
    return total
