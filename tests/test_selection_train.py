"""Training the target on a selection: only selected rows are drawn, the loss goes down, the
optimizer state carries over; evaluation names its metrics."""
import math
from types import SimpleNamespace

import pytest
import torch

from bilevel.problems.selection_train import batch_loss, evaluate_lm, train_lm

V = 5


class Bigram(torch.nn.Module):
    """logits[t] = table[tokens[t]]; records every batch it sees."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(V, V))
        self.seen = []

    def forward(self, input_ids, use_cache=False):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=self.table[input_ids])


def test_batch_loss_is_the_mean_over_scored_tokens():
    logits = torch.zeros(2, 3, V)
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert float(batch_loss(logits, tokens, mask)) == pytest.approx(math.log(V))  # 3 scored positions, each log V


def test_train_lm_draws_only_the_selection_and_learns_it():
    tokens = torch.tensor([[0, 1, 0, 1], [2, 3, 2, 3], [4, 4, 4, 4], [1, 0, 1, 0]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    model = Bigram()
    with torch.no_grad():
        before = float(batch_loss(model(tokens[[0, 3]]).logits, tokens[[0, 3]], mask[[0, 3]]))
    model.seen.clear()
    evals = []
    state = train_lm(model, tokens, mask, torch.tensor([0, 3]), steps=30, batch_size=2, lr=0.1, seed=0,
                     on_eval=evals.append, eval_every=10)
    rows = {tuple(r.tolist()) for batch in model.seen for r in batch}
    assert rows <= {(0, 1, 0, 1), (1, 0, 1, 0)}  # never the unselected rows
    assert evals == [10, 20, 30]
    after = float(batch_loss(model(tokens[[0, 3]]).logits, tokens[[0, 3]], mask[[0, 3]]))
    assert after < 0.5 * before
    assert state["state"][0]["step"] == 30  # AdamW's state, to continue the next round from
    with pytest.raises(ValueError, match="selection is empty"):
        train_lm(model, tokens, mask, torch.tensor([], dtype=torch.long), steps=1, batch_size=1, lr=0.1, seed=0)


def test_evaluate_lm_names_its_metrics():
    model = Bigram()
    tokens = torch.tensor([[0, 1, 2]])
    out = evaluate_lm(model, {"in": ("perplexity", tokens, torch.ones_like(tokens, dtype=torch.bool)),
                              "val": ("cloze", tokens, torch.tensor([[False, False, True]])),
                              "out": ("perplexity", None, None)})
    assert out["ppl_in"] == pytest.approx(V) and out["val_loss"] == pytest.approx(math.log(V))
    assert out["val_accuracy"] == 0.0  # uniform logits: the argmax is token 0, the target is 2
    assert "ppl_out" not in out  # an empty set is skipped
