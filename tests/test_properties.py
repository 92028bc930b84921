"""Property-based checks (hypothesis) of the core's algebra on random inputs."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel import linear_system, tree, upper

SETTINGS = settings(max_examples=40, deadline=None)


def _spd(seed: int, n: int, conditioning: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, conditioning, n, dtype=torch.float64)) @ q.T


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), conditioning=st.floats(0, 3))
def test_cg_solves_any_spd_system(seed, n, conditioning):
    """Exact in n steps only in exact arithmetic: with condition numbers up to 1e3, round-off
    costs CG orthogonality, so a few multiples of n are allowed."""
    a = _spd(seed, n, conditioning)
    b = {"v": torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)}
    v = linear_system.conjugate_gradient(lambda u: {"v": a @ u["v"]}, b, steps=4 * n + 4)
    assert torch.allclose(a @ v["v"], b["v"], atol=1e-7 * (1 + float(b["v"].norm())))


@SETTINGS
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_flatten_unflatten_round_trip(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    t = {f"k{i}": torch.randn(s, 2, generator=g) for i, s in enumerate(sizes)}
    back = tree.unflatten(tree.flatten(t), t)
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    assert torch.isclose(tree.norm(t), tree.flatten(t).norm())


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-6, 1e6), kind=st.sampled_from(["global", "per_tensor"]))
def test_normalized_direction_has_unit_norm(seed, scale, kind):
    g = torch.Generator().manual_seed(seed)
    h = {"a": scale * torch.randn(3, generator=g, dtype=torch.float64),
         "b": scale * torch.randn(2, 2, generator=g, dtype=torch.float64)}
    t = upper.normalize(kind)
    u, _ = t.update(h, t.init(h))
    norms = [tree.norm(u)] if kind == "global" else [v.norm() for v in u.values()]
    assert all(abs(float(n) - 1) < 1e-12 for n in norms)


@SETTINGS
@given(seed=st.integers(0, 10_000), radius=st.floats(0.01, 10))
def test_projection_lands_in_the_ball_and_fixes_points_inside(seed, radius):
    z = {"v": torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)}
    p = linear_system.project_ball(z, radius)
    assert float(tree.norm(p)) <= radius * (1 + 1e-12)
    if float(tree.norm(z)) <= radius:
        assert torch.equal(p["v"], z["v"])
