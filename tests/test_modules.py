"""ghostfast.nn modules against the original modules (timm V1/V2/V3, the paper's, Huawei's), state_dict
compatibility, live BatchNorm tensors (no cache), fallback and strict mode, bad input, launch counts."""
import copy
import warnings

import pytest
import timm.models.ghostnet as timm_ghost
import torch
from torch import nn

import ghostfast
from ghostfast.backends import GhostfastFallbackWarning, GhostfastUnsupported
from ghostfast.models import randomize_batchnorm_
from ghostfast.nn import GhostModule, GhostModuleV2
import kernel_backends
from numerics import REL_TOL, assert_close_rel
from original_modules import HuaweiGhostModuleV2, PaperGhostModule

FUSED_BACKEND = "triton"
FUSED = kernel_backends.NAMES  # triton, plus the compiled backend of the test device when ghostfast._C has it


def ready(m, device, dtype=torch.float32, seed=0):
    randomize_batchnorm_(m, torch.Generator().manual_seed(seed))
    m = m.to(device=device, dtype=dtype).eval()
    if hasattr(m, "reparameterize"):  # GhostNetV3: converted after reparameterization
        m.reparameterize()
    return m


# (name, factory, input shape): the original module families, awkward shapes included.
ORIGINALS = [
    ("timm_v1", lambda: timm_ghost.GhostModule(16, 16), (2, 16, 7, 7)),
    ("timm_v1_ratio3_dw5_noact_odd", lambda: timm_ghost.GhostModule(12, 13, ratio=3, dw_size=5,
                                                                    act_layer=nn.Identity), (1, 12, 15, 13)),
    ("timm_v2", lambda: timm_ghost.GhostModuleV2(16, 24), (2, 16, 15, 13)),
    ("timm_v2_ratio3_dw7_odd", lambda: timm_ghost.GhostModuleV2(10, 9, ratio=3, dw_size=7), (1, 10, 8, 9)),
    ("timm_v3_original", lambda: timm_ghost.GhostModuleV3(16, 16, mode="original"), (1, 16, 7, 7)),
    ("timm_v3_shortcut", lambda: timm_ghost.GhostModuleV3(12, 20, mode="shortcut"), (2, 12, 9, 6)),
    ("paper_v1_norelu", lambda: PaperGhostModule(8, 11, relu=False), (1, 8, 5, 4)),
    ("huawei_v2_attn", lambda: HuaweiGhostModuleV2(12, 16, mode="attn"), (1, 12, 7, 7)),
    ("huawei_v2_original", lambda: HuaweiGhostModuleV2(12, 16, dw_size=1, mode="original"), (2, 12, 3, 5)),
]


def make_input(shape, device, dtype, layout):
    n, c, h, w = shape
    if layout == "noncontiguous":
        return torch.randn(n, c + 3, h, w, device=device, dtype=dtype)[:, 2:2 + c]
    x = torch.randn(shape, device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def convert_one(orig, backend=FUSED_BACKEND, **kw):
    fast = ghostfast.convert(nn.Sequential(orig), backend=backend, strict=True, **kw)
    assert len(fast.ghostfast_report.converted) == 1, str(fast.ghostfast_report)
    return fast[0]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,factory,shape", ORIGINALS, ids=[o[0] for o in ORIGINALS])
def test_module_matches_original(name, factory, shape, dtype, layout, backend, device):
    orig = ready(factory(), device, dtype)
    fast = convert_one(orig, backend)
    x = make_input(shape, device, dtype, layout)
    with torch.no_grad():
        ref = orig(x)
        out = fast(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, ref, dtype, factor=1.0 if dtype == torch.float32 else 1e3)


@pytest.mark.parametrize("name,factory,shape", ORIGINALS[:4], ids=[o[0] for o in ORIGINALS[:4]])
def test_module_float16_against_float64_original(name, factory, shape, device):
    half = ready(factory(), device, torch.float16)
    orig = copy.deepcopy(half).double()  # the same (fp16-rounded) weights, evaluated in float64
    fast = convert_one(half)
    x = torch.randn(shape, device=device, dtype=torch.float16)
    with torch.no_grad():
        ref = orig(x.double())
        out = fast(x)
    assert out.dtype == torch.float16
    assert_close_rel(out, ref, torch.float16)


def test_module_v2_bilinear_gate_matches_reference(device):
    orig = ready(timm_ghost.GhostModuleV2(8, 12), device)
    fast = GhostModuleV2.from_module(orig, gate_mode="bilinear", backend=FUSED_BACKEND, strict=True)
    x = torch.randn(2, 8, 9, 7, device=device)
    with torch.no_grad():
        res = torch.sigmoid(orig.short_conv(torch.nn.functional.avg_pool2d(x, 2, 2)))
        gate = torch.nn.functional.interpolate(res, size=(9, 7), mode="bilinear", align_corners=False)
        x1 = orig.primary_conv(x)
        ref = torch.cat([x1, orig.cheap_operation(x1)], 1)[:, :12] * gate
        out = fast(x)
    assert_close_rel(out, ref, torch.float32)


def test_module_state_dict_round_trip(device):
    timm_mod = ready(timm_ghost.GhostModuleV2(8, 12), device)
    ours = GhostModuleV2(8, 12).to(device).eval()
    assert list(ours.state_dict().keys()) == list(timm_mod.state_dict().keys())
    ours.load_state_dict(timm_mod.state_dict(), strict=True)
    back = timm_ghost.GhostModuleV2(8, 12).to(device).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 8, 6, 6, device=device)
    with torch.no_grad():
        assert_close_rel(ours(x), timm_mod(x), torch.float32)
        assert torch.equal(back(x), timm_mod(x))
    v1 = timm_ghost.GhostModule(8, 12)
    assert list(GhostModule(8, 12).state_dict().keys()) == list(v1.state_dict().keys())


def test_module_from_module_shares_parameters(device):
    orig = ready(timm_ghost.GhostModule(8, 12), device)
    fast = GhostModule.from_module(orig, backend=FUSED_BACKEND)
    assert fast.primary_conv[0].weight is orig.primary_conv[0].weight
    assert fast.state_dict().keys() == orig.state_dict().keys()


def test_module_follows_parameter_changes(device):
    """No folded-weight cache: every call reads the live BatchNorm tensors."""
    orig = ready(timm_ghost.GhostModuleV2(8, 12), device)
    fast = GhostModuleV2.from_module(orig, backend=FUSED_BACKEND, strict=True)
    x = torch.randn(1, 8, 6, 6, device=device)
    with torch.no_grad():
        fast(x)
        assert not hasattr(fast, "_fold_value")
        # an optimizer-style in-place update
        orig.cheap_operation[1].weight.mul_(1.5)
        orig.short_conv[3].running_mean.add_(0.3)
        assert_close_rel(fast(x), orig(x), torch.float32)
        # load_state_dict from another module
        other = ready(timm_ghost.GhostModuleV2(8, 12), device, seed=7)
        fast.load_state_dict(other.state_dict())
        assert_close_rel(fast(x), other(x), torch.float32)
        # .to() a new dtype
        fast.double()
        assert_close_rel(fast(x.double()), other.double()(x.double()), torch.float64, factor=1e3)


def test_module_training_mode_matches_eager(device):
    """Training mode runs fused with batch statistics (no fallback): outputs and running stats match eager (the
    full check, gradients and every configuration, is tests/test_train_batchnorm.py)."""
    eager = ready(timm_ghost.GhostModuleV2(8, 12), device).train()
    fast = GhostModuleV2.from_module(copy.deepcopy(eager), backend=FUSED_BACKEND).train()
    x = torch.randn(4, 8, 6, 6, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GhostfastFallbackWarning)
        out = fast(x)
    ref = eager(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    for (k, a), (_, b) in zip(fast.state_dict().items(), eager.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("backend", FUSED)
def test_module_eval_gradients_match_eager(backend, device):
    orig = ready(timm_ghost.GhostModuleV2(6, 10), device, torch.float64)
    fast = convert_one(copy.deepcopy(orig), backend)
    x = torch.randn(1, 6, 5, 4, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 10, 5, 4, device=device, dtype=torch.float64)
    grads_ref = torch.autograd.grad((orig(x) * g).sum(), [x] + list(orig.parameters()))
    grads = torch.autograd.grad((fast(x) * g).sum(), [x] + list(fast.parameters()))
    for a, b in zip(grads, grads_ref):
        assert_close_rel(a, b, torch.float64, factor=1e3)


def with_primary_groups(m, groups=2):
    old = m.primary_conv[0]
    m.primary_conv[0] = nn.Conv2d(old.in_channels, old.out_channels, 1, groups=groups, bias=False)
    return m


def with_reflect_padding(m):
    m.primary_conv[0].padding_mode = "reflect"
    return m


def with_activation(m, act):
    m.primary_conv[2] = act
    m.cheap_operation[2] = act
    return m


@pytest.mark.parametrize("factory,why", [
    (lambda: timm_ghost.GhostModule(8, 12, dw_size=9), "cheap conv kernel_size"),
    (lambda: with_primary_groups(timm_ghost.GhostModule(8, 12)), "groups 2"),
    (lambda: with_reflect_padding(timm_ghost.GhostModule(8, 12, kernel_size=3)), "padding_mode 'reflect'"),
    (lambda: with_activation(timm_ghost.GhostModule(8, 12), nn.GELU()), "GELU"),
])
def test_module_unsupported_falls_back_with_warning(factory, why, device):
    orig = ready(factory(), device)
    x = torch.randn(1, 8, 8, 8, device=device)
    fast = GhostModule.from_module(orig, backend=FUSED_BACKEND, strict=False)
    assert why in fast.unsupported_reason
    ghostfast.backends._warned.clear()
    with pytest.warns(GhostfastFallbackWarning, match=why):
        out = fast(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GhostfastFallbackWarning)  # one-time: the second call is silent
        fast(x)
    with torch.no_grad():
        assert torch.equal(out, orig(x))
    with pytest.raises(GhostfastUnsupported, match=why):
        GhostModule.from_module(orig, backend=FUSED_BACKEND, strict=True)


def test_module_strict_env(monkeypatch, device):
    monkeypatch.setenv("GHOSTFAST_STRICT", "1")
    with pytest.raises(GhostfastUnsupported, match=r"kernel_size \(9, 9\)"):
        GhostModule(8, 12, dw_size=9)


def test_module_bad_input_errors(device):
    fast = convert_one(ready(timm_ghost.GhostModuleV2(8, 12), device))
    with pytest.raises(ValueError, match="expected input with 8 channels, got 5"):
        fast(torch.randn(1, 5, 6, 6, device=device))
    with pytest.raises(ValueError, match="4-D"):
        fast(torch.randn(8, 6, 6, device=device))
    with pytest.raises(TypeError, match="expected input of dtype torch.float32.*got torch.float64"):
        fast(torch.randn(1, 8, 6, 6, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="on meta"):
        fast(torch.randn(1, 8, 6, 6, device="meta"))
    with pytest.raises(ValueError, match="H and W >= 2"):
        fast(torch.randn(1, 8, 1, 6, device=device))


def test_module_empty_batch_matches_eager(device):
    orig = ready(timm_ghost.GhostModuleV2(8, 12), device)
    fast = convert_one(copy.deepcopy(orig))
    x = torch.randn(0, 8, 6, 6, device=device)
    with torch.no_grad():
        ref, out = orig(x), fast(x)
    assert out.shape == ref.shape == (0, 12, 6, 6) and out.dtype == ref.dtype


def count_launches(fn, device, backend="triton"):
    """Kernel launches of fn(): CUDA kernels in the profiler on GPU; on CPU, Triton launches under the interpreter
    or calls of the compiled kernels (the profiler's ghostfast::_*_kernel events), with no eager conv run."""
    if device == "cpu" and backend != "triton":
        from torch.profiler import ProfilerActivity, profile

        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        names = [e.name for e in prof.events()]
        assert not [n for n in names if n.startswith("aten::") and "conv" in n], "eager convolution ran"
        return sum(1 for n in names if n.startswith("ghostfast::_") and n.endswith("_kernel"))
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from triton.runtime.interpreter import InterpretedFunction

    calls = []
    original = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        calls.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = counting
    conv_calls = []
    conv_forward = nn.Conv2d.forward
    nn.Conv2d.forward = lambda self, x: conv_calls.append(1) or conv_forward(self, x)
    try:
        fn()
    finally:
        InterpretedFunction.run = original
        nn.Conv2d.forward = conv_forward
    assert not conv_calls, "the fused path must not run the eager convolutions"
    return len(calls)


@pytest.mark.parametrize("backend", FUSED)
def test_module_launch_count(backend, device):
    v2 = convert_one(ready(timm_ghost.GhostModuleV2(16, 24), device), backend)
    v1 = convert_one(ready(timm_ghost.GhostModule(16, 24), device), backend)
    x = torch.randn(2, 16, 9, 9, device=device)
    with torch.no_grad():
        assert count_launches(lambda: v1(x), device, backend) == 1
        assert count_launches(lambda: v2(x), device, backend) == 2
