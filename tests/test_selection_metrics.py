"""Selection metrics on hand-made inputs whose answers are computed here."""
import math

import numpy as np
import pytest
import torch

from bilevel.problems.selection_metrics import (auroc, cloze_scores, composition, one_step_influence,
                                                perplexity, rankdata, spearman, steps_to_match)

V = 4


def table_lm(table):
    """A bigram LM: logits at position t = table[input_ids[t]] (table (V, V) of log-probs)."""
    return lambda ids: table[ids]


def padded(seqs, pad=0):
    length = max(len(q) for q in seqs)
    tokens = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, q in enumerate(seqs):
        tokens[i, :len(q)] = torch.tensor(q)
        mask[i, :len(q)] = True
    return tokens, mask


def test_perplexity_of_a_bigram_table_is_exp_mean_token_nll():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25],
                          [0.1, 0.2, 0.3, 0.4], [0.5, 0.3, 0.1, 0.1]])
    table = probs.log()
    seqs = [[0, 0, 1, 2], [2, 3, 0], [1, 3]]  # different lengths: padding must not count
    nll = [-math.log(probs[a, b]) for q in seqs for a, b in zip(q[:-1], q[1:])]
    expected = math.exp(sum(nll) / len(nll))  # token-weighted: 3 + 2 + 1 = 6 predictions
    tokens, mask = padded(seqs)
    assert perplexity(table_lm(table), tokens, mask, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert perplexity(table_lm(torch.zeros(V, V)), tokens, mask) == pytest.approx(V, rel=1e-6)
    tokens, mask = padded([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no scored token"):
        perplexity(table_lm(table), tokens, mask)


def test_cloze_loss_is_the_target_tokens_only_and_accuracy_is_greedy_match():
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1],
                          [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    lm = table_lm(probs.log())
    contexts = [[3, 0], [2, 2, 0], [1]]
    targets = [[1, 2], [1, 0], [3]]
    tokens, _ = padded([c + t for c, t in zip(contexts, targets)])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, (c, t) in enumerate(zip(contexts, targets)):
        mask[i, len(c):len(c) + len(t)] = True
    # passage 0: P(1|0) P(2|1); argmax after 0 is 1, after 1 is 2: correct
    # passage 1: P(1|0) P(0|1); argmax after 1 is 2, not 0: wrong
    # passage 2: P(3|1); argmax after 1 is 2: wrong
    losses = [-(math.log(0.6) + math.log(0.7)) / 2, -(math.log(0.6) + math.log(0.1)) / 2, -math.log(0.1)]
    out = cloze_scores(lm, tokens, mask, batch_size=2)
    assert out["cloze_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert out["cloze_accuracy"] == pytest.approx(1 / 3)


def test_composition_counts_noise_and_sources():
    sources = ["wiki", "wiki", "news", "news", "bible", "wiki", "news", "bible"]
    noise = ["", "spam", "", "random", "", "", "", "spam"]
    out = composition([0, 2, 3, 5], sources, noise)
    assert out["noise_pool"] == pytest.approx(3 / 8)
    assert out["noise_selected"] == pytest.approx(1 / 4)
    assert out["noise_ratio"] == pytest.approx((1 / 4) / (3 / 8))
    assert out["source_selected/wiki"] == pytest.approx(2 / 4)
    assert out["source_selected/news"] == pytest.approx(2 / 4)
    assert out["source_selected/bible"] == 0.0
    assert out["source_pool/bible"] == pytest.approx(2 / 8)
    assert out["noise_selected/random"] == pytest.approx(1 / 4)
    assert out["noise_selected/spam"] == 0.0
    with pytest.raises(ValueError, match="repeats"):
        composition([0, 0], sources, noise)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        composition([8], sources, noise)


def test_auroc_is_the_pairwise_probability_with_half_ties():
    scores = [0.9, 0.1, 0.5, 0.5, 0.3]
    noise = [False, True, False, True, True]
    # clean {0.9, 0.5} vs noise {0.1, 0.5, 0.3}: pairs won 3 + (1 + 0.5 + 1) = 5.5 of 6
    assert auroc(scores, noise) == pytest.approx(5.5 / 6)
    assert auroc([1, 2, 3], [True, False, False]) == 1.0
    assert auroc([3, 2, 1], [True, False, False]) == 0.0
    assert math.isnan(auroc([1, 2], [False, False]))


def test_rankdata_and_spearman():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = (1, 2, 3, 4), b = (2, 1, 4, 3): d^2 sum = 4, rho = 1 - 6*4 / (4*15) = 0.6
    assert spearman([1, 2, 3, 4], [0.2, 0.1, 0.9, 0.5]) == pytest.approx(0.6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_one_step_influence_exact_and_first_order_on_least_squares():
    # loss(w, (a, b)) = 0.5 (a.w - b)^2: gradients and the stepped loss are closed forms
    def loss_fn(p, batch):
        a, b = batch
        return 0.5 * ((a * p["w"]).sum() - b) ** 2

    w = torch.tensor([0.5, -1.0], dtype=torch.float64)
    val = (torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    items = [(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)),
             (torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64))]
    lr = 0.1
    f = lambda v: 0.5 * (float(val[0] @ v) - float(val[1])) ** 2
    grad_f = (float(val[0] @ w) - float(val[1])) * val[0]
    exact, first = [], []
    for a, b in items:
        g = (float(a @ w) - float(b)) * a
        exact.append(f(w - lr * g) - f(w))
        first.append(-lr * float(g @ grad_f))
    params = {"w": w}
    assert one_step_influence(loss_fn, params, items, val, lr) == pytest.approx(exact, rel=1e-10)
    assert one_step_influence(loss_fn, params, items, val, lr, first_order=True) == pytest.approx(first, rel=1e-10)
    assert params["w"].tolist() == [0.5, -1.0]  # not modified


def test_steps_to_match():
    steps = [0, 10, 20, 30, 40]
    assert steps_to_match(steps, [5.0, 4.0, 3.5, 3.0, 2.9], reference=3.5) == 20
    assert steps_to_match(steps, [5.0, 4.0, 3.9, 3.8, 3.7], reference=3.5) is None
    with pytest.raises(ValueError, match="increasing"):
        steps_to_match([0, 20, 10], [1, 1, 1], 1.0)
