"""The `cpu` backend's Ghost module forward with x1's GEMM by ATen (MKL / oneDNN; GHOSTFAST_CPU_GEMM=library) and by
its own register-blocked GEMM (=own), both against the float64 eager reference with poisoned outputs, over the
forward kernel's covering cases plus the wide, small-image shapes the library path is chosen for
(csrc/cpu/ghost_module_forward.cpp, `library_gemm_wins`)."""
import pytest
import torch

import kernel_backends
from test_kernel_ghost_module import CASES, _check
from kernel_inputs import ghost_case_id

pytestmark = pytest.mark.skipif("cpu" not in kernel_backends.NAMES, reason="the cpu backend (ghostfast._C) is absent")

# (N, C_in, H, W, init, ratio, dw, out_channels, relu, dtype, layout, gate_mode): GhostNet's wide 7x7 and 14x14
# layers, scaled down where the channel count does not change the code path
WIDE = [
    (2, 160, 7, 7, 480, 2, 3, 960, True, torch.float32, "contiguous", None),
    (1, 160, 7, 7, 480, 2, 3, 960, False, torch.float32, "channels_last", "nearest"),
    (2, 112, 7, 7, 336, 2, 3, 672, True, torch.float64, "contiguous", "bilinear"),
    (3, 80, 14, 14, 100, 2, 3, 184, True, torch.float32, "channels_last", None),  # out < 2*init: cheap half cut
    (1, 40, 5, 9, 60, 3, 5, 150, False, torch.float64, "channels_last", "bilinear"),
    (2, 24, 3, 3, 20, 2, 3, 17, True, torch.float32, "contiguous", "nearest"),  # out < init
]


@pytest.fixture(params=["own", "library"])
def gemm(request, monkeypatch):
    monkeypatch.setenv("GHOSTFAST_CPU_GEMM", request.param)
    with kernel_backends.active("cpu"):
        yield request.param


@pytest.mark.parametrize("case", CASES + WIDE, ids=[ghost_case_id(c) for c in CASES + WIDE])
def test_forward_with_either_gemm_matches_reference(case, gemm):
    _check(*case, "cpu")


@pytest.mark.parametrize("act", ["none", "relu", "relu6", "hardswish", "silu"])
def test_library_gemm_every_activation(act, gemm):
    _check(2, 48, 7, 7, 96, 2, 3, 192, act, torch.float32, "contiguous", "nearest", "cpu")
    _check(1, 48, 7, 7, 96, 2, 3, 190, act, torch.float32, "channels_last", None, "cpu")


def test_either_gemm_same_result_to_rounding(monkeypatch):
    """Both GEMMs ran (K = 960 is past the library's K blocking: the sums' orders differ, so the results differ in
    rounding) and agree to float32 rounding."""
    from ghostfast import ops
    from ghostfast.reference import BatchNormParams
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 960, 7, 7, generator=g)
    w1, w2 = torch.randn(480, 960, 1, 1, generator=g) * 0.05, torch.randn(480, 1, 3, 3, generator=g)
    bn = BatchNormParams(torch.rand(480, generator=g) + 0.5, torch.randn(480, generator=g),
                         torch.randn(480, generator=g), torch.rand(480, generator=g) + 0.5, 1e-5)
    outs = {}
    for mode in ("own", "library"):
        monkeypatch.setenv("GHOSTFAST_CPU_GEMM", mode)
        with torch.inference_mode():
            outs[mode] = ops.ghost_module(x, w1, bn, w2, bn, 960, act="relu", backend="cpu")
    rel = ((outs["own"] - outs["library"]).norm() / outs["own"].norm()).item()
    assert 0 < rel < 2e-6


@pytest.mark.parametrize("first", ["inference_mode", "grad"])
def test_library_gemm_across_inference_mode(first, monkeypatch):
    """The library path's reused buffer works whichever mode allocated it: a module called under inference_mode,
    then in a training step (and the other way round), as a benchmark or a validation loop does."""
    from ghostfast import ops
    from ghostfast.reference import BatchNormParams
    monkeypatch.setenv("GHOSTFAST_CPU_GEMM", "library")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 416, 7, 7, generator=g)
    w1 = (torch.randn(40, 416, 1, 1, generator=g) * 0.05).requires_grad_()
    w2 = torch.randn(40, 1, 3, 3, generator=g)
    bn = BatchNormParams(torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g),
                         torch.randn(40, generator=g), torch.rand(40, generator=g) + 0.5, 1e-5)

    def inference():
        with torch.inference_mode():
            return ops.ghost_module(x, w1, bn, w2, bn, 80, backend="cpu")

    def grad():
        out = ops.ghost_module(x, w1, bn, w2, bn, 80, backend="cpu")
        out.square().sum().backward()
        return out.detach()

    calls = [inference, grad] if first == "inference_mode" else [grad, inference]
    outs = [f() for f in calls + calls]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)
    assert w1.grad is not None and w1.grad.abs().sum() > 0


# The stage-1 statistics' gradient (ghostfast/compiled.py, `_stats1_form`): the kernel (=own), or library GEMMs
# (=library: the closed form where it has no more flops than z1 and both products, else those), every float32 /
# float64 case of the statistics tests plus inputs wider than init (the direct form) and GhostNet's 960 -> 80 layer
# scaled down.
from test_kernel_ghost_module_stats import CASES as STATS_CASES, _case_id, _check as _stats_check  # noqa: E402

STATS1 = [c for c in STATS_CASES if c[8] in (torch.float32, torch.float64)] + [
    (2, 40, 5, 6, 8, 2, 3, True, torch.float32, "contiguous"),
    (1, 40, 5, 6, 8, 2, 3, False, torch.float64, "channels_last"),
    (2, 6, 4, 5, 16, 2, 3, True, torch.float32, "channels_last"),
    (1, 400, 3, 3, 40, 2, 3, True, torch.float32, "contiguous"),
]


@pytest.mark.parametrize("needs", [(True,) * 5, (True, False) + (False,) * 3, (False, True) + (False,) * 3])
@pytest.mark.parametrize("case", STATS1, ids=[_case_id(c) for c in STATS1])
def test_stats1_backward_either_gemm_matches_reference(case, needs, gemm):
    _stats_check(*case, 1, "cpu", needs=needs)


def test_stats1_forms_each_run(monkeypatch):
    """The cases above reach both library forms (and the kernel when forced), so neither goes untested."""
    from ghostfast.compiled import _stats1_form

    def forms(mode):
        monkeypatch.setenv("GHOSTFAST_CPU_GEMM", mode)
        return {_stats1_form(torch.empty(1, c[1], 1, 1, dtype=c[8]), torch.empty(c[4], c[1], 1, 1), [True, True])
                for c in STATS1}

    assert forms("library") == {"closed", "direct"}
    assert forms("own") == {None}
    monkeypatch.delenv("GHOSTFAST_CPU_GEMM")
    assert _stats1_form(torch.empty(1, 160, 1, 1), torch.empty(480, 160, 1, 1), [True, True]) == "closed"
    assert _stats1_form(torch.empty(1, 960, 1, 1), torch.empty(80, 960, 1, 1), [True, True]) == "direct"
    assert _stats1_form(torch.empty(1, 16, 1, 1), torch.empty(8, 16, 1, 1), [True, True]) is None
    assert _stats1_form(torch.empty(1, 160, 1, 1, dtype=torch.bfloat16), torch.empty(480, 160, 1, 1), [True] * 2) \
        is None
