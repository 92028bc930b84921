"""Data-selection baselines that BLISS is compared with, behind one interface: a score per pool
sequence (higher = keep), then :func:`select_top` keeps a fraction of the pool.

* ``random``: i.i.d. uniform scores from a seeded generator (a uniformly random subset);
* ``full``: every sequence (the selection is the whole pool; the token budget stays the same,
  the target simply sees each sequence less often);
* ``dsir``: hashed n-gram importance weights (Xie, Santurkar, Ma, Liang, "Data Selection for
  Language Models via Importance Resampling", NeurIPS 2023): unigram + bigram features hashed
  into ``num_buckets`` buckets, bag-of-n-grams distributions p_target (fitted on the validation
  text) and p_raw (on the pool), score = sum_features count_j (log p_target_j - log p_raw_j).
  :func:`dsir_scores` uses the PyPI ``data-selection`` package (``HashedNgramDSIR``) when it is
  installed and falls back to :func:`hashed_ngram_log_weights`, our own implementation of the
  same formula, otherwise;
* ``perplexity``: minus the proxy LM's mean token cross-entropy of the sequence (perplexity
  filtering: keep the sequences the proxy finds most predictable);
* ``mates``: MATES (Yu, Das, Xiong, NeurIPS 2024): one-step influence probes of the current
  model on a few pool sequences (:func:`~bilevel.problems.selection_metrics.one_step_influence`),
  regressed by a score model of the same architecture as BLISS's (:func:`fit_score_regression`),
  which then scores the whole pool.

Selection (:func:`select_top`): deterministic top-k of the scores (BLISS's ``np.argpartition``)
with k = floor(fraction * n), or Gumbel top-k (sample without replacement proportionally to
exp(score / temperature): top-k of score / temperature + Gumbel noise, as MATES and QuRating).
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BASELINES", "select_top", "random_scores", "full_scores", "wordpunct", "hashed_ngram_counts",
           "hashed_ngram_log_weights", "dsir_scores", "perplexity_scores", "rank_targets", "fit_score_regression"]

BASELINES = ("random", "full", "dsir", "perplexity", "mates")


def select_top(scores: Sequence[float], fraction: float = 0.2, temperature: Optional[float] = None,
               seed: int = 0) -> np.ndarray:
    """Indices of the kept sequences, best first: k = max(1, floor(fraction * n)).

    ``temperature=None``: the k highest scores (ties broken by the lower index, so the result is
    deterministic). ``temperature > 0``: Gumbel top-k, the k largest ``score / temperature + G_i``
    with G_i i.i.d. standard Gumbel from ``numpy.random.default_rng(seed)`` (a draw without
    replacement with probabilities proportional to exp(score / temperature))."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"select_top: scores must be a non-empty 1-d sequence, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"select_top: {int((~np.isfinite(s)).sum())} score(s) are not finite")
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"select_top: fraction={fraction!r} must be a number in (0, 1]")
    k = max(1, int(np.floor(fraction * s.size + 1e-9)))
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"select_top: temperature={temperature!r} must be > 0 (or None for top-k)")
        s = s / temperature + np.random.default_rng(seed).gumbel(size=s.size)
    order = np.lexsort((np.arange(s.size), -s))  # by score descending, then index ascending
    return order[:k]


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    """Uniform scores in [0, 1): the top-k is a uniformly random subset."""
    return np.random.default_rng(seed).random(n)


def full_scores(n: int) -> np.ndarray:
    """All ones: with fraction 1 the whole pool."""
    return np.ones(n)


# -- DSIR ---------------------------------------------------------------------------------------

_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def wordpunct(text: str) -> List[str]:
    """NLTK's ``wordpunct_tokenize`` (the regex ``\\w+|[^\\w\\s]+``) on the lower-cased text."""
    return _WORDPUNCT.findall(text.lower())


def _bucket(feature: str, num_buckets: int) -> int:
    # sha256 as DSIR's hash_buckets (stable across processes, unlike Python's salted hash())
    return int(hashlib.sha256(feature.encode("utf-8")).hexdigest(), 16) % num_buckets


def hashed_ngram_counts(text: str, num_buckets: int = 10000, n: int = 2) -> np.ndarray:
    """Counts of the hashed 1..n-grams of ``wordpunct(text)`` in ``num_buckets`` buckets."""
    words = wordpunct(text)
    counts = np.zeros(num_buckets, dtype=np.float64)
    for order in range(1, n + 1):
        for i in range(len(words) - order + 1):
            counts[_bucket(" ".join(words[i:i + order]), num_buckets)] += 1
    return counts


def hashed_ngram_log_weights(pool_texts: Sequence[str], target_texts: Sequence[str], num_buckets: int = 10000,
                             n: int = 2, target_smoothing: float = 0.0) -> np.ndarray:
    """DSIR's log importance weight of each pool text: ``c_i . (log(p_target + 1e-8) - log(p_raw +
    1e-8))`` where ``c_i`` is the text's hashed n-gram count vector, ``p_raw`` the normalized sum
    of the pool's counts and ``p_target`` the normalized sum of the target (validation) texts'
    counts plus ``target_smoothing`` per bucket (0 in ``data-selection`` 1.0.3, the
    ``target_laplace_smoothing`` of later versions: a pseudo-count that keeps an n-gram absent
    from a small target set from costing log(1e-8) per occurrence)."""
    if not pool_texts or not target_texts:
        raise ValueError("hashed_ngram_log_weights: need non-empty pool and target texts")
    pool = np.stack([hashed_ngram_counts(t, num_buckets, n) for t in pool_texts])
    target = sum(hashed_ngram_counts(t, num_buckets, n) for t in target_texts) + target_smoothing
    p_raw = pool.sum(0) / pool.sum()
    p_target = target / target.sum()
    return pool @ (np.log(p_target + 1e-8) - np.log(p_raw + 1e-8))


def dsir_scores(pool_texts: Sequence[str], target_texts: Sequence[str], num_buckets: int = 10000,
                target_smoothing: float = 0.0, workdir: Optional[str] = None,
                use_package: Optional[bool] = None) -> np.ndarray:
    """DSIR log importance weights of the pool against the target texts.

    ``use_package=None``: the ``data-selection`` package if importable, else our implementation;
    ``True`` requires the package (ImportError otherwise); ``False`` uses ours."""
    if use_package is None or use_package:
        try:
            from ._dsir_package import package_log_weights
            return package_log_weights(pool_texts, target_texts, num_buckets=num_buckets,
                                       target_smoothing=target_smoothing, workdir=workdir)
        except ImportError:
            if use_package:
                raise
    return hashed_ngram_log_weights(pool_texts, target_texts, num_buckets=num_buckets,
                                    target_smoothing=target_smoothing)


# -- model-based baselines ----------------------------------------------------------------------

@torch.no_grad()
def perplexity_scores(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, mask: Tensor,
                      batch_size: int = 32) -> np.ndarray:
    """Minus the mean next-token cross-entropy of each (N, L) sequence under ``logits_fn`` over its
    real tokens (``mask``): higher = lower perplexity = kept by perplexity filtering."""
    from .selection_metrics import token_losses
    out: List[float] = []
    for start in range(0, tokens.shape[0], batch_size):
        ids, m = tokens[start:start + batch_size], mask[start:start + batch_size]
        ce = token_losses(logits_fn(ids), ids, m)
        out.extend((-ce.sum(1) / m[:, 1:].sum(1).clamp_min(1)).tolist())
    return np.asarray(out, dtype=np.float64)


def rank_targets(values: Sequence[float]) -> Tensor:
    """Normalized ranks ``(rank - 1/2) / n`` in (0, 1): a monotone map of ``values`` that a sigmoid
    output can reach (ties share their average rank)."""
    from .selection_metrics import rankdata
    return torch.as_tensor((rankdata(values) - 0.5) / len(values), dtype=torch.float32)


def fit_score_regression(score_fn: Callable[[Tensor, Tensor], Tensor], parameters: Iterable[Tensor],
                         tokens: Tensor, mask: Tensor, targets: Sequence[float], epochs: int = 5,
                         lr: float = 1e-3, batch_size: int = 16, seed: int = 0) -> List[float]:
    """Fit a score model to ``targets`` (MATES's data-influence model, here with BLISS's sigmoid
    head), higher target = higher score.

    The targets become their normalized ranks (:func:`rank_targets`; MATES z-normalizes and fits a
    linear head, a sigmoid head needs targets in (0, 1), and ranks keep the order it regresses), and
    ``score_fn(tokens, mask) -> (B,)`` is trained by Adam on the mean squared error for ``epochs``
    shuffled passes over the (N, L) probe sequences. Returns the mean loss of each epoch."""
    if tokens.shape[0] != len(targets) or len(targets) < 2:
        raise ValueError(f"fit_score_regression: {tokens.shape[0]} sequences and {len(targets)} targets; need the "
                         "same number, at least 2")
    y = rank_targets(targets)
    params = [p for p in parameters if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(epochs):
        order = torch.as_tensor(rng.permutation(len(targets)))
        losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = torch.nn.functional.mse_loss(score_fn(tokens[idx], mask[idx]).float(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    return history
