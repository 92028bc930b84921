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


def test_data_selection_warm_up_is_the_pipelines_training_loop():
    """One LM training loop: the data-selection problem warms its proxy and target up with
    :func:`train_lm` (bilevel select's), both drawing from one seeded stream. Before, it had its
    own loop with a per-sequence-mean loss, which differs from the token mean on padded rows."""
    pytest.importorskip("transformers")
    from bilevel.problems import language_model as LM
    from bilevel.problems.data_selection import DataSelection
    steps, batch, lr = 3, 8, 3e-3
    p = DataSelection(data="builtin", model_preset="tiny", max_pool=48, warmup_steps=steps, warmup_lr=lr,
                      batch_size=batch, eval_pool=8, max_eval=8, seed=0)
    draws = torch.randint(48, (2 * steps, batch), generator=torch.Generator().manual_seed(0))
    padded = (~p.pool.mask[draws.flatten()]).any(1).sum()
    assert padded > 0  # batches with padded rows: where the two losses (and the old loop's result) differ
    generator = torch.Generator().manual_seed(0)
    for role, model_seed, warmed in (("proxy", 0, p.proxy_params), ("target", 1, p.target_params)):
        model = LM.build_lm(getattr(p, role).config, seed=model_seed)
        start = LM.params_of(model)
        train_lm(model, p.pool.tokens, p.pool.mask, None, steps, batch, lr, generator=generator)
        assert any(not torch.equal(start[k], v) for k, v in warmed.items())  # it did train
        for name, value in model.named_parameters():
            assert torch.equal(value.detach(), warmed[name]), (role, name)
