"""Every Ghost module activation (ghostfast.reference.ACTIVATIONS: none, ReLU, ReLU6, Hardswish, SiLU) in both halves,
on every fused backend: forward (poisoned outputs), backward against float64 autograd, the training-mode statistics
and their backward, and float64 gradcheck of the whole op with its BatchNorm chain rule.

Inputs are scaled so the pre-activations cross every breakpoint (ReLU6's 0 and 6, Hardswish's -3 and 3)."""
import pytest
import torch

from ghostfast import ops, reference
from ghostfast.reference import BatchNormParams

import test_kernel_ghost_module as fwd
import test_kernel_ghost_module_backward as bwd
import test_kernel_ghost_module_stats as stats

ACTS = reference.ACTIVATIONS


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", [
    # (N, C_in, H, W, init, ratio, dw, out_channels, dtype, layout, gate_mode)
    (2, 11, 15, 13, 8, 2, 3, 15, torch.float32, "contiguous", "nearest"),
    (1, 9, 7, 7, 8, 3, 5, 20, torch.float64, "channels_last", None),
    (1, 16, 6, 9, 16, 2, 7, 32, torch.float16, "slice", "bilinear"),
], ids=["f32-gate", "f64-cl", "f16-slice-bilinear"])
def test_activation_forward(case, act, device):
    n, c_in, h, w, init, ratio, dw, oc, dtype, layout, gate_mode = case
    fwd._check(n, c_in, h, w, init, ratio, dw, oc, act, dtype, layout, gate_mode, device,
               p=_wide_params(c_in, init, ratio, dw, dtype, device))


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", [
    # (N, C_in, H, W, init, ratio, dw, out_channels, dtype, layout, gate_shape, gate_mode)
    (2, 11, 15, 13, 8, 2, 3, 15, torch.float32, "contiguous", (7, 6), "nearest"),
    (1, 9, 7, 7, 8, 3, 5, 20, torch.float64, "channels_last", None, None),
], ids=["f32-gate", "f64-cl"])
def test_activation_backward(case, act, device, monkeypatch):
    monkeypatch.setattr(bwd, "_folded_params", _wide_folded)
    bwd._check(*case[:8], act, *case[8:], device)


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("stage", [1, 2])
def test_activation_stats(stage, act, device):
    # offset 1.5: the primary pre-activations spread over the activations' breakpoints
    stats._check(2, 11, 9, 7, 8, 2, 3, act, torch.float32, "contiguous", stage, device, offset=1.5)
    stats._check(1, 6, 5, 6, 4, 3, 5, act, torch.float64, "channels_last", stage, device, offset=-1.0)


def _wide_params(c_in, init, ratio, dw, dtype, device):
    """make_ghost_params with the weights scaled up: pre-activations of several units, past ReLU6's 6."""
    from kernel_inputs import make_ghost_params

    p = make_ghost_params(c_in, init, ratio, dw, dtype, device)
    p["primary_weight"] = p["primary_weight"] * 3
    p["cheap_weight"] = p["cheap_weight"] * 3
    return p


def _wide_folded(c_in, init, ratio, dw, dtype, device):
    from kernel_inputs import acc_dtype, fold_ghost_params

    return fold_ghost_params(_wide_params(c_in, init, ratio, dw, dtype, device), acc_dtype(dtype))


def _fused_backends():
    import kernel_backends

    return kernel_backends.NAMES


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", _fused_backends())
def test_activation_gradcheck(backend, act, device):
    """float64 gradcheck of the registered op (BatchNorm chain rule included) and of the training statistics."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(device).requires_grad_()

    x = rnd(2, 3, 5, 4, lo=-3, hi=3)
    w1, w2 = rnd(4, 3, 1, 1, lo=-2, hi=2), rnd(4, 1, 3, 3, lo=-2, hi=2)
    bn1 = (rnd(4, lo=0.5, hi=2), rnd(4), rnd(4), rnd(4, lo=0.5, hi=2))
    bn2 = (rnd(4, lo=0.5, hi=2), rnd(4), rnd(4), rnd(4, lo=0.5, hi=2))

    def fn(x, w1, w2, *bn):
        return ops.ghost_module(x, w1, BatchNormParams(*bn[:4], 1e-5), w2, BatchNormParams(*bn[4:], 1e-5),
                                out_channels=7, act=act, backend=backend, strict=True)

    # the Triton interpreter costs ~0.1 s a launch: its gradcheck checks random directions (fast_mode) instead of
    # every column of the Jacobian
    fast = backend == "triton"
    assert torch.autograd.gradcheck(fn, (x, w1, w2, *bn1, *bn2), eps=1e-6, atol=1e-5, fast_mode=fast)

    from ghostfast.backends import stats_backend

    name, _ = stats_backend(backend, torch.device(device))
    if name is None:
        return

    def stat(x, w1, w2, a1, b1, m1, v1):
        return ops.ghost_module_stats(x, w1, BatchNormParams(a1, b1, m1, v1, 1e-5), w2, act, 2, backend=name)

    assert torch.autograd.gradcheck(stat, (x, w1, w2, *bn1), eps=1e-6, atol=1e-5, fast_mode=fast)


def test_activation_names_and_errors():
    assert reference.activation_name(True) == "relu" and reference.activation_name(False) == "none"
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'gelu'"):
        reference.activation_name("gelu")
    x = torch.randn(1, 3, 4, 4)
    w1, w2 = torch.randn(2, 3, 1, 1), torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"ghostfast.ops.ghost_module: activation must be one of"):
        ops.ghost_module(x, w1, None, w2, None, act="tanh")
    with pytest.raises(ValueError, match=r"expected act to be one of .*got 'tanh'"):
        torch.ops.ghostfast.ghost_module.default(x, w1, *BatchNormParams(), w2, *BatchNormParams(), 4, "tanh", None,
                                                 "nearest", "reference")
