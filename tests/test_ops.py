"""The op registry: opcheck of every custom op, backend selection, argument validation, float64 gradcheck of
the op-level autograd."""
import pytest
import torch

import ghostfast
from ghostfast import ops, reference
from ghostfast.backends import GhostfastFallbackWarning, GhostfastUnsupported
from kernel_backends import COMPILED, NAMES as FUSED
from numerics import assert_close_rel


def ghost_args(device, dtype=torch.float32, n=2, c_in=5, init=4, ratio=3, dw=3, h=6, w=5):
    new = init * (ratio - 1)
    return [torch.randn(n, c_in, h, w, device=device, dtype=dtype),
            torch.randn(init, c_in, 1, 1, device=device, dtype=dtype),
            torch.rand(init, device=device, dtype=dtype) + 0.5, torch.randn(init, device=device, dtype=dtype),
            torch.randn(new, 1, dw, dw, device=device, dtype=dtype),
            torch.rand(new, device=device, dtype=dtype) + 0.5, torch.randn(new, device=device, dtype=dtype)]


def dfc_args(device, dtype=torch.float32, n=2, c_in=5, c=6, h=6, w=7):
    def vec():
        return torch.rand(c, device=device, dtype=dtype) + 0.5, torch.randn(c, device=device, dtype=dtype)

    return [torch.randn(n, c_in, h, w, device=device, dtype=dtype),
            torch.randn(c, c_in, 1, 1, device=device, dtype=dtype), *vec(),
            torch.randn(c, 1, 1, 5, device=device, dtype=dtype), *vec(),
            torch.randn(c, 1, 5, 1, device=device, dtype=dtype), *vec()]


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_ops_opcheck_ghost_module(backend, device):
    args = ghost_args(device)
    gate = torch.rand(2, 11, 3, 2, device=device)
    for a in args:
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.ghostfast.ghost_module.default, (*args, 11, True, gate, "bilinear", backend))
    torch.library.opcheck(torch.ops.ghostfast.ghost_module.default, (*args, 12, False, None, "nearest", backend))


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_ops_opcheck_dfc(backend, device):
    args = [a.requires_grad_(True) for a in dfc_args(device)]
    torch.library.opcheck(torch.ops.ghostfast.dfc_gate.default, (*args, backend))
    torch.library.opcheck(torch.ops.ghostfast.dfc_attention.default, (*args, "nearest", backend))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_ops_public_functions_match_reference(mode, backend, device):
    g_args = ghost_args(device)
    d_args = dfc_args(device, c=11, h=6, w=5)
    gate = ops.dfc_gate(*d_args, backend=backend, strict=True)
    assert_close_rel(gate, reference.dfc_gate_forward(*[a.double() for a in d_args]), torch.float32)
    out = ops.ghost_module(*g_args, out_channels=11, gate=gate, gate_mode=mode, backend=backend, strict=True)
    ref = reference.ghost_module_forward(*[a.double() for a in g_args], 11, True, gate.double(), mode)
    assert_close_rel(out, ref, torch.float32)
    full = ops.dfc_attention(*d_args, mode=mode, backend=backend, strict=True)
    assert_close_rel(full, reference.dfc_attention_forward(*[a.double() for a in d_args], mode=mode), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_ops_gradcheck_float64(backend, device):
    g_args = [a.requires_grad_(True) for a in ghost_args(device, torch.float64, n=1, c_in=3, init=2, h=4, w=3)]
    gate = torch.rand(1, 5, 2, 1, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: ops.ghost_module(*a[:7], out_channels=5, gate=a[7], gate_mode="bilinear", backend=backend,
                                    strict=True), (*g_args, gate))
    d_args = [a.requires_grad_(True) for a in dfc_args(device, torch.float64, n=1, c_in=3, c=2, h=4, w=5)]
    assert torch.autograd.gradcheck(lambda *a: ops.dfc_attention(*a, mode="bilinear", backend=backend, strict=True),
                                    d_args)
    assert torch.autograd.gradcheck(lambda *a: ops.dfc_gate(*a, backend=backend, strict=True), d_args)


STATS_BACKENDS = [b for b in FUSED if b != "cuda"] + ["reference"]  # cuda's statistics run in Triton


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_ops_opcheck_ghost_module_stats(backend, stage, device):
    x, w1, s1, b1, w2 = [a.requires_grad_(True) for a in ghost_args(device)[:5]]
    torch.library.opcheck(torch.ops.ghostfast.ghost_module_stats.default, (x, w1, s1, b1, w2, True, stage, backend))


@pytest.mark.parametrize("backend", STATS_BACKENDS[:-1])
def test_ops_gradcheck_ghost_module_stats_float64(backend, device):
    args = [a.requires_grad_(True) for a in ghost_args(device, torch.float64, n=2, c_in=3, init=2, h=4, w=3)[:5]]
    for stage in (1, 2):
        for relu in (True, False):
            assert torch.autograd.gradcheck(
                lambda *a: ops.ghost_module_stats(*a, relu=relu, stage=stage, backend=backend), args, fast_mode=True)


def test_ops_ghost_module_stats_bad_input(device):
    x, w1, s1, b1, w2 = ghost_args(device)[:5]
    with pytest.raises(ValueError, match="stage must be 1 or 2, got 3"):
        ops.ghost_module_stats(x, w1, s1, b1, w2, True, 3, backend="reference")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.ghost_module_stats(x[:1, :, :1, :1], w1, s1, b1, w2, True, 1, backend="reference")
    with pytest.raises(ValueError, match="backend must be 'triton', 'cpu' or 'reference', got 'cuda'"):
        ops.ghost_module_stats(x, w1, s1, b1, w2, True, 1, backend="cuda")
    with pytest.raises(ValueError, match=r"expected primary_scale of shape \(4,\)"):
        ops.ghost_module_stats(x, w1, s1[:3], b1, w2, True, 2, backend="reference")


def test_ops_available_backends():
    cpu = ghostfast.available_backends("cpu")
    assert cpu[-1] == "reference"
    assert ("cpu" in cpu) == (ghostfast.backends.load_extension() is not None)
    cuda = ghostfast.available_backends("cuda")
    assert ("triton" in cuda) == (torch.cuda.is_available() and not ghostfast.backends.triton_interpreting())


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
    assert_close_rel(out, reference.ghost_module_forward(*[a.double() for a in args], 12), torch.float32)
    with pytest.raises(GhostfastUnsupported):
        ops.ghost_module(*args, backend=other, strict=True)


def test_ops_auto_measures_once_and_skips_a_disagreeing_backend(monkeypatch, device):
    """`auto` with several fused candidates (CUDA: triton and cuda) times each once per op and shape, caches the
    winner, and never picks a backend whose output disagrees with the reference. Exercised here with two
    stand-in candidates, one of them wrong."""
    good = FUSED[-1]
    monkeypatch.setattr(ops, "_AUTO_CHOICE", {})
    monkeypatch.setattr(ghostfast.backends, "resolve_backend", lambda *a, **k: ("auto", None))
    monkeypatch.setattr(ops, "auto_candidates", lambda *a, **k: ["broken", good])
    real = ops._ghost_module_op
    calls = []

    def fake_op(*a):
        calls.append(a[-1])
        out = real(*a[:-1], "reference" if a[-1] == "broken" else a[-1])
        return out + 1.0 if a[-1] == "broken" else out

    monkeypatch.setattr(ops, "_ghost_module_op", fake_op)
    monkeypatch.setattr(ops, "resolve_backend", ghostfast.backends.resolve_backend)
    ghostfast.backends._warned.clear()
    args = ghost_args(device)
    with pytest.warns(GhostfastFallbackWarning, match="'broken' disagrees with the reference"):
        out = ops.ghost_module(*args, backend="auto")
    assert_close_rel(out, reference.ghost_module_forward(*[a.double() for a in args], 12), torch.float32)
    (choice, times), = ops.auto_choices().values()
    assert choice == good and set(times) == {good}
    calls.clear()
    ops.ghost_module(*args, backend="auto")
    assert calls == [good]  # cached: no second measurement


def test_ops_strict_and_fallback_for_unavailable_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors then have no Triton backend
    args = ghost_args("cpu")
    ghostfast.backends._warned.clear()
    with pytest.warns(GhostfastFallbackWarning, match="TRITON_INTERPRET"):
        out = ops.ghost_module(*args, backend="triton")
    assert_close_rel(out, reference.ghost_module_forward(*[a.double() for a in args], 12), torch.float32)
    with pytest.raises(GhostfastUnsupported):
        ops.ghost_module(*args, backend="triton", strict=True)


def test_ops_bad_input_errors(device):
    x, w1, s1, b1, w2, s2, b2 = ghost_args(device)
    with pytest.raises(ValueError, match="expected input with 5 channels, got 4"):
        ops.ghost_module(x[:, :4], w1, s1, b1, w2, s2, b2)
    with pytest.raises(ValueError, match="4-D"):
        ops.ghost_module(x[0], w1, s1, b1, w2, s2, b2)
    with pytest.raises(TypeError, match="primary_weight of dtype torch.float32"):
        ops.ghost_module(x, w1.double(), s1, b1, w2, s2, b2)
    with pytest.raises(ValueError, match="primary_scale of shape \\(4,\\)"):
        ops.ghost_module(x, w1, s1[:3], b1, w2, s2, b2)
    with pytest.raises(ValueError, match="depthwise size"):
        ops.ghost_module(x, w1, s1, b1, torch.randn(8, 1, 9, 9, device=device), s2, b2)
    with pytest.raises(ValueError, match="out_channels must be in"):
        ops.ghost_module(x, w1, s1, b1, w2, s2, b2, out_channels=13)
    with pytest.raises(ValueError, match="gate_mode"):
        ops.ghost_module(x, w1, s1, b1, w2, s2, b2, gate=torch.rand(2, 12, 3, 2, device=device), gate_mode="cubic")
    with pytest.raises(ValueError, match="on meta"):
        ops.ghost_module(x, w1.to("meta"), s1, b1, w2, s2, b2)
    with pytest.raises(TypeError, match="floating"):
        ops.ghost_module(x.long(), w1, s1, b1, w2, s2, b2)
    d = dfc_args(device)
    with pytest.raises(ValueError, match="h_weight of shape \\(6, 1, 1, 5\\)"):
        ops.dfc_gate(d[0], *d[1:4], d[7], *d[5:7], d[7], *d[8:])
    with pytest.raises(ValueError, match="H and W >= 2"):
        ops.dfc_gate(d[0][:, :, :1], *d[1:])


@pytest.mark.parametrize("backend", FUSED)
def test_ops_empty_batch(backend, device):
    args = ghost_args(device, n=0)
    out = ops.ghost_module(*args, backend=backend, strict=True)
    assert out.shape == (0, 12, 6, 5)
    d = dfc_args(device, n=0)
    assert ops.dfc_attention(*d, backend=backend, strict=True).shape == (0, 6, 6, 7)
    assert ops.dfc_gate(*d, backend=backend, strict=True).shape == (0, 6, 3, 3)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_ops_backward_matches_reference_autograd(backend, device):
    """Eval-mode (folded BN) gradients of GhostModuleV2's two ops, through the chosen backend's backward."""
    g_args = [a.requires_grad_(True) for a in ghost_args(device, n=2, c_in=6, init=4, ratio=2, h=7, w=6)]
    d_args = [a.requires_grad_(True) for a in dfc_args(device, n=2, c_in=6, c=7, h=7, w=6)]
    d_args[0] = g_args[0]
    gate = ops.dfc_gate(*d_args, backend=backend)
    out = ops.ghost_module(*g_args, out_channels=7, gate=gate, backend=backend)
    leaves = g_args + d_args[1:]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    dbl = [a.detach().double().requires_grad_(True) for a in leaves]
    ref_gate = reference.dfc_gate_forward(dbl[0], *dbl[7:])
    ref = reference.ghost_module_forward(*dbl[:7], 7, True, ref_gate)
    ref_grads = torch.autograd.grad(ref, dbl, grad_out.double())
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, torch.float32)


def test_ops_double_backward_raises_clearly(device):
    args = [a.requires_grad_(True) for a in ghost_args(device, torch.float64, n=1, c_in=3, init=2, h=4, w=3)]
    out = ops.ghost_module(*args, backend="triton")
    (gx,) = torch.autograd.grad((out * out).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", STATS_BACKENDS[:-1])
def test_ops_ghost_module_stats_double_backward_raises_clearly(backend, device):
    args = [a.requires_grad_(True) for a in ghost_args(device, torch.float64, n=2, c_in=3, init=2, h=4, w=3)[:5]]
    mean, var = ops.ghost_module_stats(*args, relu=True, stage=2, backend=backend)
    (gx,) = torch.autograd.grad((mean * var).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gx.sum().backward()
