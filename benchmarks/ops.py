"""Op benchmarks: the Ghost module, the DFC gate and GhostModuleV2 at every distinct shape of timm's GhostNets,
forward / backward / forward+backward, against eager timm, torch.compile, each ghostfast backend and the plain
1x1 conv + BN + ReLU a Ghost module replaces."""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import ghostfast
from ghostfast.models import randomize_batchnorm_

from .measure import TimingBudget, peak_memory_mb, synchronize, time_cpu_paired, time_cuda
from .shapes import GhostShape, model_names

OPS = ("ghost_module", "dfc_gate", "ghost_module_v2")
DIRECTIONS = ("forward", "backward", "forward+backward")
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PEERS = ("eager", "compile", "conv1x1")  # the providers every other one is compared with (speedup_vs_*)


@dataclass
class OpCase:
    """One timed configuration; every provider in `providers` runs it on the same input."""

    op: str
    shape: GhostShape
    batch: int
    dtype: str
    layout: str
    direction: str
    providers: Tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape.label} b{self.batch} {self.dtype} {self.layout} {self.direction}"


def ops_for_shape(shape: GhostShape) -> Tuple[str, ...]:
    """A module with DFC attention gives the DFC gate and GhostModuleV2 cases; one without, the Ghost module."""
    return ("dfc_gate", "ghost_module_v2") if shape.has_attention else ("ghost_module",)


def ghostfast_backends(device: torch.device) -> List[str]:
    """The ghostfast backends to time on `device`: all available ones, except Triton on CPU, which is the
    Triton interpreter (a correctness tool; timing it says nothing about the kernels)."""
    return [b for b in ghostfast.available_backends(device) if not (b == "triton" and device.type == "cpu")]


class EagerDFCGate(nn.Module):
    """The DFC gate as timm computes it inside GhostModuleV2.forward (before upsampling), on timm's submodules."""

    def __init__(self, ghost: nn.Module):
        super().__init__()
        self.short_conv = ghost.short_conv

    def forward(self, x):
        return torch.sigmoid(self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2)))


class FusedDFCGate(nn.Module):
    """The DFC gate through `ghostfast.ops.dfc_gate` on the live BatchNorms of a converted
    ghostfast.nn.GhostModuleV2's short_conv (what its forward passes to the op; folded inside the launch)."""

    def __init__(self, fused: ghostfast.nn.GhostModuleV2, backend: str):
        super().__init__()
        self.fused = fused
        self.backend = backend

    def forward(self, x):
        l = self.fused.short_conv
        return ghostfast.ops.dfc_gate(x, l[0].weight, l[1], l[2].weight, l[3], l[4].weight, l[5],
                                      backend=self.backend)


def conv1x1_peer(shape: GhostShape) -> nn.Module:
    """The layer a Ghost module stands in for: a 1x1 conv to out_chs channels + BN (+ ReLU where it has one)."""
    layers = [nn.Conv2d(shape.in_chs, shape.out_chs, 1, bias=False), nn.BatchNorm2d(shape.out_chs)]
    if shape.relu:
        layers.append(nn.ReLU(inplace=True))
    return randomize_batchnorm_(nn.Sequential(*layers), torch.Generator().manual_seed(0)).eval()


def build_provider(provider: str, op: str, shape: GhostShape) -> nn.Module:
    """The module a provider runs for `op` (CPU, float32; the caller moves it). timm's module is the eager one."""
    timm_module = copy.deepcopy(shape.module).eval()
    if provider == "conv1x1":
        return conv1x1_peer(shape)
    if provider in ("eager", "compile", "compile-max-autotune"):
        module = EagerDFCGate(timm_module) if op == "dfc_gate" else timm_module
        if provider == "eager":
            return module
        # dynamic=False: one static graph per case, as a user compiling for a fixed input size gets.
        mode = "max-autotune" if provider == "compile-max-autotune" else None
        return torch.compile(module, mode=mode, dynamic=False)
    if provider.startswith("ghostfast-"):
        backend = provider[len("ghostfast-"):]
        fused = ghostfast.convert(timm_module, backend=backend, strict=False)
        if not fused.ghostfast_report.converted:
            raise RuntimeError(f"ghostfast.convert skipped the module: {fused.ghostfast_report.skipped}")
        return FusedDFCGate(fused, backend) if op == "dfc_gate" else fused
    raise ValueError(f"unknown provider {provider!r}")


def provider_note(provider: str, op: str, direction: str) -> str:
    """What a row really measures, where the name alone would mislead."""
    notes = []
    if provider == "ghostfast-reference" and op != "dfc_gate":
        notes.append("reference backend: the module runs the original timm submodules")
    if provider == "ghostfast-reference" and op == "dfc_gate":
        notes.append("reference backend: ghostfast.reference math")
    if provider == "ghostfast-reference" and op == "dfc_gate" and direction != "forward":
        notes.append("backward differentiates the reference math")
    if provider == "ghostfast-triton" and direction != "forward":
        notes.append("eval-mode backward (BN frozen, folded per call): fused Triton backward kernels")
    if provider == "conv1x1":
        notes.append("1x1 conv + BN (+ReLU) with the same channels")
    return "; ".join(notes)


def min_bytes(op: str, shape: GhostShape, batch: int, dtype: torch.dtype, direction: str, weight_bytes: int) -> int:
    """The fewest bytes the op must move: input read once, output written once, weights read once (forward);
    backward reads x, grad_out and the weights and writes grad_x and the weight gradients."""
    es = torch.finfo(dtype).bits // 8
    x = batch * shape.in_chs * shape.H * shape.W * es
    out_hw = (shape.H // 2) * (shape.W // 2) if op == "dfc_gate" else shape.H * shape.W
    out = batch * shape.out_chs * out_hw * es
    forward = x + out + weight_bytes
    backward = 2 * x + out + 2 * weight_bytes
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[direction]


def _direction_callable(module: nn.Module, x: torch.Tensor, direction: str) -> Callable[[], object]:
    """A no-argument callable running one `direction` step of `module` on x (backward: on a graph built once
    and retained, so only the backward pass is timed)."""
    if direction == "forward":
        def forward():
            with torch.no_grad():
                return module(x)
        return forward
    x = x.detach().requires_grad_(True)
    inputs = [x] + [p for p in module.parameters() if p.requires_grad]
    out = module(x)
    grad_out = torch.randn_like(out)
    # allow_unused: FusedDFCGate holds the whole GhostModuleV2, whose Ghost-branch parameters the gate never uses.
    if direction == "backward":
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(module(x), inputs, grad_out, allow_unused=True)


@contextlib.contextmanager
def record_fallbacks():
    """Collect ghostfast's fallback warnings raised inside the block, so that a row timing the eager fallback
    instead of a fused kernel says so. ghostfast warns once per reason per process; the once-set is cleared so
    that every case reports its own fallbacks."""
    ghostfast.backends._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ghostfast.GhostfastFallbackWarning)
        messages: List[str] = []
        yield messages
    messages.extend(dict.fromkeys(str(w.message).replace("ghostfast: running eager PyTorch instead of a fused "
                                                         "kernel: ", "")
                                  for w in caught if issubclass(w.category, ghostfast.GhostfastFallbackWarning)))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def time_providers(calls: Dict[str, Callable], device: torch.device, budget: TimingBudget, errors: Dict[str, str]):
    """(timings, peak memory) per provider: one by one on CUDA, in alternation on CPU. A provider failing while
    timed gets its error in `errors` and no timing."""
    synchronize(device)
    timings, peaks = {}, {}
    if device.type == "cuda":
        for provider, fn in calls.items():
            try:
                timings[provider] = time_cuda(fn, budget)
                peaks[provider] = peak_memory_mb(fn, device)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: reported in the row
                errors[provider] = error_text(e)
                torch.cuda.empty_cache()
        return timings, peaks
    try:
        timings = time_cpu_paired(calls, budget) if calls else {}
    except Exception as e:  # noqa: BLE001
        for provider in calls:
            errors[provider] = error_text(e)
    return timings, {p: None for p in timings}


def error_text(e: Exception) -> str:
    first_line = str(e).splitlines()[0][:200] if str(e) else ""
    return f"error: {type(e).__name__}: {first_line}"


def run_op_case(case: OpCase, device: torch.device, budget: TimingBudget, copy_gbps: float) -> List[dict]:
    """Time every provider of `case`; one row per provider (a provider that fails gets a row with the error)."""
    dtype = DTYPES[case.dtype]
    memory_format = LAYOUTS[case.layout]
    # Drawn on the device: a batch-256 input drawn on the host would cost more than timing it.
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(case.batch, case.shape.in_chs, case.shape.H, case.shape.W, generator=gen, device=device)
    x = x.to(dtype).contiguous(memory_format=memory_format)
    calls, errors, rel_errs = {}, {}, {}
    reference_out = None
    fallbacks = {}
    for provider in case.providers:
        try:
            with record_fallbacks() as caught:
                module = build_provider(provider, case.op, case.shape).to(device=device, dtype=dtype,
                                                                           memory_format=memory_format)
                if case.direction == "forward":
                    with torch.no_grad():
                        out = module(x)  # also compiles a compiled provider, outside the timing
                    if provider == "eager":
                        reference_out = out
                    elif reference_out is not None and provider != "conv1x1":
                        rel_errs[provider] = _rel_err(out, reference_out)
                call = _direction_callable(module, x, case.direction)
                call()  # a compiled backward compiles on its first call, outside the timing
            calls[provider] = call
            if caught:
                fallbacks[provider] = "fell back to eager: " + " | ".join(caught)
        except Exception as e:  # noqa: BLE001 - a failing provider is reported in its row, the run goes on
            errors[provider] = error_text(e)
    timings, peaks = time_providers(calls, device, budget, errors)
    eager_params = build_provider("eager", case.op, case.shape).parameters()
    weight_bytes = sum(p.numel() for p in eager_params) * (torch.finfo(dtype).bits // 8)
    nbytes = min_bytes(case.op, case.shape, case.batch, dtype, case.direction, weight_bytes)
    peer_p50 = {peer: timings[peer].p50 for peer in PEERS if peer in timings}
    rows = []
    for provider in case.providers:
        row = {
            "suite": "ops", "op": case.op, "model": model_names(case.shape), "in_chs": case.shape.in_chs,
            "out_chs": case.shape.out_chs, "ratio": case.shape.ratio, "dw": case.shape.dw, "H": case.shape.H,
            "W": case.shape.W, "relu": int(case.shape.relu), "has_attention": int(case.shape.has_attention),
            "dtype": case.dtype, "layout": case.layout, "batch": case.batch, "direction": case.direction,
            "provider": provider, "bytes": nbytes, "copy_gbps": round(copy_gbps, 2),
            "rel_err_vs_eager": format_number(rel_errs.get(provider), ".2e"),
        }
        note = [provider_note(provider, case.op, case.direction), fallbacks.get(provider, "")]
        t = timings.get(provider)
        if t is None:
            note.append(errors.get(provider, "error: not timed"))
        else:
            gbps = nbytes / (t.p50 * 1e-3) / 1e9
            row.update({
                "t_p20_ms": format_number(t.p20, ".5f"), "t_p50_ms": format_number(t.p50, ".5f"), "t_p80_ms": format_number(t.p80, ".5f"),
                "reps": t.reps if t.reps >= 0 else "",
                "gbps": format_number(gbps, ".2f"), "bw_share": format_number(gbps / copy_gbps, ".4f"),
                "peak_mem_mb": format_number(peaks.get(provider), ".2f"),
            })
            for peer, p50 in peer_p50.items():
                row[f"speedup_vs_{peer}"] = format_number(p50 / t.p50, ".3f")
        row["note"] = "; ".join(n for n in note if n)
        rows.append(row)
    del calls
    if any(p.startswith("compile") for p in case.providers):
        torch._dynamo.reset()  # every case compiles anew; without a reset dynamo's recompile limit is hit
    return rows


def format_number(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)
