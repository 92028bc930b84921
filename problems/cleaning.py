"""What every data hyper-cleaning problem shares: option checks and detection scores.

The upper variable holds one weight logit x_i per training sample (weight sigma(x_i)); samples
whose weight falls below a threshold are "flagged" as corrupted. The scores compare the flags (or
the logits themselves, threshold-free) with the known corrupted subset.
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor

from .options import check_real


def check_cleaning_options(problem: str, noise_rate, reg, flag_threshold) -> None:
    """The options every hyper-cleaning problem shares: noise_rate in [0, 1), reg > 0 (the squared
    L2 term of the lower loss) and flag_threshold in (0, 1)."""
    check_real(problem, "noise_rate", noise_rate, 0.0, 1.0, include_low=True, rule="a number in [0, 1)")
    check_real(problem, "reg", reg, 0.0, rule="a number > 0 (the squared L2 term makes g strongly convex)")
    check_real(problem, "flag_threshold", flag_threshold, 0.0, 1.0, rule="a number in (0, 1)")


def detection_scores(flagged: Tensor, corrupted: Tensor) -> Dict[str, float]:
    """F1, precision and recall of the boolean prediction ``flagged`` of the boolean truth
    ``corrupted``. Precision and F1 are 0 when nothing is flagged, recall is 0 when nothing is
    corrupted (F1 = 2 tp / (n_flagged + n_corrupted))."""
    tp = int((flagged & corrupted).sum())
    n_flagged, n_corrupted = int(flagged.sum()), int(corrupted.sum())
    return {"f1": 2 * tp / (n_flagged + n_corrupted) if n_flagged else 0.0,
            "precision": tp / n_flagged if n_flagged else 0.0,
            "recall": tp / n_corrupted if n_corrupted else 0.0}


def detection_auc(weight_logits: Tensor, corrupted: Tensor) -> float:
    """Threshold-free detection score: the probability that a corrupted sample has a smaller
    weight logit than a clean one (ties count 1/2), i.e. the ROC AUC of the score -x_i for the
    truth ``corrupted``. 0.5 is chance; 0.5 too when every sample (or none) is corrupted."""
    n_corrupted = int(corrupted.sum())
    if n_corrupted in (0, corrupted.numel()):
        return 0.5
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(corrupted.cpu().numpy(), (-weight_logits).double().cpu().numpy()))
