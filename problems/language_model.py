"""Causal language models for data selection: GPT-NeoX (the Pythia architecture) from a config.

Models are Hugging Face ``transformers`` ``GPTNeoXForCausalLM`` built from a ``GPTNeoXConfig``
(never downloaded; the Pythia suite of Biderman et al., "Pythia: A Suite for Analyzing Large
Language Models Across Training and Scaling", ICML 2023, uses this architecture), or loaded
from a local directory of pretrained weights with ``from_pretrained(path,
local_files_only=True)``. The hub is switched off in this module (``HF_HUB_OFFLINE=1``,
``HF_DATASETS_OFFLINE=1``). Attention is ``attn_implementation="eager"``: plain matmul and
softmax, twice differentiable, which second-order products (Hessian-vector and cross products)
need; fused SDPA kernels have no double-backward on every device.

Presets keep BLISS's proxy : target ratio (Pythia-160M : Pythia-1B, about 1 : 6 in parameters;
Hao et al., "BLISS: A Lightweight Bilevel Influence Scoring Method for Data Selection in
Language Model Pretraining", ICML 2026, arXiv:2510.06048). Untied input and output embeddings as
in Pythia. Parameter counts (embeddings included) at each preset's vocabulary, computed by
:func:`parameter_count` (tests check the ratio):

    preset  vocab  seq   proxy (layers x width)         target (layers x width)        ratio
    tiny      512   32   1 x 32         45,536          2 x 80          237,760         5.2
    cpu      2048  128   2 x 128       921,088          6 x 256       5,787,648         6.3
    gpu      8192  512   6 x 256     8,933,376         14 x 512      52,523,008         5.9

Functions of explicit parameter dicts (``torch.func.functional_call``): :func:`lm_logits`,
:func:`sequence_ce` (mean token cross-entropy of each sequence over its masked positions),
:func:`token_kl` (KL(target || proxy) per sequence). :class:`ScoreModel` is BLISS's score
network: the proxy's backbone, a mean over real tokens of the final-layer-norm hidden states,
then ``Linear(d, 1)`` and a sigmoid.

Mixed precision: each forward function takes ``autocast`` (None, or ``torch.bfloat16`` from the
problem's ``dtype="bfloat16"`` option, :func:`problems.options.check_precision`). The transformer
then runs under ``torch.autocast`` (:func:`problems.models.autocast_scope`, the mechanism of every
problem's networks): its matrix products (attention, feed-forward, the vocabulary projection) in
bf16, the parameters float32. What leaves it is cast to float32 before any reduction: the logits
(so the cross-entropies, the KL's log-softmaxes and their means are float32) and the score model's
hidden states (so its pooling, head, sigmoid and the softmax weights built on them are float32).
Attention stays the eager matmul-softmax path, twice differentiable under autocast too.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.sharding import require_unsharded

from .models import autocast_scope

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

if TYPE_CHECKING:  # transformers is imported on first use: the `lm` extra is optional
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("language models need the `lm` extra: pip install 'bilevel[lm]' "
                          "(transformers, tokenizers)") from exc
    return transformers

Tree = Dict[str, Tensor]
ROLES = ("proxy", "target")
ATTENTION = "eager"

#: Architecture per preset and role; ``vocab_size`` and ``seq_len`` are the preset's defaults.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(vocab_size=512, seq_len=32,
                 proxy=dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=128),
                 target=dict(num_hidden_layers=2, hidden_size=80, num_attention_heads=4, intermediate_size=320)),
    "cpu": dict(vocab_size=2048, seq_len=128,
                proxy=dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512),
                target=dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=8, intermediate_size=1024)),
    "gpu": dict(vocab_size=8192, seq_len=512,
                proxy=dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=8, intermediate_size=1024),
                target=dict(num_hidden_layers=14, hidden_size=512, num_attention_heads=8, intermediate_size=2048)),
}


def lm_config(preset: str, role: str, vocab_size: Optional[int] = None, seq_len: Optional[int] = None,
              **overrides) -> "GPTNeoXConfig":
    """The ``GPTNeoXConfig`` of ``role`` ("proxy" or "target") in ``preset``; ``overrides`` replace
    architecture fields (e.g. ``hidden_size``). Dropout is off (a deterministic loss for the
    bilevel oracles)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {sorted(PRESETS)}")
    if role not in ROLES:
        raise ValueError(f"role={role!r}: must be one of {ROLES}")
    spec = PRESETS[preset]
    arch = {**spec[role], **overrides}
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise ValueError(f"hidden_size={arch['hidden_size']} must be divisible by num_attention_heads="
                         f"{arch['num_attention_heads']}")
    vocab = int(vocab_size or spec["vocab_size"])
    positions = int(seq_len or spec["seq_len"])
    config = _transformers().GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_dropout=0.0,
                           attention_dropout=0.0, tie_word_embeddings=False, use_cache=False, **arch)
    config._attn_implementation = ATTENTION
    return config


def build_lm(config: "GPTNeoXConfig", *, path: Optional[str] = None, seed: Optional[int] = None,
             dtype: torch.dtype = torch.float32) -> "GPTNeoXForCausalLM":
    """A GPT-NeoX causal LM: from ``config`` with weights initialised under ``seed`` (the global
    RNG is left as it was), or pretrained weights from the local directory ``path``
    (``local_files_only``; its own config wins). Eager attention, eval mode, ``dtype``."""
    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"pretrained model path {path!r} is not a local directory (never downloaded)")
        model = _transformers().GPTNeoXForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation=ATTENTION)
    else:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = _transformers().GPTNeoXForCausalLM(config)
    model.config._attn_implementation = ATTENTION
    return model.to(dtype).eval()


def parameter_count(preset: str, role: str, vocab_size: Optional[int] = None) -> int:
    """Number of parameters of ``role`` in ``preset`` (embeddings included)."""
    model = build_lm(lm_config(preset, role, vocab_size), seed=0)
    return sum(p.numel() for p in model.parameters())


def params_of(module: nn.Module) -> Tree:
    """Detached copies of a module's parameters (the explicit tree the oracles differentiate)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def lm_logits(model: "GPTNeoXForCausalLM", params: Tree, tokens: Tensor,
              autocast: Optional[torch.dtype] = None) -> Tensor:
    """(N, L, vocab) next-token logits of ``model`` with parameters ``params``; with ``autocast``
    (``torch.bfloat16``) the forward pass runs under autocast and the logits come back float32.
    A ValueError when ``model`` is FSDP-sharded (``functional_call`` would silently use its own
    parameters)."""
    require_unsharded(model, "lm_logits")
    return module_logits(lambda: functional_call(model, params, (tokens,), {"use_cache": False}),
                         tokens.device.type, autocast)


def module_logits(forward, device_type: str, autocast: Optional[torch.dtype] = None) -> Tensor:
    """The ``.logits`` of ``forward()`` (a causal LM's forward pass), run under ``autocast`` when
    given and then cast to float32 (the losses reduce in float32)."""
    with autocast_scope(device_type, autocast):
        logits = forward().logits
    return logits if autocast is None else logits.float()


def _shifted(logits: Tensor, tokens: Tensor, mask: Tensor):
    """Position t predicts token t + 1; ``mask[:, 1:]`` selects the scored targets."""
    return logits[:, :-1], tokens[:, 1:], mask[:, 1:].to(logits.dtype)


def sequence_ce_from_logits(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """(N,) mean cross-entropy over each sequence's scored targets (``mask[:, 1:]``)."""
    logits, targets, weight = _shifted(logits, tokens, mask)
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view(targets.shape) * weight
    return ce.sum(1) / weight.sum(1).clamp_min(1.0)


def sequence_ce(model: "GPTNeoXForCausalLM", params: Tree, tokens: Tensor, mask: Tensor,
                autocast: Optional[torch.dtype] = None) -> Tensor:
    """(N,) per-sequence CE_i(params): the mean over sequence i's scored tokens, as BLISS's
    ``chunked_cross_entropy`` before weighting (mean over tokens, then per sample)."""
    return sequence_ce_from_logits(lm_logits(model, params, tokens, autocast), tokens, mask)


def token_kl(proxy_logits: Tensor, target_logits: Tensor, mask: Tensor) -> Tensor:
    """(N,) KL(target || proxy) per position, summed over the vocabulary, averaged over each
    sequence's scored positions:

        KL_i = mean_t sum_v p_T(v | t) (log p_T(v | t) - log p_P(v | t)).

    This is what BLISS's ``F.kl_div(log_softmax(proxy), softmax(target))`` computes: a forward KL
    from the frozen target, whose gradient in the proxy is a cross-entropy against the target's
    soft labels (distillation toward the target, mass-covering)."""
    weight = mask[:, 1:].to(proxy_logits.dtype)
    log_q = torch.log_softmax(proxy_logits[:, :-1], -1)
    log_p = torch.log_softmax(target_logits[:, :-1], -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * weight
    return kl.sum(1) / weight.sum(1).clamp_min(1.0)


class ScoreModel(nn.Module):
    """BLISS's score network: s(sequence) = sigmoid(Linear(mean_t h_t)), h the final-layer-norm
    hidden states of a GPT-NeoX backbone, the mean over the sequence's real tokens (``mask``).
    Parameter names: ``backbone.*`` (as ``gpt_neox.*`` in the LM) and ``head.weight``/``head.bias``."""

    def __init__(self, config: "GPTNeoXConfig"):
        super().__init__()
        self.backbone = _transformers().GPTNeoXModel(config)
        self.head = nn.Linear(config.hidden_size, 1)

    def forward(self, tokens: Tensor, mask: Tensor, autocast: Optional[torch.dtype] = None) -> Tensor:
        """(N,) scores; with ``autocast`` the backbone runs under autocast and its hidden states
        are cast to float32: pooling, head and sigmoid in float32."""
        with autocast_scope(tokens.device.type, autocast):
            hidden = self.backbone(input_ids=tokens, use_cache=False).last_hidden_state
        if autocast is not None:
            hidden = hidden.float()
        w = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
        return torch.sigmoid(self.head(pooled)).squeeze(-1)


def score_params_from_lm(score: ScoreModel, lm_params: Tree, generator: Optional[torch.Generator] = None) -> Tree:
    """Score-model parameters initialised from a (warmed-up) LM's: the backbone copied from
    ``gpt_neox.*``, the head freshly drawn (PyTorch's Linear init, seeded by ``generator``).
    ``embed_out`` (the LM head) is not used, as in BLISS's score model."""
    out = {}
    for name, p in score.named_parameters():
        if name.startswith("backbone."):
            source = "gpt_neox." + name[len("backbone."):]
            if source not in lm_params or lm_params[source].shape != p.shape:
                raise ValueError(f"score model parameter {name!r} has no match {source!r} of the same shape in "
                                 "the LM: the score backbone must have the proxy's architecture")
            out[name] = lm_params[source].detach().clone()
    bound = 1.0 / score.head.in_features ** 0.5
    # drawn where the generator lives, then put beside the backbone (the problem's device)
    drawn_on = generator.device if generator is not None else None
    dtype = score.head.weight.dtype
    device = next(iter(out.values())).device if out else score.head.weight.device
    w = torch.rand(score.head.weight.shape, generator=generator, dtype=dtype, device=drawn_on) * 2 - 1
    b = torch.rand(score.head.bias.shape, generator=generator, dtype=dtype, device=drawn_on) * 2 - 1
    out["head.weight"], out["head.bias"] = (w * bound).to(device), (b * bound).to(device)
    return out


def scores(score: ScoreModel, params: Tree, tokens: Tensor, mask: Tensor,
           autocast: Optional[torch.dtype] = None) -> Tensor:
    """(N,) sigmoid scores in (0, 1) of the sequences under score-model parameters ``params``
    (the backbone under ``autocast`` when given, the scores float32)."""
    return functional_call(score, params, (tokens, mask), {"autocast": autocast})

