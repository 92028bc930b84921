"""Devices and dtypes: device names, moving problems, draws on the generator's device, no host
reads inside the losses, twice-differentiable kernels for second-order oracles, bf16 autocast.

No GPU is needed: a CUDA mismatch between a generator and a draw is caught statically (every
random draw from a generator passes that generator's device), host reads inside the losses by
running them on the ``meta`` device (shapes only: reading a value back raises), and the
second-order context by the backend flags it sets (the same flags CUDA reads). Tests that take
the ``device`` fixture also run on CUDA when one is present (tests/conftest.py).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import pathlib
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import oracles
from bilevel.config import ConfigError, load
from bilevel.device import _move, problem_device, reachable, resolve_device, to_device
from bilevel.hypergrad import exact, itd
from bilevel.problem import FunctionProblem, ProblemError, validate
from bilevel.registry import make_problem
from bilevel.sampling import run_generator

ROOT = pathlib.Path(__file__).resolve().parents[1]
META = torch.device("meta")


# -- device names ------------------------------------------------------------------------------

def test_device_names_resolve_or_fail_naming_the_value():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")  # the tests' default (conftest)
    assert resolve_device("auto") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "CPU", 3):
        with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_problem("cosh", device="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_config_device_and_dtype_keys():
    cfg = load(None, ["problem=hyperclean-digits", "device=cpu", "dtype=float64"])
    assert cfg.device == "cpu" and cfg.dtype == "float64"
    with pytest.raises(ConfigError, match="device must be"):
        load(None, ["device=gpu0"])
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load(None, ["dtype=float16"])


# -- moving a problem --------------------------------------------------------------------------

class Pair(NamedTuple):
    a: torch.Tensor
    b: int


@dataclasses.dataclass(frozen=True)
class Frozen:
    t: torch.Tensor
    name: str = "frozen"


class WithAside(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.aside = torch.ones(4)  # a plain attribute: nn.Module.to does not move it


class Holder:
    def __init__(self):
        shared = {"s": torch.zeros(2)}
        self.t = torch.arange(3.0)
        self.nested = {"list": [torch.ones(1), "text", 3], "tuple": (torch.ones(2), None), "pair": Pair(torch.ones(1), 2)}
        self.frozen = Frozen(torch.ones(2))
        self.model = nn.Sequential(WithAside())
        self.first, self.second = shared, shared
        self.array = np.ones(3)
        self.cycle = self


def _tensors(obj):
    out = []
    for o in reachable(obj):
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, nn.Module):
            out += list(o.parameters()) + [m.aside for m in o.modules() if isinstance(m, WithAside)]
    return out


def test_moving_reaches_every_tensor_and_module_and_leaves_the_original_alone():
    holder = Holder()
    moved = _move(holder, META, {})
    assert len(_tensors(moved)) == len(_tensors(holder)) == 9
    assert all(t.device == META for t in _tensors(moved))
    assert all(t.device.type == "cpu" for t in _tensors(holder))  # nothing modified in place
    assert moved.first is moved.second  # a shared object is moved once
    assert moved.frozen.name == "frozen" and moved.nested["pair"].b == 2 and moved.nested["list"][1:] == ["text", 3]
    assert moved.array is holder.array and moved.cycle is moved
    assert to_device(holder, "cpu") is holder  # already there: the same object


def test_problem_to_and_make_problem_device(device):
    problem = make_problem("cosh", preset="tiny", noise=0.1, lower_condition=2.0, device=device)
    assert problem_device(problem).type == device
    assert problem.to(device) is problem
    generator = run_generator(0, problem_device(problem))
    x, y = problem.init(generator)
    assert {t.device.type for t in (*x.values(), *y.values())} == {device}
    assert problem.sample("lower", generator).device.type == device


def test_validate_names_a_variable_on_the_wrong_device():
    problem = FunctionProblem(lambda x, y, b: (y["w"] ** 2).sum() + x["l"].sum(),
                              lambda x, y, b: ((y["w"] - x["l"]) ** 2).sum(),
                              x0={"l": torch.zeros(2)}, y0={"w": torch.zeros(2)})
    x, y = problem.init(None)
    with pytest.raises(ProblemError, match=r"init\(\) returned y\['w'\] on meta"):
        validate(problem, x, {"w": torch.zeros(2, device=META)}, torch.Generator())


# -- draws happen on the generator's device ------------------------------------------------------

RANDOM_FACTORIES = {"rand", "randn", "randint", "randperm"}


def test_every_random_draw_passes_its_generators_device():
    """A CUDA generator refuses a CPU draw ("Expected a 'cuda' device type for generator but
    found 'cpu'"): every torch.rand/randn/randint/randperm given ``generator=G`` in the library
    must pass ``device=G.device`` (or a local ``device`` name derived from it)."""
    offenders = []
    for folder in ("bilevel", "problems", "solvers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in RANDOM_FACTORIES):
                    continue
                keywords = {k.arg: k.value for k in node.keywords}
                if "generator" not in keywords:
                    continue
                device = keywords.get("device")
                if device is None or not (isinstance(device, ast.Name)
                                          or ast.unparse(device) == f"{ast.unparse(keywords['generator'])}.device"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "draws not on their generator's device:\n" + "\n".join(offenders)


def test_batches_are_drawn_and_made_on_the_generators_device(device):
    from bilevel.sampling import draw_indices
    generator = run_generator(0, device)
    for sampling in ("blocks", "replacement"):
        for _ in range(5):  # across an epoch boundary (4 blocks of 10 samples by 3)
            indices = draw_indices(10, 3, "lower", generator, sampling)
            assert indices.device.type == device and indices.dtype == torch.long


# -- nothing read back to the host inside a loss -------------------------------------------------

#: tiny problems and the options that point them at fixture data; "{rt}" / "{mnist}" are files.
TINY = {
    "quadratic": {}, "cosh": {}, "hpo": {}, "hyperclean-digits": {},
    "hyperclean": {"data_path": "{rt}"}, "hyperrep": {"data_path": "{mnist}"},
    "hyperrep-transformer": {"data_path": "{rt}", "dataset": "rotten-tomatoes", "encoder": "transformer", "n_way": 2,
                             "enc_dim": 16, "hidden": 16, "layers": 1, "heads": 2, "n_train_tasks": 4,
                             "n_test_tasks": 2, "k_support": 2, "k_query": 2, "tasks_per_batch": 2},
    "auc": {"data_path": "{rt}"}, "hpo-rnn": {"data_path": "{rt}"},
}


def tiny_problem(case, run_files, **extra):
    name = case.split("-transformer")[0]
    options = {k: v.format(**run_files) if isinstance(v, str) else v for k, v in TINY[case].items()}
    return make_problem(name, preset="tiny", **{**options, **extra})


@pytest.mark.parametrize("case", sorted(TINY))
def test_losses_and_second_order_oracles_read_nothing_back_to_the_host(case, run_files, monkeypatch):
    """On the meta device a tensor has a shape and no value: ``float(t)``, ``bool(t)``,
    ``t.item()``, ``t.tolist()`` or ``t.numpy()`` raise. So a loss or an oracle that runs on meta
    tensors makes no host read (no sync on CUDA). The one deliberate host read, the padded length
    of a token batch (``trim_padding``: a shape, chosen from the data), is replaced by the identity
    here (padding never reaches a feature, so the losses are unchanged)."""
    import importlib
    for module_name in ("batches", "text_classifier", "hyperrep", "hyperclean"):
        module = importlib.import_module(f"bilevel.problems.{module_name}")
        if hasattr(module, "trim_padding"):
            monkeypatch.setattr(module, "trim_padding", lambda tokens: tokens)
    problem = tiny_problem(case, run_files)
    generator = run_generator(0)
    x, y = problem.init(generator)
    batches = {level: problem.sample(level, generator) for level in ("lower", "upper")}
    on_meta = _move((problem, x, y, batches), META, {})
    problem, x, y, batches = on_meta
    for level, loss in (("lower", problem.lower_loss), ("upper", problem.upper_loss)):
        assert loss(x, y, batches[level]).device == META
    oracles.grad_upper(problem, x, y, batches["upper"])
    hv, cross, gy = oracles.hvp_and_cross(problem, x, y, y, batches["lower"])
    assert all(t.device == META for t in (*hv.values(), *cross.values(), *gy.values()))


@pytest.mark.parametrize("case", sorted(TINY))
def test_hypergradient_on_the_device_matches_the_cpu(case, run_files, device):
    """The same point and batches moved to ``device``: the same hypergradient (on a CUDA machine
    this compares CUDA with the CPU, kernels differing in rounding only; 1e-3 relative)."""
    problem = tiny_problem(case, run_files, device="cpu")
    generator = run_generator(0)
    x, y = problem.init(generator)
    batches = [problem.sample(level, generator) for level in ("upper", "lower")]
    reference = bilevel.hypergradient(problem, x, y, *batches, method="neumann", steps=3, lr=0.05)
    on_device = to_device((problem, x, y, batches), device)
    estimate = bilevel.hypergradient(*on_device[:3], *on_device[3], method="neumann", steps=3, lr=0.05)
    assert all(t.device.type == device for t in estimate.values())
    difference = torch.cat([(estimate[k].cpu() - reference[k]).reshape(-1) for k in reference]).norm()
    assert difference <= 1e-3 * torch.cat([t.reshape(-1) for t in reference.values()]).norm() + 1e-8, difference


# -- kernels that can be differentiated twice ----------------------------------------------------

def _attention_problem(fused: bool):
    """g(x, y) = ||attention(q = s W, k = s W, v = s)||^2 / 2 + ||W||^2 / 2 with x = {"s"}, y = {"W"}:
    the attention by F.scaled_dot_product_attention (fused kernel) or written out."""
    def attention(q, k, v):
        if fused:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v

    def lower(x, y, batch):
        h = x["s"] @ y["W"]
        return 0.5 * attention(h, h, x["s"]).square().sum() + 0.5 * y["W"].square().sum()

    def upper(x, y, batch):
        return (x["s"] @ y["W"]).sum()

    g = torch.Generator().manual_seed(0)
    return FunctionProblem(upper, lower, x0={"s": torch.randn(1, 2, 5, 4, generator=g)},
                           y0={"W": 0.3 * torch.randn(4, 4, generator=g)})


def test_second_order_oracles_differentiate_fused_attention_twice():
    """The CPU (and CUDA) flash attention kernels have no double backward and no forward-mode
    rule; every second-order oracle takes the math kernel and agrees with the written-out
    attention (without the context: "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    fused, plain = _attention_problem(True), _attention_problem(False)
    x, y = fused.init(None)
    v = {"W": torch.randn(4, 4, generator=torch.Generator().manual_seed(1))}
    with pytest.raises(RuntimeError, match="not implemented"):  # what the context avoids
        xl, yl = oracles._leaves(x), oracles._leaves(y)
        gy = torch.autograd.grad(fused.lower_loss(xl, yl, None), list(yl.values()), create_graph=True)
        torch.autograd.grad(gy, list(yl.values()), [v["W"]])
    expected_hv = oracles.hvp(plain, x, y, v, None)
    expected_cross = oracles.cross(plain, x, y, v, None)
    for mode in ("reverse", "forward"):
        torch.testing.assert_close(oracles.hvp(fused, x, y, v, None, mode=mode), expected_hv, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(oracles.cross(fused, x, y, v, None, mode=mode), expected_cross, rtol=1e-4, atol=1e-5)
    inside_vmap = torch.func.vmap(lambda s: oracles.hvp(fused, {"s": s}, y, v, None)["W"])(x["s"].unsqueeze(0))[0]
    torch.testing.assert_close(inside_vmap, expected_hv["W"], rtol=1e-4, atol=1e-5)  # the torch.func path
    products = oracles.LowerProducts(fused, x, y, None)
    torch.testing.assert_close(products.hvp(v), expected_hv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exact(fused, x, y, None, None)[0], exact(plain, x, y, None, None)[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(itd(fused, x, y, None, [None] * 3, lr=0.1)[0],
                               itd(plain, x, y, None, [None] * 3, lr=0.1)[0], rtol=1e-4, atol=1e-5)


class _RecordingRNN(FunctionProblem):
    """A problem holding an RNN; its lower loss records whether cuDNN is enabled when it runs."""

    def __init__(self, recurrent=None):
        self.rnn = nn.RNN(2, 3, batch_first=True)
        self.seen = []
        if recurrent is not None:
            self.recurrent = recurrent

        def lower(x, y, batch):
            self.seen.append(torch.backends.cudnn.enabled)
            return ((y["w"] - x["l"]) ** 2).sum()

        super().__init__(lambda x, y, b: (y["w"] ** 2).sum() + x["l"].sum(), lower,
                         x0={"l": torch.zeros(2)}, y0={"w": torch.ones(2)})


def test_cudnn_is_off_only_inside_second_order_oracles_of_recurrent_problems(monkeypatch):
    """cuDNN RNNs have no double backward: HVPs and cross products of a problem that holds an
    RNN run with cuDNN disabled; its gradients keep cuDNN; so do problems without an RNN (a
    problem can declare ``recurrent`` itself). Other cuDNN settings are left as they are."""
    monkeypatch.setattr(oracles, "_CUDNN_BUILT", True)  # as on a CUDA build (this one may lack cuDNN)
    problem, v = _RecordingRNN(), {"w": torch.ones(2)}
    x, y = problem.init(None)
    before = (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.deterministic = True
    try:
        oracles.grad_lower(problem, x, y, None)
        oracles.hvp(problem, x, y, v, None)
        oracles.cross(problem, x, y, v, None, mode="forward")
        oracles.hvp_and_cross(problem, x, y, v, None)
        assert problem.seen == [True, False, False, False]
        assert torch.backends.cudnn.enabled and torch.backends.cudnn.deterministic
        for declared, expected in ((False, True), (True, False)):
            other = _RecordingRNN(recurrent=declared)
            oracles.hvp(other, x, y, v, None)
            assert other.seen == [expected]
    finally:
        torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic = before


# -- bf16 autocast ----------------------------------------------------------------------------------

#: Relative error of the bf16-autocast hypergradient against float32 at the same point and
#: batches (bf16 keeps 8 bits of mantissa: about 0.4% per rounding; measured on the cases below
#: 0.005 (hyperrep transformer) and 0.003 (hpo-rnn, an Elman RNN)).
BF16_TOLERANCE = 0.05


@pytest.mark.parametrize("case", ["hyperrep-transformer", "hpo-rnn"])
def test_bfloat16_autocast_hypergradient_agrees_with_float32(case, run_files):
    results = {}
    for dtype in ("float32", "bfloat16"):
        problem = tiny_problem(case, run_files, dtype=dtype)
        generator = run_generator(0)
        x, y = problem.init(generator)
        assert all(t.dtype == torch.float32 for t in (*x.values(), *y.values()))
        upper, lower = problem.sample("upper", generator), problem.sample("lower", generator)
        results[dtype] = bilevel.hypergradient(problem, x, y, upper, lower, method="neumann", steps=5, lr=0.1)
    flat = {k: torch.cat([t.reshape(-1) for t in v.values()]) for k, v in results.items()}
    error = float((flat["bfloat16"] - flat["float32"]).norm() / flat["float32"].norm())
    assert 0 < error < BF16_TOLERANCE, error  # > 0: bf16 did run


def test_bfloat16_is_refused_by_problems_without_networks():
    with pytest.raises(ValueError, match=r"option dtype must be one of \['float32', 'float64'\]"):
        make_problem("cosh", dtype="bfloat16")


# -- a run on the device ----------------------------------------------------------------------------

def test_solve_runs_on_the_device_and_keeps_its_generator_there(device):
    problem = make_problem("quadratic", dim_inner=5, dim_outer=3, n_samples_inner=20, n_samples_outer=20,
                           batch_size=4, device="cpu")
    result = bilevel.solve(problem, "soba", steps=3, device=device)  # moved to the device
    assert result.state.generator.device.type == device
    assert all(t.device.type == device for t in (*result.x.values(), *result.y.values()))
    assert math.isfinite(result.final["grad_norm_sq"])


# -- the GPU check script ---------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_quick_runs_every_problem_on_the_cpu():
    """bench/gpu_check.py --quick: every problem's tiny preset runs (about 30 s here, so slow)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in bilevel.registry.PROBLEMS.names():
        assert sum(line.startswith(f"{name} ") and line.endswith("ok") for line in lines) == 2, name
    assert "HVP cost in gradients" in done.stdout
    if not torch.cuda.is_available():
        assert "no GPU" in lines[0]
