"""The CUDA C++ kernels of csrc/cuda executed on the CPU (tests/cuda_emu): the host code and the kernel bodies of
ghost_module.cu, ghost_module_backward.cu, dfc.cu, dfc_backward.cu and their headers compiled by g++ against an
emulation of the CUDA execution model (blocks one after another, the 256 threads of a block as fibers run between
barriers in forward, reverse or random order, warp shuffles exchanged when all 32 lanes arrive, sequential atomics,
shared memory filled with NaN before every block and guarded after it), called through ghostfast's own `cuda`
backend (ghostfast/compiled.py) on CPU tensors and checked against the float64 reference by the kernel tests' own
checks (tests/test_kernel_*.py), every output NaN-poisoned first, every tensor argument between NaN guards.

The sample kernels (tests/cuda_emu/sample_kernels.cu) prove the harness fails a kernel with a missing barrier, an
unwritten output, a write past shared or global memory, a read past global memory, a divergent barrier or shuffle.

CI runs each case under one schedule (forward, reverse, random in turn); GHOSTFAST_EMU_FULL=1 (`make cuda-emu-full`)
runs every case under all three."""
import os
import re

import pytest
import torch

import kernel_backends
import test_kernel_activations as acts
import test_kernel_dfc as dfc_fwd
import test_kernel_dfc_backward as dfc_bwd
import test_kernel_ghost_module as ghost_fwd
import test_kernel_ghost_module_backward as ghost_bwd
from cuda_emu import build, harness
from ghostfast import reference
from ghostfast.backends import BACKENDS
from kernel_inputs import acc_dtype, fold_dfc_params, fold_ghost_params, make_dfc_params, make_ghost_params
from numerics import assert_close_rel

FULL = os.environ.get("GHOSTFAST_EMU_FULL", "") == "1"
ORDERS = ("forward", "reverse", "random")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MODES = ("gate", "nearest", "bilinear")
# the activations past none / relu (those run in every case above them): test_kernel_activations.py's cases each
NEW_ACTS = tuple(a for a in reference.ACTIVATIONS if a not in ("none", "relu"))


@pytest.fixture(scope="module", autouse=True)
def _library():
    harness.ops()  # builds (or finds in the cache) the emulation library once


@pytest.fixture
def emu(monkeypatch):
    """Kernel-test helpers (tests/kernel_backends.py) routed to the emulated `cuda` backend."""
    monkeypatch.setitem(BACKENDS, "cuda_emu", harness.EmuBackend())
    harness.reset()
    with kernel_backends.active("cuda_emu"):
        yield


def _scheduled(cases):
    """Each case with the schedule(s) it runs under: one in turn in CI, all three with GHOSTFAST_EMU_FULL=1."""
    out = []
    for i, (name, fn) in enumerate(cases):
        for order in (ORDERS if FULL else (ORDERS[i % 3],)):
            out.append(pytest.param(fn, order, i, id=f"{name}-{order}"))
    return out


def _run(fn, order, seed, monkeypatch):
    harness.schedule(order, seed=seed)
    fn(monkeypatch)
    assert harness.stats()["launches"] > 0, "the case launched no emulated kernel"


# ---- the cases: the kernel tests' own checks -------------------------------------------------------------------

def _ghost_forward_cases():
    cases = [(f"case-{ghost_fwd.ghost_case_id(c)}", lambda mp, c=c: ghost_fwd._check(*c, "cpu"))
             for c in ghost_fwd.CASES]
    for dw in (1, 3, 5, 7):
        for ratio in (2, 3):
            for relu in (True, False):
                cases.append((f"dw{dw}-r{ratio}-{relu}", lambda mp, dw=dw, ratio=ratio, relu=relu:
                              ghost_fwd.test_ghost_module_kernel_dw_ratio_sweep(dw, ratio, relu, "cpu")))
    for dtype in DTYPES:
        for layout in ("contiguous", "channels_last", "slice"):
            for gate_mode in (None, "nearest", "bilinear"):
                cases.append((f"{str(dtype)[6:]}-{layout}-{gate_mode}", lambda mp, d=dtype, l=layout, g=gate_mode:
                              ghost_fwd.test_ghost_module_kernel_dtype_layout_gate_sweep(d, l, g, "cpu")))
    for dtype, bn_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                            (torch.float64, torch.float32)]:
        cases.append((f"bn-{str(dtype)[6:]}-{str(bn_dtype)[6:]}", lambda mp, d=dtype, b=bn_dtype:
                      ghost_fwd.test_ghost_module_kernel_bn_dtypes(d, b, "cpu")))
    for missing in ("var", "all"):
        cases.append((f"missing-{missing}", lambda mp, m=missing:
                      ghost_fwd.test_ghost_module_kernel_missing_bn_tensors(m, "both", "cpu")))
    for act in NEW_ACTS:
        for cid, c in _parametrized(acts.test_activation_forward, "case"):
            cases.append((f"act-{act}-{cid}", lambda mp, c=c, a=act: acts.test_activation_forward(c, a, "cpu")))
    return cases


def _parametrized(fn, name):
    """(id, value) of each value of a test function's `@pytest.mark.parametrize(name, ..., ids=...)`."""
    for m in getattr(fn, "pytestmark", []):
        if m.name == "parametrize" and m.args[0] == name:
            return list(zip(m.kwargs["ids"], m.args[1]))
    raise LookupError(f"{fn.__name__} has no parametrize of {name!r}")


def _ghost_backward_cases():
    cases = [(f"case-{ghost_bwd.ghost_case_id(c)}", lambda mp, c=c: ghost_bwd._check(*c, "cpu"))
             for c in ghost_bwd.CASES]
    for dw in (1, 3, 5, 7):
        for ratio in (2, 3):
            for relu in (True, False):
                cases.append((f"dw{dw}-r{ratio}-{relu}", lambda mp, dw=dw, ratio=ratio, relu=relu:
                              ghost_bwd.test_ghost_module_backward_dw_ratio_sweep(dw, ratio, relu, "cpu")))
    for dtype in DTYPES:
        for layout in ("contiguous", "channels_last", "slice"):
            for gate_mode in (None, "nearest", "bilinear"):
                cases.append((f"{str(dtype)[6:]}-{layout}-{gate_mode}", lambda mp, d=dtype, l=layout, g=gate_mode:
                              ghost_bwd.test_ghost_module_backward_dtype_layout_gate_sweep(d, l, g, "cpu")))
    for xl, gl in [("contiguous", "channels_last"), ("slice", "contiguous"), ("channels_last", "slice")]:
        cases.append((f"mixed-{xl}-{gl}", lambda mp, xl=xl, gl=gl:
                      ghost_bwd.test_ghost_module_backward_mixed_layouts(xl, gl, "cpu")))
    cases += [
        ("expanded-grad-out", lambda mp: ghost_bwd.test_ghost_module_backward_expanded_grad_out("cpu")),
        ("multi-tile-wide-halo", lambda mp: ghost_bwd.test_ghost_module_backward_multi_tile_wide_halo("cpu")),
        ("odd-upsample-nearest", lambda mp: ghost_bwd.test_ghost_module_backward_gate_odd_upsample("nearest", "cpu")),
        ("odd-upsample-bilinear",
         lambda mp: ghost_bwd.test_ghost_module_backward_gate_odd_upsample("bilinear", "cpu")),
        ("nearest-fp32-rounding", lambda mp: ghost_bwd.test_ghost_module_backward_gate_nearest_fp32_rounding("cpu")),
        ("relu-grad-at-zero", lambda mp: ghost_bwd.test_ghost_module_backward_relu_grad_at_zero("cpu")),
    ]
    for needs in [(True, False, False, False, False, False, False, True),
                  (False, True, True, True, True, True, True, False)]:
        cases.append((f"needs-{''.join('1' if n else '0' for n in needs)}", lambda mp, n=needs:
                      ghost_bwd.test_ghost_module_backward_needs(n, "cpu")))
    for act in NEW_ACTS:
        for cid, c in _parametrized(acts.test_activation_backward, "case"):
            cases.append((f"act-{act}-{cid}", lambda mp, c=c, a=act: acts.test_activation_backward(c, a, "cpu", mp)))
    return cases


_DFC_SHAPES = [(1, 5, 7, 2, 2), (2, 5, 7, 3, 3), (1, 20, 40, 7, 7), (2, 5, 7, 15, 13), (1, 5, 7, 4, 9),
               (1, 6, 20, 40, 37)]


def _dfc_forward_cases():
    cases = []
    for shape in _DFC_SHAPES:
        for mode in MODES:
            cases.append((f"{'x'.join(map(str, shape))}-{mode}", lambda mp, s=shape, m=mode:
                          dfc_fwd.test_dfc_kernel_shapes("cpu", *s, m)))
    for dtype in (torch.float16, torch.float64, torch.bfloat16):
        for mode in MODES:
            cases.append((f"{str(dtype)[6:]}-{mode}", lambda mp, d=dtype, m=mode:
                          dfc_fwd.test_dfc_kernel_dtypes("cpu", d, m, mp)))
    for dtype, bn_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                            (torch.float64, torch.float32)]:
        cases.append((f"bn-{str(dtype)[6:]}-{str(bn_dtype)[6:]}", lambda mp, d=dtype, b=bn_dtype:
                      dfc_fwd.test_dfc_kernel_bn_dtypes("cpu", d, b)))
    for layout in ("channels_last", "strided"):
        for mode in MODES:
            cases.append((f"{layout}-{mode}", lambda mp, l=layout, m=mode: dfc_fwd.test_dfc_kernel_layouts("cpu", l, m)))
    cases += [("missing-all", lambda mp: dfc_fwd.test_dfc_kernel_missing_bn_tensors("cpu", "all", "all")),
              ("border-pads-biased-output", lambda mp: dfc_fwd.test_dfc_kernel_border_pads_biased_output("cpu"))]
    return cases


def _dfc_backward_cases():
    cases = []
    for shape in _DFC_SHAPES:
        for mode in MODES:
            cases.append((f"{'x'.join(map(str, shape))}-{mode}", lambda mp, s=shape, m=mode:
                          dfc_bwd.test_dfc_backward_shapes("cpu", *s, m)))
    for dtype in (torch.float16, torch.float64, torch.bfloat16):
        for mode in MODES:
            cases.append((f"{str(dtype)[6:]}-{mode}", lambda mp, d=dtype, m=mode:
                          dfc_bwd.test_dfc_backward_dtypes("cpu", d, m, mp)))
    for layout in ("channels_last", "strided"):
        for mode in MODES:
            cases.append((f"{layout}-{mode}", lambda mp, l=layout, m=mode:
                          dfc_bwd.test_dfc_backward_layouts("cpu", l, m)))
    for needs in [(True,) + (False,) * 9, (False,) * 4 + (True,) * 6, (False, True) + (False,) * 8]:
        cases.append((f"needs-{''.join('1' if n else '0' for n in needs)}", lambda mp, n=needs:
                      dfc_bwd.test_dfc_backward_needs("cpu", n)))
    cases.append(("border-pads-biased-output", lambda mp: dfc_bwd.test_dfc_backward_border_pads_biased_output("cpu")))
    return cases


@pytest.mark.parametrize("fn,order,seed", _scheduled(_ghost_forward_cases()))
def test_cuda_emu_ghost_module_forward(fn, order, seed, emu, monkeypatch):
    _run(fn, order, seed, monkeypatch)


@pytest.mark.parametrize("fn,order,seed", _scheduled(_ghost_backward_cases()))
def test_cuda_emu_ghost_module_backward(fn, order, seed, emu, monkeypatch):
    _run(fn, order, seed, monkeypatch)


@pytest.mark.parametrize("fn,order,seed", _scheduled(_dfc_forward_cases()))
def test_cuda_emu_dfc_forward(fn, order, seed, emu, monkeypatch):
    _run(fn, order, seed, monkeypatch)


@pytest.mark.parametrize("fn,order,seed", _scheduled(_dfc_backward_cases()))
def test_cuda_emu_dfc_backward(fn, order, seed, emu, monkeypatch):
    _run(fn, order, seed, monkeypatch)


# ---- what no single comparison shows -------------------------------------------------------------------------

def _ghost_call(dtype, gate_mode, backward, n=2, c_in=13, h=11, w=9, init=12, ratio=3, dw=5, out_channels=33):
    """One Ghost module forward or backward of the emulated backend on fixed data: its outputs."""
    torch.manual_seed(1)
    p = make_ghost_params(c_in, init, ratio, dw, dtype, "cpu")
    x = torch.randn(n, c_in, h, w).to(dtype)
    gate = None if gate_mode is None else torch.rand(n, out_channels, 4, 5).to(dtype)
    be = BACKENDS["cuda_emu"]
    if not backward:
        return [be.ghost_module(x, p["primary_weight"], p["bn1"], p["cheap_weight"], p["bn2"], out_channels, True,
                                gate, gate_mode or "nearest")]
    f = fold_ghost_params(p, acc_dtype(dtype))
    grad_out = torch.randn(n, out_channels, h, w).to(dtype)
    return be.ghost_module_backward(grad_out, x, *f.values(), out_channels, True, gate, gate_mode or "nearest",
                                    [True] * 8)


def _dfc_call(dtype, mode, backward, n=2, c_in=9, c=20, h=13, w=15):
    torch.manual_seed(2)
    params = make_dfc_params(c_in, c, dtype, "cpu")
    x = torch.randn(n, c_in, h, w).to(dtype)
    be = BACKENDS["cuda_emu"]
    if not backward:
        return [be.dfc(x, *params, mode)]
    folded = fold_dfc_params(params, acc_dtype(dtype))
    grad = torch.randn((n, c, h // 2, w // 2) if mode == "gate" else (n, c, h, w)).to(dtype)
    return be.dfc_backward(grad, x, *folded, mode, [True] * 10)


@pytest.mark.parametrize("op", ["ghost_forward", "ghost_backward", "dfc_forward", "dfc_backward"])
def test_cuda_emu_schedules_agree(op, emu):
    """Outputs every element of which one thread writes once (the forwards, grad_x, and the backward's other
    outputs up to the atomics' rounding) come out the same under every thread and block order: a race that happens
    to stay within the tolerance still shows here."""
    call = {"ghost_forward": lambda: _ghost_call(torch.float32, "bilinear", False),
            "ghost_backward": lambda: _ghost_call(torch.float32, "bilinear", True),
            "dfc_forward": lambda: _dfc_call(torch.float32, "bilinear", False),
            "dfc_backward": lambda: _dfc_call(torch.float32, "bilinear", True)}[op]
    runs = []
    for i, order in enumerate(ORDERS + ("random",)):
        harness.schedule(order, seed=11 + i)
        runs.append(call())
    for other in runs[1:]:
        assert torch.equal(other[0], runs[0][0]), f"{op}: output 0 depends on the schedule"
        for a, b in zip(other[1:], runs[0][1:]):
            if a is not None:  # atomics: the order of the additions may round differently
                assert_close_rel(a, b, torch.float32)


def test_cuda_emu_covers_every_kernel_and_dtype(emu):
    """Every kernel instantiation family the host code launches, in every dtype, ran under the emulator; a change
    that adds a kernel shows here until it is covered."""
    harness.schedule("random", seed=5)
    for dtype in DTYPES:
        _ghost_call(dtype, "nearest", False, init=4, out_channels=8)  # CB 8
        _ghost_call(dtype, None, False, init=24, ratio=2, out_channels=48)  # the wide channel block
        _ghost_call(dtype, "bilinear", True)
        for mode in MODES:
            _dfc_call(dtype, mode, False)
        _dfc_call(dtype, "nearest", True)
    seen = harness.kernels_seen(harness.launches())
    names = {"float": "float, float", "double": "double, double", "half": "c10::Half, float",
             "bf16": "c10::BFloat16, float"}
    for kernel in ("ghost_forward_kernel", "ghost_backward_kernel", "dfc_forward_kernel", "dfc_backward_kernel"):
        for types in names.values():
            assert (kernel, types) in seen, (kernel, types, sorted(seen))
    # the GEMMs' args carry (scalar_t, acc_t) for grad_input, (acc_t, loader) for grad_weight
    gemm = {(k, t) for k, t in seen if k.startswith("conv1x1_")}
    assert {t for k, t in gemm if k == "conv1x1_grad_input_kernel"} == set(names.values())
    assert {k for k, _ in gemm} == {"conv1x1_grad_input_kernel", "conv1x1_grad_weight_kernel"}
    # both channel-block widths of the forward (CB 8 and the wide one) in every dtype: 8 instantiations
    assert len({r["address"] for r in harness.launches() if r["kernel"] == "ghost_forward_kernel"}) == 8


def test_cuda_emu_large_shared_memory_opt_in(emu):
    """A backward launch above 48 KB of dynamic shared memory (the tile chooser's budget is 96 KB) passes the
    emulator's check that the host code opted in with cudaFuncSetAttribute."""
    _ghost_call(torch.float64, "bilinear", True, n=1, c_in=8, h=40, w=40, init=8, ratio=2, dw=7, out_channels=16)
    big = [r["smem"] for r in harness.launches() if r["kernel"] == "ghost_backward_kernel"]
    assert big and max(big) > 48 * 1024, big


def test_cuda_emu_grad_weight_split(emu):
    """The split-K of grad_W1 depends on the SM count: one SM (few splits) and 132 (many) agree."""
    harness.schedule("forward", sm_count=1)
    one = _ghost_call(torch.float32, None, True, n=2, h=24, w=24)
    blocks_one = [r["grid"] for r in harness.launches() if r["kernel"] == "conv1x1_grad_weight_kernel"]
    harness.reset()
    harness.schedule("reverse", sm_count=132)
    many = _ghost_call(torch.float32, None, True, n=2, h=24, w=24)
    blocks_many = [r["grid"] for r in harness.launches() if r["kernel"] == "conv1x1_grad_weight_kernel"]
    assert blocks_one != blocks_many, (blocks_one, blocks_many)
    assert_close_rel(one[1], many[1], torch.float32)


# ---- the harness itself: the rewrite, and kernels it must fail ---------------------------------------------------

@pytest.mark.parametrize("path", sorted(p.name for p in (build.CSRC / "cuda").iterdir() if p.suffix in (".cu", ".cuh")))
def test_cuda_emu_rewrite_touches_only_launches_and_shared(path):
    """The emulated sources are csrc/cuda's: the rewrite changes only kernel launches and __shared__ declarations."""
    text = (build.CSRC / "cuda" / path).read_text()
    new, counts, changed = build.rewrite(text)
    old_lines, new_lines = text.split("\n"), new.split("\n")
    assert len(old_lines) == len(new_lines)
    for no, (a, b) in enumerate(zip(old_lines, new_lines), 1):
        code = a.split("//")[0]
        if "<<<" in code or "__shared__" in code:
            assert no in changed and a != b, (path, no, a)
        else:
            assert a == b, (path, no, a, b)
    assert sum(counts.values()) == len(changed)
    if path in ("ghost_module.cu", "ghost_module_backward.cu", "dfc.cu", "dfc_backward.cu"):
        assert counts == {"launch": 1, "dynamic_shared": 1, "static_shared": 0}, counts
        assert path in {p.name for p in build.KERNEL_SOURCES}


def _sample(variant, order, n=512, zeros=False):
    harness.schedule(order, seed=variant)
    torch.manual_seed(variant)
    x = torch.randn(n)
    out = torch.zeros(1) if zeros else torch.full((n,), float("nan"))
    harness.guarded_call("_sample_kernel", x, out, variant)
    return x, out


def _rows_reversed(x):
    return x.view(-1, 256).flip(1).reshape(-1)


def _chunk_sums(x):
    return x.view(-1, 256).roll(-1, 1).sum(0)


@pytest.mark.parametrize("order", ORDERS)
def test_cuda_emu_sample_kernels_correct_pass(order):
    x, out = _sample(0, order)
    assert torch.equal(out, _rows_reversed(x))
    x, out = _sample(9, order, zeros=True)
    assert_close_rel(out, x.sum().reshape(1), torch.float32)
    x, out = _sample(10, order)
    torch.testing.assert_close(out[:256], _chunk_sums(x))
    assert out[256:].isnan().all()  # one block of 256 threads writes 256 elements


@pytest.mark.parametrize("order", ORDERS)
def test_cuda_emu_fails_missing_barrier(order):
    """A thread reads a shared-memory slot another thread writes before the barrier that is missing: the poison (or
    a stale value) reaches the output under every order."""
    x, out = _sample(1, order)
    assert not torch.equal(out, _rows_reversed(x))
    assert out.isnan().any()
    # a missing barrier before shared memory is reused: stale values, no NaN, so the comparison must catch it
    x, out = _sample(11, order)
    assert not out[:256].isnan().any()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out[:256], _chunk_sums(x))


@pytest.mark.parametrize("order", ORDERS)
def test_cuda_emu_fails_unwritten_output(order):
    x, out = _sample(2, order)
    assert out[-1].isnan() and torch.equal(out[:-1], x[:-1])
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_rel(out, x, torch.float32)


@pytest.mark.parametrize("variant,message", [
    (3, "past the end of the dynamic shared memory"),
    (4, "past the end of a static __shared__ array"),
    (5, r"__syncthreads at sample_kernels.cu:\d+ reached by 128 threads while 128 had exited"),
    (6, r"shuffle at sample_kernels.cu:\d+ .* waits for lanes"),
])
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_emu_fails_shared_overrun_and_divergence(variant, message, order):
    with pytest.raises(RuntimeError, match=message):
        _sample(variant, order)


@pytest.mark.parametrize("order", ORDERS)
def test_cuda_emu_fails_global_out_of_range(order):
    with pytest.raises(harness.GuardError, match="wrote after argument 1"):
        _sample(7, order)
    x, out = _sample(8, order)  # reads one past x: the guard's NaN lands in the last element
    assert out[-1].isnan() and torch.equal(out[:-1], x[1:])


def test_cuda_emu_fails_write_into_input():
    with pytest.raises(harness.GuardError, match="wrote into its input argument 0"):
        _sample(12, "forward")


def test_cuda_emu_launch_log_names_kernels(emu):
    _dfc_call(torch.float32, "nearest", True)
    kernels = [r["kernel"] for r in harness.launches()]
    assert kernels == ["dfc_backward_kernel", "conv1x1_grad_input_kernel", "conv1x1_grad_weight_kernel"], kernels
    assert all(re.fullmatch(r"\d+,1,1", r["grid"]) and r["block"] == "256,1,1" for r in harness.launches())
