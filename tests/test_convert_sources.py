"""convert on the Ghost code people run beyond timm: Huawei's GhostNetV3 modes, the paper's module with k x k /
strided primary convs, SiLU / Hardswish / ReLU6 activations, ultralytics YOLO's GhostConv (BN and fused-bias forms),
Ghost-ResNet's Conv2d-subclass module, look-alikes the report must name, fx GraphModules.

Each source is built faithfully in tests/original_modules.py (attribute names, forward maths, reparameterize() /
fuse() forms); converted models are compared with the eager originals in eval mode and in a training step, on every
fused backend of the device."""
import copy
import warnings

import pytest
import timm.models.ghostnet as timm_ghost
import torch
from torch import nn

import ghostfast
import kernel_backends
from ghostfast import ops, reference
from ghostfast.backends import GhostfastFallbackWarning
from ghostfast.models import randomize_batchnorm_
from ghostfast.nn import GhostConv, GhostConv2d, GhostModule, GhostModuleV2
from ghostfast.reference import BatchNormParams
from numerics import assert_close_rel
from original_modules import (GhostResNetModule, HuaweiGhostModuleV3, HuaweiGhostNetV3Stack, PaperGhostModule,
                              TinyGhostResNet, UltralyticsGhostNet, ultralytics_fuse)

BACKENDS = kernel_backends.NAMES


def _randomized(model, seed=1):
    randomize_batchnorm_(model, torch.Generator().manual_seed(seed))
    return model


def _kinds(report):
    kinds = {}
    for _, kind in report.converted:
        cls = kind.rsplit(".", 1)[-1]
        kinds[cls] = kinds.get(cls, 0) + 1
    return kinds


def _check_eval(model, fast, x, factor=1):
    with torch.no_grad():
        assert_close_rel(fast(x), model(x), x.dtype, factor=factor)


def _check_train_step(model, fast, x):
    """One training step on both: outputs, every parameter's gradient (against the original's float64 gradients),
    the BatchNorms' running statistics."""
    exact = copy.deepcopy(model).double().train()
    model.train()
    fast.train()
    out_ref, out = model(x), fast(x)
    g = torch.randn_like(out_ref)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    (exact(x.double()) * g.double()).sum().backward()
    assert_close_rel(out, out_ref, x.dtype, factor=10)
    exact_params = dict(exact.named_parameters())
    largest = max(q.grad.norm().item() for q in exact_params.values() if q.grad is not None)
    from numerics import REL_TOL

    for name, p in fast.named_parameters():
        q = exact_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        err = (p.grad.double() - q.grad).norm().item()
        if q.grad.norm().item() <= 1e-9 * largest:
            # exactly zero in exact arithmetic (a bias before a training-mode BatchNorm): fp32 rounding noise only,
            # bounded against the model's largest gradient
            assert err <= REL_TOL[x.dtype] * largest, f"grad of {name}: {err:.2e} where it is 0"
            continue
        err /= q.grad.norm().item()
        assert err <= 10 * REL_TOL[x.dtype], f"grad of {name}: relative error {err:.2e}"
    ref_bufs = dict(model.named_buffers())
    for name, b in fast.named_buffers():
        if b.is_floating_point():
            assert_close_rel(b, ref_bufs[name], x.dtype, factor=10)


# ---- Huawei GhostNetV3 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_huawei_ghostnetv3_modes(backend, device):
    model = _randomized(HuaweiGhostNetV3Stack()).to(device).eval()
    with pytest.warns(GhostfastFallbackWarning, match="reparameterize"):
        before = ghostfast.convert(model, backend=backend)
    assert len(before.ghostfast_report.skipped) == 4 and not before.ghostfast_report.converted
    assert all("reparameterize()" in why for _, why in before.ghostfast_report.skipped)

    model.reparameterize()
    fast = ghostfast.convert(model, backend=backend, strict=True)
    assert _kinds(fast.ghostfast_report) == {"GhostModule": 3, "GhostModuleV2": 1}
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert fast.g3.gate_loc == "before" and fast.g1.mode == "ori"  # the original's attributes stay readable
    x = torch.randn(2, 3, 12, 10, device=device)
    _check_eval(model, fast, x)
    _check_train_step(model, fast, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loc,interp,scale", [("after", "nearest", 1.0), ("before", "bilinear", 1.0),
                                              ("before", "nearest", 2.5)])
def test_huawei_ghostnetv3_gate_options(loc, interp, scale, backend, device):
    m = _randomized(HuaweiGhostModuleV3(8, 12, mode="ori_shortcut_mul_conv15")).to(device).eval()
    m.reparameterize()
    m.gate_loc, m.inter_mode, m.scale = loc, interp, scale
    fast = ghostfast.convert(m, backend=backend, strict=True)
    assert isinstance(fast, GhostModuleV2)
    _check_eval(m, fast, torch.randn(2, 8, 11, 9, device=device))
    # changed after conversion: re-planned, still the original's maths
    fast.scale = m.scale = 0.5
    _check_eval(m, fast, torch.randn(1, 8, 6, 6, device=device))


def test_huawei_ghostnetv3_unsupported_gate_is_reported(device):
    m = _randomized(HuaweiGhostModuleV3(8, 12, mode="ori_shortcut_mul_conv15")).to(device).eval()
    m.reparameterize()
    m.gate_loc, m.inter_mode = "after", "bilinear"
    with pytest.warns(GhostfastFallbackWarning, match="gate_loc 'after' with inter_mode 'bilinear'"):
        fast = ghostfast.convert(nn.Sequential(m))
    assert "gate_loc 'after'" in fast.ghostfast_report.skipped[0][1]
    wrapped = GhostModuleV2.from_module(m)
    with pytest.warns(GhostfastFallbackWarning, match="GhostModuleV2: gate_loc 'after'"):
        _check_eval(m, wrapped, torch.randn(1, 8, 6, 6, device=device))  # eager, the original's maths


# ---- primary conv kernel_size / stride / padding, activations ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel_size,stride", [(1, 2), (3, 1), (3, 2), (5, 2)])
def test_paper_module_kernel_size_and_stride(kernel_size, stride, backend, device):
    model = nn.Sequential(_randomized(PaperGhostModule(6, 11, kernel_size=kernel_size, stride=stride, ratio=3)),
                          _randomized(timm_ghost.GhostModule(11, 8, kernel_size=kernel_size, stride=stride), 2))
    model = model.to(device).eval()
    fast = ghostfast.convert(model, backend=backend, strict=True)
    assert _kinds(fast.ghostfast_report) == {"GhostModule": 2}
    x = torch.randn(2, 6, 13, 10, device=device)
    _check_eval(model, fast, x)
    _check_train_step(model, fast, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act_layer", [nn.SiLU, nn.Hardswish, nn.ReLU6, nn.ReLU, nn.Identity])
def test_activations_convert_and_match(act_layer, backend, device):
    model = nn.Sequential(_randomized(timm_ghost.GhostModule(5, 12, act_layer=act_layer)),
                          _randomized(timm_ghost.GhostModuleV2(12, 12, act_layer=act_layer), 2)).to(device).eval()
    with torch.no_grad():  # wide pre-activations: past ReLU6's 6 and Hardswish's +-3
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3)
    fast = ghostfast.convert(model, backend=backend, strict=True)
    assert _kinds(fast.ghostfast_report) == {"GhostModule": 1, "GhostModuleV2": 1}
    x = torch.randn(2, 5, 9, 8, device=device)
    _check_eval(model, fast, x)
    _check_train_step(model, fast, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_primary_conv_geometry_gradcheck(backend, device):
    """The public op with a 3x3 stride-2 padded, and a dilated, primary conv: float64 gradcheck and the reference."""
    g = torch.Generator().manual_seed(5)

    def rnd(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(device).requires_grad_()

    x = rnd(2, 3, 7, 6)
    w2 = rnd(4, 1, 3, 3)
    bn = BatchNormParams(rnd(4, lo=0.5, hi=2), rnd(4), rnd(4), rnd(4, lo=0.5, hi=2), 1e-5)
    for kernel, kw in ((3, dict(stride=2, padding=1)), (3, dict(stride=(1, 2), padding=(2, 0), dilation=2)),
                       (1, dict(stride=2))):
        w1 = rnd(4, 3, kernel, kernel)

        def fn(x, w1, w2):
            return ops.ghost_module(x, w1, bn, w2, bn, out_channels=7, act="silu", backend=backend, strict=True, **kw)

        z = torch.nn.functional.conv2d(x, w1, **kw)
        s, t = reference.fold_bn(bn)
        x1 = reference.activation(z * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), "silu")
        x2 = reference.activation(torch.nn.functional.conv2d(x1, w2, padding=1, groups=4) * s.view(1, -1, 1, 1)
                                  + t.view(1, -1, 1, 1), "silu")
        assert_close_rel(fn(x, w1, w2), torch.cat([x1, x2], 1)[:, :7], torch.float64)
        # the Triton interpreter costs ~0.1-0.5 s a launch and a full gradcheck here needs ~800 per geometry (~10 min
        # in all): it checks random directions of the Jacobian (fast_mode) instead of every column
        assert torch.autograd.gradcheck(fn, (x, w1, w2), eps=1e-6, atol=1e-5, fast_mode=backend == "triton")


def test_ops_primary_conv_geometry_errors():
    x, w2 = torch.randn(1, 3, 4, 4), torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"smaller than the kernel"):
        ops.ghost_module(x, torch.randn(2, 3, 5, 5), None, w2, None)
    with pytest.raises(ValueError, match=r"stride >= 1"):
        ops.ghost_module(x, torch.randn(2, 3, 3, 3), None, w2, None, stride=0)
    with pytest.raises(ValueError, match=r"expected input with 3 channels, got 4"):
        ops.ghost_module(torch.randn(1, 4, 4, 4), torch.randn(2, 3, 3, 3), None, w2, None)


# ---- ultralytics YOLO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["bn", "fuse()"])
def test_ultralytics_ghostconv(fused, backend, device):
    model = _randomized(UltralyticsGhostNet()).to(device).eval()
    if fused:
        ultralytics_fuse(model)
    fast = ghostfast.convert(model, backend=backend, strict=True)
    report = fast.ghostfast_report
    # GhostConv x2 at the top level, 2 per GhostBottleneck (3 of them: two standalone, one in the C3Ghost)
    assert _kinds(report) == {"GhostConv": 8} and not report.skipped
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 32, 30, device=device)
    _check_eval(model, fast, x, factor=10)
    if not fused:  # fuse() is for inference (its convs are frozen)
        _check_train_step(model, fast, x)


def test_ultralytics_lookalike_is_reported(device):
    class Pair(nn.Module):  # GhostConv's structure, another name: listed, never silently missed
        def __init__(self):
            super().__init__()
            from original_modules import Conv

            self.cv1 = Conv(4, 4, 1)
            self.cv2 = Conv(4, 4, 5, 1, None, 4)

        def forward(self, x):
            return self.cv2(self.cv1(x))

    with pytest.warns(GhostfastFallbackWarning):
        fast = ghostfast.convert(nn.Sequential(Pair()).to(device))
    assert [n for n, _ in fast.ghostfast_report.skipped] == ["0"]
    assert "GhostConv.from_module" in fast.ghostfast_report.skipped[0][1]


def test_ultralytics_detection_model(device):
    ultralytics = pytest.importorskip("ultralytics", reason="ultralytics is not installed (optional)")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n-ghost.yaml", verbose=False).to(device).eval()
    _randomized(model)
    n_ghost = sum(type(m).__name__ == "GhostConv" for m in model.modules())
    fast = ghostfast.convert(model, strict=True)
    assert _kinds(fast.ghostfast_report) == {"GhostConv": n_ghost} and n_ghost >= 26, ultralytics.__version__
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    ref, out = (ref[0], out[0]) if isinstance(ref, (tuple, list)) else (ref, out)
    assert_close_rel(out, ref, torch.float32, factor=10)


# ---- Ghost-ResNet ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ghost_resnet(backend, device):
    model = TinyGhostResNet().to(device).eval()
    _randomized(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GhostResNetModule):
                m.conv1.bias.normal_(0, 0.1)
                m.conv2.bias.normal_(0, 0.1)
    fast = ghostfast.convert(model, backend=backend, strict=True)
    # 3 per bottleneck and the downsample
    assert _kinds(fast.ghostfast_report) == {"GhostConv2d": 7}
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert fast.layer1[0].conv2.out_channels == 8 and fast.layer1[0].conv2.stride == (2, 2)
    x = torch.randn(2, 3, 32, 32, device=device)
    _check_eval(model, fast, x)
    _check_train_step(model, fast, x)


# ---- fx ----------------------------------------------------------------------------------------------------------


def test_convert_graph_module_is_reported(device):
    traced = torch.fx.symbolic_trace(nn.Sequential(timm_ghost.GhostModule(4, 8)).to(device).eval())
    with pytest.warns(GhostfastFallbackWarning, match="GraphModule"):
        out = ghostfast.convert(traced)
    assert out.ghostfast_report.skipped and "before tracing" in out.ghostfast_report.skipped[0][1]


# ---- deployment of the new wrappers ------------------------------------------------------------------------------


def _sources():
    v3 = HuaweiGhostNetV3Stack().eval()
    v3.reparameterize()
    return {"huawei_v3": v3, "ultralytics": UltralyticsGhostNet().eval(),
            "ultralytics_fused": ultralytics_fuse(UltralyticsGhostNet().eval()), "ghost_resnet": TinyGhostResNet().eval()}


@pytest.mark.parametrize("source", ["huawei_v3", "ultralytics", "ultralytics_fused", "ghost_resnet"])
def test_new_sources_script_trace_fx_onnx(source, device):
    model = _randomized(_sources()[source]).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GhostfastFallbackWarning)  # SiLU on a backend without it: eager is fine here
        fast = ghostfast.convert(model)
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        ref = model(x)
        for recorded in (torch.jit.script(fast), torch.jit.trace(fast, x), torch.fx.symbolic_trace(fast)):
            assert_close_rel(recorded(x), ref, torch.float32)
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    import io

    buf = io.BytesIO()
    torch.onnx.export(fast, (x,), buf, dynamo=False, input_names=["x"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"x": x.cpu().numpy()})[0])
    assert_close_rel(out, ref.cpu(), torch.float32, factor=10)
