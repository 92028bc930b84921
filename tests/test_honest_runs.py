"""Issue 9, items 4, 6, 7 and 8: honest statuses and messages, one `error:` line (exit 2, nothing
written) for bad input, a user's problem class from the command line, `bilevel check` verdicts."""
from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch

import bilevel
from bilevel import FunctionProblem, cli, solve
from bilevel.problem import ProblemError
from bilevel.registry import PROBLEMS

Q = ["problem=quadratic", "preset=tiny", "solver=soba", "steps=4", "eval_every=2", "progress=false"]


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def one_error_line(err, *names):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])


# ---------------------------------------------------------------------------------------------
# item 7: bad input -> one error line, exit 2, nothing written


@pytest.mark.parametrize("override, names", [
    ("solver_options.soba.upper_lr=nan", ["solver_options.soba", "upper_lr", "nan"]),
    ("solver_options.soba.upper_lr=-0.1", ["solver_options.soba", "upper_lr", "-0.1"]),
    ("solvers=soba", ["solvers must be a list", "solvers=[soba]"]),
    ("metrics=[accuracy]", ["metrics", "'accuracy'", "grad_norm_sq"]),
    ("eval_every=0", ["eval_every"]),
    ("checkpoint_every=-1", ["checkpoint_every"]),
])
def test_bad_override_is_one_error_line_and_writes_nothing(tmp_path, override, names):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["run", *Q, override, f"output_dir={out}"])
    assert code == 2 and "Traceback" not in stderr
    one_error_line(stderr, *names)
    assert not out.exists()


@pytest.mark.parametrize("text, names", [
    ("problem: quadratic\nsolvers: [soba\nsteps: 3\n", ["bad.yaml", "malformed YAML", "line 3"]),
    ("problem: quadratic\nsolvers: soba\n", ["solvers must be a list", "solvers: [soba]", "bad.yaml"]),
    ("- a\n- b\n", ["bad.yaml", "mapping"]),
])
def test_bad_yaml_file_is_one_error_line(tmp_path, text, names):
    (tmp_path / "bad.yaml").write_text(text)
    code, _, stderr = run_main(["run", str(tmp_path / "bad.yaml"), f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    one_error_line(stderr, *names)
    assert "AnyNode" not in stderr and "ListConfig" not in stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    for target in ("afile", "afile/sub"):
        code, _, stderr = run_main(["run", *Q, f"output_dir={tmp_path / target}"])
        assert code == 2
        one_error_line(stderr, "output_dir", "afile", "must be a folder")
    import pathlib
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    code, _, stderr = run_main(["run", *Q, f"output_dir={tmp_path / 'ro'}"])
    assert code == 2
    one_error_line(stderr, "output_dir", "Permission denied")
    assert list((tmp_path / "ro").iterdir()) == []


def test_wandb_enabled_without_wandb_leaves_no_folder(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, stderr = run_main(["run", *Q, "wandb.enabled=true", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    one_error_line(stderr, "wandb.enabled", "pip install")
    assert not (tmp_path / "out").exists()


def quadratic_problem(**overrides):
    options = dict(upper_loss=lambda x, y, b: ((y["w"] - 1) ** 2).sum() + (x["l"] ** 2).sum(),
                   lower_loss=lambda x, y, b: ((y["w"] - x["l"]) ** 2).sum(),
                   x0={"l": torch.zeros(3)}, y0={"w": torch.zeros(3)}, name="toy")
    options.update(overrides)
    return FunctionProblem(**options)


def test_detached_upper_loss_names_the_method():
    problem = quadratic_problem(upper_loss=lambda x, y, b: ((y["w"].detach() - 1) ** 2).sum())
    with pytest.raises(ProblemError, match=r"problem 'toy': upper_loss\(x, y, batch\) returned a tensor without "
                                           r"an autograd graph"):
        solve(problem, "soba", steps=2)
    problem = quadratic_problem(lower_loss=lambda x, y, b: (x["l"] ** 2).sum() + 0 * y["w"].detach().sum())
    with pytest.raises(ProblemError, match=r"lower_loss\(x, y, batch\) .*does not depend on y"):
        solve(problem, "soba", steps=2)


def test_vector_metric_names_evaluate():
    problem = quadratic_problem(evaluate=lambda x, y: {"acc": y["w"] * 2})
    with pytest.raises(ProblemError, match=r"problem 'toy': evaluate\(x, y\) returned metric 'acc' as a tensor of "
                                           r"shape \(3,\)"):
        solve(problem, "soba", steps=2)


def test_eval_every_zero_is_refused_by_the_api():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="eval_every must be an integer >= 1"):
            solve(quadratic_problem(), "soba", steps=2, eval_every=bad)


# ---------------------------------------------------------------------------------------------
# item 8: a user's problem class from the command line

USER_MODULE = '''
import torch, bilevel

class Toy(bilevel.BilevelProblem):
    name = "toy"
    def __init__(self, dim: int = 3):
        self.dim = dim
    def init(self, generator):
        return {"l": torch.zeros(self.dim)}, {"w": torch.zeros(self.dim)}
    def upper_loss(self, x, y, batch):
        return ((y["w"] - 1) ** 2).sum() + 0.1 * (x["l"] ** 2).sum()
    def lower_loss(self, x, y, batch):
        return ((y["w"] - x["l"]) ** 2).sum()
    def evaluate(self, x, y):
        return {"f": float(self.upper_loss(x, y, None))}

class NotAProblem:
    pass
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "usermod", raising=False)
    yield tmp_path
    sys.modules.pop("usermod", None)
    for name in [n for n in PROBLEMS.names() if n.startswith("usermod:")]:
        PROBLEMS.unregister(name)  # later tests iterate over every registered problem
    with contextlib.suppress(ValueError):
        sys.path.remove(str(tmp_path))


def test_run_a_user_problem_class(user_module):
    code, stdout, stderr = run_main(["run", "problem=usermod:Toy", "problem_options.dim=2", "solver=soba", "steps=30",
                                     "eval_every=10", "output_dir=out", "name=u", "progress=false", "plot=false"])
    assert code == 0, stderr
    summary = (user_module / "out" / "u" / "summary.md").read_text()
    assert "usermod:Toy" in summary and "| ok" in summary


@pytest.mark.parametrize("name, message", [
    ("nosuchmod:Toy", "cannot import module 'nosuchmod'"),
    ("usermod:Missing", "module 'usermod' has no 'Missing'"),
    ("usermod:NotAProblem", "NotAProblem is not a subclass of bilevel.BilevelProblem"),
])
def test_user_problem_errors(user_module, name, message):
    code, _, stderr = run_main(["run", f"problem={name}", "solver=soba", "steps=2", "output_dir=out"])
    assert code == 2
    one_error_line(stderr, name, message)
    assert not (user_module / "out").exists()


# ---------------------------------------------------------------------------------------------
# item 4: statuses and messages


def test_inf_metric_and_exploding_iterates_are_diverged_not_ok(tmp_path):
    code, stdout, stderr = run_main(["run", "problem=cosh", "preset=tiny", "solvers=[aid-cg,lower-only]", "steps=200",
                                     # aid-cg's own defaults, not cosh's tiny run (upper_lr 0.005 is stable)
                                     "solver_options.aid-cg.upper_lr=0.1", "solver_options.aid-cg.lower_lr=0.1",
                                     "eval_every=100", f"output_dir={tmp_path}", "name=c", "progress=false",
                                     "plot=false"])
    assert code == 1
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "c" / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| solver")}
    assert "diverged: metric grad_norm_sq is inf" in rows["aid-cg"] and rows["lower-only"].split("|")[-2].strip() == "ok"
    assert "results of the others are in" in stderr and "wrote" in stdout and "curves.png" not in stdout


def test_finite_but_exploding_run_is_diverged():
    from bilevel.report import divergence
    problem = quadratic_problem(evaluate=lambda x, y: {"f": 1.0})
    result = solve(problem, "soba", steps=5, upper_lr=1e8, eval_every=5)
    assert float(result.x["l"].abs().max()) > 1e6
    assert divergence(result, ["f"], 1e6).startswith("diverged: |x['l']| reached")
    assert divergence(solve(problem, "soba", steps=5, eval_every=5), ["f"], 1e6) is None


def test_nan_iterate_message_says_which_iterate(tmp_path):
    code, _, stderr = run_main(["run", *Q, "solver_options.soba.upper_lr=1e30", "steps=20", f"output_dir={tmp_path}",
                                "name=n", "plot=true"])
    assert code == 1
    assert "iterate x['x'] became" in stderr or "iterate y['" in stderr
    assert "results of the others" not in stderr and "records and checkpoints are in" in stderr
    assert (tmp_path / "n" / "curves.png").exists()  # records up to the NaN are plotted


# ---------------------------------------------------------------------------------------------
# bilevel check: progress and a verdict

SMALL = ["problem=quadratic", "problem_options.dim_inner=6", "problem_options.dim_outer=3",
         "problem_options.n_samples_inner=40", "problem_options.n_samples_outer=40", "problem_options.dtype=float64"]


def test_check_prints_progress_and_a_verdict(monkeypatch):
    code, out, err = run_main(["check", *SMALL, "lower_lr=0.5", "lower_steps=800", "directions=1"])
    assert code == 0 and "verdict: PASS" in out and "... estimator cg" in err
    code, out, _ = run_main(["check", *SMALL, "lower_lr=0.01", "lower_steps=3", "directions=1"])
    assert code == 0 and "verdict: INCONCLUSIVE" in out and "raise lower_steps" in out
    from bilevel import check as check_module, tree
    right = check_module.hypergradient
    monkeypatch.setattr(check_module, "hypergradient",
                        lambda *a, **k: tree.scale(right(*a, **k), 1.1) if k.get("method") == "exact" else right(*a, **k))
    code, out, _ = run_main(["check", *SMALL, "lower_lr=0.5", "lower_steps=800", "directions=1"])
    assert code == 1 and "verdict: FAIL" in out


def test_check_a_user_problem_class(user_module):
    code, out, err = run_main(["check", "problem=usermod:Toy", "lower_lr=0.4", "lower_steps=200", "directions=1"])
    assert code == 0, err
    assert "hypergradient check on toy" in out and "verdict: PASS" in out


def test_nan_stop_carries_the_last_good_state():
    problem = quadratic_problem()
    with pytest.raises(bilevel.NonFiniteError, match=r"iterate x\['l'\] became (NaN|inf)") as info:
        solve(problem, "soba", steps=50, upper_lr=1e30, eval_every=1)
    good = info.value.state
    assert all(bool(torch.isfinite(v).all()) for v in good.x.values())
    assert good.iteration >= 1 and good.calls["grad_upper"] >= 1
