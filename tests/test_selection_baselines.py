"""Selection and baselines on hand-made inputs: top-k, Gumbel top-k, DSIR's hashed n-gram weights
(closed form; the data-selection package when installed), perplexity scores, the MATES regression."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from bilevel.problems.selection_baselines import (_bucket, dsir_scores, fit_score_regression, hashed_ngram_counts,
                                                  hashed_ngram_log_weights, perplexity_scores, random_scores,
                                                  rank_targets, select_top, wordpunct)


def test_select_top_keeps_floor_fraction_best_with_index_ties():
    scores = [0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.0, 0.4, 0.6]
    assert select_top(scores, 0.2).tolist() == [1, 3]  # tie 0.9: lower index first
    assert select_top(scores, 0.35).tolist() == [1, 3, 5]  # floor(3.5) = 3
    assert select_top(scores, 1.0).tolist() == [1, 3, 5, 9, 2, 8, 4, 6, 0, 7]
    assert select_top([5.0, 1.0], 0.1).tolist() == [0]  # at least one
    with pytest.raises(ValueError, match="fraction"):
        select_top(scores, 0.0)
    with pytest.raises(ValueError, match="not finite"):
        select_top([1.0, float("nan")], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        select_top(scores, 0.5, temperature=0.0)


def test_gumbel_top_k_is_seeded_and_reduces_to_top_k_at_low_temperature():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=50)
    top = select_top(scores, 0.2)
    assert sorted(select_top(scores, 0.2, temperature=1e-6, seed=1).tolist()) == sorted(top.tolist())
    a = select_top(scores, 0.2, temperature=1.0, seed=5)
    assert a.tolist() == select_top(scores, 0.2, temperature=1.0, seed=5).tolist()
    assert len(set(a.tolist())) == 10
    # with the Gumbel noise of the seed the result is the top-k of score / T + G
    g = np.random.default_rng(5).gumbel(size=50)
    assert sorted(a.tolist()) == sorted(np.argsort(-(scores / 1.0 + g))[:10].tolist())


def test_random_scores_give_a_seeded_uniform_subset():
    a, b = select_top(random_scores(100, seed=1), 0.2), select_top(random_scores(100, seed=1), 0.2)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 20
    assert a.tolist() != select_top(random_scores(100, seed=2), 0.2).tolist()


def test_wordpunct_and_hashed_counts():
    assert wordpunct("The cat's mat!!") == ["the", "cat", "'", "s", "mat", "!!"]
    counts = hashed_ngram_counts("a b a", num_buckets=1_000_003, n=2)
    expected = Counter({_bucket("a", 1_000_003): 2, _bucket("b", 1_000_003): 1, _bucket("a b", 1_000_003): 1,
                        _bucket("b a", 1_000_003): 1})
    assert {int(i): int(counts[i]) for i in np.nonzero(counts)[0]} == dict(expected)


def features(text):
    words = wordpunct(text)
    return Counter(words + [" ".join(words[i:i + 2]) for i in range(len(words) - 1)])


def test_dsir_log_weights_match_the_closed_form():
    pool = ["the cat sat on the mat", "buy cheap pills now now", "the dog sat"]
    target = ["the cat sat", "a dog sat on a mat"]
    B, s = 1_000_003, 1.0
    feats = [features(t) for t in pool]
    all_feats = set().union(*feats, *[features(t) for t in target])
    assert len({_bucket(f, B) for f in all_feats}) == len(all_feats)  # no collisions: the closed form applies
    raw = sum(feats, Counter())
    tgt = sum((features(t) for t in target), Counter())
    n_raw, n_tgt = sum(raw.values()), sum(tgt.values()) + s * B
    expected = [sum(c * (math.log((tgt[f] + s) / n_tgt + 1e-8) - math.log(raw[f] / n_raw + 1e-8))
                    for f, c in fc.items()) for fc in feats]
    got = hashed_ngram_log_weights(pool, target, num_buckets=B, target_smoothing=s)
    assert got == pytest.approx(expected, rel=1e-9)
    assert dsir_scores(pool, target, num_buckets=B, target_smoothing=s, use_package=False) == pytest.approx(
        expected, rel=1e-9)


def test_dsir_ranks_target_like_text_above_spam_of_the_same_length():
    pool = ["the cat sat on the mat", "buy cheap pills now now now", "a dog sat on a mat"]
    for smoothing in (0.0, 1.0):
        w = hashed_ngram_log_weights(pool, ["the cat sat", "a dog sat on a mat"], target_smoothing=smoothing)
        assert w[0] > w[1] and w[2] > w[1]


def test_dsir_package_agrees_with_our_weights(tmp_path):
    pytest.importorskip("data_selection")
    pool = ["the cat sat on the mat today", "buy cheap pills now now now", "the dog sat on a log",
            "quantum flux of the reactor", "a cat and a dog"]
    target = ["the cat sat", "a dog sat on a mat"]
    for smoothing in (0.0, 1.0):
        ours = hashed_ngram_log_weights(pool, target, num_buckets=512, target_smoothing=smoothing)
        theirs = dsir_scores(pool, target, num_buckets=512, target_smoothing=smoothing, workdir=str(tmp_path),
                             use_package=True)
        assert theirs == pytest.approx(ours, rel=1e-9)


def test_perplexity_scores_are_minus_mean_token_ce():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    lm = lambda ids: probs.log()[ids]
    tokens = torch.tensor([[0, 1, 1, 0], [2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    expected = [-(-math.log(0.25) - math.log(0.8) - math.log(0.1)) / 3, -(-math.log(1 / 3) - math.log(0.5)) / 2]
    assert perplexity_scores(lm, tokens, mask, batch_size=1) == pytest.approx(expected, rel=1e-6)


def test_rank_targets():
    assert rank_targets([3.0, -1.0, 10.0, 3.0]).tolist() == pytest.approx([0.5, 0.125, 0.875, 0.5])


def test_score_regression_learns_the_order_of_the_targets():
    torch.manual_seed(0)
    tokens = torch.randint(0, 10, (64, 6))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    targets = tokens.float().mean(1).numpy() ** 2  # any monotone function of the mean token
    w = torch.zeros(2, requires_grad=True)
    score = lambda t, m: torch.sigmoid(w[0] * (t.float().mean(1) - 4.5) + w[1])
    history = fit_score_regression(score, [w], tokens, mask, targets, epochs=30, lr=0.05, batch_size=16)
    assert history[-1] < history[0] / 2
    from bilevel.problems.selection_metrics import spearman
    with torch.no_grad():
        assert spearman(score(tokens, mask).numpy(), targets) > 0.99
