"""A tiny deterministic bilevel problem whose steps can be computed by hand (batch None):

    g(x, y) = 1/2 y^T A y + x^T C y + a^T y     grad_y g = A y + C^T x + a,  d2_yy g = A,  d2_xy g = C
    f(x, y) = 1/2 ||y - t||^2 + 1/2 x^T B x     grad_y f = y - t,            grad_x f = B x

Shared by the solver tests that check update equations step by step.
"""
import torch

import bilevel
from bilevel.problem import FunctionProblem

DIM_Y, DIM_X = 4, 3
DT = torch.float64


def make_matrices():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    M = r(DIM_Y, DIM_Y)
    return dict(A=M @ M.T / DIM_Y + torch.eye(DIM_Y, dtype=DT), C=0.5 * r(DIM_X, DIM_Y), a=r(DIM_Y),
                t=r(DIM_Y), B=torch.diag(torch.tensor([1.0, 0.5, 0.2], dtype=DT)), x0=r(DIM_X), y0=r(DIM_Y))


def make_problem(m):
    return FunctionProblem(
        upper_loss=lambda x, y, b: 0.5 * ((y["y"] - m["t"]) ** 2).sum() + 0.5 * x["x"] @ m["B"] @ x["x"],
        lower_loss=lambda x, y, b: 0.5 * y["y"] @ m["A"] @ y["y"] + x["x"] @ m["C"] @ y["y"] + m["a"] @ y["y"],
        x0={"x": m["x0"]}, y0={"y": m["y0"]})


def grad_y_g(m, x, y):
    return m["A"] @ y + m["C"].T @ x + m["a"]


def run_steps(problem, solver, n, seed=0, **hp):
    """The states after init and after each of n steps of a registered solver."""
    solver = bilevel.make_solver(solver, **hp)
    g = torch.Generator().manual_seed(seed)
    state = solver.init(problem, *problem.init(g), g)
    states = [state]
    for _ in range(n):
        state = solver.step(problem, state)
        states.append(state)
    return states
