"""DSIR through the PyPI ``data-selection`` package (Xie et al. 2023, ``p-lambda/dsir``).

Imported only by :func:`bilevel.problems.selection_baselines.dsir_scores`; an ``ImportError``
here (package or its ``nltk`` dependency missing) makes it fall back to our own implementation.
The package reads jsonl files and writes its weights under a cache folder, so the texts are
written to a temporary folder first; one process (``num_proc=1``) keeps the weights in pool
order (the package interleaves examples across its virtual shards).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import numpy as np

from data_selection import HashedNgramDSIR  # noqa: F401  (ImportError when not installed)


def _write_jsonl(path: str, texts: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def package_log_weights(pool_texts: Sequence[str], target_texts: Sequence[str], num_buckets: int = 10000,
                        target_smoothing: float = 0.0, workdir: Optional[str] = None) -> np.ndarray:
    """The package's log importance weight of every pool text against the target texts (its
    ``fit_importance_estimator(num_tokens_to_fit="all")`` then ``compute_importance_weights()``)."""
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the package draws a progress bar per pass over each file
    try:
        return _log_weights(pool_texts, target_texts, num_buckets, target_smoothing, workdir)
    finally:
        if quiet is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = quiet


def _log_weights(pool_texts, target_texts, num_buckets, target_smoothing, workdir) -> np.ndarray:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        raw, target = os.path.join(tmp, "pool.jsonl"), os.path.join(tmp, "target.jsonl")
        _write_jsonl(raw, pool_texts)
        _write_jsonl(target, target_texts)
        dsir = HashedNgramDSIR([raw], [target], cache_dir=os.path.join(tmp, "cache"), num_proc=1,
                               ngrams=2, num_buckets=num_buckets, tokenizer="wordpunct")
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        if target_smoothing:
            # 1.0.3 has no target smoothing (later versions' target_laplace_smoothing): add the
            # pseudo-count to the target counts, hashed by the package's own featurizer
            counts = sum(dsir.featurizer(t) for t in target_texts).astype(np.float64) + target_smoothing
            dsir.target_probs = counts / counts.sum()
            dsir.log_diff = np.log(dsir.target_probs + 1e-8) - np.log(dsir.raw_probs + 1e-8)
        dsir.compute_importance_weights()
        weights = np.load(os.path.join(tmp, "cache", "log_importance_weights", "0.npy"))
    if weights.shape[0] != len(pool_texts):
        raise RuntimeError(f"data-selection returned {weights.shape[0]} weights for {len(pool_texts)} pool texts")
    return np.asarray(weights, dtype=np.float64)
