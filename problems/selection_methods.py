"""Scoring the pool, one function per method, for the rounds of ``bilevel select``.

Every method gets the same :class:`RoundInputs` (the current target LM, the proxy, the pool and
validation sequences) and returns a score per pool sequence, higher = keep; the pipeline then
keeps the top fraction (:func:`~bilevel.problems.selection_baselines.select_top`). The baselines
are described in :mod:`~bilevel.problems.selection_baselines`; BLISS (Hao et al., ICML 2026,
arXiv:2510.06048) is the ``bliss`` solver run by :func:`bilevel.solve` on the ``data-selection``
problem (:func:`bliss_scores`), after which the learned score model scores the pool.

MATES's probe (:func:`influence_targets`): the one-step influence of each probed pool sequence on
the validation (cloze) loss of the current target, ``f(theta - lr grad CE_i) - f(theta)``; the
regression target is its negative (a larger value = the step helps more).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from .selection_baselines import (dsir_scores, fit_score_regression, full_scores, perplexity_scores,
                                  random_scores)
from .selection_metrics import one_step_influence
from .selection_train import batch_loss, logits_fn

__all__ = ["RoundInputs", "METHODS", "influence_targets", "score_pool", "score_with"]

METHODS = ("bliss", "random", "full", "dsir", "perplexity", "mates")


@dataclass
class RoundInputs:
    """What a method sees at the start of a round. ``pool`` and ``validation`` are
    :class:`~bilevel.problems.data.tokenizer.Sequences` (``validation``'s mask marks the cloze
    target words); ``pool_texts`` the decoded text of each pool sequence (for DSIR);
    ``options`` the method's settings (see ``SelectConfig``); ``state`` what the method keeps
    across rounds (BLISS's proxy and score parameters)."""

    target: nn.Module
    proxy: nn.Module
    pool: object
    validation: object
    pool_texts: List[str]
    seed: int
    round: int
    target_lr: float
    options: Dict[str, object] = field(default_factory=dict)
    state: Dict[str, object] = field(default_factory=dict)


def lm_loss_fn(model: nn.Module):
    """``loss(params, (tokens, mask))``: the batch's mean next-token CE under ``params``."""
    def loss(params, batch):
        tokens, mask = batch
        return batch_loss(functional_call(model, params, (tokens,), {"use_cache": False}).logits, tokens, mask)
    return loss


def influence_targets(model: nn.Module, tokens: Tensor, mask: Tensor, val_tokens: Tensor, val_mask: Tensor,
                      lr: float, first_order: bool = False) -> np.ndarray:
    """One-step influence of each sequence on the validation loss (negative = helps): see
    :func:`~bilevel.problems.selection_metrics.one_step_influence`."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    items = [(tokens[i:i + 1], mask[i:i + 1]) for i in range(tokens.shape[0])]
    return one_step_influence(lm_loss_fn(model), params, items, (val_tokens, val_mask), lr, first_order=first_order)


@torch.no_grad()
def score_with(score_model: nn.Module, params, tokens: Tensor, mask: Tensor, batch_size: int = 64) -> np.ndarray:
    """The score model's outputs on every sequence, in batches."""
    out = [functional_call(score_model, params, (tokens[s:s + batch_size], mask[s:s + batch_size]))
           for s in range(0, tokens.shape[0], batch_size)]
    return torch.cat(out).double().numpy()


def _fresh_score_model(inputs: RoundInputs, seed: int):
    from .language_model import ScoreModel, score_params_from_lm
    score = ScoreModel(inputs.proxy.config)
    proxy_params = {k: v.detach() for k, v in inputs.proxy.named_parameters()}
    params = score_params_from_lm(score, proxy_params, torch.Generator().manual_seed(seed))
    return score, params


def mates_scores(inputs: RoundInputs) -> np.ndarray:
    """MATES: probe ``mates_probes`` pool sequences with one-step influence on the current target,
    fit a fresh score model (BLISS's architecture, from the proxy) to minus the influence, score
    the pool."""
    o = inputs.options
    n = inputs.pool.tokens.shape[0]
    gen = np.random.default_rng(1000 * inputs.seed + inputs.round + 17)
    probe = np.sort(gen.choice(n, size=min(int(o.get("mates_probes", 64)), n), replace=False))
    val = inputs.validation
    infl = influence_targets(inputs.target, inputs.pool.tokens[probe], inputs.pool.mask[probe], val.tokens, val.mask,
                             inputs.target_lr)
    score, params = _fresh_score_model(inputs, inputs.seed + 7919 * inputs.round)
    trainable = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    fit_score_regression(lambda t, m: functional_call(score, trainable, (t, m)), trainable.values(),
                         inputs.pool.tokens[probe], inputs.pool.mask[probe], -infl,
                         epochs=int(o.get("mates_epochs", 5)), lr=float(o.get("mates_lr", 1e-3)),
                         seed=inputs.seed)
    return score_with(score, {k: v.detach() for k, v in trainable.items()}, inputs.pool.tokens, inputs.pool.mask)


def bliss_scores(inputs: RoundInputs) -> np.ndarray:
    """BLISS's bilevel phase then scoring: see :mod:`bilevel.problems.selection_bliss`."""
    from .selection_bliss import bliss_round
    return bliss_round(inputs)


def score_pool(method: str, inputs: RoundInputs) -> np.ndarray:
    """A score per pool sequence for ``method`` (one of :data:`METHODS`)."""
    n = inputs.pool.tokens.shape[0]
    if method == "random":
        return random_scores(n, seed=1000 * inputs.seed + inputs.round)
    if method == "full":
        return full_scores(n)
    if method == "dsir":
        if "dsir" not in inputs.state:  # the weights depend on the texts only: once per run
            val_texts = [str(t) for t in inputs.options.get("validation_texts", [])]
            inputs.state["dsir"] = dsir_scores(inputs.pool_texts, val_texts,
                                               use_package=inputs.options.get("dsir_package"))
        return np.asarray(inputs.state["dsir"])
    if method == "perplexity":
        return perplexity_scores(logits_fn(inputs.proxy), inputs.pool.tokens, inputs.pool.mask)
    if method == "mates":
        return mates_scores(inputs)
    if method == "bliss":
        return bliss_scores(inputs)
    raise ValueError(f"method={method!r}: must be one of {METHODS}")
