"""`bilevel check`: estimators against exact, exact against finite differences."""

from bilevel import check as check_module
from bilevel import cli, tree
from bilevel.problems.quadratic import Quadratic

SMALL = dict(dim_inner=6, dim_outer=3, n_samples_inner=40, n_samples_outer=40, dtype="float64")


def _rows(rows):
    return {row["method"]: row["relative_error"] for row in rows}


def test_check_reports_small_errors_on_a_correct_problem():
    errors = _rows(check_module.check_hypergradients(Quadratic(**SMALL), lower_lr=0.5, lower_steps=800, steps=200, lr=0.5))
    assert errors["cg"] < 1e-10 and errors["neumann"] < 1e-3  # 200 terms at step 0.5: geometric, not exact
    assert errors["exact"] < 1e-6  # the finite-difference row
    assert errors["lower solve"] < 1e-8  # converged lower level


def test_check_reports_an_unconverged_lower_solve():
    errors = _rows(check_module.check_hypergradients(Quadratic(**SMALL), lower_lr=0.01, lower_steps=3, directions=1))
    assert errors["lower solve"] > 1e-2


def test_check_flags_a_wrong_hypergradient(monkeypatch):
    right = check_module.hypergradient
    monkeypatch.setattr(check_module, "hypergradient",
                        lambda *a, **k: tree.scale(right(*a, **k), 1.1) if k.get("method") == "exact" else right(*a, **k))
    errors = _rows(check_module.check_hypergradients(Quadratic(**SMALL), lower_lr=0.5, lower_steps=800))
    assert errors["exact"] > 0.05 and errors["cg"] > 0.05


def test_check_command(capsys):
    settings = [f"problem_options.{k}={v}" for k, v in SMALL.items()]
    assert cli.main(["check", "problem=quadratic", *settings, "lower_steps=300", "directions=1"]) == 0
    out = capsys.readouterr().out
    assert "cg" in out and "finite differences" in out
    assert cli.main(["check", "problem=quadratic", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert cli.main(["check", "problem=quadratic", "problem_options.dim_inner=abc"]) == 2


def test_check_command_on_a_model_too_large_for_dense_hessians(capsys, monkeypatch):
    from bilevel import hypergrad

    monkeypatch.setattr(hypergrad, "MAX_DENSE_BYTES", 100)  # the dense blocks take 6 * 9 * 8 = 432 bytes
    settings = [f"problem_options.{k}={v}" for k, v in SMALL.items()]
    assert cli.main(["check", "problem=quadratic", *settings, "lower_steps=3", "directions=1"]) == 2
    err = capsys.readouterr().err
    assert "dim(y) = 6" in err and "use method='cg'" in err
