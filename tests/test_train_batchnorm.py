"""Training-mode BatchNorm inside the fused path (GhostModule, GhostModuleV2), per fused backend, against the
original modules in training mode: outputs, gradients through the batch statistics (input and every parameter),
running statistics (momentum, cumulative averaging with momentum=None, unbiased running_var) and
num_batches_tracked, over several calls. float64 pins the math; float32 checks the kernels' own rounding.

The fused path is proven taken: per module and call, one Ghost forward launch plus one statistics launch per
BatchNorm in training mode (counted as `ghost_fwd`), as many backward launches (on the `cpu` backend with z1 kept:
fused_runs.train_launches), and no eager convolution module in the Ghost part (GhostModuleV2's DFC branch runs
eagerly while its BatchNorms are in training mode)."""
import copy
import warnings

import pytest
import timm.models.ghostnet as timm_ghost
import torch
from torch import nn

import ghostfast
import kernel_backends
from fused_runs import record_fused_runs, train_launches
from ghostfast.backends import GhostfastFallbackWarning
from ghostfast.models import randomize_batchnorm_
from ghostfast.nn import GhostModule, GhostModuleV2
from numerics import rel_error
from original_modules import HuaweiGhostModuleV2, PaperGhostModule

FUSED = kernel_backends.NAMES
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CALLS = 2


def _momentum_none_affine_false_conv_bias():
    """BatchNorms with momentum=None (cumulative average) and affine=False, after a conv with a bias."""
    m = timm_ghost.GhostModule(7, 12)
    m.primary_conv[0] = nn.Conv2d(7, 6, 1, bias=True)
    m.primary_conv[1] = nn.BatchNorm2d(6, momentum=None, affine=False)
    m.cheap_operation[1] = nn.BatchNorm2d(6, momentum=None)
    return m


def _frozen_primary_bn():
    """Training mode with the primary BatchNorm frozen (eval mode): only the cheap one uses batch statistics."""
    m = timm_ghost.GhostModule(8, 12)
    m.primary_conv[1].momentum = 0.3
    return m


# (name, factory, input shape, modules whose BNs stay in eval mode)
CONFIGS = [
    ("timm_v1", lambda: timm_ghost.GhostModule(10, 16), (3, 10, 9, 8), ()),
    ("timm_v1_ratio3_dw5_noact_odd", lambda: timm_ghost.GhostModule(7, 13, ratio=3, dw_size=5,
                                                                    act_layer=nn.Identity), (2, 7, 11, 6), ()),
    ("timm_v2", lambda: timm_ghost.GhostModuleV2(8, 13), (2, 8, 10, 9), ()),
    ("paper_v1_norelu", lambda: PaperGhostModule(8, 11, relu=False), (2, 8, 5, 4), ()),
    ("huawei_v2_attn_dw7", lambda: HuaweiGhostModuleV2(6, 10, dw_size=7, mode="attn"), (2, 6, 8, 10), ()),
    ("momentum_none_affine_false_conv_bias", _momentum_none_affine_false_conv_bias, (2, 7, 6, 7), ()),
    ("frozen_primary_bn", _frozen_primary_bn, (2, 8, 7, 7), ("primary_conv.1",)),
]


def _pair(factory, backend, dtype, device, frozen=(), seed=0):
    eager = factory()
    randomize_batchnorm_(eager, torch.Generator().manual_seed(seed))
    eager = eager.to(device=device, dtype=dtype).train()
    for name in frozen:
        eager.get_submodule(name).eval()
    cls = GhostModuleV2 if hasattr(eager, "short_conv") else GhostModule
    fast = cls.from_module(copy.deepcopy(eager), backend=backend, strict=True)
    for name in frozen:
        fast.get_submodule(name).eval()
    return eager, fast


def _ghost_convs(m):
    return [c for part in (m.primary_conv, m.cheap_operation) for c in part.modules() if isinstance(c, nn.Conv2d)]


def _step(model, x, g):
    x = x.clone().requires_grad_(True)
    out = model(x)
    grads = torch.autograd.grad((out * g).sum(), [x] + list(model.parameters()))
    return out.detach(), grads


def _assert_close(what, got, want, tol):
    err = rel_error(got, want)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name,factory,shape,frozen", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_train_mode_batchnorm_matches_eager(name, factory, shape, frozen, backend, dtype, device):
    eager, fast = _pair(factory, backend, dtype, device, frozen)
    n_batch_stats = sum(isinstance(m, nn.BatchNorm2d) and m.training
                        for part in (fast.primary_conv, fast.cheap_operation) for m in part.modules())
    assert n_batch_stats == 2 - len(frozen)
    gen = torch.Generator().manual_seed(1)
    tol = TOL[dtype]
    for call in range(CALLS):
        x = (torch.randn(shape, generator=gen) + 0.5).to(device=device, dtype=dtype)
        g = torch.randn((shape[0], fast.out_chs) + tuple(shape[2:]), generator=gen).to(device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GhostfastFallbackWarning)
            with record_fused_runs(device, backend) as runs:
                out, grads = _step(fast, x, g)
        ref, ref_grads = _step(eager, x, g)
        counts = dict(runs.counts)
        want = train_launches(fast, backend, dtype)
        assert {k: counts.pop(k, 0) for k in want} == want, dict(runs.counts)
        assert not counts or isinstance(fast, GhostModuleV2), counts  # the DFC gate: eager while BNs train
        assert not runs.eager_convs_in([nn.ModuleList(_ghost_convs(fast))]), "eager convs ran in the Ghost part"
        _assert_close(f"call {call}: output", out, ref, tol)
        names = ["x"] + [n for n, _ in eager.named_parameters()]
        for n, a, b in zip(names, grads, ref_grads):
            if n == "primary_conv.0.bias":
                # cancels against the batch mean: exactly zero here, rounding noise in eager
                assert torch.equal(a, torch.zeros_like(a)) and b.abs().max() <= 1e3 * tol, (a, b)
                continue
            _assert_close(f"call {call}: grad {n}", a, b, tol)
        for (k, a), (k2, b) in zip(fast.state_dict().items(), eager.state_dict().items()):
            assert k == k2
            if k.endswith("num_batches_tracked"):
                assert a.item() == b.item(), k
            else:
                _assert_close(f"call {call}: {k}", a, b, tol)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_module_gradcheck_float64(kind, train, backend, device):
    """torch.autograd.gradcheck of the whole converted module in float64, w.r.t. the input and every parameter,
    in eval mode (BN folded) and in training mode (batch statistics)."""
    orig = timm_ghost.GhostModule(4, 6) if kind == "v1" else timm_ghost.GhostModuleV2(4, 6)
    randomize_batchnorm_(orig, torch.Generator().manual_seed(0))
    orig = orig.to(device=device, dtype=torch.float64).train(train)
    fast = (GhostModuleV2 if kind == "v2" else GhostModule).from_module(orig, backend=backend, strict=True)
    names = [n for n, _ in fast.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in fast.parameters()]
    x = torch.randn(2, 4, 4, 5, device=device, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(fast, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("backend", FUSED)
def test_train_mode_one_value_per_channel_raises_like_eager(backend, device):
    eager, fast = _pair(lambda: timm_ghost.GhostModule(4, 6), backend, torch.float32, device)
    x = torch.randn(1, 4, 1, 1, device=device)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        eager(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fast(x)


def test_track_running_stats_false_falls_back(device):
    m = timm_ghost.GhostModule(4, 6)
    m.primary_conv[1] = nn.BatchNorm2d(3, track_running_stats=False)
    model = nn.Sequential(m).to(device).train()
    ghostfast.backends._warned.clear()
    with pytest.warns(GhostfastFallbackWarning, match="track_running_stats=False"):
        fast = ghostfast.convert(copy.deepcopy(model), backend="triton")
    x = torch.randn(2, 4, 5, 5, device=device)
    assert torch.equal(fast(x), model(x))


@pytest.mark.parametrize("case", ["z1", "bn2-frozen", "float64-z1", "cheap-bias", "batch1"])
def test_auto_on_cpu_trains_the_z1_path_else_the_original_submodules(case):
    """`auto` on CPU tensors in training mode trains fused where the z1 path applies (bn2 on batch statistics,
    float32 / float64, no cheap-conv bias: faster than eager there) and runs the original submodules elsewhere (the
    other C++ training forms lose to oneDNN) and at batch 1 (where the z1 path loses too; also after a fused call at
    batch 2), silently; eval mode runs fused."""
    dtype = torch.float64 if case.startswith("float64") else torch.float32
    frozen = ("cheap_operation.1",) if case == "bn2-frozen" else ()

    def factory():
        m = timm_ghost.GhostModule(8, 12)
        if case == "cheap-bias":
            c = m.cheap_operation[0]
            m.cheap_operation[0] = nn.Conv2d(c.in_channels, c.out_channels, 3, 1, 1, groups=c.groups, bias=True)
        return m
    eager, fast = _pair(factory, "auto", dtype, "cpu", frozen=frozen)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 if case == "batch1" else 2, 8, 6, 6, generator=g, dtype=dtype)
    fused = case.endswith("z1") and "cpu" in kernel_backends.COMPILED
    if case == "batch1" and "cpu" in kernel_backends.COMPILED:
        with record_fused_runs("cpu", "cpu") as runs:
            fast(torch.cat([x, x]))
        assert runs.counts  # batch 2: fused
    with warnings.catch_warnings():
        warnings.simplefilter("error", GhostfastFallbackWarning)
        with record_fused_runs("cpu", "cpu") as runs:
            out = fast(x)
            out.backward(torch.randn(out.shape, generator=g, dtype=dtype))
    ref = eager(x)
    if fused:
        assert dict(runs.counts) == train_launches(fast, "cpu", dtype)
        assert not runs.convs  # z1 by a matmul, the cheap conv inside the fused op
        assert rel_error(out, ref) <= (1e-12 if dtype == torch.float64 else 1e-5)
    else:
        assert not runs.counts and len(runs.convs) == 2
        assert torch.equal(out, ref)
    if "cpu" in kernel_backends.COMPILED:
        fast.eval()
        with torch.no_grad(), record_fused_runs("cpu", "cpu") as runs:
            fast(x)
        assert not runs.convs and runs.counts == {"ghost_fwd": 1}  # eval mode: fused


def _trains(m) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.training


def _kernel_calls(prof, name):
    return sum(1 for e in prof.events() if e.name == f"ghostfast::{name}")


@pytest.mark.parametrize("path", ["z1", "joint"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,factory,shape,frozen", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_cpu_joint_bn2_statistics_backward(name, factory, shape, frozen, dtype, layout, path, monkeypatch):
    """The `cpu` backend trains bn2 through one op whose backward carries the batch statistics' gradient inside the
    main backward (a reduction pass, then one full pass): `joint` (ghostfast::ghost_module_bn2_batch_stats, the
    kernels recompute z1 = W1 x) and `z1` (the default: z1 by the library convolution, kept, bn1's statistics from
    it by ghostfast::ghost_module_z1_stats, the rest by ghostfast::ghost_module_z1, whose backward returns dz1).
    Both give the same gradients, outputs and running statistics as the separate statistics op with its own
    backward pass, and as eager; the joint kernel ran once per call (z1: twice, and no statistics backward kernel),
    the stage-2 statistics' backward kernel not at all."""
    if "cpu" not in FUSED:
        pytest.skip("ghostfast._C has no CPU kernels in this build")
    from torch.profiler import profile

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    eager, joint = _pair(factory, "cpu", dtype, "cpu", frozen)
    separate = copy.deepcopy(joint)
    bn2_trains = _trains(joint.cheap_operation[1])
    conv2 = joint.cheap_operation[0]
    z1_path = path == "z1" and bn2_trains and conv2.bias is None and joint.out_chs >= conv2.in_channels
    gen = torch.Generator().manual_seed(2)
    for call in range(CALLS):
        x = (torch.randn(shape, generator=gen) + 0.5).to(dtype).to(memory_format=fmt)
        g = torch.randn((shape[0], joint.out_chs) + tuple(shape[2:]), generator=gen).to(dtype)
        monkeypatch.setattr(ghostfast.nn, "KEEP_Z1", path == "z1")
        with profile() as prof, kernel_backends.poisoned_buffers() as allocated:  # unwritten elements show as NaN
            out, grads = _step(joint, x, g)
        assert allocated[0] > 0
        monkeypatch.setattr(ghostfast.nn, "JOINT_BN2_STATS", False)
        out_s, grads_s = _step(separate, x, g)
        monkeypatch.setattr(ghostfast.nn, "JOINT_BN2_STATS", True)
        ref, ref_grads = _step(eager, x, g)
        n_stats_bwd = _kernel_calls(prof, "_ghost_module_stats_backward_kernel") + \
            _kernel_calls(prof, "_ghost_module_stats_backward_library")
        if z1_path:
            assert _kernel_calls(prof, "_ghost_module_z1_backward_kernel") == 2
            assert _kernel_calls(prof, "_ghost_module_z1_stats_kernel") == int(_trains(joint.primary_conv[1]))
            assert _kernel_calls(prof, "_ghost_module_backward_bnstats_kernel") == 0 and n_stats_bwd == 0
        else:
            assert _kernel_calls(prof, "_ghost_module_backward_bnstats_kernel") == int(bn2_trains)
            assert n_stats_bwd == int(_trains(joint.primary_conv[1])), n_stats_bwd  # stage 1's only
        _assert_close(f"call {call}: output vs separate", out, out_s, TOL[dtype])
        _assert_close(f"call {call}: output vs eager", out, ref, TOL[dtype])
        names = ["x"] + [n for n, _ in eager.named_parameters()]
        for n, a, b, r in zip(names, grads, grads_s, ref_grads):
            if n == "primary_conv.0.bias":
                assert torch.equal(a, torch.zeros_like(a)), a
                continue
            _assert_close(f"call {call}: grad {n} vs separate", a, b, TOL[dtype])
            _assert_close(f"call {call}: grad {n} vs eager", a, r, TOL[dtype])
        for (k, a), (_, b) in zip(joint.state_dict().items(), eager.state_dict().items()):
            if k.endswith("num_batches_tracked"):
                assert a.item() == b.item(), k
            else:
                _assert_close(f"call {call}: {k}", a, b, TOL[dtype])
