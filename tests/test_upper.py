"""Tests of bilevel.upper: each transform against a hand computation on a few steps."""
import math

import pytest
import torch

from bilevel import upper

DT = torch.float64


def T(w, b):
    """A two-key tree from plain lists."""
    return {"w": torch.tensor(w, dtype=DT), "b": torch.tensor(b, dtype=DT)}


H = [T([1.0, -2.0], [0.5]), T([3.0, 0.0], [-1.0]), T([-1.0, 4.0], [2.0])]
X0 = T([0.1, 0.2], [0.3])


def run(transform, directions, extras=None):
    state = transform.init(X0)
    outs = []
    for i, d in enumerate(directions):
        u, state = transform.update(d, state, **(extras[i] if extras else {}))
        outs.append(u)
    return outs, state


def close(a, b, tol=1e-14):
    assert set(a) == set(b)
    for k in b:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], rtol=0, atol=tol), (k, a[k], b[k])


def lin(*pairs):
    """sum_i c_i tree_i, computed leaf by leaf."""
    keys = pairs[0][1].keys()
    return {k: sum(c * t[k] for c, t in pairs) for k in keys}


def test_apply_subtracts():
    close(upper.apply(X0, H[0]), T([0.1 - 1.0, 0.2 + 2.0], [0.3 - 0.5]))


@pytest.mark.parametrize("make", [upper.sgd, upper.scale])
def test_sgd_and_scale_constant(make):
    outs, state = run(make(0.1), H)
    for u, hh in zip(outs, H):
        close(u, lin((0.1, hh)))
    assert state == upper.Count(torch.tensor(3))


@pytest.mark.parametrize("make", [upper.sgd, upper.scale])
def test_sgd_with_polynomial_decay(make):
    c, e = 0.4, 0.6
    outs, _ = run(make(upper.polynomial_decay(c, e)), H)
    for t, (u, hh) in enumerate(zip(outs, H)):
        close(u, lin((c / (t + 1) ** e, hh)))
    # the schedule itself
    sched = upper.polynomial_decay(2.0, 0.5)
    assert sched(0) == 2.0 and abs(sched(3) - 1.0) < 1e-15
    assert upper.polynomial_decay(0.3, 0.0)(10) == 0.3


def test_scale_accepts_any_callable_schedule():
    outs, _ = run(upper.scale(lambda t: [1.0, 10.0, 100.0][t]), H)
    for lr, u, hh in zip([1.0, 10.0, 100.0], outs, H):
        close(u, lin((lr, hh)))


def test_ema():
    beta = 0.8
    outs, m = run(upper.ema(beta), H)
    m0 = lin((0.2, H[0]))
    m1 = lin((0.8, m0), (0.2, H[1]))
    m2 = lin((0.8, m1), (0.2, H[2]))
    for u, e in zip(outs, [m0, m1, m2]):
        close(u, e)
    close(m.m, m2)


def test_heavy_ball():
    beta = 0.5
    outs, _ = run(upper.heavy_ball(beta), H)
    m0 = H[0]
    m1 = lin((0.5, m0), (1.0, H[1]))
    m2 = lin((0.5, m1), (1.0, H[2]))
    for u, e in zip(outs, [m0, m1, m2]):
        close(u, e)


def test_storm():
    beta = 0.7
    prev = [None, T([2.0, 1.0], [0.0]), T([0.0, -1.0], [1.5])]
    outs, _ = run(upper.storm(beta), H, [{}, {"previous": prev[1]}, {"previous": prev[2]}])
    m0 = H[0]
    m1 = lin((beta, m0), (1 - beta, H[1]), (beta, H[1]), (-beta, prev[1]))
    m2 = lin((beta, m1), (1 - beta, H[2]), (beta, H[2]), (-beta, prev[2]))
    close(outs[0], m0)
    close(outs[1], m1)
    close(outs[2], m2)


def test_storm_first_step_ignores_previous_and_later_steps_require_it():
    tr = upper.storm(0.5)
    state = tr.init(X0)
    u, state = tr.update(H[0], state, previous=H[2])
    close(u, H[0])
    with pytest.raises(ValueError, match="previous"):
        tr.update(H[1], state)


def test_normalize_global_vs_per_tensor():
    h = T([3.0, 4.0], [12.0])  # global norm 13, per-tensor norms 5 and 12
    (u,), _ = run(upper.normalize(), [h])
    close(u, T([3 / 13, 4 / 13], [12 / 13]))
    (u,), _ = run(upper.normalize("per_tensor"), [h])
    close(u, T([0.6, 0.8], [1.0]))
    (u,), _ = run(upper.normalize("global", eps=1.0), [h])
    close(u, T([3 / 14, 4 / 14], [12 / 14]))


@pytest.mark.parametrize("kind", ["global", "per_tensor"])
def test_normalize_zero_direction_stays_zero(kind):
    zero = T([0.0, 0.0], [0.0])
    (u,), _ = run(upper.normalize(kind), [zero])
    close(u, zero, tol=0)
    assert all(torch.isfinite(v).all() for v in u.values())
    # per tensor: only the zero leaf stays zero
    if kind == "per_tensor":
        (u,), _ = run(upper.normalize(kind), [T([0.0, 0.0], [-2.0])])
        close(u, T([0.0, 0.0], [-1.0]), tol=0)


def test_normalize_invalid_kind():
    with pytest.raises(ValueError):
        upper.normalize("layer")


def test_clip():
    h = T([3.0, 4.0], [12.0])  # norm 13
    (u,), _ = run(upper.clip(26.0), [h])
    close(u, h, tol=0)
    (u,), _ = run(upper.clip(6.5), [h])
    close(u, T([1.5, 2.0], [6.0]))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            upper.clip(bad)


def test_adam_three_steps_with_bias_correction():
    b1, b2, eps = 0.9, 0.99, 1e-3
    outs, state = run(upper.adam(b1, b2, eps), H)
    for k in ("w", "b"):
        m = torch.zeros_like(H[0][k])
        v = torch.zeros_like(H[0][k])
        for t in range(1, 4):
            g = H[t - 1][k]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            expected = (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
            assert torch.allclose(outs[t - 1][k], expected, rtol=0, atol=1e-13), (k, t)
    assert int(state.count) == 3
    # the first Adam step is sign-like: h / (|h| + eps)
    first = outs[0]["w"]
    assert torch.allclose(first, H[0]["w"] / (H[0]["w"].abs() + eps), rtol=0, atol=1e-12)


def test_chain_ema_normalize_scale_by_hand():
    beta, lr = 0.6, 0.25
    tr = upper.chain(upper.ema(beta), upper.normalize(), upper.scale(lr))
    outs, _ = run(tr, H)
    m = {k: torch.zeros_like(v) for k, v in H[0].items()}
    for u, hh in zip(outs, H):
        m = lin((beta, m), (1 - beta, hh))
        n = math.sqrt(sum(float((v ** 2).sum()) for v in m.values()))
        close(u, lin((lr / n, m)))


def test_chain_passes_extras_and_keeps_state_per_transform():
    beta = 0.5
    prev = T([1.0, 1.0], [1.0])
    tr = upper.chain(upper.storm(beta), upper.scale(upper.polynomial_decay(1.0, 1.0)))
    outs, states = run(tr, H[:2], [{}, {"previous": prev}])
    close(outs[0], H[0])
    m1 = lin((beta, H[0]), (1 - beta, H[1]), (beta, H[1]), (-beta, prev))
    close(outs[1], lin((0.5, m1)))
    assert int(states[1].count) == 2


def test_transforms_do_not_modify_inputs():
    h = [{k: v.clone() for k, v in t.items()} for t in H]
    for tr in (upper.ema(0.9), upper.heavy_ball(0.9), upper.adam(), upper.normalize(), upper.clip(0.1),
               upper.storm(0.5), upper.scale(2.0)):
        run(tr, h, [{}, {"previous": H[0]}, {"previous": H[1]}])  # extras reach every transform
    for a, b in zip(h, H):
        close(a, b, tol=0)


@pytest.mark.parametrize("make", [
    lambda: upper.ema(1.0), lambda: upper.ema(-0.1), lambda: upper.ema(float("nan")),
    lambda: upper.heavy_ball(1.5), lambda: upper.storm(1.0), lambda: upper.storm(-1e-9),
    lambda: upper.adam(b1=1.0), lambda: upper.adam(b2=-0.5),
])
def test_invalid_beta_raises(make):
    with pytest.raises(ValueError):
        make()


def test_beta_zero_is_allowed():
    outs, _ = run(upper.ema(0.0), H)
    close(outs[2], H[2])


def test_counted_transforms_take_the_iteration_from_the_caller():
    """Given t (a solver's outer iteration), scale, adam and storm use it and never read their
    stored count: the same t gives the same direction whatever the count holds."""
    for tr, extra in ((upper.scale(upper.polynomial_decay(0.4, 0.6)), {}), (upper.adam(), {}),
                      (upper.storm(0.5), {"previous": H[1]})):
        state = tr.init(X0)
        fresh, _ = tr.update(H[0], state, t=2, **extra)
        bumped = type(state)(*(torch.tensor(7) if isinstance(f, torch.Tensor) and f.dtype == torch.int64 else f
                               for f in state))
        other, new_state = tr.update(H[0], bumped, t=2, **extra)
        close(fresh, other, tol=0)
        assert int(new_state.count) == 8
    u, _ = upper.scale(upper.polynomial_decay(0.4, 0.6)).update(H[0], upper.Count(torch.tensor(0)), t=2)
    close(u, lin((0.4 / 3 ** 0.6, H[0])))


def test_transform_states_are_tensor_leaves():
    from torch.utils._pytree import tree_leaves
    tr = upper.chain(upper.storm(0.5), upper.normalize(), upper.clip(1.0), upper.adam(), upper.ema(0.9),
                     upper.heavy_ball(0.5), upper.scale(0.1))
    _, state = tr.update(H[0], tr.init(X0))
    leaves = tree_leaves(state)
    assert leaves and all(isinstance(v, torch.Tensor) for v in leaves)
