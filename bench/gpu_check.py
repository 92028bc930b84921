"""Every problem with a few solvers on CUDA and on the host CPU: does it run, and how fast.

    python bench/gpu_check.py [--quick] [--steps N] [--budget SECONDS] [--threads N]

For every registered problem at its ``tiny`` preset (data problems on the learnable fixture
files of the tests, written to a temporary folder, so nothing is downloaded) and its ``paper``
preset (real data when it is in the cache, ``bilevel data fetch``; else the case says "no
data"), the solvers SOBA, BO-REP, stocBiO and F2SA run a few steps on each device:
``make_problem(..., device=D)`` and ``solve(..., device=D)``. Per case it prints ok or the error,
the median time of one step on CUDA and on the CPU (the first step, a warm-up, left out when
there are three or more) and the CPU / CUDA ratio, and, on CUDA, the host synchronisations of
one more step (``torch.cuda.set_sync_debug_mode("warn")``: the block order of a new epoch and
the padded length of a token batch are the deliberate ones, bilevel.device). Then, per problem,
the cost of one Hessian-vector product in gradients (``oracles.hvp`` / ``oracles.grad_lower_y``
at the initial point on one lower batch, medians of a few calls) on each device.

Without CUDA it prints the CPU column only and says so. ``--quick`` (tiny presets, SOBA and
stocBiO, 2 steps, no paper presets) is the smoke run of the tests. ``--budget`` bounds the whole
run: the cases left when it is spent are listed as skipped. Sized for an H200 machine with 16
cores: about 5 minutes with the defaults. Step times of a CUDA run include the wait for the
device (``solve`` synchronises after each step).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

import bilevel
from bilevel import oracles
from bilevel.registry import PROBLEMS, make_problem, make_solver
from bilevel.sampling import run_generator
from bilevel.solve import Callback

SOLVERS = ("soba", "bo-rep", "stocbio", "f2sa")
QUICK_SOLVERS = ("soba", "stocbio")
#: Tiny-preset options pointing the data problems at fixture files ("{rt}", "{mnist}").
FIXTURE_OPTIONS = {
    "hyperclean": {"data_path": "{rt}"}, "hyperrep": {"data_path": "{mnist}"},
    "auc": {"data_path": "{rt}"}, "hpo-rnn": {"data_path": "{rt}"},
}


def fixture_files(folder: Path) -> Dict[str, str]:
    """The tests' learnable fixture files: Rotten Tomatoes sentences and MNIST images."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from data_fixtures import write_mnist_5k, write_rotten_tomatoes
    return {"rt": str(write_rotten_tomatoes(folder / "rt.csv.bz2", n=900, positive_rate=0.7)),
            "mnist": str(write_mnist_5k(folder / "mnist.csv.gz", n_per_class=20))}


def cases(quick: bool, files: Dict[str, str]):
    """(problem, preset, options) of every case."""
    for name in PROBLEMS.names():
        options = {k: v.format(**files) for k, v in FIXTURE_OPTIONS.get(name, {}).items()}
        yield name, "tiny", options
        if not quick and "paper" in getattr(PROBLEMS.get(name).cls, "PRESETS", {}):
            yield name, "paper", {}


class StepClock(Callback):
    """Wall time of each step (solve synchronises the device after a step)."""

    def __init__(self):
        self.marks: List[float] = []

    def on_start(self, info):
        self.marks = [time.perf_counter()]

    def on_step(self, iteration):
        self.marks.append(time.perf_counter())

    def per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return statistics.median(gaps[1:] if len(gaps) >= 3 else gaps)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(problem, solver: str, steps: int, device: torch.device) -> Dict[str, object]:
    """Per-step seconds, and on CUDA the host synchronisations of one extra step."""
    clock = StepClock()
    result = bilevel.solve(problem, solver, steps, device=device, eval_every=steps, callbacks=[clock])
    out = {"seconds": clock.per_step(), "syncs": None}
    if device.type == "cuda":
        step = make_solver(solver)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step.step(problem, result.state)
                sync(device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def hvp_ratio(problem, device: torch.device, repeats: int = 5) -> float:
    """median time of oracles.hvp / median time of oracles.grad_lower_y at the initial point."""
    generator = run_generator(0, device)
    x, y = problem.init(generator)
    batch = problem.sample("lower", generator)

    def timed(fn):
        fn()  # warm-up
        sync(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    grad = timed(lambda: oracles.grad_lower_y(problem, x, y, batch))
    return timed(lambda: oracles.hvp(problem, x, y, y, batch)) / grad


def short_error(error: BaseException) -> str:
    """"no data: ..." for a data file that is not there (not a failure of the code), else "error: ..."."""
    first = str(error).splitlines()[0][:110] if str(error) else ""
    if isinstance(error, FileNotFoundError):
        return f"no data: {first}"
    return f"error: {type(error).__name__}: {first}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets, SOBA and stocBiO, 2 steps")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 4; 2 with --quick)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    warnings.filterwarnings("ignore", category=UserWarning, message=".*(TF32|non-contiguous|contiguous chunk).*")
    steps = args.steps or (2 if args.quick else 4)
    solvers = QUICK_SOLVERS if args.quick else SOLVERS
    cuda = torch.cuda.is_available()
    devices = [torch.device("cuda")] if cuda else []
    devices.append(torch.device("cpu"))
    gpu = torch.cuda.get_device_name(0) if cuda else None
    print(f"gpu_check: torch {torch.__version__}, {gpu or 'no GPU (CUDA not available): CPU column only'}, "
          f"CPU {torch.get_num_threads()} threads, {steps} steps per run")
    header = f"{'problem':<18s} {'preset':<6s} {'solver':<8s}"
    header += (f" {'cuda ms/step':>12s} {'cpu ms/step':>12s} {'cpu/cuda':>8s} {'syncs/step':>10s}" if cuda
               else f" {'cpu ms/step':>12s}")
    rows, ratios, skipped = [header], {}, []
    with tempfile.TemporaryDirectory() as folder:
        files = fixture_files(Path(folder))
        for name, preset, options in cases(args.quick, files):
            built: Dict[str, object] = {}
            for device in devices:
                if time.perf_counter() - started > args.budget:
                    break
                try:
                    built[device.type] = make_problem(name, preset=preset, device=device, **options)
                except Exception as error:  # a missing data file: reported, the others go on
                    built[device.type] = error
            if not built:
                skipped.append(f"{name}/{preset}")
                continue
            for solver in solvers:
                if time.perf_counter() - started > args.budget:
                    skipped.append(f"{name}/{preset}/{solver}")
                    continue
                cells, status = [], "ok"
                for device in devices:
                    problem = built.get(device.type)
                    if problem is None or isinstance(problem, Exception):
                        cells.append(None)
                        status = short_error(problem) if problem is not None else "skipped (budget)"
                        continue
                    try:
                        cells.append(run_case(problem, solver, steps, device))
                    except Exception as error:
                        cells.append(None)
                        status = f"{device.type} {short_error(error)}"
                row = f"{name:<18s} {preset:<6s} {solver:<8s}"
                fmt = lambda c: f"{1e3 * c['seconds']:12.1f}" if c else f"{'-':>12s}"  # noqa: E731
                if cuda:
                    gpu_cell, cpu_cell = cells
                    ratio = (cpu_cell["seconds"] / gpu_cell["seconds"]) if gpu_cell and cpu_cell else None
                    syncs = gpu_cell["syncs"] if gpu_cell else None
                    row += (f" {fmt(gpu_cell)} {fmt(cpu_cell)} {f'{ratio:.1f}x' if ratio else '-':>8s}"
                            f" {syncs if syncs is not None else '-':>10}")
                else:
                    row += f" {fmt(cells[0])}"
                if len(rows) == 1:
                    print(header, flush=True)
                rows.append(f"{row}  {status}")
                print(rows[-1], flush=True)
            for device in devices:
                problem = built.get(device.type)
                if problem is None or isinstance(problem, Exception) or time.perf_counter() - started > args.budget:
                    continue
                try:
                    ratios[(name, preset, device.type)] = f"{hvp_ratio(problem, device):.2f}"
                except Exception as error:
                    ratios[(name, preset, device.type)] = short_error(error)[:40]
    print("\nHVP cost in gradients (oracles.hvp / oracles.grad_lower_y, reverse mode, one lower batch):")
    print(f"{'problem':<18s} {'preset':<6s} " + " ".join(f"{d.type:>12s}" for d in devices))
    for name, preset in sorted({(n, p) for n, p, _ in ratios}):
        print(f"{name:<18s} {preset:<6s} " + " ".join(f"{ratios.get((name, preset, d.type), '-'):>12s}"
                                                     for d in devices))
    if skipped:
        print(f"\nskipped (budget of {args.budget:.0f} s spent): {', '.join(skipped)}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    failed = [r for r in rows[1:] if "error:" in r]
    print(f"{len(rows) - 1 - len(failed)} of {len(rows) - 1} cases ok" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
