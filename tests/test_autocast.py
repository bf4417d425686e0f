"""Converted modules under torch.autocast: the fused ops run in the autocast dtype (input and conv weights cast, BN
folded in float32), as eager autocast runs the convolutions. Output dtype as eager autocast's; the output and the
gradients of the input and of every parameter against a float64 reference, within DESIGN.md's bound for the dtype
and no worse than eager autocast's own error against the same reference.

The float64 reference is evaluated on the values autocast hands to the computation: the input, the conv weights
and the incoming gradient rounded to the autocast dtype (BN parameters as they are), as test_modules' float16 test
evaluates the float16 weights in float64. What remains is each implementation's own rounding: eager autocast
rounds every intermediate (conv output, BN output, their gradients) to the half dtype, the fused kernels
accumulate in float32 and round each output once. (Against unrounded inputs both errors are dominated by the same
input rounding, ~4e-4 in float16, and by ReLUs that the rounding flips: that compares the data, not the code.)
"""
import copy

import pytest
import timm.models.ghostnet as timm_ghost
import torch
from torch import nn

import ghostfast
import kernel_backends
from fused_runs import record_fused_runs
from ghostfast.backends import dtype_unsupported
from ghostfast.models import randomize_batchnorm_
from numerics import REL_TOL, rel_error
from torch.utils._python_dispatch import TorchDispatchMode

MODULES = [
    ("v1", lambda: timm_ghost.GhostModule(16, 24), (2, 16, 9, 7)),
    ("v1_ratio3_dw5_noact", lambda: timm_ghost.GhostModule(12, 13, ratio=3, dw_size=5, act_layer=nn.Identity),
     (1, 12, 8, 9)),
    ("v2", lambda: timm_ghost.GhostModuleV2(16, 24), (2, 16, 9, 7)),
    ("v2_ratio3_dw7", lambda: timm_ghost.GhostModuleV2(10, 9, ratio=3, dw_size=7), (1, 10, 8, 9)),
]
DTYPES = [torch.float16, torch.bfloat16]
EXPECTED_LAUNCHES = {"v1": {"ghost_fwd": 1}, "v2": {"ghost_fwd": 1, "dfc_fwd": 1}}


class _GhostfastOpInputs(TorchDispatchMode):
    """The dtypes of the tensors each ghostfast op receives: (op, [(ndim, dtype), ...])."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("ghostfast."):
            self.calls.append((str(func), [(a.dim(), a.dtype) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def _skip_unsupported(backend, dtype, device):
    why = dtype_unsupported(backend, dtype)
    if why and (device == "cpu" or backend != "triton"):
        pytest.skip(f"{backend} backend cannot run {dtype} on {device}: {why} (the module would run eager)")


def _modules(factory, device, backend, dtype=None):
    """(eager module, converted copy, float64 reference copy with its conv weights rounded to `dtype`)."""
    eager = factory()
    randomize_batchnorm_(eager, torch.Generator().manual_seed(0))
    eager = eager.to(device).eval()
    fast = ghostfast.convert(nn.Sequential(copy.deepcopy(eager)), backend=backend, strict=True)[0]
    ref = copy.deepcopy(eager).double()
    if dtype is not None:
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(m.weight.to(dtype))
    return eager, fast, ref


def _rounded(t, dtype):
    return t.to(dtype).double()


def _check_errors(fused, eager, ref, dtype):
    """Every tensor within DESIGN.md's bound for `dtype`, and the worst fused tensor no worse than the worst eager
    one. (Not tensor by tensor: where both errors come from the same kind of rounding, e.g. of the half-dtype DFC
    gate, which of the two is smaller on a 3-channel BN gradient is a coin toss.)"""
    errors = {k: (rel_error(fused[k], ref[k]), rel_error(eager[k], ref[k])) for k in ref}
    text = ", ".join(f"{k}: fused {a:.2e} eager {b:.2e}" for k, (a, b) in errors.items())
    for k, (f, _) in errors.items():
        assert f <= REL_TOL[dtype], f"{k} over {REL_TOL[dtype]:.0e}: {text}"
    assert max(f for f, _ in errors.values()) <= max(e for _, e in errors.values()), f"worse than eager: {text}"
    return errors


def _forward_backward(module, x, g, dtype, device, autocast, running=False):
    """The output and the gradients of the input and of every parameter (and the running statistics when
    `running`): under autocast, or (the float64 reference) on the input and gradient rounded to `dtype`."""
    xi = (x if autocast else _rounded(x, dtype)).detach().requires_grad_(True)
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        out = module(xi)
    if autocast:  # the backward of out.float() hands the half-dtype output a rounded g
        (out.float() * g).sum().backward()
    else:
        (out * _rounded(g, dtype)).sum().backward()
    result = {"out": out.detach(), "x": xi.grad}
    result.update({n: p.grad for n, p in module.named_parameters()})
    if running:
        result.update({n: b for n, b in module.named_buffers() if "running" in n})
    return result


@pytest.mark.parametrize("backend", kernel_backends.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,factory,shape", MODULES, ids=[m[0] for m in MODULES])
def test_autocast_forward_matches_eager_autocast(name, factory, shape, dtype, backend, device):
    _skip_unsupported(backend, dtype, device)
    eager, fast, ref_module = _modules(factory, device, backend, dtype)
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        ref = ref_module(_rounded(x, dtype))
        with torch.autocast(device, dtype=dtype):
            out_eager = eager(x)
            with record_fused_runs(device, backend) as runs, _GhostfastOpInputs() as seen:
                out = fast(x)
    assert out.dtype == out_eager.dtype == dtype
    assert out.shape == out_eager.shape
    assert not runs.convs, "under autocast the converted module must run fused, not its eager submodules"
    assert dict(runs.counts) == EXPECTED_LAUNCHES[name[:2]]
    # the ops compute in the autocast dtype: input, conv weights (4-D) and the DFC gate in it, BN vectors float32
    assert [op for op, _ in seen.calls] == (["ghostfast.dfc.default"] if name.startswith("v2") else []) + \
        ["ghostfast.ghost_module.default"]
    for op, tensors in seen.calls:
        assert all(dt == (dtype if ndim == 4 else torch.float32) for ndim, dt in tensors), (op, tensors)
    _check_errors({"out": out}, {"out": out_eager}, {"out": ref}, dtype)


@pytest.mark.parametrize("backend", kernel_backends.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,factory,shape", MODULES, ids=[m[0] for m in MODULES])
def test_autocast_backward_matches_eager_autocast(name, factory, shape, dtype, backend, device):
    """Frozen-BN fine-tuning under autocast: gradients of the input and of every parameter (conv weights, BN
    weight and bias through the folded scale and bias), fused backward kernels in the autocast dtype."""
    _skip_unsupported(backend, dtype, device)
    eager, fast, ref_module = _modules(factory, device, backend, dtype)
    x = torch.randn(shape, device=device)
    g = torch.randn((shape[0], fast.out_chs) + shape[2:], device=device)

    ref = _forward_backward(ref_module, x, g, dtype, device, autocast=False)
    eager_grads = _forward_backward(eager, x, g, dtype, device, autocast=True)
    with record_fused_runs(device, backend) as runs:
        fused_grads = _forward_backward(fast, x, g, dtype, device, autocast=True)
    assert fused_grads["out"].dtype == eager_grads["out"].dtype == dtype
    assert not runs.convs
    has_attention = name.startswith("v2")
    assert dict(runs.counts) == {"ghost_fwd": 1, "ghost_bwd": 1,
                                 **({"dfc_fwd": 1, "dfc_bwd": 1} if has_attention else {})}
    assert fused_grads.keys() == ref.keys()
    for key in ref:  # float32: the parameters' and the input's dtype
        assert fused_grads[key].dtype == eager_grads[key].dtype, key
    _check_errors(fused_grads, eager_grads, ref, dtype)


@pytest.mark.parametrize("backend", kernel_backends.NAMES)
def test_autocast_follows_dtype_and_updates(backend, device):
    """Under no_grad and autocast the fused ops see the live parameters (no cache): an update between two calls
    takes effect, and autocast off again runs float32."""
    eager, fast, _ = _modules(lambda: timm_ghost.GhostModuleV2(8, 12), device, backend)
    x = torch.randn(1, 8, 6, 6, device=device)
    with torch.no_grad():
        with torch.autocast(device, dtype=torch.float16):
            fast(x)
            eager.cheap_operation[1].weight.mul_(1.5)  # shared nothing: update both copies alike
            fast.cheap_operation[1].weight.mul_(1.5)
            out, ref = fast(x), eager(x)
        assert out.dtype == ref.dtype == torch.float16
        assert rel_error(out, ref) <= 2 * REL_TOL[torch.float16]
        out32 = fast(x)  # autocast off again: float32 weights
        assert out32.dtype == torch.float32 and rel_error(out32, eager(x)) <= REL_TOL[torch.float32]


def test_autocast_float64_input_is_left_alone(device):
    """Autocast does not cast float64: a float64 module under autocast runs fused in float64."""
    eager, fast, _ = _modules(lambda: timm_ghost.GhostModuleV2(8, 12), device, "triton")
    eager, fast = eager.double(), fast.double()
    x = torch.randn(1, 8, 6, 6, device=device, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16):
        out, ref = fast(x), eager(x)
    assert out.dtype == ref.dtype == torch.float64
    assert rel_error(out, ref) <= 1e-12


@pytest.mark.parametrize("backend", kernel_backends.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,factory,shape", MODULES, ids=[m[0] for m in MODULES])
def test_autocast_train_mode_matches_eager_autocast(name, factory, shape, dtype, backend, device):
    """Training mode under autocast: BatchNorm with batch statistics computed by the statistics kernels from the
    autocast-dtype input and weights (accumulated in float32), the fused op in the autocast dtype, the DFC branch
    eager (autocast). Output, gradients and running statistics against the float64 train-mode reference.

    The DFC branch's own parameters and statistics are computed by eager autocast in both runs, so its rounding
    (over DESIGN.md's float16 bound in eager itself on these small layers) is eager's: they are held to eager's
    error against the reference (x2: their upstream gradient, the gate's, comes from the fused backward)."""
    _skip_unsupported(backend, dtype, device)
    eager, fast, ref_module = _modules(factory, device, backend, dtype)
    for m in (eager, fast, ref_module):
        m.train()
    x = torch.randn(shape, device=device) + 0.5
    g = torch.randn((shape[0], fast.out_chs) + shape[2:], device=device)

    ref = _forward_backward(ref_module, x, g, dtype, device, autocast=False, running=True)
    eager_res = _forward_backward(eager, x, g, dtype, device, autocast=True, running=True)
    with record_fused_runs(device, backend) as runs:
        fused = _forward_backward(fast, x, g, dtype, device, autocast=True, running=True)
    assert fused["out"].dtype == eager_res["out"].dtype == dtype
    ghost_convs = [c for part in (fast.primary_conv, fast.cheap_operation) for c in part.modules()
                   if isinstance(c, nn.Conv2d)]
    assert not [c for c in runs.convs if any(c is k for k in ghost_convs)], "eager convs ran in the Ghost part"
    assert dict(runs.counts) == {"ghost_fwd": 3, "ghost_bwd": 3}
    dfc = [k for k in ref if k.startswith("short_conv.")]
    for k in dfc:
        f, e = rel_error(fused[k], ref[k]), rel_error(eager_res[k], ref[k])
        assert f <= max(REL_TOL[dtype], 2 * e), f"{k}: fused {f:.2e}, eager {e:.2e}"
    ghost = [k for k in ref if k not in dfc]
    _check_errors(*({k: d[k] for k in ghost} for d in (fused, eager_res, ref)), dtype)
