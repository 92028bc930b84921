"""Metrics of data selection for language-model pretraining (BLISS's evaluation, reduced).

BLISS (Hao et al., "A Lightweight Bilevel Influence Scoring Method for Data Selection in Language
Model Pretraining", arXiv:2510.06048) and MATES (Yu, Das, Xiong, NeurIPS 2024) judge a selection by
the model trained on it; at our scale the judges are:

* held-out perplexity ``exp(sum_t CE_t / n_tokens)`` on in-domain and out-of-domain test text
  (:func:`perplexity`, token-weighted over all sequences);
* last-word cloze loss and accuracy (LAMBADA, Paperno et al. 2016: the loss on the final word's
  tokens only; a passage is correct when greedy decoding reproduces every token of the word)
  (:func:`cloze_scores`);
* the selection's composition against the pool: the fraction of planted noise and of each source
  (:func:`composition`);
* AUROC of the scores for clean against planted noise (:func:`auroc`: the Mann-Whitney
  probability that a clean sequence scores above a noisy one, ties 1/2);
* Spearman correlation of the scores with one-step influence (:func:`spearman`,
  :func:`one_step_influence`): the change of validation loss ``f(theta - lr grad CE_i) - f(theta)``
  after one SGD step on sequence i (MATES's probe), or its first-order form
  ``-lr <grad CE_i, grad f>``;
* steps-to-match (:func:`steps_to_match`): the first evaluated step at which a run's validation
  loss reaches a reference loss (random selection's final one), the analogue of the paper's 1.7x.

Everything here takes plain tensors / arrays or a ``logits_fn(input_ids) -> logits`` callable, so
it does not depend on which language model is evaluated.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["token_losses", "perplexity", "cloze_scores", "composition", "auroc", "rankdata",
           "spearman", "one_step_influence", "steps_to_match"]

LogitsFn = Callable[[Tensor], Tensor]


def token_losses(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy per position, shape (B, T-1): position t predicts ``tokens[:, t+1]``
    from ``logits[:, t]``; a position counts only when its target is scored (``mask[:, t+1]``),
    else it is 0."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:],
                                           reduction="none")
    return ce * mask[:, 1:].to(ce.dtype)


def _check_pair(what: str, tokens: Tensor, mask: Tensor) -> None:
    if tokens.ndim != 2 or tokens.shape != mask.shape or tokens.shape[0] == 0:
        raise ValueError(f"{what}: tokens and mask must be equal (N, L) tensors with N >= 1, got "
                         f"{tuple(tokens.shape)} and {tuple(mask.shape)}")
    empty = (mask[:, 1:].sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{what}: sequence(s) {empty[:5]} have no scored token (mask[:, 1:] is all False)")


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, tokens: Tensor, mask: Tensor, batch_size: int = 16) -> float:
    """Token-weighted perplexity ``exp(sum CE / number of scored tokens)`` of (N, L) ``tokens``,
    where ``mask`` marks the real tokens (a position t >= 1 is scored when ``mask[:, t]``)."""
    _check_pair("perplexity", tokens, mask)
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        ids, m = tokens[start:start + batch_size], mask[start:start + batch_size]
        total += float(token_losses(logits_fn(ids), ids, m).double().sum())
        count += int(m[:, 1:].sum())
    return math.exp(total / count)


@torch.no_grad()
def cloze_scores(logits_fn: LogitsFn, tokens: Tensor, mask: Tensor, batch_size: int = 16) -> Dict[str, float]:
    """Last-word cloze over passages ``context + target`` (``mask`` True on the target word's tokens
    only): ``cloze_loss``, the mean over passages of the mean CE of the target's tokens (the loss on
    the final word; the validation loss f of the data-selection problem), and ``cloze_accuracy``,
    the fraction of passages where the argmax prediction at every target position is the target
    token (greedy decoding of the whole word, LAMBADA's accuracy)."""
    _check_pair("cloze_scores", tokens, mask)
    losses: List[float] = []
    correct: List[bool] = []
    for start in range(0, tokens.shape[0], batch_size):
        ids, m = tokens[start:start + batch_size], mask[start:start + batch_size]
        logits = logits_fn(ids)
        scored = m[:, 1:]
        ce = token_losses(logits, ids, m)
        losses.extend((ce.sum(1) / scored.sum(1)).tolist())
        hit = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~scored.bool()
        correct.extend(hit.all(1).tolist())
    return {"cloze_loss": float(np.mean(losses)), "cloze_accuracy": float(np.mean(correct))}


def composition(selected: Sequence[int], sources: Sequence[str], noise: Sequence[str]) -> Dict[str, float]:
    """The selection's make-up against the pool's.

    ``sources[i]`` and ``noise[i]`` describe pool sequence i (``noise[i]`` is ``""`` for clean data,
    else the planted kind). Returns ``noise_selected`` / ``noise_pool`` (fractions of planted noise),
    ``noise_ratio`` (their quotient; 0 = no noise kept, 1 = the base rate; nan when the pool has
    none), ``source_selected/<s>`` and ``source_pool/<s>`` for every source and
    ``noise_selected/<kind>`` for every planted kind (fractions of the selection)."""
    n = len(sources)
    if len(noise) != n:
        raise ValueError(f"composition: {n} sources but {len(noise)} noise labels")
    idx = np.asarray(list(selected), dtype=np.int64)
    if idx.size == 0:
        raise ValueError("composition: the selection is empty")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"composition: selected indices must be in [0, {n}), got min {idx.min()} max {idx.max()}")
    if len(np.unique(idx)) != idx.size:
        raise ValueError("composition: the selection repeats indices")
    is_noise = np.asarray([bool(k) for k in noise])
    out: Dict[str, float] = {"noise_selected": float(is_noise[idx].mean()), "noise_pool": float(is_noise.mean())}
    out["noise_ratio"] = out["noise_selected"] / out["noise_pool"] if out["noise_pool"] > 0 else float("nan")
    src = np.asarray(list(sources))
    for s in sorted(set(sources)):
        out[f"source_selected/{s}"] = float((src[idx] == s).mean())
        out[f"source_pool/{s}"] = float((src == s).mean())
    kinds = np.asarray(list(noise))
    for k in sorted({k for k in noise if k}):
        out[f"noise_selected/{k}"] = float((kinds[idx] == k).mean())
    return out


def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(scores: Sequence[float], is_noise: Sequence[bool]) -> float:
    """P(score of a clean sequence > score of a noisy one), ties 1/2 (Mann-Whitney U / (n_c n_n)).

    1 = every clean sequence outranks every planted one, 0.5 = chance. ``nan`` when one class is
    empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_noise, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.shape[0]} scores but {y.shape[0]} labels")
    n_noise, n_clean = int(y.sum()), int((~y).sum())
    if n_noise == 0 or n_clean == 0:
        return float("nan")
    r = rankdata(s)
    u_clean = r[~y].sum() - n_clean * (n_clean + 1) / 2.0
    return float(u_clean / (n_clean * n_noise))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (average, for ties) ranks.
    ``nan`` when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if ra.shape != rb.shape or ra.size < 2:
        raise ValueError(f"spearman: need two equally long sequences of >= 2 values, got {ra.size} and {rb.size}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def one_step_influence(loss_fn: Callable[[Mapping[str, Tensor], object], Tensor], params: Mapping[str, Tensor],
                       train_items: Sequence[object], val_batch: object, lr: float,
                       first_order: bool = False) -> np.ndarray:
    """MATES's one-step probe: for each training item i, ``f(theta - lr grad L_i(theta)) - f(theta)``
    with ``f = loss_fn(., val_batch)`` and ``L_i = loss_fn(., item_i)`` (negative = the step on item
    i lowers the validation loss, i.e. the item helps). With ``first_order=True`` the Taylor form
    ``-lr <grad L_i, grad f>`` (one gradient per item, no second forward).

    ``loss_fn(params, batch)`` is a scalar; ``params`` a dict of tensors (not modified)."""
    names = list(params)
    theta = {k: params[k].detach() for k in names}

    def grad_of(batch):
        p = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        loss = loss_fn(p, batch)
        return torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True), float(loss.detach())

    grads_f, f0 = grad_of(val_batch)
    out = np.empty(len(train_items), dtype=np.float64)
    for i, item in enumerate(train_items):
        g_i, _ = grad_of(item)
        if first_order:
            out[i] = -lr * sum(float((a * b).sum()) for a, b in zip(g_i, grads_f) if a is not None and b is not None)
        else:
            stepped = {k: (theta[k] - lr * g if g is not None else theta[k]) for k, g in zip(names, g_i)}
            with torch.no_grad():
                out[i] = float(loss_fn(stepped, val_batch)) - f0
    return out


def steps_to_match(steps: Sequence[int], losses: Sequence[float], reference: float) -> Optional[int]:
    """The first evaluated step whose loss is <= ``reference`` (None if the curve never reaches it).

    With ``reference`` = random selection's final validation loss and ``steps``/``losses`` BLISS's
    curve, ``final_step / steps_to_match`` is the speed-up (the paper's 1.7x)."""
    if len(steps) != len(losses):
        raise ValueError(f"steps_to_match: {len(steps)} steps but {len(losses)} losses")
    if list(steps) != sorted(steps):
        raise ValueError("steps_to_match: steps must be increasing")
    for s, l in zip(steps, losses):
        if l <= reference:
            return int(s)
    return None
