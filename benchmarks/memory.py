"""Memory benchmark: what a forward keeps for the backward, and how many kernels a step launches, eager vs converted.

For every distinct Ghost-module shape of timm's GhostNets (benchmarks/shapes.py) and for whole models, in eval mode
with trainable parameters (`mode` eval: frozen-BN fine-tuning) and in training mode (`mode` train: BatchNorm with
batch statistics, ghostfast's statistics kernels; GhostModuleV2's DFC branch eager), one forward with gradients
records every tensor autograd saves for the backward (`torch.autograd.graph.saved_tensors_hooks`), deduplicated
by storage: views of one buffer, and a buffer saved by several nodes, count once. Storages of the model's own
parameters and buffers are counted apart (`saved_param_bytes`); the rest is `saved_activation_bytes`, the module
input included (eager and converted both keep it). On a GPU, `peak_mem_mb` is the peak memory one
forward+backward allocates above what was allocated before it (torch.cuda.max_memory_allocated).

Launches (`infer_launches`: a no_grad forward; `fwd_launches` and `bwd_launches`: the forward with gradients and its
backward): on a GPU the profiler's CUDA kernels (and memsets/memcpys); on a CPU the profiler's innermost aten ops
that compute (views, allocations and dtype no-ops left out: what would be a kernel launch on a GPU), each Triton
launch counted once (under the interpreter its host-side copies are the interpreter's, not the kernel's), and the
compiled backends' `ghostfast::_*_kernel` calls. `launches_detail` lists them by name."""
from __future__ import annotations

import contextlib
import copy
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

import ghostfast
from ghostfast.models import timm_ghostnet

from .measure import peak_memory_mb
from .ops import DTYPES, error_text, format_number, record_fallbacks
from .shapes import IMAGE_SIZE, GhostShape, model_names

PROVIDERS = ("eager", "converted")
COLUMNS = [
    "suite", "op", "mode", "model", "in_chs", "out_chs", "ratio", "dw", "H", "W", "relu", "has_attention",
    "dtype", "batch", "provider", "backend", "saved_tensors", "saved_activation_bytes", "saved_param_bytes",
    "activation_ratio_vs_eager", "peak_mem_mb", "peak_ratio_vs_eager",
    "infer_launches", "fwd_launches", "bwd_launches", "launches_detail",
    "threads", "device", "git_sha", "torch", "triton", "cuda", "python", "date", "run_id", "note",
]


@dataclass
class MemoryCase:
    """A Ghost-module shape (`shape`) or a whole model (`model`), at one batch and dtype."""

    batch: int
    dtype: str
    shape: Optional[GhostShape] = None
    model: Optional[str] = None
    providers: Tuple[str, ...] = PROVIDERS
    mode: str = "eval"  # eval: frozen BatchNorm (folded); train: batch statistics

    @property
    def label(self) -> str:
        what = self.model if self.model else f"{_op(self.shape)} {self.shape.label}"
        return f"memory {what} {self.mode} b{self.batch} {self.dtype}"


def _op(shape: GhostShape) -> str:
    return "ghost_module_v2" if shape.has_attention else "ghost_module"


def fused_backend(device: torch.device) -> Optional[str]:
    """The backend `converted` uses: the first fused one available (the Triton interpreter included: memory is
    what it measures, not time), or None when only the reference exists."""
    fused = [b for b in ghostfast.available_backends(device) if b != "reference"]
    return fused[0] if fused else None


class SavedTensors:
    """Bytes of the distinct storages saved for backward inside the context, parameters' storages apart."""

    def __init__(self, module: nn.Module):
        self.param_storages = {t.untyped_storage().data_ptr() for t in list(module.parameters()) +
                               list(module.buffers())}
        self.storages = {}
        self.count = 0

    def _pack(self, t: torch.Tensor):
        self.count += 1
        storage = t.untyped_storage()
        self.storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def param_bytes(self) -> int:
        return sum(n for (_, ptr), n in self.storages.items() if ptr in self.param_storages)

    @property
    def activation_bytes(self) -> int:
        return sum(n for (_, ptr), n in self.storages.items() if ptr not in self.param_storages)


# Profiler events that launch nothing on a GPU: views, allocations, metadata, and wrappers whose work (if any) is
# a child event (aten::to -> aten::_to_copy -> aten::copy_).
_NOT_KERNELS = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::view", "aten::_unsafe_view", "aten::view_as", "aten::reshape", "aten::_reshape_alias", "aten::flatten",
    "aten::slice", "aten::select", "aten::narrow", "aten::as_strided", "aten::as_strided_", "aten::expand",
    "aten::t", "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::alias",
    "aten::detach", "detach", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous",
    "aten::to", "aten::_to_copy", "aten::split", "aten::chunk", "aten::unbind", "aten::result_type", "aten::size",
    "aten::stride", "aten::set_", "aten::resize_", "aten::resize_as_", "aten::item", "aten::_local_scalar_dense",
    "aten::is_nonzero", "aten::_nnpack_available",
}


def _kernel_like(name: str) -> bool:
    if name.startswith("ghostfast::_") and name.endswith("_kernel"):
        return True
    return name.startswith("aten::") and name not in _NOT_KERNELS


@contextlib.contextmanager
def _triton_launches_as_ranges():
    """Under the Triton interpreter, each launch as one profiler range named triton::<kernel>."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        yield
        return
    run = InterpretedFunction.run

    def marked(self, *args, **kwargs):
        with torch.profiler.record_function(f"triton::{self.fn.__name__}"):
            return run(self, *args, **kwargs)

    InterpretedFunction.run = marked
    try:
        yield
    finally:
        InterpretedFunction.run = run


def count_launches(fn, device: torch.device) -> Counter:
    """Kernel launches of one call of fn(), by name (see the module docstring for what counts on each device)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    with _triton_launches_as_ranges(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = Counter()

    def visit(event) -> bool:  # True when the subtree counted a launch
        if event.name.startswith("triton::"):
            counts[event.name] += 1
            return True
        below = [visit(child) for child in event.cpu_children]
        if event.name.startswith("ghostfast::_") and event.name.endswith("_kernel"):
            counts[event.name] += 1  # a compiled kernel is a launch, whatever aten ops (buffer fills) it runs inside
            return True
        if any(below):
            return True
        if _kernel_like(event.name):
            counts[event.name] += 1
            return True
        return False

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return counts


def _launches(module: nn.Module, x: torch.Tensor, inputs, device: torch.device) -> Tuple[Counter, Counter, Counter]:
    """(no_grad forward, forward with gradients, backward) launches, after one warm-up of each (autotuning,
    auto's backend choice and lazy initialization are not what a step launches)."""
    with torch.no_grad():
        module(x)
        infer = count_launches(lambda: module(x), device)
    out = module(x)
    grad = torch.randn_like(out)
    torch.autograd.grad(out, inputs, grad, retain_graph=True)
    forward = count_launches(lambda: module(x), device)
    backward = count_launches(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), device)
    return infer, forward, backward


def _detail(counts: Counter) -> str:
    return " ".join(f"{name.split('::')[-1]}x{n}" for name, n in sorted(counts.items()))


def build(case: MemoryCase, provider: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if case.model:
        module = timm_ghostnet(case.model)
    else:
        module = copy.deepcopy(case.shape.module)
    module = module.to(device=device, dtype=dtype).train(case.mode == "train")
    if provider == "converted":
        backend = fused_backend(device)
        module = ghostfast.convert(module, backend=backend or "reference", strict=False)
    return module


def _input(case: MemoryCase, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(0)
    if case.model:
        shape = (case.batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    else:
        shape = (case.batch, case.shape.in_chs, case.shape.H, case.shape.W)
    # requires grad: inside a network a Ghost module's input comes from trainable layers
    return torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(not case.model)


def measure(module: nn.Module, x: torch.Tensor, device: torch.device, launches: bool):
    """(saved tensors, peak MiB or None, launches (infer, forward, backward) or None)."""
    with SavedTensors(module) as saved:
        out = module(x)
    grad = torch.randn_like(out)
    inputs = [p for p in module.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])

    def forward_backward():
        torch.autograd.grad(module(x), inputs, grad)

    del out
    peak = peak_memory_mb(forward_backward, device) if device.type == "cuda" else None
    return saved, peak, (_launches(module, x, inputs, device) if launches else None)


def run_memory_case(case: MemoryCase, device: torch.device) -> List[dict]:
    dtype = DTYPES[case.dtype]
    results, notes = {}, {}
    for provider in case.providers:
        try:
            with record_fallbacks() as caught:
                module = build(case, provider, device, dtype)
                x = _input(case, device, dtype)
                results[provider] = measure(module, x, device, launches=case.shape is not None)
            if caught:
                notes[provider] = "fell back to eager: " + " | ".join(caught)
            del module, x
        except Exception as e:  # noqa: BLE001 - reported in the row
            notes[provider] = error_text(e)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    eager = results.get("eager")
    rows = []
    for provider in case.providers:
        row = {"suite": "memory", "mode": case.mode, "dtype": case.dtype, "batch": case.batch,
               "provider": provider,
               "backend": (fused_backend(device) or "reference") if provider == "converted" else ""}
        if case.model:
            row.update({"op": "model_forward_backward", "model": case.model, "H": IMAGE_SIZE, "W": IMAGE_SIZE})
        else:
            s = case.shape
            row.update({"op": _op(s), "model": model_names(s), "in_chs": s.in_chs, "out_chs": s.out_chs,
                        "ratio": s.ratio, "dw": s.dw, "H": s.H, "W": s.W, "relu": int(s.relu),
                        "has_attention": int(s.has_attention)})
        note = [notes.get(provider, "")]
        if provider == "converted" and row["backend"] == "reference":
            note.append("no fused backend on this device: the converted model runs the original submodules")
        got = results.get(provider)
        if got is not None:
            saved, peak, launches = got
            row.update({"saved_tensors": saved.count, "saved_activation_bytes": saved.activation_bytes,
                        "saved_param_bytes": saved.param_bytes, "peak_mem_mb": format_number(peak, ".2f")})
            if launches is not None:
                infer, forward, backward = launches
                row.update({"infer_launches": sum(infer.values()), "fwd_launches": sum(forward.values()),
                            "bwd_launches": sum(backward.values()),
                            "launches_detail": f"infer: {_detail(infer)} | fwd: {_detail(forward)} | "
                                               f"bwd: {_detail(backward)}"})
            if eager is not None:
                row["activation_ratio_vs_eager"] = format_number(saved.activation_bytes /
                                                                 max(eager[0].activation_bytes, 1), ".3f")
                if peak is not None and eager[1]:
                    row["peak_ratio_vs_eager"] = format_number(peak / eager[1], ".3f")
        row["note"] = "; ".join(n for n in note if n)
        rows.append(row)
    return rows


def memory_plan(device: torch.device, quick: bool, shapes, models) -> List[MemoryCase]:
    """The whole models, then every Ghost-module shape (with launch counts). Batch 1 float32 on CPU (the fused
    path may be the Triton interpreter there: it runs, slowly; saved bytes grow linearly with the batch); on CUDA
    batch 32 float16, then float32. Quick: on CPU the first shape without and with attention only (launch counts
    under the Triton interpreter take ~30 s a shape), on CUDA float16 only."""
    if device.type == "cpu":
        configs = [(1, "float32")]
        if quick:
            firsts = [next((s for s in shapes if s.has_attention == attention), None) for attention in (False, True)]
            shapes = [s for s in firsts if s is not None]
    else:
        configs = [(32, "float16")] + ([] if quick else [(32, "float32")])
    cases = []
    for batch, dtype in configs:
        for mode in ("eval", "train"):
            b = batch if mode == "eval" else max(batch, 2)  # batch statistics of a 1x1 map need two images
            if not (quick and device.type == "cpu"):
                # GhostNetV3 after reparameterization has GhostNetV1/V2's Ghost modules: nothing new to measure
                cases += [MemoryCase(b, dtype, model=m, mode=mode) for m in models if m != "ghostnetv3_100"]
            cases += [MemoryCase(b, dtype, shape=s, mode=mode) for s in shapes]
    return cases
