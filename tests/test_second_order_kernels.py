"""bilevel.oracles.second_order: the attention flags of sdpa_kernel(SDPBackend.MATH), restored after."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bilevel import oracles
from bilevel.oracles import second_order

NAMES = ("cudnn", "flash", "mem_efficient", "overrideable", "math")


def flags():
    return {name: getattr(torch._C, f"_get_{name}_sdp_enabled")() for name in NAMES}


class Problem:
    pass


def test_same_flags_as_sdpa_kernel_math_and_restored():
    with sdpa_kernel(SDPBackend.MATH):
        expected = flags()
    assert expected["math"] and not any(v for k, v in expected.items() if k != "math")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # a non-default outer state
        before = flags()
        with second_order(Problem()):
            assert flags() == expected
            with second_order(Problem()):
                assert flags() == expected
            assert flags() == expected
        assert flags() == before


def test_restored_after_an_error():
    before = flags()
    with pytest.raises(RuntimeError, match="inside"):
        with second_order(Problem()):
            raise RuntimeError("inside")
    assert flags() == before


def test_recurrent_problem_turns_cudnn_off_inside_only(monkeypatch):
    monkeypatch.setattr(oracles, "_CUDNN_BUILT", True)  # as on a CUDA build (this one may lack cuDNN)
    problem = torch.nn.Module()
    problem.rnn = torch.nn.GRU(2, 3)
    before = torch.backends.cudnn.enabled
    with second_order(problem):
        assert torch.backends.cudnn.enabled is False
        assert flags()["math"] and not flags()["flash"]
    assert torch.backends.cudnn.enabled == before


def test_attention_double_backward_inside():
    """The flash CPU kernel has no double backward; inside the context the math one is used."""
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    with second_order(Problem()):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q).pow(2).sum()
        (g,) = torch.autograd.grad(out, q, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), q)
    assert torch.isfinite(h).all()


def test_without_cudnn_the_flag_is_left_alone(monkeypatch):
    """A torch build without cuDNN has no RNN kernel to avoid: the flag stays as it is (and the
    problem is not searched for an RNN)."""
    monkeypatch.setattr(oracles, "_CUDNN_BUILT", False)
    problem = torch.nn.Module()
    problem.rnn = torch.nn.GRU(2, 3)
    before = torch.backends.cudnn.enabled
    with second_order(problem):
        assert torch.backends.cudnn.enabled == before
