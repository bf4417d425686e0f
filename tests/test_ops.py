"""The op registry: opcheck of every custom op on every backend, the fake kernels against the kernels (shapes,
dtypes, strides), the registered ops' own argument checks, float64 gradcheck of the op-level autograd (x, weights and
every BatchNorm tensor, through the chain rule of the fold), torch.compile(fullgraph=True), backend selection and
`auto`.

BatchNorms are live tensors (`BatchNormParams`); the registered ops `torch.ops.ghostfast.*` take each as five flat
arguments (bnK_weight, bnK_bias, bnK_mean, bnK_var, bnK_eps)."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import ghostfast
from ghostfast import ops, reference
from ghostfast.backends import BACKENDS, Backend, GhostfastFallbackWarning, GhostfastUnsupported
from ghostfast.reference import BatchNormParams
from kernel_backends import COMPILED, NAMES as FUSED
from numerics import assert_close_rel

ALL = FUSED + [n for n in ["reference"] if n not in FUSED]
STATS_BACKENDS = [b for b in ALL if b != "cuda"]  # cuda's statistics run in Triton
STATS_FUSED = [b for b in STATS_BACKENDS if b != "reference"]
GM = torch.ops.ghostfast.ghost_module.default
GM_STATS = torch.ops.ghostfast.ghost_module_stats.default
DFC = torch.ops.ghostfast.dfc.default
GM_BWD = torch.ops.ghostfast.ghost_module_backward.default
GM_STATS_BWD = torch.ops.ghostfast.ghost_module_stats_backward.default
DFC_BWD = torch.ops.ghostfast.dfc_backward.default


def make_bn(c, device, dtype=torch.float32, eps=1e-5):
    return BatchNormParams(torch.rand(c, device=device, dtype=dtype) + 0.5,
                           torch.randn(c, device=device, dtype=dtype) * 0.5,
                           torch.randn(c, device=device, dtype=dtype) * 0.5,
                           torch.rand(c, device=device, dtype=dtype) + 0.5, eps)


def ghost_args(device, dtype=torch.float32, n=2, c_in=5, init=4, ratio=3, dw=3, h=6, w=5, bn_dtype=None):
    """[x, primary_weight, bn1, cheap_weight, bn2]; out_channels init * ratio = 12 by default."""
    cheap = init * (ratio - 1)
    return [torch.randn(n, c_in, h, w, device=device, dtype=dtype),
            torch.randn(init, c_in, 1, 1, device=device, dtype=dtype), make_bn(init, device, bn_dtype or dtype, 1e-5),
            torch.randn(cheap, 1, dw, dw, device=device, dtype=dtype), make_bn(cheap, device, bn_dtype or dtype, 1e-3)]


def dfc_args(device, dtype=torch.float32, n=2, c_in=5, c=6, h=6, w=7):
    """[x, conv_weight, bn3, h_weight, bn4, v_weight, bn5]."""
    return [torch.randn(n, c_in, h, w, device=device, dtype=dtype),
            torch.randn(c, c_in, 1, 1, device=device, dtype=dtype), make_bn(c, device, dtype, 1e-5),
            torch.randn(c, 1, 1, 5, device=device, dtype=dtype), make_bn(c, device, dtype, 1e-3),
            torch.randn(c, 1, 5, 1, device=device, dtype=dtype), make_bn(c, device, dtype, 0.1)]


def flat(args):
    """The registered ops' flat arguments: each BatchNormParams as its five."""
    out = []
    for a in args:
        out.extend(a if isinstance(a, BatchNormParams) else [a])
    return out


def grad_leaves(args):
    """`args` with every tensor (BatchNorm tensors included) a leaf that requires grad."""
    def leaf(t):
        return t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t

    return [BatchNormParams(*map(leaf, a)) if isinstance(a, BatchNormParams) else leaf(a) for a in args]


def tensors(args):
    return [t for t in flat(args) if isinstance(t, torch.Tensor)]


def fold64(bn, c, device):
    """A BatchNorm folded in float64 (differentiable through its tensors)."""
    if all(t is None for t in bn.tensors()):
        return reference.fold_bn_vectors(bn, c, torch.float64, device)
    return reference.fold_bn(bn, dtype=torch.float64)


def ghost_ref(args, out_channels, relu=True, gate=None, gate_mode="nearest"):
    x, w1, bn1, w2, bn2 = args
    return reference.ghost_module_forward(x.double(), w1.double(), *fold64(bn1, w1.shape[0], x.device), w2.double(),
                                          *fold64(bn2, w2.shape[0], x.device), out_channels, relu,
                                          None if gate is None else gate.double(), gate_mode)


def dfc_ref(args, mode):
    x, cw, bn3, hw, bn4, vw, bn5 = args
    c = cw.shape[0]
    folded = [cw.double(), *fold64(bn3, c, x.device), hw.double(), *fold64(bn4, c, x.device), vw.double(),
              *fold64(bn5, c, x.device)]
    if mode == "gate":
        return reference.dfc_gate_forward(x.double(), *folded)
    return reference.dfc_attention_forward(x.double(), *folded, mode=mode)


def stats_ref(args, relu, stage):
    x, w1, bn1, w2, _ = args
    return reference.ghost_module_stats(x.double(), w1.double(), *fold64(bn1, w1.shape[0], x.device), w2.double(),
                                        relu, stage)


# ---- opcheck ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_ops_opcheck_ghost_module(backend, device):
    args = grad_leaves(ghost_args(device))
    gate = torch.rand(2, 11, 3, 2, device=device, requires_grad=True)
    torch.library.opcheck(GM, (*flat(args), 11, "relu", gate, "bilinear", backend))
    # BatchNorms with missing tensors: bn1 affine=False (no weight, bias), bn2 none at all
    args[2] = args[2]._replace(weight=None, bias=None)
    args[4] = BatchNormParams()
    torch.library.opcheck(GM, (*flat(args), 12, "none", None, "nearest", backend))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ops.DFC_MODES)
def test_ops_opcheck_dfc(mode, backend, device):
    args = grad_leaves(dfc_args(device))
    args[4] = args[4]._replace(mean=None, var=None)  # a plain affine stage
    torch.library.opcheck(DFC, (*flat(args), mode, backend))


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_ops_opcheck_ghost_module_stats(backend, stage, device):
    x, w1, bn1, w2, _ = grad_leaves(ghost_args(device))
    torch.library.opcheck(GM_STATS, (x, w1, *bn1, w2, "relu", stage, backend))


@pytest.mark.parametrize("backend", ALL)
def test_ops_opcheck_backward_ops(backend, device):
    """The backward kernels' own ops (no autograd of their own): schema, fake kernel, AOT dispatch."""
    opcheck = torch.library.opcheck

    x, w1, bn1, w2, bn2 = ghost_args(device)
    s1, b1 = reference.fold_bn_vectors(bn1, 4, torch.float32, device)
    s2, b2 = reference.fold_bn_vectors(bn2, 8, torch.float32, device)
    gate = torch.rand(2, 11, 3, 2, device=device)
    go = torch.randn(2, 11, 6, 5, device=device)
    opcheck(GM_BWD, (go, x, w1, s1, b1, w2, s2, b2, 11, "relu", gate, "bilinear", [True] * 8, backend))
    opcheck(GM_BWD, (go, x, w1, s1, b1, w2, s2, b2, 11, "relu", None, "nearest",
                     [False, True, True, False, True, False, True, False], backend))
    d = dfc_args(device)
    folded = [d[1], *reference.fold_bn_vectors(d[2], 6, torch.float32, device), d[3],
              *reference.fold_bn_vectors(d[4], 6, torch.float32, device), d[5],
              *reference.fold_bn_vectors(d[6], 6, torch.float32, device)]
    opcheck(DFC_BWD, (torch.randn(2, 6, 3, 3, device=device), d[0], *folded, "gate", [True] * 10, backend))
    if backend in STATS_BACKENDS:
        m = torch.randn(8, device=device)
        opcheck(GM_STATS_BWD, (x, w1, s1, b1, w2, "relu", 2, torch.randn(8, device=device),
                                torch.randn(8, device=device), m, [True] * 5, backend))


@pytest.mark.parametrize("backend", ALL)
def test_ops_registered_backward_ops_match_autograd(backend, device):
    """The backward ops called directly (as compiled and exported graphs call them), on every backend: each
    gradient against float64 autograd of the reference math, with outputs that were not asked for left empty."""
    x, w1, bn1, w2, bn2 = ghost_args(device)
    folded = [*reference.fold_bn_vectors(bn1, 4, torch.float32, device),
              *reference.fold_bn_vectors(bn2, 8, torch.float32, device)]
    gate = torch.rand(2, 11, 3, 2, device=device)
    go = torch.randn(2, 11, 6, 5, device=device)
    inputs = [x, w1, folded[0], folded[1], w2, folded[2], folded[3], gate]
    needs = [True, True, False, True, True, True, False, True]
    got = GM_BWD(go, x, w1, *folded[:2], w2, *folded[2:], 11, "relu", gate, "bilinear", needs, backend)
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = reference.ghost_module_forward(*leaves[:7], 11, True, leaves[7], "bilinear")
    want = torch.autograd.grad(out, leaves, go.double())
    for i, (a, b, need) in enumerate(zip(got, want, needs)):
        if not need:
            assert a.numel() == 0, f"ghost_module_backward output {i} was not asked for"
            continue
        assert a.dtype == inputs[i].dtype and a.shape == inputs[i].shape
        assert_close_rel(a, b, torch.float32)
    d = dfc_args(device)
    inputs = [d[0], d[1], *reference.fold_bn_vectors(d[2], 6, torch.float32, device), d[3],
              *reference.fold_bn_vectors(d[4], 6, torch.float32, device), d[5],
              *reference.fold_bn_vectors(d[6], 6, torch.float32, device)]
    grad = torch.randn(2, 6, 6, 7, device=device)
    got = DFC_BWD(grad, *inputs, "nearest", [True] * 10, backend)
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    want = torch.autograd.grad(reference.dfc_attention_forward(*leaves, mode="nearest"), leaves, grad.double())
    for a, b in zip(got, want):
        assert_close_rel(a, b, torch.float32)


# ---- the fake kernels give what the kernels give ---------------------------------------------------------------


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _fake_matches_real(op, args):
    real = _as_list(op(*args))
    with FakeTensorMode() as mode:
        fake = _as_list(op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]))
    assert len(real) == len(fake)
    for i, (r, f) in enumerate(zip(real, fake)):
        meta = [(tuple(t.shape), t.dtype, t.stride(), t.storage_offset()) for t in (r, f)]
        assert meta[0] == meta[1], f"output {i}: kernel (shape, dtype, strides, storage offset) {meta[0]}, fake " \
                                   f"{meta[1]}"


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a channel slice: no dense layout
        big = torch.randn(t.shape[0], t.shape[1] + 3, *t.shape[2:], device=t.device, dtype=t.dtype)
        big[:, 1:1 + t.shape[1]] = t
        return big[:, 1:1 + t.shape[1]]
    return t


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("backend", ALL)
def test_ops_fake_kernels_match_kernels(backend, layout, device):
    dtype = torch.float16
    g = ghost_args(device, dtype, bn_dtype=torch.float32)
    g[0] = _layout(g[0], layout)
    gate = torch.rand(2, 11, 3, 2, device=device, dtype=dtype)
    _fake_matches_real(GM, (*flat(g), 11, "relu", gate, "bilinear", backend))
    _fake_matches_real(GM, (*flat(g), 12, "none", None, "nearest", backend))
    d = dfc_args(device, dtype)
    d[0] = _layout(d[0], layout)
    for mode in ops.DFC_MODES:
        _fake_matches_real(DFC, (*flat(d), mode, backend))
    if backend in STATS_BACKENDS:
        for stage in (1, 2):
            _fake_matches_real(GM_STATS, (g[0], g[1], *g[2], g[3], "relu", stage, backend))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("backend", ALL)
def test_ops_fake_backward_kernels_match_kernels(backend, layout, device):
    dtype = torch.float16
    g = ghost_args(device, dtype, bn_dtype=torch.float32)
    g[0] = _layout(g[0], layout)
    gate = torch.rand(2, 11, 3, 2, device=device, dtype=dtype)
    s1, b1 = reference.fold_bn_vectors(g[2], 4, torch.float32, device)
    s2, b2 = reference.fold_bn_vectors(g[4], 8, torch.float32, device)
    go = _layout(torch.randn(2, 11, 6, 5, device=device, dtype=dtype), layout)
    for needs in ([True] * 8, [True, False, True, False, False, True, False, False]):
        _fake_matches_real(GM_BWD, (go, g[0], g[1], s1, b1, g[3], s2, b2, 11, "relu", gate, "bilinear", needs,
                                    backend))
    d = dfc_args(device, dtype)
    d[0] = _layout(d[0], layout)
    folded = [d[1], *reference.fold_bn_vectors(d[2], 6, torch.float32, device), d[3],
              *reference.fold_bn_vectors(d[4], 6, torch.float32, device), d[5],
              *reference.fold_bn_vectors(d[6], 6, torch.float32, device)]
    for mode, shape in (("gate", (2, 6, 3, 3)), ("bilinear", (2, 6, 6, 7))):
        grad = _layout(torch.randn(shape, device=device, dtype=dtype), layout)
        _fake_matches_real(DFC_BWD, (grad, d[0], *folded, mode, [True] * 10, backend))
        _fake_matches_real(DFC_BWD, (grad, d[0], *folded, mode, [False] * 4 + [True] * 6, backend))
    if backend in STATS_BACKENDS:
        vec = [torch.randn(8, device=device) for _ in range(3)]
        for needs in ([True] * 5, [False, True, False, True, True]):
            _fake_matches_real(GM_STATS_BWD, (g[0], g[1], s1, b1, g[3], "relu", 2, *vec, needs, backend))


# ---- the registered ops check their own arguments, on every backend --------------------------------------------


def _raises(exc, match, op, *args):
    """The registered op raises, and so does its fake kernel (a compiled or exported graph meets that first)."""
    with pytest.raises(exc, match=match):
        op(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(exc, match=match):
            op(*fake)


@pytest.mark.parametrize("backend", ALL)
def test_ops_registered_ghost_module_checks_arguments(backend, device):
    x, w1, bn1, w2, bn2 = ghost_args(device)
    gate = torch.rand(2, 11, 3, 2, device=device)

    def call(x=x, w1=w1, bn1=bn1, w2=w2, bn2=bn2, out_channels=11, gate=gate, mode="bilinear", backend=backend):
        return (GM, x, w1, *bn1, w2, *bn2, out_channels, "relu", gate, mode, backend)

    _raises(ValueError, r"expected bn1_weight of shape \(4,\), got \(3,\)",
            *call(bn1=bn1._replace(weight=bn1.weight[:3])))
    _raises(ValueError, r"expected bn2_var of shape \(8,\), got \(7,\)", *call(bn2=bn2._replace(var=bn2.var[:7])))
    _raises(ValueError, r"expected bn1_mean of shape \(4,\), got \(2, 2\)",
            *call(bn1=bn1._replace(mean=bn1.mean.view(2, 2))))
    _raises(ValueError, r"expected gate of shape \(2, 11, Hg, Wg\)", *call(gate=gate[:, :10]))
    _raises(ValueError, r"expected gate of shape", *call(gate=gate[:1]))
    _raises(ValueError, r"expected gate of shape", *call(gate=gate[:, :, :0]))
    _raises(ValueError, r"expected gate of shape", *call(gate=gate[0]))
    _raises(TypeError, r"expected gate dtype torch.float32", *call(gate=gate.double()))
    _raises(ValueError, r"gate_mode must be one of \('nearest', 'bilinear'\), got 'cubic'", *call(mode="cubic"))
    _raises(ValueError, r"backend must be one of .*got 'tritonn'", *call(backend="tritonn"))
    _raises(ValueError, r"backend must be one of .*got 'auto'", *call(backend="auto"))
    _raises(ValueError, r"out_channels must be in \[1, 12\], got 13", *call(out_channels=13))
    _raises(ValueError, r"out_channels must be in \[1, 12\], got 0", *call(out_channels=0, gate=None))
    _raises(ValueError, r"primary_weight \[init, C_in, 1, 1\] with init >= 1", *call(w1=w1[:0]))
    _raises(ValueError, r"cheap_weight has 0 output channels", *call(w2=w2[:0]))
    _raises(ValueError, r"cheap_weight has 6 output channels; expected a positive multiple of init=4",
            *call(w2=w2[:6]))
    _raises(ValueError, r"expected input with 5 channels, got 4", *call(x=x[:, :4]))


@pytest.mark.parametrize("backend", ALL)
def test_ops_registered_dfc_checks_arguments(backend, device):
    x, cw, bn3, hw, bn4, vw, bn5 = dfc_args(device)

    def call(x=x, cw=cw, bn3=bn3, hw=hw, bn4=bn4, vw=vw, bn5=bn5, mode="bilinear", backend=backend):
        return (DFC, x, cw, *bn3, hw, *bn4, vw, *bn5, mode, backend)

    _raises(ValueError, r"expected bn3_mean of shape \(6,\), got \(5,\)", *call(bn3=bn3._replace(mean=bn3.mean[:5])))
    _raises(ValueError, r"expected bn4_weight of shape \(6,\)", *call(bn4=bn4._replace(weight=bn4.weight[:1])))
    _raises(ValueError, r"expected bn5_bias of shape \(6,\)", *call(bn5=bn5._replace(bias=bn5.bias[:5])))
    _raises(ValueError, r"expected bn5_var of shape \(6,\)", *call(bn5=bn5._replace(var=bn5.var[:0])))
    _raises(ValueError, r"mode must be one of \('gate', 'nearest', 'bilinear'\), got 'area'", *call(mode="area"))
    _raises(ValueError, r"backend must be one of .*got 'cudaa'", *call(backend="cudaa"))
    _raises(ValueError, r"1x1 conv_weight \[C, C_in, 1, 1\] with C >= 1", *call(cw=cw[:0]))
    _raises(ValueError, r"expected h_weight of shape \(6, 1, 1, 5\)", *call(hw=hw[:5]))
    _raises(ValueError, r"expected v_weight of shape \(6, 1, 5, 1\)", *call(vw=hw))
    _raises(ValueError, r"H and W >= 2", *call(x=x[:, :, :1]))


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_ops_registered_ghost_module_stats_checks_arguments(backend, device):
    x, w1, bn1, w2, _ = ghost_args(device)
    _raises(ValueError, r"stage must be 1 or 2, got 3", GM_STATS, x, w1, *bn1, w2, "relu", 3, backend)
    _raises(ValueError, r"expected bn1_var of shape \(4,\)", GM_STATS, x, w1, *bn1._replace(var=bn1.var[:3]), w2,
            "relu", 2, backend)
    _raises(ValueError, r"more than 1 value per channel", GM_STATS, x[:1, :, :1, :1], w1, *bn1, w2, "relu", 1, backend)
    _raises(ValueError, r"init >= 1", GM_STATS, x, w1[:0], *bn1, w2, "relu", 1, backend)
    _raises(ValueError, r"backend must be one of .*got 'tritonn'", GM_STATS, x, w1, *bn1, w2, "relu", 1, "tritonn")


@pytest.mark.parametrize("backend", ALL)
def test_ops_registered_backward_ops_check_arguments(backend, device):
    x, w1, bn1, w2, bn2 = ghost_args(device)
    s1, b1 = reference.fold_bn_vectors(bn1, 4, torch.float32, device)
    s2, b2 = reference.fold_bn_vectors(bn2, 8, torch.float32, device)
    go = torch.randn(2, 12, 6, 5, device=device)
    gate = torch.rand(2, 12, 3, 2, device=device)

    def gm(go=go, s1=s1, s2=s2, gate=gate, needs=[True] * 8, backend=backend):
        return (GM_BWD, go, x, w1, s1, b1, w2, s2, b2, 12, "relu", gate, "bilinear", needs, backend)

    _raises(ValueError, r"expected primary_scale of shape \(4,\), got \(3,\)", *gm(s1=s1[:3]))
    _raises(ValueError, r"expected cheap_scale of shape \(8,\), got \(7,\)", *gm(s2=s2[:7]))
    _raises(ValueError, r"expected gate of shape", *gm(gate=gate[:, :11]))
    _raises(ValueError, r"expected grad_out of shape \(2, 12, 6, 5\)", *gm(go=go[:, :, :5]))
    _raises(ValueError, r"expected needs to be 8 bools", *gm(needs=[True] * 7))
    _raises(ValueError, r"backend must be one of", *gm(backend="tritonn"))
    d = dfc_args(device)
    folded = [d[1], *reference.fold_bn_vectors(d[2], 6, torch.float32, device), d[3],
              *reference.fold_bn_vectors(d[4], 6, torch.float32, device), d[5],
              *reference.fold_bn_vectors(d[6], 6, torch.float32, device)]
    grad = torch.randn(2, 6, 3, 3, device=device)
    short = list(folded)
    short[8] = short[8][:5]  # v_bias
    _raises(ValueError, r"expected v_bias of shape \(6,\), got \(5,\)", DFC_BWD, grad, d[0], *short, "gate",
            [True] * 10, backend)
    _raises(ValueError, r"expected grad of shape \(2, 6, 6, 7\)", DFC_BWD, grad, d[0], *folded, "nearest",
            [True] * 10, backend)
    _raises(ValueError, r"mode must be one of", DFC_BWD, grad, d[0], *folded, "cubic", [True] * 10, backend)


def test_ops_public_argument_errors(device):
    x, w1, bn1, w2, bn2 = ghost_args(device)
    with pytest.raises(TypeError, match=r"expected out_channels to be an int, got 3.7"):
        ops.ghost_module(x, w1, bn1, w2, bn2, out_channels=3.7)
    with pytest.raises(TypeError, match=r"expected out_channels to be an int"):
        ops.ghost_module(x, w1, bn1, w2, bn2, out_channels="12")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'tritonn'"):
        ops.ghost_module(x, w1, bn1, w2, bn2, backend="tritonn")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cpuu'"):
        ops.dfc(*dfc_args(device), backend="cpuu")
    with pytest.raises(ValueError, match=r"init >= 1"):
        ops.ghost_module(x, w1[:0], BatchNormParams(), w2, bn2)
    with pytest.raises(ValueError, match=r"cheap_weight has 0 output channels"):
        ops.ghost_module(x, w1, bn1, w2[:0], BatchNormParams(), out_channels=4)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        ops.dfc_attention(*dfc_args(device), mode="gate")
    with pytest.raises(TypeError, match=r"bn1: expected a ghostfast.reference.BatchNormParams"):
        ops.ghost_module(x, w1, (bn1.weight, bn1.bias), w2, bn2)
    with pytest.raises(TypeError, match=r"expected bn2_eps to be a float"):
        ops.ghost_module(x, w1, bn1, w2, bn2._replace(eps=None))


def test_ops_bad_input_errors(device):
    x, w1, bn1, w2, bn2 = ghost_args(device)
    with pytest.raises(ValueError, match="expected input with 5 channels, got 4"):
        ops.ghost_module(x[:, :4], w1, bn1, w2, bn2)
    with pytest.raises(ValueError, match="4-D"):
        ops.ghost_module(x[0], w1, bn1, w2, bn2)
    with pytest.raises(TypeError, match="primary_weight of dtype torch.float32"):
        ops.ghost_module(x, w1.double(), bn1, w2, bn2)
    with pytest.raises(ValueError, match=r"bn1_weight of shape \(4,\)"):
        ops.ghost_module(x, w1, bn1._replace(weight=bn1.weight[:3]), w2, bn2)
    with pytest.raises(TypeError, match="expected bn1_var of a floating dtype"):
        ops.ghost_module(x, w1, bn1._replace(var=bn1.var.long()), w2, bn2)
    with pytest.raises(ValueError, match="depthwise size"):
        ops.ghost_module(x, w1, bn1, torch.randn(8, 1, 9, 9, device=device), bn2)
    with pytest.raises(ValueError, match="out_channels must be in"):
        ops.ghost_module(x, w1, bn1, w2, bn2, out_channels=13)
    with pytest.raises(ValueError, match="gate_mode"):
        ops.ghost_module(x, w1, bn1, w2, bn2, gate=torch.rand(2, 12, 3, 2, device=device), gate_mode="cubic")
    with pytest.raises(ValueError, match="on meta"):
        ops.ghost_module(x, w1.to("meta"), bn1, w2, bn2)
    with pytest.raises(ValueError, match="bn2_mean is on meta"):
        ops.ghost_module(x, w1, bn1, w2, bn2._replace(mean=bn2.mean.to("meta")))
    with pytest.raises(TypeError, match="floating"):
        ops.ghost_module(x.long(), w1, bn1, w2, bn2)
    d = dfc_args(device)
    with pytest.raises(ValueError, match=r"h_weight of shape \(6, 1, 1, 5\)"):
        ops.dfc_gate(d[0], d[1], d[2], d[5], d[4], d[5], d[6])
    with pytest.raises(ValueError, match="H and W >= 2"):
        ops.dfc_gate(d[0][:, :, :1], *d[1:])


# ---- values and gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_ops_public_functions_match_reference(mode, backend, device):
    g_args = ghost_args(device)
    d_args = dfc_args(device, c=11, h=6, w=5)
    gate = ops.dfc_gate(*d_args, backend=backend, strict=True)
    assert_close_rel(gate, dfc_ref(d_args, "gate"), torch.float32)
    out = ops.ghost_module(*g_args, out_channels=11, gate=gate, gate_mode=mode, backend=backend, strict=True)
    assert_close_rel(out, ghost_ref(g_args, 11, True, gate, mode), torch.float32)
    full = ops.dfc_attention(*d_args, mode=mode, backend=backend, strict=True)
    assert_close_rel(full, dfc_ref(d_args, mode), torch.float32)
    assert torch.equal(ops.dfc(*d_args, mode=mode, backend=backend, strict=True), full)


@pytest.mark.parametrize("backend", ALL)
def test_ops_batch_norm_forms(backend, device):
    """What users pass as a BatchNorm: BatchNormParams, an eval-mode nn.BatchNorm2d, a 5-tuple, None."""
    x, w1, bn1, w2, bn2 = ghost_args(device)
    module = nn.BatchNorm2d(8, eps=1e-3).to(device).eval()
    with torch.no_grad():
        for t, v in zip((module.weight, module.bias, module.running_mean, module.running_var), bn2.tensors()):
            t.copy_(v)
    want = ghost_ref([x, w1, bn1, w2, bn2], 12)
    for form in (module, tuple(bn2)):
        assert_close_rel(ops.ghost_module(x, w1, tuple(bn1), w2, form, backend=backend, strict=True), want,
                         torch.float32)
    none = ops.ghost_module(x, w1, None, w2, None, backend=backend, strict=True)
    assert_close_rel(none, ghost_ref([x, w1, BatchNormParams(), w2, BatchNormParams()], 12), torch.float32)


@pytest.mark.parametrize("backend", ALL)
def test_ops_follow_live_batch_norm_updates(backend, device):
    """No fold is cached: in-place updates of the BatchNorm tensors (an optimizer step, .data edits) show in the
    next call."""
    args = ghost_args(device)
    first = ops.ghost_module(*args, backend=backend, strict=True)
    with torch.no_grad():
        args[2].weight.mul_(1.5)
        args[4].var.add_(1.0)
        args[4].mean.sub_(0.3)
    second = ops.ghost_module(*args, backend=backend, strict=True)
    assert not torch.allclose(first, second)
    assert_close_rel(second, ghost_ref(args, 12), torch.float32)


def _ghost_gradcheck_fn(eps1, eps2, backend, out_channels, gate_mode):
    def fn(x, w1, a1, b1, m1, v1, w2, a2, b2, m2, v2, gate):
        return ops.ghost_module(x, w1, BatchNormParams(a1, b1, m1, v1, eps1), w2, BatchNormParams(a2, b2, m2, v2, eps2),
                                out_channels=out_channels, gate=gate, gate_mode=gate_mode, backend=backend,
                                strict=True)

    return fn


@pytest.mark.parametrize("backend", ALL)
def test_ops_gradcheck_float64(backend, device):
    """x, both weights, every BatchNorm tensor (weight, bias, running mean and var: the chain rule through the
    fold) and the gate."""
    g = grad_leaves(ghost_args(device, torch.float64, n=1, c_in=3, init=2, h=4, w=3))
    gate = torch.rand(1, 5, 2, 1, device=device, dtype=torch.float64, requires_grad=True)
    inputs = (*tensors(g), gate)
    assert len(inputs) == 12
    assert torch.autograd.gradcheck(_ghost_gradcheck_fn(g[2].eps, g[4].eps, backend, 5, "bilinear"), inputs)

    d = grad_leaves(dfc_args(device, torch.float64, n=1, c_in=3, c=2, h=4, w=5))
    eps = [d[2].eps, d[4].eps, d[6].eps]

    def dfc_fn(mode):
        def fn(x, cw, a3, b3, m3, v3, hw, a4, b4, m4, v4, vw, a5, b5, m5, v5):
            return ops.dfc(x, cw, BatchNormParams(a3, b3, m3, v3, eps[0]), hw, BatchNormParams(a4, b4, m4, v4, eps[1]),
                           vw, BatchNormParams(a5, b5, m5, v5, eps[2]), mode, backend=backend, strict=True)

        return fn

    for mode in ops.DFC_MODES:  # fast mode (a random projection of the Jacobian): the interpreter is slow
        assert torch.autograd.gradcheck(dfc_fn(mode), tuple(tensors(d)), fast_mode=True)


@pytest.mark.parametrize("backend", ALL)
def test_ops_gradcheck_missing_bn_tensors_float64(backend, device):
    """BatchNorms with some tensors None: the gradients of those present."""
    g = grad_leaves(ghost_args(device, torch.float64, n=1, c_in=3, init=2, h=4, w=3))
    bn1 = g[2]._replace(mean=None, var=None)
    bn2 = g[4]._replace(weight=None)
    leaves = [g[0], g[1], bn1.weight, bn1.bias, g[3], bn2.bias, bn2.mean, bn2.var]

    def fn(x, w1, a1, b1, w2, b2, m2, v2):
        return ops.ghost_module(x, w1, BatchNormParams(a1, b1, None, None, bn1.eps), w2,
                                BatchNormParams(None, b2, m2, v2, bn2.eps), backend=backend, strict=True)

    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=True)


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_ops_gradcheck_ghost_module_stats_float64(backend, device):
    g = grad_leaves(ghost_args(device, torch.float64, n=2, c_in=3, init=2, h=4, w=3))
    x, w1, bn1, w2, _ = g
    eps = bn1.eps

    for stage in (1, 2):
        for relu in (True, False):
            def fn(x, w1, a1, b1, m1, v1, w2):
                return ops.ghost_module_stats(x, w1, BatchNormParams(a1, b1, m1, v1, eps), w2, act=relu,
                                              stage=stage, backend=backend)

            assert torch.autograd.gradcheck(fn, (x, w1, *bn1.tensors(), w2), fast_mode=True)


@pytest.mark.parametrize("backend", ALL)
def test_ops_backward_matches_reference_autograd(backend, device):
    """GhostModuleV2's two ops chained (the DFC gate into the Ghost module), float32: the gradients of every input,
    BatchNorm tensors included, against float64 autograd through the reference."""
    g = grad_leaves(ghost_args(device, n=2, c_in=6, init=4, ratio=2, h=7, w=6))
    d = grad_leaves(dfc_args(device, n=2, c_in=6, c=7, h=7, w=6))
    d[0] = g[0]
    gate = ops.dfc_gate(*d, backend=backend)
    out = ops.ghost_module(*g, out_channels=7, gate=gate, backend=backend)
    leaves = tensors(g) + tensors(d[1:])
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    dbl = [t.detach().double().requires_grad_(True) for t in leaves]

    def unflat(ts, args):
        it = iter(ts)
        return [BatchNormParams(*(next(it) for _ in range(4)), a.eps) if isinstance(a, BatchNormParams) else next(it)
                for a in args]

    g64 = unflat(dbl[:len(tensors(g))], g)
    d64 = [g64[0]] + unflat(dbl[len(tensors(g)):], d[1:])
    ref = ghost_ref(g64, 7, True, dfc_ref(d64, "gate"))
    ref_grads = torch.autograd.grad(ref, dbl, grad_out.double())
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        try:
            assert_close_rel(got, want, torch.float32)
        except AssertionError as err:
            raise AssertionError(f"leaf {i}: {err}") from None


@pytest.mark.parametrize("backend", ALL)
def test_ops_gradient_dtypes_follow_each_tensor(backend, device):
    """float16 input with float32 BatchNorms (fp16 autocast): each gradient in its own tensor's dtype."""
    if ghostfast.backends.dtype_unsupported(backend, torch.float16):
        pytest.skip(ghostfast.backends.dtype_unsupported(backend, torch.float16))
    g = grad_leaves(ghost_args(device, torch.float16, bn_dtype=torch.float32))
    out = ops.ghost_module(*g, backend=backend, strict=True)
    leaves = tensors(g)
    grads = torch.autograd.grad(out.float().sum(), leaves)
    for t, gr in zip(leaves, grads):
        assert gr.dtype == t.dtype and gr.shape == t.shape
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(ref)
    g64 = [BatchNormParams(*(next(it) for _ in range(4)), a.eps) if isinstance(a, BatchNormParams) else next(it)
           for a in g]
    want = torch.autograd.grad(ghost_ref(g64, 12).sum(), ref)
    for gr, w in zip(grads, want):
        assert_close_rel(gr, w, torch.float16)


# ---- torch.compile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
def test_ops_torch_compile_fullgraph(backend, device):
    """GhostModuleV2's two ops in one compiled graph, forward and backward (every BatchNorm tensor a leaf)."""
    torch._dynamo.reset()
    g = grad_leaves(ghost_args(device, n=1, c_in=6, init=4, ratio=2, h=6, w=6))
    d = grad_leaves(dfc_args(device, n=1, c_in=6, c=8, h=6, w=6))

    def block(x, g, d):
        gate = ops.dfc(x, *d, mode="gate", backend=backend)
        return ops.ghost_module(x, *g[1:], out_channels=8, gate=gate, gate_mode="nearest", backend=backend)

    eager = block(g[0], g, d[1:])
    leaves = tensors(g) + tensors(d[1:])
    want = torch.autograd.grad(eager.sum(), leaves)
    compiled_block = torch.compile(block, fullgraph=True)
    got = compiled_block(g[0], g, d[1:])
    assert_close_rel(got, eager.detach().double(), torch.float32)
    grads = torch.autograd.grad(got.sum(), leaves)
    for a, b in zip(grads, want):
        assert_close_rel(a, b.double(), torch.float32)


# ---- backends --------------------------------------------------------------------------------------------------


def test_ops_available_backends():
    cpu = ghostfast.available_backends("cpu")
    assert cpu[-1] == "reference"
    assert ("cpu" in cpu) == (ghostfast.backends.load_extension() is not None)
    cuda = ghostfast.available_backends("cuda")
    assert ("triton" in cuda) == (torch.cuda.is_available() and not ghostfast.backends.triton_interpreting())
    assert set(FUSED) <= set(BACKENDS)


def test_ops_compiled_extension_is_built():
    """The README's install builds ghostfast._C (setup.py); only GHOSTFAST_BUILD_C=0 installs without it."""
    import os

    if os.environ.get("GHOSTFAST_BUILD_C", "1") == "0":
        assert ghostfast.backends.load_extension() is None
        return
    ext = ghostfast.backends.load_extension()
    assert ext is not None, ghostfast.backends.extension_error()
    info = ghostfast.backends.build_info()
    assert {"compiler", "torch", "cuda", "cuda_version", "cuda_archs", "openmp", "cpu_isa"} <= set(info)
    assert info["openmp"] is not None  # at::parallel_for is only parallel when built with OpenMP
    assert "cpu" in ghostfast.available_backends("cpu")
    assert ghostfast.backends.stats_backend("cpu", torch.device("cpu")) == ("cpu", None)
    if torch.cuda.is_available() and info["cuda"]:
        assert "cuda" in ghostfast.available_backends("cuda")


@pytest.mark.skipif(not COMPILED or COMPILED[0] != "cpu", reason="needs the compiled cpu backend (CPU test device)")
def test_ops_auto_picks_compiled_cpu_for_cpu_tensors():
    assert ghostfast.backends.resolve_backend("auto", torch.device("cpu")) == ("cpu", None)
    # the Triton interpreter never competes with compiled kernels on CPU
    assert ghostfast.backends.resolve_backend("auto", torch.device("cpu"), torch.float32)[0] == "cpu"


def test_ops_compiled_backend_on_the_wrong_device_falls_back(device):
    ghostfast.backends._warned.clear()
    other = "cuda" if device == "cpu" else "cpu"
    args = ghost_args(device)
    with pytest.warns(GhostfastFallbackWarning, match=f"backend '{other}'"):
        out = ops.ghost_module(*args, backend=other)
    assert_close_rel(out, ghost_ref(args, 12), torch.float32)
    with pytest.raises(GhostfastUnsupported):
        ops.ghost_module(*args, backend=other, strict=True)


def test_ops_strict_and_fallback_for_unavailable_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors then have no Triton backend
    args = ghost_args("cpu")
    ghostfast.backends._warned.clear()
    with pytest.warns(GhostfastFallbackWarning, match="TRITON_INTERPRET"):
        out = ops.ghost_module(*args, backend="triton")
    assert_close_rel(out, ghost_ref(args, 12), torch.float32)
    with pytest.raises(GhostfastUnsupported):
        ops.ghost_module(*args, backend="triton", strict=True)


def _auto_with(monkeypatch, candidates):
    """`auto` resolving to several fused candidates (as on CUDA with triton and cuda), measured afresh."""
    monkeypatch.setattr(ops, "_AUTO_CHOICE", {})
    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **k: ("auto", None))
    monkeypatch.setattr(ops, "auto_candidates", lambda *a, **k: list(candidates))
    ghostfast.backends._warned.clear()


def test_ops_auto_measures_once_and_skips_a_disagreeing_backend(monkeypatch, device):
    """`auto` with several fused candidates times each once per op and shape, caches the winner, and never picks a
    backend whose output disagrees with the reference. Exercised with a stand-in candidate that is wrong."""
    good = FUSED[-1]
    calls = []

    class Wrong(Backend):
        name = "wrong"

        def unavailable(self, device_type):
            return None

        def ghost_module(self, *a):
            calls.append(self.name)
            return BACKENDS["reference"].ghost_module(*a) + 1.0

    def counted(*a, run=BACKENDS[good].ghost_module):
        calls.append(good)
        return run(*a)

    monkeypatch.setitem(BACKENDS, "wrong", Wrong())
    monkeypatch.setattr(BACKENDS[good], "ghost_module", counted)
    _auto_with(monkeypatch, ["wrong", good])
    args = ghost_args(device)
    with pytest.warns(GhostfastFallbackWarning, match="'wrong' disagrees with the reference"):
        out = ops.ghost_module(*args, backend="auto")
    assert_close_rel(out, ghost_ref(args, 12), torch.float32)
    (choice, times), = ops.auto_choices().values()
    assert choice == good and set(times) == {good}
    calls.clear()
    ops.ghost_module(*args, backend="auto")
    assert calls == [good]  # cached: no second measurement


class _Raising(Backend):
    """A candidate whose launch fails (e.g. Triton's OutOfResources, a compile error)."""
    name = "raising"

    def unavailable(self, device_type):
        return None

    def ghost_module(self, *a):
        raise RuntimeError("out of resources: shared memory")

    def dfc(self, *a):
        raise RuntimeError("out of resources: shared memory")


def test_ops_auto_falls_back_when_a_candidate_raises(monkeypatch, device):
    good = FUSED[-1]
    monkeypatch.setitem(BACKENDS, "raising", _Raising())
    _auto_with(monkeypatch, ["raising", good])
    args = ghost_args(device)
    with pytest.warns(GhostfastFallbackWarning, match=r"backend 'raising' failed .*RuntimeError: out of resources"):
        out = ops.ghost_module(*args, backend="auto")
    assert_close_rel(out, ghost_ref(args, 12), torch.float32)
    (choice, times), = ops.auto_choices().values()
    assert choice == good and set(times) == {good}
    d = dfc_args(device)
    with pytest.warns(GhostfastFallbackWarning, match=r"dfc: backend 'raising' failed"):
        gate = ops.dfc(*d, mode="bilinear", backend="auto")
    assert_close_rel(gate, dfc_ref(d, "bilinear"), torch.float32)


def test_ops_auto_uses_the_reference_when_every_candidate_raises(monkeypatch, device):
    monkeypatch.setitem(BACKENDS, "raising", _Raising())
    monkeypatch.setitem(BACKENDS, "raising2", _Raising())
    _auto_with(monkeypatch, ["raising", "raising2"])
    args = ghost_args(device)
    with pytest.warns(GhostfastFallbackWarning, match="failed"):
        out = ops.ghost_module(*args, backend="auto")
    assert_close_rel(out, ghost_ref(args, 12), torch.float32)
    (choice, times), = ops.auto_choices().values()
    assert choice == "reference" and times == {}
    assert_close_rel(ops.ghost_module(*args, backend="auto"), ghost_ref(args, 12), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_ops_empty_batch(backend, device):
    args = ghost_args(device, n=0)
    out = ops.ghost_module(*args, backend=backend, strict=True)
    assert out.shape == (0, 12, 6, 5)
    d = dfc_args(device, n=0)
    assert ops.dfc_attention(*d, backend=backend, strict=True).shape == (0, 6, 6, 7)
    assert ops.dfc_gate(*d, backend=backend, strict=True).shape == (0, 6, 3, 3)


@pytest.mark.parametrize("backend", [n for n in FUSED if n != "reference"])
def test_ops_double_backward_raises_clearly(backend, device):
    args = grad_leaves(ghost_args(device, torch.float64, n=1, c_in=3, init=2, h=4, w=3))
    out = ops.ghost_module(*args, backend=backend)
    (gx,) = torch.autograd.grad((out * out).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", STATS_FUSED)
def test_ops_ghost_module_stats_double_backward_raises_clearly(backend, device):
    x, w1, bn1, w2, _ = grad_leaves(ghost_args(device, torch.float64, n=2, c_in=3, init=2, h=4, w=3))
    mean, var = ops.ghost_module_stats(x, w1, bn1, w2, act=True, stage=2, backend=backend)
    (gx,) = torch.autograd.grad((mean * var).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gx.sum().backward()


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_ops_ghost_module_stats_match_reference(backend, stage, device):
    args = ghost_args(device)
    mean, var = ops.ghost_module_stats(args[0], args[1], args[2], args[3], act=True, stage=stage, backend=backend)
    want_mean, want_var = stats_ref(args, True, stage)
    assert_close_rel(mean, want_mean, torch.float32)
    assert_close_rel(var, want_var, torch.float32)


# ---- the cpu backend's training ops (bn2 on batch statistics; z1 kept) ------------------------------------------

CPU_ONLY = pytest.mark.skipif("cpu" not in COMPILED, reason="ghostfast._C has no CPU kernels in this build")
GM_Z1 = "ghostfast::ghost_module_z1"


def _z1_args(dtype=torch.float32, n=2, init=4, ratio=3, h=6, w=5, layout=torch.contiguous_format):
    """[z1, bn1, cheap_weight, bn2_weight, bn2_bias, bn2_eps] (bn1 with batch-statistics-like mean / var)."""
    cheap = init * (ratio - 1)
    z1 = (torch.randn(n, init, h, w, dtype=dtype) + 0.3).contiguous(memory_format=layout)
    bn1 = make_bn(init, "cpu", dtype)
    return [z1, bn1, torch.randn(cheap, 1, 3, 3, dtype=dtype), torch.rand(cheap, dtype=dtype) + 0.5,
            torch.randn(cheap, dtype=dtype), 1e-3]


@CPU_ONLY
def test_ops_opcheck_cpu_training_ops():
    """The joint and z1 ops and their backward ops: schema, fake kernel, autograd registration, AOT dispatch."""
    opcheck = torch.library.opcheck
    z1, bn1, w2, a2, b2, eps2 = grad_leaves(_z1_args())
    gate = torch.rand(2, 11, 3, 2, requires_grad=True)
    opcheck(torch.ops.ghostfast.ghost_module_z1.default,
            (z1, *bn1, w2, a2, b2, eps2, 11, "relu", gate, "bilinear", "cpu"))
    opcheck(torch.ops.ghostfast.ghost_module_z1.default, (z1, *bn1, w2, None, b2, eps2, 12, "none", None, "nearest",
                                                           "cpu"))
    opcheck(torch.ops.ghostfast.ghost_module_z1_stats.default, (z1, "cpu"))
    x, w1, bn1x, w2x, _ = grad_leaves(ghost_args("cpu"))
    opcheck(torch.ops.ghostfast.ghost_module_bn2_batch_stats.default,
            (x, w1, *bn1x, w2x, a2.detach().requires_grad_(), b2, eps2, 11, "relu", gate, "bilinear", "cpu"))
    s1, sh1 = reference.fold_bn_vectors(bn1, 4, torch.float32, "cpu")
    s2, sh2 = torch.rand(8) + 0.5, torch.randn(8)
    coef = [torch.randn(8), torch.randn(8), torch.randn(8)]
    go = torch.randn(2, 11, 6, 5)
    needs = [True, False, True, True, True, True, True, True]
    opcheck(torch.ops.ghostfast.ghost_module_z1_backward.default,
            (go, z1.detach(), s1, sh1, w2.detach(), s2, sh2, 11, "relu", gate.detach(), "bilinear", *coef, needs,
             "cpu"))
    opcheck(torch.ops.ghostfast.ghost_module_backward_bnstats.default,
            (go, x.detach(), w1.detach(), s1, sh1, w2x.detach(), s2, sh2, 11, "relu", None, "nearest", *coef,
             [True] * 7 + [False], "cpu"))


@CPU_ONLY
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_ops_z1_ops_gradcheck_float64(layout):
    """ghost_module_z1 (z1, bn1's four tensors, the cheap weight, bn2's weight and bias, the gate: z2's batch
    statistics inside) and ghost_module_z1_stats, float64 gradcheck; outputs poisoned (unwritten elements NaN)."""
    import kernel_backends

    z1, bn1, w2, a2, b2, eps2 = grad_leaves(_z1_args(torch.float64, n=2, init=2, ratio=2, h=4, w=3, layout=layout))
    gate = torch.rand(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(z1, a1, b1, m1, v1, w2, a2, b2, gate):
        return ops.run_ghost_module_z1(z1, BatchNormParams(a1, b1, m1, v1, bn1.eps), w2, a2, b2, eps2, 3, "relu",
                                       gate, "bilinear", "cpu")[0]

    with kernel_backends.poisoned_buffers():
        assert torch.autograd.gradcheck(fn, (z1, *bn1.tensors(), w2, a2, b2, gate))
        assert torch.autograd.gradcheck(lambda z: ops.run_ghost_module_z1_stats(z, "cpu"), (z1,))
    mean, var = ops.run_ghost_module_z1_stats(z1.detach(), "cpu")
    want_var, want_mean = torch.var_mean(z1.detach(), dim=(0, 2, 3), correction=0)
    assert_close_rel(mean, want_mean, torch.float64) and assert_close_rel(var, want_var, torch.float64)


@CPU_ONLY
def test_ops_z1_ops_check_arguments():
    z1, bn1, w2, a2, b2, eps2 = _z1_args()
    run = ops.run_ghost_module_z1
    with pytest.raises(TypeError, match="float32 or float64, got torch.bfloat16"):
        run(z1.bfloat16(), bn1, w2.bfloat16(), a2, b2, eps2, 12, "relu", None, "nearest", "cpu")
    with pytest.raises(ValueError, match=r"out_channels >= 4 \(z1's channels"):
        run(z1, bn1, w2, a2, b2, eps2, 3, "relu", None, "nearest", "cpu")
    with pytest.raises(ValueError, match="cpu backend only, got backend 'triton'"):
        run(z1, bn1, w2, a2, b2, eps2, 12, "relu", None, "nearest", "triton")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run(z1[:1, :, :1, :1], bn1, w2, a2, b2, eps2, 12, "relu", None, "nearest", "cpu")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.run_ghost_module_z1_stats(z1[:1, :, :1, :1], "cpu")
    with pytest.raises(ValueError, match="multiple of init=4"):
        run(z1, bn1, w2[:6], a2[:6], b2[:6], eps2, 10, "relu", None, "nearest", "cpu")
    with pytest.raises(ValueError, match=r"bn2_weight of shape \(8,\)"):
        run(z1, bn1, w2, a2[:3], b2, eps2, 12, "relu", None, "nearest", "cpu")
