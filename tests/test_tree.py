"""Tests of bilevel.tree: arithmetic on dicts of tensors."""
import math

import pytest
import torch

from bilevel import tree

DT = torch.float64


def make(seed=0, keys=("w", "b"), shapes=((2, 3), (4,))):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=DT) for k, s in zip(keys, shapes)}


def concat(t, keys):
    return torch.cat([t[k].reshape(-1) for k in keys])


def test_flatten_concatenates_in_key_order_and_unflatten_inverts():
    a = make()
    flat = tree.flatten(a)
    assert flat.shape == (10,)
    assert torch.equal(flat[:6], a["w"].reshape(-1))
    assert torch.equal(flat[6:], a["b"])
    back = tree.unflatten(flat, a)
    assert list(back) == ["w", "b"]
    for k in a:
        assert back[k].shape == a[k].shape
        assert torch.equal(back[k], a[k])
    # unflatten of an arbitrary vector then flatten is the identity on vectors
    vec = torch.arange(10, dtype=DT)
    assert torch.equal(tree.flatten(tree.unflatten(vec, a)), vec)
    assert tree.unflatten(vec, a)["b"].tolist() == [6.0, 7.0, 8.0, 9.0]


def test_unflatten_wrong_size_raises():
    with pytest.raises(ValueError):
        tree.unflatten(torch.zeros(9, dtype=DT), make())


def test_numel_and_as_tree():
    a = make()
    assert tree.numel(a) == 10
    t = torch.ones(3, dtype=DT)
    assert set(tree.as_tree(t)) == {"w"} and tree.as_tree(t)["w"] is t
    d = tree.as_tree(a)
    assert d == a and d is not a
    with pytest.raises(TypeError):
        tree.as_tree([1.0, 2.0])
    with pytest.raises(TypeError):
        tree.as_tree({"w": 1.0})


def test_dot_norm_sq_norm_match_torch_on_concatenation():
    a, b = make(0), make(1)
    ca, cb = concat(a, ["w", "b"]), concat(b, ["w", "b"])
    assert abs(float(tree.dot(a, b)) - float(ca @ cb)) < 1e-12
    assert abs(float(tree.sq_norm(a)) - float(ca @ ca)) < 1e-12
    assert abs(float(tree.norm(a)) - float(torch.linalg.vector_norm(ca))) < 1e-12
    # dot pairs leaves by key, not by position
    b_reordered = {"b": b["b"], "w": b["w"]}
    assert abs(float(tree.dot(a, b_reordered)) - float(ca @ cb)) < 1e-12


def test_add_sub_mul_scale_axpy_lerp_values():
    a, b = make(0), make(1)
    for k in a:
        assert torch.allclose(tree.add(a, b)[k], a[k] + b[k], rtol=0, atol=1e-15)
        assert torch.allclose(tree.sub(a, b)[k], a[k] - b[k], rtol=0, atol=1e-15)
        assert torch.allclose(tree.mul(a, b)[k], a[k] * b[k], rtol=0, atol=1e-15)
        assert torch.allclose(tree.scale(a, -2.5)[k], -2.5 * a[k], rtol=0, atol=1e-15)
        assert torch.allclose(tree.axpy(0.3, a, b)[k], 0.3 * a[k] + b[k], rtol=0, atol=1e-15)
        assert torch.allclose(tree.lerp(a, b, 0.25)[k], 0.75 * a[k] + 0.25 * b[k], rtol=0, atol=1e-14)
    # a 0-d tensor scale also works
    s = torch.tensor(3.0, dtype=DT)
    assert torch.allclose(tree.scale(a, s)["w"], 3 * a["w"], rtol=0, atol=1e-15)
    # lerp endpoints
    assert torch.allclose(tree.lerp(a, b, 0.0)["b"], a["b"], rtol=0, atol=1e-15)
    assert torch.allclose(tree.lerp(a, b, 1.0)["b"], b["b"], rtol=0, atol=1e-15)


def test_functions_do_not_modify_inputs():
    a, b = make(0), make(1)
    a0, b0 = {k: v.clone() for k, v in a.items()}, {k: v.clone() for k, v in b.items()}
    tree.add(a, b), tree.sub(a, b), tree.axpy(2.0, a, b), tree.lerp(a, b, 0.5), tree.scale(a, 3.0)
    c = tree.clone(a)
    c["w"].add_(1.0)  # a clone is independent storage
    for k in a:
        assert torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k])


def test_zeros_like_detach():
    a = make()
    z = tree.zeros_like(a)
    assert all(torch.equal(z[k], torch.zeros_like(a[k])) for k in a)
    leaf = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    d = tree.detach({k: 2 * v for k, v in leaf.items()})
    assert not any(v.requires_grad for v in d.values())


@pytest.mark.parametrize("fn", [
    lambda a, b: tree.add(a, b),
    lambda a, b: tree.sub(a, b),
    lambda a, b: tree.mul(a, b),
    lambda a, b: tree.axpy(1.0, a, b),
    lambda a, b: tree.lerp(a, b, 0.5),
    lambda a, b: tree.dot(a, b),
    lambda a, b: tree.map(torch.add, a, b),
    lambda a, b: tree.relative_error(a, b),
])
def test_key_mismatch_raises(fn):
    a = make(0)
    b = make(1, keys=("w", "c"))
    with pytest.raises(ValueError):
        fn(a, b)
    c = {"w": a["w"]}  # a missing key
    with pytest.raises(ValueError):
        fn(a, c)


def test_relative_error():
    ref = make(0)
    est = {k: v.clone() for k, v in ref.items()}
    est["b"] = est["b"] + 0.01
    expected = math.sqrt(4 * 0.01 ** 2) / float(torch.linalg.vector_norm(concat(ref, ["w", "b"])))
    assert abs(tree.relative_error(est, ref) - expected) < 1e-12
    assert tree.relative_error(ref, ref) == 0.0
    zero = tree.zeros_like(ref)
    assert tree.relative_error(zero, zero) == 0.0
    assert tree.relative_error(ref, zero) == math.inf


def test_all_finite():
    a = make()
    assert tree.all_finite(a)
    a["b"] = a["b"].clone()
    a["b"][1] = float("nan")
    assert not tree.all_finite(a)
    a["b"][1] = float("inf")
    assert not tree.all_finite(a)
