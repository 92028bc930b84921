"""The data-selection problem (BLISS) and the bliss solver.

A micro problem on fixture text with a 21-word word-level tokenizer (given as a local
tokenizer.json: the user-tokenizer path) keeps dim(y) in the hundreds, so Hessians and cross
Jacobians are built densely here, with one vmapped backward pass over the basis (not the
library's one-product-at-a-time oracles).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bilevel import oracles, solve, tree  # noqa: E402
from bilevel.hypergrad import implicit  # noqa: E402
from bilevel.problem import validate  # noqa: E402
from bilevel.problems import language_model as LM  # noqa: E402
from bilevel.problems.data_selection import DataSelection, sample_weights  # noqa: E402
from bilevel.registry import make_solver  # noqa: E402

import word_corpus  # noqa: E402  (tests/word_corpus.py)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    splits = word_corpus.splits(torch.Generator().manual_seed(0), pool=8, pool_words=30, noise=2, val=6, val_words=6)
    path = word_corpus.tokenizer(tmp_path_factory.mktemp("tok"))
    problem = DataSelection(splits=splits, tokenizer_path=path, seq_len=8, batch_size=4, val_batch_size=3,
                            proxy_arch=dict(hidden_size=4, num_attention_heads=1, intermediate_size=8),
                            target_arch=dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                             intermediate_size=16),
                            warmup_steps=5, dtype="float64", gamma=0.1, reg=1e-3, eval_pool=32)
    problem._tokenizer_path = path  # for tests that build a second problem on the same data
    return problem


@pytest.fixture(scope="module")
def point(micro):
    x, y = micro.init(torch.Generator().manual_seed(1))
    return x, y


def flat(t):
    return torch.cat([v.reshape(-1) for v in t.values()])


def unflat(vec, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def dense_second_order(problem, x, y, batch):
    """(H, J): d2_yy g and the cross Jacobian d2_xy g (dim x by dim y), every row of H and
    column of J from one vmapped backward pass (``is_grads_batched``) over grad_y g's graph."""
    xl = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    yl = {k: v.clone().requires_grad_(True) for k, v in y.items()}
    gy = flat(dict(zip(yl, torch.autograd.grad(problem.lower_loss(xl, yl, batch), list(yl.values()),
                                               create_graph=True))))
    n = gy.numel()
    out = torch.autograd.grad(gy, list(yl.values()) + list(xl.values()), torch.eye(n, dtype=gy.dtype),
                              is_grads_batched=True)
    H = torch.cat([o.reshape(n, -1) for o in out[:len(yl)]], 1)
    J = torch.cat([o.reshape(n, -1) for o in out[len(yl):]], 1).T
    return H, J


def test_micro_problem_is_valid_and_small(micro, point):
    x, y = point
    validate(micro, x, y, torch.Generator().manual_seed(0))
    assert tree.numel(y) < 1000 and micro.tokenizer.vocab_size == 21
    assert micro.pool.is_noise.any() and micro.n_val == 6
    metrics = micro.evaluate(x, y)
    assert set(metrics) >= {"val_cloze_loss", "val_cloze_accuracy", "test_in_ppl", "test_out_ppl", "noise_auroc"}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_weights_are_the_batch_softmax_and_the_quirk_uses_a_given_normalizer():
    s = torch.tensor([0.2, 0.9, 0.5])
    p = sample_weights(s)
    assert torch.allclose(p, torch.exp(s) / torch.exp(s).sum()) and torch.isclose(p.sum(), torch.tensor(1.0))
    q = sample_weights(s, torch.tensor(0.0))
    assert torch.allclose(q, torch.exp(s))  # previous-normalizer weights need not sum to one


def test_lower_loss_is_its_formula(micro, point):
    x, y = point
    batch = torch.tensor([0, 3, 5, 2])
    tokens, mask = micro.pool.tokens[batch], micro.pool.mask[batch]
    s = LM.scores(micro.score, x, tokens, mask)
    ce = LM.sequence_ce(micro.proxy, y, tokens, mask)
    kl = LM.token_kl(LM.lm_logits(micro.proxy, y, tokens), LM.lm_logits(micro.target, micro.target_params, tokens),
                     mask)
    want = (torch.softmax(s, 0) * ce).sum() + 0.1 * kl.mean() + 1e-3 * sum((v ** 2).sum() for v in y.values())
    assert torch.allclose(micro.lower_loss(x, y, batch), want)
    view = micro.with_log_normalizer(torch.tensor(0.3, dtype=torch.float64))
    want_q = (torch.exp(s - 0.3) * ce).sum() + 0.1 * kl.mean() + 1e-3 * sum((v ** 2).sum() for v in y.values())
    assert torch.allclose(view.lower_loss(x, y, batch), want_q) and micro.log_normalizer is None


def test_cross_term_equals_the_official_per_sample_formula_and_the_looped_autograd(micro, point):
    """d2_xy g . z (the library's generic cross product) = BLISS's per-sample softmax-Jacobian
    combination (get_distributed_hypergrad, with the sign of +d2_xy g . z) = autograd of the
    looped sum_i P_i(x) <grad_y CE_i, z>."""
    x, y = point
    batch = torch.tensor([1, 4, 6, 7])
    z = {k: torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(5)) for k, v in y.items()}
    generic = oracles.cross(micro, x, y, z, batch)

    scores, score_grads, dots = [], [], []
    for i in batch.tolist():  # the official loop: one sample at a time
        t, m = micro.pool.tokens[i:i + 1], micro.pool.mask[i:i + 1]
        xl = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        s = LM.scores(micro.score, xl, t, m)[0]
        score_grads.append(torch.autograd.grad(s, list(xl.values())))
        scores.append(s.detach())
        yl = {k: v.clone().requires_grad_(True) for k, v in y.items()}
        g = torch.autograd.grad(LM.sequence_ce(micro.proxy, yl, t, m)[0], list(yl.values()))
        dots.append(sum((a * z[k]).sum() for a, k in zip(g, y)))
    p = torch.softmax(torch.stack(scores), 0)
    mean_grad = [sum(p[i] * score_grads[i][j] for i in range(4)) for j in range(len(x))]
    mean_dot = sum(p[i] * dots[i] for i in range(4))
    official = {k: sum(p[i] * score_grads[i][j] * dots[i] for i in range(4)) - mean_grad[j] * mean_dot
                for j, k in enumerate(x)}

    xl = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    looped = torch.stack([LM.scores(micro.score, xl, micro.pool.tokens[i:i + 1], micro.pool.mask[i:i + 1])[0]
                          for i in batch.tolist()])
    auto = torch.autograd.grad((torch.softmax(looped, 0) * torch.stack(dots)).sum(), list(xl.values()))
    for j, k in enumerate(x):  # float64; the official formula subtracts two sums (rounding ~1e-12 of ~0.1 entries)
        assert torch.allclose(generic[k], official[k], rtol=1e-8, atol=1e-10), k
        assert torch.allclose(generic[k], auto[j], rtol=1e-8, atol=1e-10), k
    assert flat(generic).norm() > 0


def test_hypergradient_against_the_dense_damped_solve(micro, point):
    """-d2_xy g . (H + lambda I)^{-1} grad_y f through the library (implicit(), LowerProducts,
    linear_sgd with damping run to convergence) equals the dense computation."""
    x, y = point
    batch, upper_batch = torch.tensor([0, 2, 4, 9]), torch.tensor([0, 1, 2])
    H, J = dense_second_order(micro, x, y, batch)
    b = flat(torch.func.grad(lambda t: micro.upper_loss(x, t, upper_batch))(y))
    eig = torch.linalg.eigvalsh(H)
    damping = max(0.0, -float(eig[0])) + 0.5  # H + lambda I positive definite
    z_dense = torch.linalg.solve(H + damping * torch.eye(len(b), dtype=H.dtype), b)
    h_dense = -J @ z_dense

    lr = 1.0 / (float(eig[-1]) + damping)

    # linear_sgd's damped recursion converges to the dense solution (dense matvec: fast)
    from bilevel.linear_system import linear_sgd
    z_sgd = linear_sgd(lambda u: {"v": H @ u["v"]}, {"v": b}, steps=3000, lr=lr, damping=damping)["v"]
    assert torch.allclose(z_sgd, z_dense, rtol=1e-6, atol=1e-8)

    h, z = implicit(micro, x, y, upper_batch, batch, batch, lambda matvec, rhs: unflat(z_dense, rhs))
    assert torch.allclose(flat(h), h_dense, rtol=1e-7, atol=1e-10)
    # and a few damped steps through the library's HVPs match the same steps on the dense matrix
    from bilevel.linear_system import linear_sgd as ls
    h3, z3 = implicit(micro, x, y, upper_batch, batch, batch,
                      lambda matvec, rhs: ls(matvec, rhs, steps=5, lr=lr, damping=damping))
    zd = torch.zeros_like(b)
    for _ in range(5):
        zd = zd - lr * (H @ zd + damping * zd - b)
    assert torch.allclose(flat(z3), zd, rtol=1e-7, atol=1e-10)
    assert torch.allclose(flat(h3), -J @ zd, rtol=1e-7, atol=1e-10)


def test_hypergradient_sign_and_scale_against_a_finite_difference_of_the_unrolled_loss(micro, point):
    """The validation loss after one lower step, F(x) = f(y_1(x)) with y_1 = y - eta grad_y g(x, y; B),
    has dF/dx = -eta d2_xy g(x, y; B) . grad_y f(y_1) exactly: the library's cross product
    (implicit() with z = eta grad_y f(y_1)) must match a central finite difference of F along
    random directions, sign and scale; and the hypergradient BLISS uses (z from a few damped steps
    at y) must point the same way (a descent step on h lowers the unrolled validation loss)."""
    x, y = point
    batch, upper_batch = torch.tensor([0, 2, 4, 9]), torch.tensor([0, 1, 2])
    eta = 0.05

    def step(xv):
        g = torch.func.grad(lambda t: micro.lower_loss(xv, t, batch))(y)
        return {k: y[k] - eta * g[k] for k in y}

    def unrolled(xv):
        return float(micro.upper_loss(xv, step(xv), upper_batch))

    b1 = torch.func.grad(lambda t: micro.upper_loss(x, t, upper_batch))(step(x))
    h, _ = implicit(micro, x, y, upper_batch, batch, batch, lambda matvec, rhs: {k: eta * b1[k] for k in rhs})
    solver = make_solver("bliss", z_lr=0.05, damping=0.01)
    h_bliss, _ = implicit(micro, x, y, upper_batch, batch, batch, solver.linear_solve(0))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in x.items()}
        eps = 1e-4
        fd = (unrolled({k: x[k] + eps * v[k] for k in x}) - unrolled({k: x[k] - eps * v[k] for k in x})) / (2 * eps)
        assert abs(fd) > 1e-9  # the direction moves the loss at all
        assert float(tree.dot(h, v)) == pytest.approx(fd, rel=1e-3)  # FD error ~1e-4 (ReLU kinks)
    # BLISS's own z (3 damped steps from zero at y) gives the same direction, up to a positive scale
    cos = float(tree.dot(h, h_bliss)) / float(tree.dot(h, h) * tree.dot(h_bliss, h_bliss)) ** 0.5
    assert cos > 0.9


def test_bliss_step_against_its_equations(micro, point):
    """One bliss step = K torch.optim.AdamW steps on y (clip 1), z from z_steps clipped damped
    steps from zero (dense H), h = -J z, per-tensor clip, one torch.optim.AdamW step on x."""
    x, y = point
    solver = make_solver("bliss", upper_lr=0.05, lower_lr=0.01, inner_steps=2, z_steps=3, z_lr=0.05,
                         damping=0.01, z_clip=0.5, upper_clip=0.01)
    gen = torch.Generator().manual_seed(3)
    state = solver.init(micro, x, y, gen)
    replay = torch.Generator().manual_seed(3)
    new = solver.step(micro, state)

    yl = {k: v.clone().requires_grad_(True) for k, v in y.items()}
    opt = torch.optim.AdamW(list(yl.values()), lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(2):
        batch = micro.sample("lower", replay)
        opt.zero_grad()
        micro.lower_loss(x, yl, batch).backward()
        torch.nn.utils.clip_grad_norm_(list(yl.values()), 1.0)
        opt.step()
    y1 = {k: v.detach() for k, v in yl.items()}
    for k in y:
        # torch clips with max_norm / (norm + 1e-6), the library with max_norm / norm
        assert torch.allclose(new.y[k], y1[k], rtol=1e-5, atol=1e-8), k
    y1 = new.y  # the rest at the solver's y exactly: Adam's first step is about sign(h)
    upper_batch, batch = micro.sample("upper", replay), micro.sample("lower", replay)
    H, J = dense_second_order(micro, x, y1, batch)
    b = flat(torch.func.grad(lambda t: micro.upper_loss(x, t, upper_batch))(y1))
    z = torch.zeros_like(b)
    for _ in range(3):
        d = unflat(H @ z + 0.01 * z - b, y1)
        d = {k: v * min(1.0, 0.5 / float(v.norm())) for k, v in d.items()}
        z = z - 0.05 * flat(d)
    h = unflat(-J @ z, x)
    xl = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    opt = torch.optim.AdamW(list(xl.values()), lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for k, v in xl.items():
        v.grad = h[k] * min(1.0, 0.01 / float(h[k].norm()))
    opt.step()
    for k in x:
        # each entry moves by about lr = 0.05 (Adam's first step ~ sign(h)); entries of h below
        # Adam's eps after the clip carry the dense-vs-oracle round-off: 1e-7 is 2e-6 of a step
        assert torch.allclose(new.x[k], xl[k].detach(), rtol=1e-6, atol=1e-7), k
    assert not torch.equal(new.x["head.weight"], x["head.weight"])


def test_bliss_options_and_quirk(micro, point):
    x, y = point
    with pytest.raises(ValueError, match="inner_steps"):
        make_solver("bliss", inner_steps=0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        make_solver("bliss", warmup_fraction=2.0)
    quirk = make_solver("bliss", previous_normalizer=True, inner_steps=1, z_steps=1)
    state = quirk.init(micro, x, y, torch.Generator().manual_seed(0))
    state = quirk.step(micro, quirk.step(micro, state))
    assert state.core.log_normalizer.dim() == 0 and torch.isfinite(state.core.log_normalizer) and tree.all_finite(state.x)
    from bilevel.problem import FunctionProblem
    plain = FunctionProblem(lambda x, y, b: (y["w"] ** 2).sum(), lambda x, y, b: ((y["w"] - x["l"]) ** 2).sum(),
                            {"l": torch.zeros(2)}, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="with_log_normalizer"):
        quirk.init(plain, *plain.init(None), torch.Generator())
    cosine = make_solver("bliss", total_steps=10, upper_lr=1e-3)
    assert cosine.upper_update  # builds a cosine schedule
    from bilevel.schedules import Cosine
    assert isinstance(cosine._schedule(1e-3), Cosine)


@pytest.fixture(scope="module")
def tiny():
    from bilevel.registry import make_problem
    return make_problem("data-selection", "tiny")


@pytest.mark.parametrize("solver,options", [
    ("bliss", dict(upper_lr=1e-3)),
    ("soba", dict(upper_lr=0.05, lower_lr=0.5, z_lr=0.05)),
    ("bo-rep", dict(upper_lr=0.01, lower_lr=0.5, neumann_steps=2, neumann_lr=0.05)),
    ("slip", dict(upper_lr=0.01, lower_lr=0.5, neumann_steps=2, neumann_lr=0.05)),
    ("adambo", dict(upper_lr=1e-3, lower_lr=0.5, neumann_steps=2, neumann_lr=0.05, warm_steps=1)),
])
def test_solvers_run_on_the_tiny_preset(tiny, solver, options):
    result = solve(tiny, solver, steps=3, eval_every=3, progress=False, seed=0, **options)
    last = result.history[-1]
    assert last["iteration"] == 3 and all(torch.isfinite(torch.tensor(float(last[k])))
                                          for k in ("val_cloze_loss", "test_in_ppl", "noise_auroc"))


def test_a_problem_built_from_given_sequences_and_parameters_uses_them(micro, point):
    """bilevel select builds each round's problem with its own pool, validation set, proxy,
    target and score model (no attribute overwritten afterwards): the problem must use exactly
    those, with no warm-up."""
    x, y = point
    y_moved = {k: v + 0.01 for k, v in y.items()}
    target = {k: v * 0.5 for k, v in micro.target_params.items()}
    pool, val = micro.pool.subset([3, 1, 0, 2, 5]), micro.validation.subset([2, 0])
    p = DataSelection(splits=micro.splits, tokenizer_path=micro._tokenizer_path, seq_len=8, batch_size=4,
                      val_batch_size=2, proxy_arch=dict(hidden_size=4, num_attention_heads=1, intermediate_size=8),
                      target_arch=dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=16),
                      warmup_steps=5, dtype="float64", gamma=0.1, reg=1e-3, eval_pool=4, pool=pool, validation=val,
                      proxy_params=y_moved, target_params=target, score_params=x)
    assert p.pool is pool and p.validation is val and (p.n_train, p.n_val) == (5, 2)
    assert all(torch.equal(p.target_params[k], v) for k, v in target.items())  # no warm-up of the given models
    x0, y0 = p.init(torch.Generator().manual_seed(3))
    assert all(torch.equal(x0[k], v) for k, v in x.items()) and all(torch.equal(y0[k], v) for k, v in y_moved.items())
    batch = torch.tensor([0, 2, 4])
    tokens, mask = pool.tokens[batch], pool.mask[batch]
    s = LM.scores(micro.score, x, tokens, mask)
    ce = LM.sequence_ce(micro.proxy, y_moved, tokens, mask)
    kl = LM.token_kl(LM.lm_logits(micro.proxy, y_moved, tokens), LM.lm_logits(micro.target, target, tokens), mask)
    want = (torch.softmax(s, 0) * ce).sum() + 0.1 * kl.mean() + 1e-3 * sum((v ** 2).sum() for v in y_moved.values())
    assert torch.allclose(p.lower_loss(x, y_moved, batch), want)
    with pytest.raises(ValueError, match="do not match the model"):
        DataSelection(splits=micro.splits, tokenizer_path=micro._tokenizer_path, seq_len=8,
                      proxy_arch=dict(hidden_size=4, num_attention_heads=1, intermediate_size=8),
                      target_arch=dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=16),
                      warmup_steps=0, proxy_params={"nope": torch.zeros(1)})
