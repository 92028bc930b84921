"""Truncated CG inside a run: the hypergradient keeps its implicit term, and the warning comes
once per solve() call however often CG truncates.

    g(x, y) = -1/2 ||y||^2 + <x, y>      d2_yy g = -I (every direction has negative curvature)
    f(x, y) = 1/2 ||y - t||^2 + 1/2 ||x||^2

so truncated CG stops at its first direction and returns v = b = y - t (A taken as I), and the
AID-CG hypergradient is h = grad_x f - d2_xy g v = x - (y - t). The old code returned v = v_0
(0 cold), i.e. h = x with no implicit term.
"""
import warnings

import torch

import bilevel
import bilevel.solvers.aid_cg  # noqa: F401  (registers "aid-cg")
from bilevel import linear_system
from bilevel.problem import FunctionProblem

DT = torch.float64
T = torch.tensor([0.5, -1.0], dtype=DT)


def concave_lower_problem():
    return FunctionProblem(
        upper_loss=lambda x, y, b: 0.5 * ((y["y"] - T) ** 2).sum() + 0.5 * (x["x"] ** 2).sum(),
        lower_loss=lambda x, y, b: -0.5 * (y["y"] ** 2).sum() + x["x"] @ y["y"],
        x0={"x": torch.tensor([1.0, 2.0], dtype=DT)}, y0={"y": torch.tensor([0.3, 0.1], dtype=DT)})


HP = dict(upper_lr=0.1, lower_lr=0.01, inner_steps=1, cg_steps=3)


def test_truncated_cg_keeps_the_implicit_term_and_warns_once_per_run(monkeypatch):
    truncations = []
    original = linear_system._report_truncation
    monkeypatch.setattr(linear_system, "_report_truncation",
                        lambda *a: truncations.append(a[1]) or original(*a))
    problem = concave_lower_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = bilevel.solve(problem, "aid-cg", steps=4, **HP)
        assert len(truncations) == 4 and set(truncations) == {0}  # every step truncated at once
        assert len([w for w in caught if "truncated" in str(w.message)]) == 1
        bilevel.solve(problem, "aid-cg", steps=3, **HP)
        assert len(truncations) == 7
        assert len([w for w in caught if "truncated" in str(w.message)]) == 2  # one per run

    # the first step by hand: y_1 = y_0 - lr (-y_0 + x_0), v = b = y_1 - t, x_1 = x_0 - lr (x_0 - v)
    x0, y0 = problem.init(None)
    y1 = y0["y"] - HP["lower_lr"] * (-y0["y"] + x0["x"])
    x1 = x0["x"] - HP["upper_lr"] * (x0["x"] - (y1 - T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = bilevel.solve(problem, "aid-cg", steps=1, **HP)
    torch.testing.assert_close(one.x["x"], x1, rtol=0, atol=1e-14)
    assert (x1 - (x0["x"] - HP["upper_lr"] * x0["x"])).abs().max() > 1e-3  # the implicit term matters
    assert first.history  # the runs completed
