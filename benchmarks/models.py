"""Model benchmarks: timm's ghostnet_100, ghostnetv2_100 and ghostnetv3_100 (reparameterized) at 224x224,
inference and one SGD training step, eager vs torch.compile vs ghostfast.convert vs convert + torch.compile."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import ghostfast
from ghostfast.models import timm_ghostnet

from .measure import TimingBudget
from .ops import DTYPES, LAYOUTS, error_text, format_number, ghostfast_backends, record_fallbacks, time_providers

WORKLOADS = ("inference", "train_step")
IMAGE_SIZE = 224
PEERS = ("eager", "compile")


@dataclass
class ModelCase:
    """One timed model configuration; every provider in `providers` runs it on the same batch."""

    model: str
    workload: str
    batch: int
    dtype: str
    layout: str
    providers: Tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.model} {self.workload} b{self.batch} {self.dtype} {self.layout}"


def build_model(provider: str, base: nn.Module, device: torch.device) -> nn.Module:
    """'eager', 'compile', 'converted' (ghostfast.convert with backend 'auto': the compiled cpu kernels on CPU, the
    faster of triton and cuda per shape on a GPU; never the Triton CPU interpreter) or 'converted+compile'."""
    model = copy.deepcopy(base)
    if provider.startswith("converted"):
        model = ghostfast.convert(model, backend=_converted_backend(device))
    if provider.endswith("compile"):
        model = torch.compile(model, dynamic=False)  # one static graph per case, as for a fixed input size
    return model


def _converted_backend(device: torch.device) -> str:
    fused = [b for b in ghostfast_backends(device) if b != "reference"]
    return "auto" if fused else "reference"


def provider_note(provider: str, workload: str, device: torch.device) -> str:
    if not provider.startswith("converted"):
        return ""
    fused = [b for b in ghostfast_backends(device) if b != "reference"]
    note = f"ghostfast backend auto ({'/'.join(fused)})" if fused else "ghostfast backend reference"
    if workload == "train_step":
        if device.type == "cpu":
            note += "; training on CPU: auto runs the original submodules (the fused C++ backward is slower there)"
        else:
            note += "; training mode: BatchNorm batch statistics from ghostfast's statistics kernels, DFC branch eager"
    elif not fused:
        note += " (runs the original submodules)"
    return note


def _workload_callable(model: nn.Module, workload: str, x: torch.Tensor, labels: torch.Tensor) -> Callable:
    if workload == "inference":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(x)
        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss
    return train_step


def run_model_case(case: ModelCase, device: torch.device, budget: TimingBudget) -> List[dict]:
    dtype = DTYPES[case.dtype]
    memory_format = LAYOUTS[case.layout]
    base = timm_ghostnet(case.model).to(device=device, dtype=dtype, memory_format=memory_format)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(case.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen, device=device).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (case.batch,), generator=gen, device=device)
    calls, errors, fallbacks = {}, {}, {}
    for provider in case.providers:
        try:
            with record_fallbacks() as caught:
                fn = _workload_callable(build_model(provider, base, device), case.workload, x, labels)
                fn()  # compiles a compiled provider outside the timing
            # Training a converted model falls back to the submodules by design; provider_note says so.
            if caught and case.workload == "inference":
                fallbacks[provider] = "fell back to eager: " + " | ".join(caught)
            calls[provider] = fn
        except Exception as e:  # noqa: BLE001 - reported in the provider's row; the run goes on
            errors[provider] = error_text(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ghostfast.GhostfastFallbackWarning)
        timings, peaks = time_providers(calls, device, budget, errors)
    peer_p50 = {peer: timings[peer].p50 for peer in PEERS if peer in timings}
    rows = []
    for provider in case.providers:
        row = {"suite": "models", "op": case.workload, "model": case.model, "dtype": case.dtype,
               "layout": case.layout, "batch": case.batch, "H": IMAGE_SIZE, "W": IMAGE_SIZE,
               "direction": "forward" if case.workload == "inference" else "forward+backward+sgd",
               "provider": provider}
        note = [provider_note(provider, case.workload, device), fallbacks.get(provider, "")]
        t = timings.get(provider)
        if t is None:
            note.append(errors.get(provider, "error: not timed"))
        else:
            row.update({"t_p20_ms": format_number(t.p20, ".4f"), "t_p50_ms": format_number(t.p50, ".4f"),
                        "t_p80_ms": format_number(t.p80, ".4f"), "reps": t.reps if t.reps >= 0 else "",
                        "images_per_s": format_number(case.batch / (t.p50 * 1e-3), ".1f"),
                        "peak_mem_mb": format_number(peaks.get(provider), ".1f")})
            for peer, p50 in peer_p50.items():
                row[f"speedup_vs_{peer}"] = format_number(p50 / t.p50, ".3f")
        row["note"] = "; ".join(n for n in note if n)
        rows.append(row)
    del calls
    if any("compile" in p for p in case.providers):
        torch._dynamo.reset()
    return rows
