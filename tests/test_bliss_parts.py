"""Core parts BLISS added to bilevel/: the cosine schedule, AdamW (upper transform and lower
loop), per-tensor clipping and the damped, clipped linear-system steps."""
from __future__ import annotations

import math

import pytest
import torch

from bilevel import tree, upper
from bilevel.linear_system import linear_sgd
from bilevel.lower_adamw import AdamW, clip_global
from bilevel.problem import FunctionProblem
from bilevel.schedules import Cosine, cosine, parse


def test_cosine_schedule_values():
    s = Cosine(1.0, total=10, warmup=2, final=0.1)
    assert [s(0), s(1)] == [0.5, 1.0]  # linear ramp, no zero step
    assert s(2) == 1.0
    assert math.isclose(s(6), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert math.isclose(s(10), 0.1) and math.isclose(s(50), 0.1)
    c = cosine(2.0, 100)  # 10 % warm-up (BLISS)
    assert c.warmup == 10 and c(9) == 2.0 and c(99) < 0.01
    assert parse({"value": 1.0, "total": 10, "warmup": 2, "final": 0.1}, "upper_lr") == s
    with pytest.raises(ValueError, match="upper_lr: unknown key"):
        parse({"value": 1.0, "total": 10, "decay": 1}, "upper_lr")
    with pytest.raises(ValueError, match="warmup"):
        Cosine(1.0, total=5, warmup=6)
    with pytest.raises(ValueError, match="final"):
        Cosine(1.0, total=5, final=2.0)


def test_adamw_transform_matches_torch_adamw():
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g, dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in x.items()} for _ in range(4)]
    transform = upper.adamw(0.1, 0.9, 0.95, 1e-8, weight_decay=0.1)
    state, ours = transform.init(x), dict(x)
    ref = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for h in grads:
        u, state = transform.update(h, state, params=ours)
        ours = upper.apply(ours, u)
        for k, v in ref.items():
            v.grad = h[k].clone()
        opt.step()
    for k in x:
        assert torch.allclose(ours[k], ref[k].detach(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="params"):
        transform.update(grads[0], transform.init(x))


def test_clip_each_and_clip_global():
    u = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.3, 0.4]), "c": torch.zeros(2)}
    out = upper.clip_each(u, 1.0)
    assert torch.allclose(out["a"], torch.tensor([0.6, 0.8])) and torch.equal(out["b"], u["b"])
    assert torch.equal(out["c"], u["c"])  # a zero tensor stays zero (no 0/0)
    g = clip_global(u, 1.0)
    assert math.isclose(float(tree.norm(g)), 1.0, rel_tol=1e-6)
    assert clip_global(u, None) is u


def test_damped_clipped_linear_sgd_steps():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = {"v": torch.tensor([1.0, -2.0], dtype=torch.float64), "w": torch.tensor([5.0], dtype=torch.float64)}
    W = 3.0

    def matvec(z):
        return {"v": A @ z["v"], "w": W * z["w"]}
    got = linear_sgd(matvec, b, steps=2, lr=0.1, damping=0.5, clip=1.0)
    z = {"v": torch.zeros(2, dtype=torch.float64), "w": torch.zeros(1, dtype=torch.float64)}
    for _ in range(2):
        d = {"v": A @ z["v"] + 0.5 * z["v"] - b["v"], "w": W * z["w"] + 0.5 * z["w"] - b["w"]}
        d = {k: v / max(1.0, float(v.norm())) for k, v in d.items()}
        z = {k: z[k] - 0.1 * d[k] for k in z}
    for k in z:
        assert torch.allclose(got[k], z[k])
    # without clip, many steps solve (A + damping I) z = b
    far = linear_sgd(matvec, b, steps=500, lr=0.2, damping=0.5)
    assert torch.allclose(far["v"], torch.linalg.solve(A + 0.5 * torch.eye(2, dtype=A.dtype), b["v"]))
    assert torch.allclose(far["w"], b["w"] / 3.5)
    with pytest.raises(ValueError, match="damping"):
        linear_sgd(matvec, b, lr=0.1, damping=-1.0)
    with pytest.raises(ValueError, match="clip"):
        linear_sgd(matvec, b, lr=0.1, clip=0.0)


def test_adamw_lower_loop_matches_torch_adamw_with_clipping():
    target = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    problem = FunctionProblem(lambda x, y, b: (y["w"] ** 2).sum(),
                              lambda x, y, b: 5 * ((y["w"] - x["l"] * target) ** 2).sum(),
                              {"l": torch.ones(1, dtype=torch.float64)}, {"w": torch.zeros(3, dtype=torch.float64)})
    x, y = problem.init(None)
    loop = AdamW(lr=lambda t: 0.1 / (t + 1), steps=3, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)
    state = loop.init(y)
    for t in range(2):
        state = loop.step(problem, x, state, torch.Generator(), t)
    ref = y["w"].clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(2):
        opt.param_groups[0]["lr"] = 0.1 / (t + 1)  # one lr per outer iteration, for all K steps
        for _ in range(3):
            opt.zero_grad()
            problem.lower_loss(x, {"w": ref}, None).backward()
            n = float(ref.grad.norm())
            ref.grad.mul_(min(1.0, 1.0 / n))  # exact clip (torch's clip_grad_norm_ adds 1e-6)
            opt.step()
    assert torch.allclose(state.y["w"], ref.detach(), rtol=1e-12, atol=1e-14)
    assert int(state.moments.count) == 6
    with pytest.raises(ValueError, match="steps"):
        AdamW(lr=0.1, steps=0)
