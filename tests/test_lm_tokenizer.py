"""Tokenizer, token sequences and GPT-NeoX language models of the data-selection problem."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bilevel.problems import language_model as LM  # noqa: E402
from bilevel.problems.data import tokenizer as T  # noqa: E402
from bilevel.problems.data.text_pool import Cloze, Document, TextSplits  # noqa: E402

WORDS = ("the river runs past the old mill and the farmers bring their grain to it every autumn while "
         "children watch the wheel turn slowly in the cold water").split()


def prose(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def splits():
    pool = [Document(f"a/{i}", "a", f"A{i}", prose(80, i)) for i in range(6)]
    pool.append(Document("noise/0", "a", "spam", "buy buy buy " * 20, noise="spam", origin="a/0"))
    val = [Cloze(f"v/{i}", f"v/{i}", "V", prose(20, 3 * i), "water") for i in range(3)]
    test_in = [Document("t/0", "a", "T", "zebra quartz xylophone " * 30)]
    return TextSplits(pool, val, test_in, [])


@pytest.fixture(scope="module")
def tok(splits):
    return T.train_tokenizer(T.training_texts(splits), 300)


def test_training_texts_exclude_test(splits):
    texts = T.training_texts(splits)
    assert len(texts) == len(splits.pool) + len(splits.validation)
    assert not any("zebra" in t for t in texts)
    assert texts[-1].endswith(" water")


def test_bpe_deterministic_and_roundtrip(splits, tok, tmp_path):
    again = T.train_tokenizer(T.training_texts(splits), 300)
    assert tok.backend.to_str() == again.backend.to_str()
    text = "the river runs, unseen bytes: é ✓"
    assert tok.decode(tok.encode(text)) == text  # byte level: no unknown token
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    loaded = T.load_tokenizer(path)
    assert loaded.encode(text) == tok.encode(text) and loaded.eos_id == tok.eos_id
    assert T.load_tokenizer(tmp_path).encode(text) == tok.encode(text)  # a directory with tokenizer.json
    assert T.tokenizer_for(splits, path=path).encode(text) == tok.encode(text)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_tokenizer(["a b"], 100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        T.load_tokenizer(bad)


def test_pack_documents_keeps_provenance_and_masks(splits, tok):
    seqs = T.pack_documents(splits.pool, tok, 16)
    assert seqs.tokens.shape[1] == 16 and seqs.tokens.dtype == torch.long
    # every document's ids + eos reappear, in order, from its chunks' real tokens
    for doc in splits.pool:
        rows = [i for i, d in enumerate(seqs.doc_ids) if d == doc.id]
        assert rows == list(range(rows[0], rows[-1] + 1))
        got = torch.cat([seqs.tokens[i][seqs.mask[i]] for i in rows]).tolist()
        full = tok.encode(doc.text) + [tok.eos_id]
        assert got == [t for k, t in enumerate(full) if len(full[16 * (k // 16):16 * (k // 16) + 16]) >= 2]
        assert {seqs.noise[i] for i in rows} == {doc.noise} and {seqs.sources[i] for i in rows} == {doc.source}
    assert (seqs.tokens[~seqs.mask] == tok.eos_id).all()
    assert seqs.is_noise.sum() == sum(1 for n in seqs.noise if n) > 0
    sub = seqs.subset([2, 0])
    assert sub.doc_ids == [seqs.doc_ids[2], seqs.doc_ids[0]] and torch.equal(sub.tokens[1], seqs.tokens[0])
    assert len(T.pack_documents(splits.pool, tok, 16, max_sequences=3)) == 3


def test_pack_cloze_masks_only_the_final_word(splits, tok):
    seqs = T.pack_cloze(splits.validation, tok, 12)
    target = tok.encode(" water")
    for row, mask in zip(seqs.tokens, seqs.mask):
        assert row[mask].tolist() == target
        first = int(mask.nonzero()[0])
        assert first >= 1 and not mask[:first].any()  # context before, nothing scored there
    with pytest.raises(ValueError, match="seq_len"):
        T.pack_cloze(splits.validation, tok, len(target))


def test_presets_keep_the_bliss_ratio():
    for preset in LM.PRESETS:
        proxy, target = LM.parameter_count(preset, "proxy"), LM.parameter_count(preset, "target")
        assert 5.0 <= target / proxy <= 6.5, (preset, proxy, target)
    with pytest.raises(ValueError, match="preset"):
        LM.lm_config("huge", "proxy")
    with pytest.raises(ValueError, match="divisible"):
        LM.lm_config("tiny", "proxy", hidden_size=30, num_attention_heads=4)


@pytest.fixture(scope="module")
def lm():
    model = LM.build_lm(LM.lm_config("tiny", "proxy", vocab_size=40, seq_len=10, hidden_size=8,
                                     num_attention_heads=2, intermediate_size=16), seed=0, dtype=torch.float64)
    return model, LM.params_of(model)


def test_sequence_ce_is_the_mean_over_scored_tokens(lm):
    model, params = lm
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(40, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    logits = LM.lm_logits(model, params, tokens)
    ce = LM.sequence_ce(model, params, tokens, mask)
    for i in range(3):
        n = int(mask[i].sum())
        want = F.cross_entropy(logits[i, :n - 1], tokens[i, 1:n])
        assert torch.allclose(ce[i], want)


def test_token_kl_is_kl_target_to_proxy(lm):
    g = torch.Generator().manual_seed(1)
    proxy, target = torch.randn(2, 5, 7, generator=g, dtype=torch.float64), torch.randn(2, 5, 7, generator=g,
                                                                                       dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = LM.token_kl(proxy, target, mask)
    # BLISS's F.kl_div(log q_proxy, p_target), summed over the vocabulary, mean over positions
    want = F.kl_div(torch.log_softmax(proxy[:, :-1], -1), torch.softmax(target[:, :-1], -1),
                    reduction="none").sum(-1).mean(1)
    assert torch.allclose(got, want)
    p, q = torch.softmax(target[:, :-1], -1), torch.softmax(proxy[:, :-1], -1)
    assert torch.allclose(got, (p * (p.log() - q.log())).sum(-1).mean(1))
    assert not torch.allclose(got, (q * (q.log() - p.log())).sum(-1).mean(1))


def test_eager_attention_is_twice_differentiable(lm):
    """An HVP through the LM equals a finite difference of gradients (eager attention)."""
    model, params = lm
    tokens = torch.randint(40, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.bool)

    def loss(p):
        return LM.sequence_ce(model, p, tokens, mask).sum()

    v = {k: torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(3)) for k, t in params.items()}
    _, hv = torch.func.jvp(torch.func.grad(loss), (params,), (v,))
    leaves = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    gr = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    hv2 = torch.autograd.grad(gr, list(leaves.values()), list(v.values()))
    eps = 1e-5
    plus = torch.func.grad(loss)({k: params[k] + eps * v[k] for k in params})
    minus = torch.func.grad(loss)({k: params[k] - eps * v[k] for k in params})
    fd = torch.cat([((plus[k] - minus[k]) / (2 * eps)).flatten() for k in params])
    flat = torch.cat([hv[k].flatten() for k in params])
    assert all(torch.allclose(hv[k], b, rtol=1e-7, atol=1e-9) for k, b in zip(params, hv2))  # forward == reverse
    assert float((flat - fd).norm() / flat.norm()) < 1e-5


def test_local_pretrained_path_and_score_model(lm, tmp_path):
    model, params = lm
    model.save_pretrained(tmp_path)
    loaded = LM.build_lm(None, path=str(tmp_path), dtype=torch.float64)
    assert loaded.config._attn_implementation == "eager"
    for k, v in LM.params_of(loaded).items():
        assert torch.equal(v, params[k]), k
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LM.build_lm(None, path="EleutherAI/pythia-160m")
    score = LM.ScoreModel(model.config).to(torch.float64)
    x = LM.score_params_from_lm(score, params, torch.Generator().manual_seed(0))
    assert torch.equal(x["backbone.embed_in.weight"], params["gpt_neox.embed_in.weight"])
    tokens = torch.randint(40, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 4:] = False
    s = LM.scores(score, x, tokens, mask)
    assert s.shape == (3,) and ((s > 0) & (s < 1)).all()
    # mean pooling over real tokens only: padding content does not change the score
    other = tokens.clone()
    other[0, 4:] = (other[0, 4:] + 1) % 40
    assert torch.allclose(LM.scores(score, x, other, mask)[0], s[0])
