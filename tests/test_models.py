"""Tests of the shared networks (``bilevel.problems.models``) used as functions of a tree.

Second-order checks use a small float64 problem, :class:`EncoderProblem`, around a classifier
with one of the encoders (y = all network parameters, x = per-sample log-weights and a
per-dimension log-scale of the embedding table):

    g(x, y) = mean_i sigmoid(x_w[i]) CE(net(y~; tokens_i), labels_i) + mu/2 ||y||^2,
    y~ = y with  embedding <- embedding * exp(x_s)  (x_s broadcast over the vocabulary rows),
    f(x, y) = mean_i CE(net(y~; tokens_i), labels_i).

For every encoder, d2_yy g . v and d2_xy g . v from ``bilevel.oracles`` agree between
reverse-over-reverse, forward-over-reverse and central differences of the gradient
(d2_yy g . v ~ [grad_y g(x, y + e v) - grad_y g(x, y - e v)] / 2e, likewise for grad_x g).
Tolerances (relative, in the 2-norm over the whole tree): 1e-9 between the two AD modes (float64
round-off), 1e-6 against differences with e = 1e-5 (truncation O(e^2) plus round-off
O(1e-16 / e)). The token batches have right padding and one all-padding row.
"""
import warnings

import pytest
import torch

from bilevel import oracles
from bilevel.problem import BilevelProblem
from bilevel.problems.models import (
    CELLS, Classifier, ConvEncoder, FunctionalModel, MLP, PairEncoder, RecurrentEncoder,
    TransformerEncoder, cross_entropy, squared_norm,
)

DT = torch.float64
# torch.backends.mkldnn.flags() warns about TF32 on Intel GPUs on every call; irrelevant on CPU.
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration:UserWarning")
VOCAB, EMBED, HIDDEN, N_CLASSES = 13, 4, 5, 3
AD_TOL, FD_TOL, FD_EPS = 1e-9, 1e-6, 1e-5

# Right-padded token ids (0 = <pad>), lengths 5, 3, 1, 0 (all padding) and 6.
TOKENS = torch.tensor([[3, 7, 2, 9, 4, 0],
                       [5, 5, 12, 0, 0, 0],
                       [8, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0],
                       [1, 6, 10, 11, 2, 3]])
# Pairs (premise, hypothesis): padding in both, a row where both sentences are all padding.
PAIRS = torch.stack([TOKENS, TOKENS.roll(1, dims=0)], dim=1)
PAIRS[2] = 0
LABELS = torch.tensor([0, 2, 1, 1, 0])


def recurrent(cell, layers):
    return RecurrentEncoder(VOCAB, EMBED, HIDDEN, cell=cell, layers=layers)


def transformer():
    return TransformerEncoder(VOCAB, dim=EMBED, heads=2, layers=2, ff=6, max_len=8)


ENCODERS = {
    **{f"{cell}-{layers}": (lambda c=cell, n=layers: recurrent(c, n), TOKENS)
       for cell in CELLS for layers in (1, 2)},
    "transformer": (transformer, TOKENS),
    "pair-gru": (lambda: PairEncoder(recurrent("gru", 1)), PAIRS),
    "pair-transformer": (lambda: PairEncoder(transformer()), PAIRS),
}


class EncoderProblem(BilevelProblem):
    """The problem of the module docstring around ``Classifier(encoder, MLP(out, [4], 3))``."""

    def __init__(self, encoder, inputs, dtype=DT, mu=1e-2):
        self.model = FunctionalModel(Classifier(encoder, MLP(encoder.out_dim, [4], N_CLASSES)), dtype)
        self.inputs, self.labels, self.mu, self.dtype = inputs, LABELS, mu, dtype
        self.embedding_key = next(k for k, _ in self.model.module.named_parameters()
                                  if k.endswith("embedding.weight"))

    def logits(self, x, y):
        scaled = {**y, self.embedding_key: y[self.embedding_key] * x["s"].exp()}
        return self.model(scaled, self.inputs)

    def lower_loss(self, x, y, batch):
        weights = torch.sigmoid(x["w"])
        return cross_entropy(self.logits(x, y), self.labels, weights) + 0.5 * self.mu * squared_norm(y)

    def upper_loss(self, x, y, batch):
        return cross_entropy(self.logits(x, y), self.labels)

    def init(self, generator):
        y = self.model.init(generator)
        x = {"w": torch.randn(len(self.labels), generator=generator, dtype=self.dtype),
             "s": 0.3 * torch.randn(EMBED, generator=generator, dtype=self.dtype)}
        return x, y


def point(problem, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = problem.init(g)
    v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in y.items()}
    return x, y, v


def shifted(y, v, eps):
    return {k: y[k] + eps * v[k] for k in y}


def central_difference(problem, x, y, v, which):
    """[grad_w g(x, y + e v) - grad_w g(x, y - e v)] / 2e with w = y ("hvp") or x ("cross")."""
    index = 1 if which == "hvp" else 0
    plus = oracles.grad_lower(problem, x, shifted(y, v, FD_EPS), None)[index]
    minus = oracles.grad_lower(problem, x, shifted(y, v, -FD_EPS), None)[index]
    return {k: (plus[k] - minus[k]) / (2 * FD_EPS) for k in plus}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_second_order_oracles_agree_across_modes_and_finite_differences(name, h):
    build, inputs = ENCODERS[name]
    torch.manual_seed(0)
    problem = EncoderProblem(build(), inputs)
    x, y, v = point(problem)
    with torch.backends.mkldnn.flags(enabled=True):
        with warnings.catch_warnings():  # a fallback warning is acceptable; the values are checked
            warnings.simplefilter("ignore", RuntimeWarning)
            forward = {kind: getattr(oracles, kind)(problem, x, y, v, None, mode="forward")
                       for kind in ("hvp", "cross")}
    for kind in ("hvp", "cross"):
        reverse = getattr(oracles, kind)(problem, x, y, v, None, mode="reverse")
        assert set(reverse) == set(y if kind == "hvp" else x)
        assert h.cat(reverse).norm() > 1e-3, (name, kind, "degenerate product")
        assert h.rel(forward[kind], reverse) < AD_TOL, (name, kind)
        assert h.rel(central_difference(problem, x, y, v, kind), reverse) < FD_TOL, (name, kind)


def test_products_depend_on_the_all_padding_row(h):
    """The all-padding row is a real sample: its weight enters the HVP (guards against a test
    batch whose padding row silently drops out)."""
    problem = EncoderProblem(recurrent("lstm", 1), TOKENS)
    x, y, v = point(problem)
    base = oracles.hvp(problem, x, y, v, None)
    x_up = {**x, "w": x["w"].clone()}
    x_up["w"][3] += 2.0
    assert h.rel(oracles.hvp(problem, x_up, y, v, None), base) > 1e-4


def test_forward_mode_falls_back_on_the_onednn_lstm(h):
    """In float32 the oneDNN LSTM kernel has no forward-mode rule; the forward oracle must still
    return the reverse-mode product (fallback without oneDNN, or to reverse mode)."""
    problem = EncoderProblem(recurrent("lstm", 2), TOKENS, dtype=torch.float32)
    x, y, v = point(problem)
    reverse = oracles.hvp(problem, x, y, v, None, mode="reverse")
    with torch.backends.mkldnn.flags(enabled=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first = oracles.hvp(problem, x, y, v, None, mode="forward")
        again = oracles.cross(problem, x, y, v, None, mode="forward")
    assert h.rel(first, reverse) < 1e-4
    assert h.rel(again, oracles.cross(problem, x, y, v, None, mode="reverse")) < 1e-4


# -- padding and batch independence ---------------------------------------------------------------

SEQUENCE_ENCODERS = {**{f"{c}-{n}": (lambda c=c, n=n: recurrent(c, n)) for c in CELLS for n in (1, 2)},
                     "transformer": transformer}


def float64_encoder(name):
    torch.manual_seed(1)
    return SEQUENCE_ENCODERS[name]().to(DT)


@pytest.mark.parametrize("name", list(SEQUENCE_ENCODERS))
def test_extra_padding_columns_do_not_change_the_output(name):
    encoder = float64_encoder(name)
    padded = torch.cat([TOKENS, torch.zeros(len(TOKENS), 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        base, longer = encoder(TOKENS), encoder(padded)
    assert base.shape == (len(TOKENS), encoder.out_dim)
    torch.testing.assert_close(longer, base, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SEQUENCE_ENCODERS))
def test_each_output_depends_on_its_own_sequence_only(name):
    encoder = float64_encoder(name)
    lengths = (TOKENS != 0).sum(1).clamp(min=1)
    with torch.no_grad():
        batch = encoder(TOKENS)
        other = TOKENS.clone()
        other[1:] = torch.randint(1, VOCAB, other[1:].shape, generator=torch.Generator().manual_seed(2))
        changed = encoder(other)
        for i in range(len(TOKENS)):
            alone = encoder(TOKENS[i:i + 1, :int(lengths[i])])
            torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-12)
    torch.testing.assert_close(changed[0], batch[0], rtol=0, atol=1e-12)
    assert not torch.allclose(changed[1:], batch[1:])


# -- FunctionalModel ----------------------------------------------------------------------------

def small_model():
    return FunctionalModel(Classifier(RecurrentEncoder(VOCAB, EMBED, HIDDEN, "gru"),
                                      MLP(HIDDEN, [4], 2)), DT)


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_init_is_seeded_by_the_generator_and_leaves_the_global_rng_alone():
    model = small_model()
    state = torch.get_rng_state()
    first = model.init(torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert same(model.init(torch.Generator().manual_seed(5)), first)
    assert not same(model.init(torch.Generator().manual_seed(6)), first)
    generator = torch.Generator().manual_seed(5)
    assert not same(model.init(generator), model.init(generator))  # the generator advances
    assert set(first) == {k for k, _ in model.module.named_parameters()}
    assert all(t.dtype == DT and not t.requires_grad for t in first.values())


def test_the_call_uses_the_given_parameters():
    model = small_model()
    params = model.init(torch.Generator().manual_seed(0))
    out = model(params, TOKENS)
    assert out.shape == (len(TOKENS), 2)
    shifted_bias = {**params, "head.2.bias": params["head.2.bias"] + 1.0}
    torch.testing.assert_close(model(shifted_bias, TOKENS), out + 1.0)


GLOVE = torch.randn(VOCAB, EMBED, generator=torch.Generator().manual_seed(3))

@pytest.mark.parametrize("wrap", [
    pytest.param(lambda enc: enc, id="bare"),
    pytest.param(lambda enc: Classifier(enc, MLP(HIDDEN, [4], 2)), id="classifier"),
    pytest.param(lambda enc: Classifier(PairEncoder(enc), MLP(4 * HIDDEN, [], 3)), id="pair"),
])
def test_glove_embeddings_are_copied_into_the_embedding_rows(wrap):
    model = FunctionalModel(wrap(RecurrentEncoder(VOCAB, EMBED, HIDDEN, "gru", embeddings=GLOVE)), DT)
    key = next(k for k in model.init(torch.Generator()) if k.endswith("embedding.weight"))
    for seed in (0, 1):
        params = model.init(torch.Generator().manual_seed(seed))
        torch.testing.assert_close(params[key], GLOVE.to(DT), rtol=0, atol=0)


def test_without_glove_the_embeddings_are_random_and_shapes_are_checked():
    params = small_model().init(torch.Generator().manual_seed(0))
    assert params["encoder.embedding.weight"].shape == (VOCAB, EMBED)
    assert not torch.allclose(params["encoder.embedding.weight"], GLOVE.to(DT))
    with pytest.raises(ValueError, match=r"embeddings must have shape \(13, 4\)"):
        RecurrentEncoder(VOCAB, EMBED, HIDDEN, embeddings=torch.zeros(VOCAB, EMBED + 1))


# -- shapes and option validation -------------------------------------------------------------

def test_mlp_shapes_and_layers():
    mlp = MLP(5, [7, 3], 2)
    assert mlp(torch.randn(4, 5)).shape == (4, 2) and mlp.out_dim == 2
    assert [type(m).__name__ for m in mlp] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert len(MLP(5, [], 2)) == 1
    assert isinstance(MLP(5, [3], 2, activation="relu")[1], torch.nn.ReLU)
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP(5, [3], 2, activation="gelu")
    with pytest.raises(ValueError, match="MLP layer size 1"):
        MLP(5, [0], 2)


def test_conv_encoder_shapes():
    encoder = ConvEncoder(out_dim=6, channels=3)
    assert encoder(torch.rand(3, 784)).shape == (3, 6) and encoder.out_dim == 6
    with pytest.raises(ValueError, match="channels"):
        ConvEncoder(out_dim=6, channels=0)


def test_encoder_shapes():
    for encoder in (recurrent("lstm", 2), transformer()):
        assert encoder(TOKENS).shape == (len(TOKENS), encoder.out_dim)
        pair = PairEncoder(encoder)
        assert pair(PAIRS).shape == (len(PAIRS), 4 * encoder.out_dim) and pair.out_dim == 4 * encoder.out_dim


@pytest.mark.parametrize("make, message", [
    (lambda: RecurrentEncoder(VOCAB, cell="transformer"), r"cell must be one of \('rnn', 'lstm', 'gru'\)"),
    (lambda: RecurrentEncoder(VOCAB, layers=3), "layers must be 1 or 2"),
    (lambda: RecurrentEncoder(0), "vocab_size must be a positive int"),
    (lambda: TransformerEncoder(VOCAB, dim=6, heads=4), r"dim \(6\) must be divisible by heads \(4\)"),
    (lambda: TransformerEncoder(VOCAB, layers=0), "layers must be a positive int"),
    (lambda: transformer()(torch.ones(2, 9, dtype=torch.long)), "exceed max_len=8"),
    (lambda: PairEncoder(transformer())(TOKENS), r"must have shape \(B, 2, L\)"),
])
def test_bad_options_raise_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_loss_helpers():
    params = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[3.0]])}
    assert float(squared_norm(params)) == 14.0
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    per = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(cross_entropy(logits, labels), per.mean())
    weights = torch.arange(6.0)
    torch.testing.assert_close(cross_entropy(logits, labels, weights), (weights * per).mean())
