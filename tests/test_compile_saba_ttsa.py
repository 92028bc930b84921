"""SABA and TTSA compile (issue 10 section 4): SABA's SAGA tables are stacked tensors indexed by
tensor block indices, TTSA's random Neumann length q is a tensor and its loop a masked loop of
fixed length. Both are one graph whichever block or q is drawn, and compiled == eager.

Traced with dynamo's "eager" backend (the same single graph as inductor, without code generation).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel import compiled, count_calls, linear_system, make_problem, make_solver, memory
from bilevel.compiled import CompileFallback
from bilevel.estimators import Neumann
from bilevel.hypergrad import PerProduct
from bilevel.masked_neumann import MaskedNeumann, masked_power
from bilevel.sampling import Blocks, run_generator


@pytest.fixture(scope="module")
def quad():
    return make_problem("quadratic", preset="tiny", dtype="float64")


def _leaves(core):
    return [v for v in torch.utils._pytree.tree_leaves(core) if isinstance(v, torch.Tensor)]


def _runs(problem, name, steps, **options):
    """The same seed stepped eagerly and through a CompiledStep ("eager" backend); the step."""
    solver = make_solver(name, **options)

    def start():
        generator = run_generator(3)
        x, y = problem.init(generator)
        return solver.init(problem, x, y, generator)
    eager, state = start(), start()
    step = compiled.CompiledStep(solver, problem, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)
        for _ in range(steps):
            eager, state = solver.step(problem, eager), step(state)
    return eager, state, step


# -- the masked Neumann loop ------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["randomized", "code_n1"])
def test_masked_neumann_equals_truncated_loop_for_every_q(variant):
    """Per-product matrices A_k (SPD, float64): the masked loop of fixed length gives the very v
    of the truncated loop (torch.equal) for every q the variant can draw."""
    g = torch.Generator().manual_seed(0)
    Q, lr = 4, 0.3
    mats = []
    for _ in range(Q + 1):
        m = torch.randn(3, 3, generator=g, dtype=torch.float64)
        mats.append(m @ m.T / 3 + torch.eye(3, dtype=torch.float64))
    b = {"y": torch.randn(3, generator=g, dtype=torch.float64)}

    def matvecs():
        used = []

        def matvec(u):
            used.append(1)
            return {"y": mats[len(used) - 1] @ u["y"]}
        return matvec, used
    high = Q + 1 if variant == "randomized" else Q
    for q in range(high):
        truncated, n_truncated = matvecs()
        expected = linear_system.neumann_series(truncated, b, steps=Q, lr=lr, variant=variant, term=q)
        masked, n_masked = matvecs()
        got = masked_power(masked, b, steps=Q, lr=lr, term=torch.tensor(q), variant=variant)
        assert torch.equal(got["y"], expected["y"]), (variant, q)
        assert len(n_masked) == (Q if variant == "randomized" else Q + 1)  # every product made ...
        assert len(n_truncated) == (q if variant == "randomized" else q + 1)  # ... only the first used
    # the hand-written value for one q: v = (Q + 1) lr (I - lr A_1)(I - lr A_0) b
    if variant == "randomized":
        masked, _ = matvecs()
        u = b["y"]
        for k in range(2):
            u = u - lr * mats[k] @ u
        got = masked_power(masked, b, steps=Q, lr=lr, term=torch.tensor(2))
        torch.testing.assert_close(got["y"], (Q + 1) * lr * u, rtol=1e-14, atol=0)


def test_masked_neumann_draws_the_neumann_stream_with_a_fixed_structure(quad):
    """Same q, same batches, same generator state as Neumann's draw; q a tensor; the per-product
    batches padded to Q with copies of the cross batch (never the same object)."""
    plain, masked = Neumann(lr=0.1, steps=5, variant="randomized"), MaskedNeumann(lr=0.1, steps=5)
    for seed in range(6):
        g1, g2 = run_generator(seed), run_generator(seed)
        a, b = plain.draw(quad, g1), masked.draw(quad, g2)
        assert torch.equal(g1.get_state(), g2.get_state())
        assert isinstance(b.term, torch.Tensor) and int(b.term) == a.term
        assert isinstance(b.hessian, PerProduct) and len(b.hessian) == 5
        for k in range(5):
            expected = a.hessian[k] if k < a.term else a.cross
            assert torch.equal(b.hessian[k], expected)
            assert k < a.term or b.hessian[k] is not b.cross
        assert torch.equal(a.upper, b.upper) and torch.equal(a.cross, b.cross)


def test_masked_neumann_rejects_a_fixed_length_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        MaskedNeumann(lr=0.1, steps=3, variant="sum")


# -- compiled == eager ------------------------------------------------------------------------

def test_ttsa_compiles_to_one_graph_and_equals_eager(quad):
    """Ten steps (several q drawn): no fallback, at most two graphs (the iteration made dynamic),
    the compiled run equal to the eager one (the same v: the masked loop's extra products are
    discarded) and Q HVPs per compiled step against q eagerly."""
    torch._dynamo.reset()
    options = dict(neumann_steps=3, neumann_lr=0.1)
    eager, state, step = _runs(quad, "ttsa", 10, **options)
    assert step.reason is None and 1 <= step.compiles <= 2
    for a, b in zip(_leaves(eager.core), _leaves(state.core)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert torch.equal(eager.generator.get_state(), state.generator.get_state())
    with count_calls() as counts:
        step(state)
    assert counts["hvp"] == 3 and counts["cross"] == 1


def test_ttsa_draws_several_q_in_that_run(quad):
    """The control for the test above: its ten iterations draw at least three distinct q (the
    truncated loop would have needed one graph each)."""
    solver = make_solver("ttsa", neumann_steps=3, neumann_lr=0.1)
    generator = run_generator(3)
    x, y = quad.init(generator)
    state = solver.init(quad, x, y, generator)
    qs = set()
    for t in range(10):
        qs.add(int(solver.sample(quad, t, state.generator).draw.term))
    assert len(qs) >= 3, qs


@pytest.mark.parametrize("batch_size", [16, 24])  # 4 equal blocks; 24, 24, 16 (uneven)
def test_saba_compiles_to_one_graph_and_equals_eager(quad, batch_size):
    """Twelve steps over every block: no fallback, at most two graphs per block shape plus the
    dynamic iteration, states and oracle counts equal to the eager run's."""
    torch._dynamo.reset()
    eager, state, step = _runs(quad, "saba", 12, batch_size=batch_size)
    assert step.reason is None
    assert step.compiles <= (2 if batch_size == 16 else 4)
    for a, b in zip(_leaves(eager.core), _leaves(state.core)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_saba_block_tensors_match_the_partition():
    part = Blocks(64, 24)
    for k, block in enumerate(memory.blocks(part)):
        assert block.index.tolist() == [k] and torch.equal(block.indices, part.batch(k))
        assert float(block.weight) == part.weight(k)
        assert float(block.factor) == part.size(k) * part.n_batches / part.n
    with pytest.raises(ValueError, match=r"block index must be an int in \[0, 3\)"):
        memory.block(part, 3)


def test_memory_update_writes_one_entry_by_tensor_index():
    """The stacked table: update(j) replaces row j only (out of place), the average moves by
    w_j (d_j - M[j]), the estimate is K w_j (d_j - M[j]) + Mbar; values by hand."""
    part = Blocks(5, 2)  # blocks of 2, 2, 1: w = (0.4, 0.4, 0.2), K w = (1.2, 1.2, 0.6)
    mem = memory.full([{"w": torch.full((2,), float(k), dtype=torch.float64)} for k in range(3)], part)
    torch.testing.assert_close(mem.average["w"], torch.full((2,), 0.4 * 1 + 0.2 * 2, dtype=torch.float64))
    d = {"w": torch.tensor([5.0, 7.0], dtype=torch.float64)}
    j = memory.block(part, 2)
    est, new = memory.saga(mem, j, d)
    torch.testing.assert_close(est["w"], 0.6 * (d["w"] - 2.0) + 0.8, rtol=1e-15, atol=0)
    torch.testing.assert_close(new.average["w"], 0.8 + 0.2 * (d["w"] - 2.0), rtol=1e-15, atol=0)
    assert torch.equal(new.table["w"][2], d["w"]) and torch.equal(new.table["w"][:2], mem.table["w"][:2])
    assert torch.equal(mem.table["w"][2], torch.full((2,), 2.0, dtype=torch.float64))  # the old one untouched
    assert torch.equal(memory.entry(new, 2)["w"], d["w"])


def test_saba_refuses_a_state_with_the_old_tuple_memory(quad):
    """Checkpoints written before the stacked layout hold the table as a tuple of entries: a
    clear error, not a wrong step."""
    solver = make_solver("saba", batch_size=32)
    generator = run_generator(0)
    x, y = quad.init(generator)
    state = solver.init(quad, x, y, generator)
    old = state.core.memories["lower"]
    tuple_table = tuple(memory.entry(old, k) for k in range(2))
    core = state.core._replace(memories={**state.core.memories, "lower": old._replace(table=tuple_table)})
    with pytest.raises(ValueError, match="tuple of entries"):
        solver.step(quad, state._replace(core=core))


def test_ttsa_seeds_batched_with_vmap_equal_lone_runs(quad):
    """bilevel.many: the copies draw their own q; under vmap the masked loop runs for all of them
    in one call (no fallback to a loop over copies) and each copy equals its lone run."""
    from bilevel.many import LoopFallback
    options = dict(neumann_steps=3, neumann_lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoopFallback)
        runs = bilevel.solve(quad, "ttsa", steps=5, seeds=[0, 1, 2], eval_every=5, **options)
    assert runs.batched
    for copy in runs:
        lone = bilevel.solve(quad, "ttsa", steps=5, seed=copy.seed, eval_every=5, **options)
        torch.testing.assert_close(copy.x["x"], lone.x["x"], rtol=1e-10, atol=1e-12)
