"""Step sizes (bilevel/schedules.py): numbers or schedules c / (t + 1)^e for every step-size field
of every solver, read from configs as {value: c, decay: e}.

* every solver, every ``*_lr`` field: a schedule runs; a constant schedule is bit for bit the
  plain number; a callable equal to a PolyDecay gives the same run; a decaying schedule changes
  the run (so the field is used, at the current iteration and not only at t = 0);
* hand-computed steps at t = 0, 1, 2 for ITD-BiO's lower_lr, StocBiO's neumann_lr, AmIGO's z_lr,
  the SOBA loop's fields and SABA's;
* SOBA, MA-SOBA and SABA defaults against a hand-written recursion of benchopt's update
  (benchmark_bilevel solvers/soba.py, saba.py and benchmark_utils/learning_rate_scheduler.py).
"""
import dataclasses
import math
import pickle

import pytest
import torch

import bilevel
from bilevel import schedules
from bilevel.config import ConfigError, load, solver_options
from bilevel.problems.quadratic import Quadratic
from bilevel.registry import SOLVERS
from bilevel.schedules import PolyDecay
from matrix_problem import make_matrices, make_problem

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# The schedule type and its parsing.

def test_poly_decay_values_and_pickle():
    s = PolyDecay(0.3, 0.5)
    assert [s(t) for t in range(3)] == [0.3 / 1 ** 0.5, 0.3 / 2 ** 0.5, 0.3 / 3 ** 0.5]
    assert PolyDecay(0.3)(7) == 0.3 and PolyDecay(0.3, 0.0)(10) == 0.3
    assert pickle.loads(pickle.dumps(s)) == s  # checkpoints torch.save solvers' fields
    assert schedules.parse(s.to_config(), "f") == s  # logged as the config syntax, read back
    assert schedules.at(s, 1) == s(1) and schedules.at(0.2, 5) == 0.2 and schedules.at("auto", 3) == "auto"
    assert schedules.decayed(0.2, 0.0) == 0.2 and schedules.decayed(0.2, 0.5) == PolyDecay(0.2, 0.5)
    assert schedules.decayed(s, 0.9) is s  # a schedule is used as given
    assert bilevel.upper.polynomial_decay(0.3, 0.5) == s  # the former name


@pytest.mark.parametrize("value, exponent, match", [
    (0.0, 0.5, "value"), (-1.0, 0.0, "value"), (math.inf, 0.0, "value"), ("0.1", 0.0, "value"),
    (0.1, -0.5, "exponent"), (0.1, math.nan, "exponent"), (True, 0.0, "value"),
])
def test_poly_decay_rejects_bad_values(value, exponent, match):
    with pytest.raises(ValueError, match=match):
        PolyDecay(value, exponent)


def test_parse():
    assert schedules.parse(0.1, "f") == 0.1 and isinstance(schedules.parse(2, "f"), float)
    assert schedules.parse({"value": 0.1, "decay": 0.5}, "f") == PolyDecay(0.1, 0.5)
    assert schedules.parse({"value": 0.1}, "f") == PolyDecay(0.1, 0.0)
    assert schedules.parse("auto", "f") == "auto"  # a keyword the solver resolves (neumann_lr)
    for bad, match in [({"value": 0.1, "decy": 0.5}, "decy"), ({"decay": 0.5}, "'value' is missing"),
                       ({"value": -1}, "positive"), ("0.1/sqrt(t+1)", "value: c, decay: e"), ([0.1], "value: c")]:
        with pytest.raises(ValueError, match=match) as info:
            schedules.parse(bad, "solver_options.soba.upper_lr")
        assert "solver_options.soba.upper_lr" in str(info.value)


def test_config_step_size_mapping():
    cfg = load(None, ["problem=quadratic", "solvers=[soba,ttsa]", "solver_options.soba.upper_lr={value: 0.2, decay: 0.5}",
                      "solver_options.soba.z_lr=0.3", "solver_options.ttsa.neumann_lr={value: 0.05}"])
    assert solver_options(cfg, "soba") == {"upper_lr": PolyDecay(0.2, 0.5), "z_lr": 0.3}
    assert solver_options(cfg, "ttsa") == {"neumann_lr": PolyDecay(0.05, 0.0)}
    solver = bilevel.make_solver("soba", **solver_options(cfg, "soba"))
    assert solver.upper_lr(3) == 0.2 / 2


@pytest.mark.parametrize("value, match", [
    ("{value: 0.2, decai: 0.5}", "decai"), ("{value: -0.2}", "positive"), ("fast", "fast"),
    ("{value: 0.2, decay: -1}", "exponent"),
])
def test_config_rejects_malformed_step_sizes_naming_the_field(value, match):
    with pytest.raises(ConfigError, match=match) as info:
        load(None, ["problem=quadratic", "solvers=[soba]", f"solver_options.soba.upper_lr={value}"])
    assert "solver_options.soba.upper_lr" in str(info.value)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="z_lr must be a positive number or a schedule"):
        bilevel.make_solver("soba", z_lr="0.1")
    with pytest.raises(ValueError, match="lambda0 must be a positive number"):
        bilevel.make_solver("f2sa", lambda0=lambda t: 1.0)  # only step sizes take schedules
    with pytest.raises(ValueError, match="lower_lr"):
        bilevel.make_solver("itd-bio", lower_lr=0.0)


# ---------------------------------------------------------------------------------------------
# Every solver, every step-size field.

#: Options that make every step-size field matter within 3 steps.
USED = {"bo-rep": dict(period=1), "slip": {}, "vrbo": dict(period=2, refresh_batches=2, inner_steps=2)}
LINEAR_SGD = {"bo-rep", "slip"}  # z_lr matters only with hypergradient="linear_sgd"
FAST = dict(inner_steps=2, neumann_steps=3, linear_steps=2)


def _cases():
    for name in SOLVERS.names():
        for field in schedules.step_size_fields(SOLVERS.get(name).cls):
            yield name, field


def _options(name, field):
    cls = SOLVERS.get(name).cls
    names = {f.name for f in dataclasses.fields(cls)}
    hp = {k: v for k, v in FAST.items() if k in names}
    hp.update({f: 0.0 for f in names if f.endswith("_lr_decay")})  # numbers stay constant
    hp.update(USED.get(name, {}))
    if name in LINEAR_SGD and field == "z_lr":
        hp["hypergradient"] = "linear_sgd"
    default = SOLVERS.options(name)[field]
    value = default.value if isinstance(default, PolyDecay) else default
    return hp, min(value, 0.1) if isinstance(value, (int, float)) else 0.1  # e.g. neumann_lr="auto"


@pytest.fixture(scope="module")
def quad():
    return Quadratic(n_samples_inner=32, n_samples_outer=32, dim_inner=4, dim_outer=3, batch_size=8)


def _run(problem, name, steps=3, **hp):
    solver = bilevel.make_solver(name, **hp)
    g = torch.Generator().manual_seed(0)
    state = solver.init(problem, *problem.init(g), g)
    for _ in range(steps):
        state = solver.step(problem, state)
    return torch.cat([v.reshape(-1) for v in (*state.x.values(), *state.y.values())])


@pytest.mark.parametrize("name, field", list(_cases()))
def test_every_step_size_field_takes_a_schedule(quad, name, field):
    hp, value = _options(name, field)
    number = _run(quad, name, **hp, **{field: value})
    constant = _run(quad, name, **hp, **{field: PolyDecay(value, 0.0)})
    assert torch.equal(number, constant), "a constant schedule must equal the plain number bit for bit"
    decaying = _run(quad, name, **hp, **{field: PolyDecay(value, 0.5)})
    assert torch.isfinite(decaying).all()
    assert not torch.equal(decaying, number), f"{field} of {name} is not used at t > 0"
    by_callable = _run(quad, name, **hp, **{field: lambda t: value / (t + 1) ** 0.5})
    assert torch.equal(by_callable, decaying), "a callable schedule is resolved like a PolyDecay"


# ---------------------------------------------------------------------------------------------
# Hand-computed steps on the matrix problem (tests/matrix_problem.py):
#   grad_y g = A y + C^T x + a,  d2_yy g = A,  d2_xy g . z = C z,  grad_y f = y - t,  grad_x f = B x

@pytest.fixture(scope="module")
def mats():
    return make_matrices()


def _start(m, name, **hp):
    problem = make_problem(m)
    solver = bilevel.make_solver(name, **hp)
    g = torch.Generator().manual_seed(0)
    return problem, solver, solver.init(problem, *problem.init(g), g)


def test_itd_bio_lower_lr_schedule(mats):
    m, c, e = mats, 0.3, 0.7
    problem, solver, s = _start(m, "itd-bio", lower_lr=PolyDecay(c, e), inner_steps=1)
    y = m["y0"].clone()
    for t in range(3):
        x = s.x["x"]
        y = y - c / (t + 1) ** e * (m["A"] @ y + m["C"].T @ x + m["a"])
        s = solver.step(problem, s)
        torch.testing.assert_close(s.y["y"], y, rtol=0, atol=1e-13)


def test_stocbio_neumann_lr_schedule(mats):
    """v_t = eta_t sum_{q<=Q} (I - eta_t A)^q (y_{t+1} - t) (Q products),  x_{t+1} = x_t - lr (B x_t - C v_t)."""
    m, c, e, Q, lr = mats, 0.4, 1.0, 3, 0.2
    problem, solver, s = _start(m, "stocbio", neumann_lr=PolyDecay(c, e), neumann_steps=Q, upper_lr=lr,
                                lower_lr=0.1, inner_steps=1)
    eye = torch.eye(4, dtype=F64)
    x, y = m["x0"].clone(), m["y0"].clone()
    for t in range(3):
        y = y - 0.1 * (m["A"] @ y + m["C"].T @ x + m["a"])
        eta = c / (t + 1) ** e
        v = eta * sum(torch.linalg.matrix_power(eye - eta * m["A"], q) for q in range(Q + 1)) @ (y - m["t"])
        x = x - lr * (m["B"] @ x - m["C"] @ v)
        s = solver.step(problem, s)
        torch.testing.assert_close(s.x["x"], x, rtol=0, atol=1e-12)


def test_amigo_z_lr_schedule(mats):
    m, c, e = mats, 0.3, 0.5
    problem, solver, s = _start(m, "amigo", z_lr=PolyDecay(c, e), upper_lr=0.2, lower_lr=0.1, inner_steps=1,
                                linear_steps=1)
    x, y, z = m["x0"].clone(), m["y0"].clone(), torch.zeros(4, dtype=F64)
    for t in range(3):
        y = y - 0.1 * (m["A"] @ y + m["C"].T @ x + m["a"])
        z = z - c / (t + 1) ** e * (m["A"] @ z - (y - m["t"]))
        x = x - 0.2 * (m["B"] @ x - m["C"] @ z)
        s = solver.step(problem, s)
        torch.testing.assert_close(s.x["x"], x, rtol=0, atol=1e-12)


def _benchopt_soba(m, steps, lr_inner, lr_outer):
    """benchopt's soba_one_iter (v = -z; all directions at the current point), written by hand:
        inner_var -= rho_t grad_y g;   v -= rho_t (H v + grad_y f);   outer_var -= gamma_t (J v + grad_x f)
    with (rho_t, gamma_t) = update_lr(state): constants / (t + 1) ** exponents."""
    x, y, v, out = m["x0"].clone(), m["y0"].clone(), torch.zeros(4, dtype=F64), []
    for t in range(steps):
        rho, gamma = lr_inner(t), lr_outer(t)
        grad_y_g, hvp, cross_v = m["A"] @ y + m["C"].T @ x + m["a"], m["A"] @ v, m["C"] @ v
        grad_in_outer, grad_out_outer = y - m["t"], m["B"] @ x
        y, v, x = y - rho * grad_y_g, v - rho * (hvp + grad_in_outer), x - gamma * (cross_v + grad_out_outer)
        out.append((x, y, v))
    return out


def test_soba_defaults_follow_benchopt(mats):
    """benchopt SOBA: step_size 0.1, outer_ratio 1, exponents (0.5, 0.5): 0.1 / sqrt(t + 1)."""
    problem, solver, s = _start(mats, "soba")
    assert (solver.upper_lr, solver.lower_lr, solver.z_lr) == (PolyDecay(0.1, 0.5),) * 3
    expected = _benchopt_soba(mats, 3, lambda t: 0.1 / (t + 1) ** 0.5, lambda t: 0.1 / 1.0 / (t + 1) ** 0.5)
    for x, y, v in expected:
        s = solver.step(problem, s)
        torch.testing.assert_close(s.x["x"], x, rtol=0, atol=1e-14)
        torch.testing.assert_close(s.y["y"], y, rtol=0, atol=1e-14)
        torch.testing.assert_close(s.core.z["y"], -v, rtol=0, atol=1e-14)


def test_soba_loop_uses_each_schedule(mats):
    """Distinct schedules on y, z and x (benchopt ties y and v together; here they are separate)."""
    ly, lz, lx = PolyDecay(0.3, 0.2), PolyDecay(0.2, 0.9), PolyDecay(0.25, 0.4)
    problem, solver, s = _start(mats, "soba", lower_lr=ly, z_lr=lz, upper_lr=lx)
    m = mats
    x, y, z = m["x0"].clone(), m["y0"].clone(), torch.zeros(4, dtype=F64)
    for t in range(3):
        d_y, d_z, d_x = m["A"] @ y + m["C"].T @ x + m["a"], m["A"] @ z - (y - m["t"]), m["B"] @ x - m["C"] @ z
        y, z, x = y - ly(t) * d_y, z - lz(t) * d_z, x - lx(t) * d_x
        s = solver.step(problem, s)
        torch.testing.assert_close(s.x["x"], x, rtol=0, atol=1e-14)
        torch.testing.assert_close(s.y["y"], y, rtol=0, atol=1e-14)
        torch.testing.assert_close(s.core.z["y"], z, rtol=0, atol=1e-14)


def test_ma_soba_defaults_are_constant(mats):
    """No benchopt MA-SOBA: constant 0.1 (the paper's constant steps), beta 0.9; m_t includes D_x."""
    problem, solver, s = _start(mats, "ma-soba")
    assert (solver.upper_lr, solver.lower_lr, solver.z_lr, solver.beta) == (0.1, 0.1, 0.1, 0.9)
    m = mats
    x, y, z, mom = m["x0"].clone(), m["y0"].clone(), torch.zeros(4, dtype=F64), torch.zeros(3, dtype=F64)
    for t in range(3):
        d_y, d_z, d_x = m["A"] @ y + m["C"].T @ x + m["a"], m["A"] @ z - (y - m["t"]), m["B"] @ x - m["C"] @ z
        mom = 0.9 * mom + 0.1 * d_x
        y, z, x = y - 0.1 * d_y, z - 0.1 * d_z, x - 0.1 * mom
        s = solver.step(problem, s)
        torch.testing.assert_close(s.x["x"], x, rtol=0, atol=1e-14)
        torch.testing.assert_close(s.core.z["y"], z, rtol=0, atol=1e-14)


def test_saba_defaults_follow_benchopt():
    """benchopt SABA: step_size 0.1, outer_ratio 1, zero exponents. With one mini-batch holding
    all samples the SAGA estimates are the full-batch directions, so 3 steps of SABA at its
    defaults equal benchopt's SOBA recursion at constant 0.1, computed here by autograd on the
    full-batch losses."""
    n = 16
    problem = Quadratic(n_samples_inner=n, n_samples_outer=n, dim_inner=4, dim_outer=3, batch_size=None)
    solver = bilevel.make_solver("saba", batch_size=n)
    assert (solver.upper_lr, solver.lower_lr, solver.z_lr) == (0.1, 0.1, 0.1)
    g = torch.Generator().manual_seed(0)
    x0, y0 = problem.init(g)
    s = solver.init(problem, x0, y0, g)
    (kx,), (ky,) = list(x0), list(y0)
    x, y, v = x0[kx].clone(), y0[ky].clone(), torch.zeros_like(y0[ky])
    idx = torch.arange(n)
    for t in range(3):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        grad_y_g = torch.autograd.grad(problem.lower_loss({kx: xr}, {ky: yr}, idx), yr, create_graph=True)[0]
        hvp, cross_v = torch.autograd.grad(grad_y_g, (yr, xr), grad_outputs=v)
        grad_in_outer, grad_out_outer = torch.autograd.grad(problem.upper_loss({kx: xr}, {ky: yr}, idx), (yr, xr))
        lr = 0.1 / (t + 1) ** 0.0
        y, v, x = (y - lr * grad_y_g.detach(), v - lr * (hvp + grad_in_outer), x - lr * (cross_v + grad_out_outer))
        s = solver.step(problem, s)
        torch.testing.assert_close(s.x[kx], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(s.y[ky], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(s.core.z[ky], -v, rtol=0, atol=1e-12)


#: benchopt's solver defaults (benchmark_bilevel solvers/*.py: step_size, outer_ratio 1, the
#: exponents given to init_lr_scheduler). neumann_lr is not pinned here: benchopt's HIA/SHIA step
#: is step_size (0.1), constant; the library's default is "auto". neumann_steps counts products:
#: benchopt's n_hia_steps 10 (TTSA, BSA) draws q from {0..9}, i.e. at most 9 products.
BENCHOPT_DEFAULTS = {
    "soba": dict(upper_lr=PolyDecay(0.1, 0.5), lower_lr=PolyDecay(0.1, 0.5), z_lr=PolyDecay(0.1, 0.5)),
    "saba": dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1),
    "amigo": dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1, upper_lr_decay=0.0, lower_lr_decay=0.0,
                  inner_steps=10, linear_steps=10),
    "ttsa": dict(upper_lr=0.1, lower_lr=0.1, lower_lr_decay=0.4, upper_lr_decay=0.6,
                 neumann_steps=9),
    "bsa": dict(upper_lr=0.1, lower_lr=0.1, lower_lr_decay=0.5, upper_lr_decay=0.5,
                inner_steps=10, neumann_steps=9),
    # F2SA's steps (0.1) and delta_lambda (0.01) are the library's: benchopt's 0.01 / 0.1 diverge
    # on a well-conditioned quadratic (solvers/f2sa.py, tests/test_neumann_convergence.py).
    "f2sa": dict(penalty_lr_decay=5 / 7, lower_lr_decay=4 / 7,
                 upper_lr_decay=4 / 7, lambda_decay=1 / 7, lambda0=1.0, inner_steps=10),
    "sustain": dict(upper_lr=0.1, lower_lr=0.1, eta=0.5, lower_lr_decay=1 / 3,
                    neumann_lr_decay=0.0, eta_decay=2 / 3, upper_lr_decay=1 / 3),
    "mrbo": dict(upper_lr=0.1, lower_lr=0.1, eta=0.5, lower_lr_decay=1 / 3,
                 neumann_lr_decay=0.0, eta_decay=2 / 3, upper_lr_decay=1 / 3),
    "vrbo": dict(upper_lr=0.1, lower_lr=0.1, inner_steps=10, neumann_steps=10),
}


@pytest.mark.parametrize("name", sorted(BENCHOPT_DEFAULTS))
def test_step_size_defaults_are_benchopts(name):
    options = SOLVERS.options(name)
    assert {k: options[k] for k in BENCHOPT_DEFAULTS[name]} == BENCHOPT_DEFAULTS[name]
