"""bf16 autocast for the language models of the data-selection problem (``dtype="bfloat16"``).

Proxy, target and score model run under ``torch.autocast(dtype=torch.bfloat16)`` through the
problems' one mechanism (:func:`bilevel.problems.models.autocast_scope`); variables, logits,
losses, scores and the softmax weights stay float32. The bf16 hypergradient must agree with the
float32 one at the same point and batches. The models are the ``tiny`` preset's architecture
(proxy 1 x 32, target 2 x 80) on fixture text with a word-level tokenizer, so the test needs
neither a fetch nor BPE training.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import bilevel  # noqa: E402
from bilevel import solve, tree  # noqa: E402
from bilevel.hypergrad import implicit  # noqa: E402
from bilevel.problems import language_model as LM  # noqa: E402
from bilevel.problems.data_selection import DataSelection  # noqa: E402
from bilevel.registry import make_solver  # noqa: E402

import word_corpus  # noqa: E402  (tests/word_corpus.py)

#: Relative error (norm of the difference over the float32 norm) of the bf16-autocast
#: hypergradient against float32 at the same point and batches. bf16 keeps 8 bits of mantissa
#: (about 0.4% per rounding). Measured on CPU at five points (init seeds 1-5): BLISS's z (3 damped
#: steps) 0.004-0.010, Neumann (5 terms) 0.004-0.007; the scores agree within 5e-4 absolute.
#: (CG does not apply here: the LM's lower Hessian is indefinite at these points.)
BF16_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """{"float32": problem, "bfloat16": problem}: the same splits, tokenizer and warmed-up models
    (the bf16 problem starts from the float32 one's proxy and target)."""
    splits = word_corpus.splits(torch.Generator().manual_seed(0), pool=12, pool_words=60, noise=3, val=8, val_words=10)
    path = word_corpus.tokenizer(tmp_path_factory.mktemp("tok"))
    common = dict(splits=splits, tokenizer_path=path, model_preset="tiny", seq_len=16, batch_size=6,
                  val_batch_size=4, gamma=0.1, reg=1e-4, eval_pool=32, seed=0)
    full = DataSelection(warmup_steps=5, dtype="float32", **common)
    mixed = DataSelection(warmup_steps=0, dtype="bfloat16", proxy_params=full.proxy_params,
                          target_params=full.target_params, **common)
    return {"float32": full, "bfloat16": mixed}


@pytest.fixture(scope="module")
def point(problems):
    """x, y and one upper and one lower batch, the same for both precisions."""
    generator = torch.Generator().manual_seed(1)
    x, y = problems["float32"].init(generator)
    upper, lower = problems["float32"].sample("upper", generator), problems["float32"].sample("lower", generator)
    return x, y, upper, lower


def _relative_error(a, b):
    fa, fb = (torch.cat([t.reshape(-1) for t in v.values()]) for v in (a, b))
    return float((fa - fb).norm() / fb.norm())


def test_bfloat16_option_keeps_float32_variables_losses_and_weights(problems, point):
    x, y, upper, lower = point
    mixed = problems["bfloat16"]
    assert mixed.autocast is torch.bfloat16 and problems["float32"].autocast is None
    assert all(t.dtype == torch.float32 for t in (*x.values(), *y.values(), *mixed.init(torch.Generator())[1].values()))
    weights, ce, kl = mixed.lower_terms(x, y, lower)
    assert weights.dtype == ce.dtype == kl.dtype == torch.float32
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert mixed.lower_loss(x, y, lower).dtype == mixed.upper_loss(x, y, upper).dtype == torch.float32
    # the forward passes did run in bf16: the losses differ from float32's, slightly
    ref = problems["float32"]
    for name in ("lower_loss", "upper_loss"):
        batch = lower if name == "lower_loss" else upper
        a, b = float(getattr(mixed, name)(x, y, batch)), float(getattr(ref, name)(x, y, batch))
        assert a != b and a == pytest.approx(b, rel=0.02), name
    tokens, mask = mixed.pool.tokens[lower], mixed.pool.mask[lower]
    s_mixed, s_ref = mixed.scores(x, tokens, mask), ref.scores(x, tokens, mask)
    assert s_mixed.dtype == torch.float32 and not torch.equal(s_mixed, s_ref)
    assert torch.allclose(s_mixed, s_ref, atol=2e-3)


def test_autocast_runs_the_matrix_products_in_bf16_and_returns_float32_logits(problems, point):
    x, y, _, lower = point
    mixed = problems["bfloat16"]
    tokens = mixed.pool.tokens[lower]
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(out.dtype) if isinstance(module, torch.nn.Linear) else None)
    try:
        logits = LM.lm_logits(mixed.proxy, y, tokens, torch.bfloat16)
    finally:
        handle.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert logits.dtype == torch.float32
    assert LM.lm_logits(mixed.proxy, y, tokens).dtype == torch.float32  # no autocast: unchanged


@pytest.mark.parametrize("estimator", ["bliss", "neumann"])
def test_bfloat16_hypergradient_agrees_with_float32(problems, point, estimator):
    """The hypergradient -d2_xy g . z, with z from BLISS's damped steps or a Neumann series, through the
    library's oracles (HVPs and the cross product differentiate the bf16 forward passes twice)."""
    x, y, upper, lower = point
    out = {}
    for dtype, problem in problems.items():
        if estimator == "bliss":
            solve_z = make_solver("bliss", z_steps=3, z_lr=0.05, damping=0.01).linear_solve(0)
            out[dtype], _ = implicit(problem, x, y, upper, lower, lower, solve_z)
        else:
            out[dtype] = bilevel.hypergradient(problem, x, y, upper, lower, method="neumann", steps=5, lr=0.05)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out[dtype].values())
    error = _relative_error(out["bfloat16"], out["float32"])
    assert 0 < error < BF16_TOLERANCE, error  # > 0: bf16 did run


def test_one_bliss_step_under_bf16_is_finite_and_moves_both_levels(problems):
    mixed = problems["bfloat16"]
    result = solve(mixed, "bliss", steps=1, eval_every=1, progress=False, seed=0, upper_lr=1e-3)
    x0, y0 = mixed.init(torch.Generator().manual_seed(0))
    assert tree.all_finite(result.x) and tree.all_finite(result.y)
    assert all(t.dtype == torch.float32 for t in (*result.x.values(), *result.y.values()))
    assert any(not torch.equal(result.x[k], x0[k]) for k in x0 if k.startswith("backbone."))
    assert any(not torch.equal(result.y[k], y0[k]) for k in y0)
    last = result.history[-1]
    assert all(torch.isfinite(torch.tensor(float(last[k]))) for k in ("val_cloze_loss", "test_in_ppl", "noise_auroc"))


def test_bad_dtype_is_refused_with_the_choices(problems):
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'float64', 'bfloat16'\]"):
        DataSelection(splits=problems["float32"].splits, dtype="float16")
