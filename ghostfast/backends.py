"""Backend selection: which implementation runs an op for a tensor's device, and the fallback policy.

Backends: `triton` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1) and `reference` (eager PyTorch, the
spec). `auto` picks the fastest available. Unsupported configurations fall back to `reference` with a
one-time warning naming the reason, or raise `GhostfastUnsupported` in strict mode.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import List, Optional

import torch

BACKEND_NAMES = ("auto", "triton", "reference")


class GhostfastUnsupported(RuntimeError):
    """Raised in strict mode where the default policy would fall back to eager PyTorch."""


class GhostfastFallbackWarning(UserWarning):
    """Emitted once per reason when ghostfast runs a module in eager PyTorch instead of a fused kernel."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def _triton_runs_on(device_type: str) -> bool:
    if not _triton_importable():
        return False
    if device_type == "cuda":
        return torch.cuda.is_available() and not triton_interpreting()
    if device_type == "cpu":
        return triton_interpreting()
    return False


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """The concrete backends that can run on `device` (default: cuda if present, else cpu), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    names = []
    if _triton_runs_on(device_type):
        names.append("triton")
    names.append("reference")
    return names


def default_backend() -> str:
    name = os.environ.get("GHOSTFAST_BACKEND", "auto").strip().lower() or "auto"
    check_backend_name(name, source="GHOSTFAST_BACKEND")
    return name


def default_strict() -> bool:
    return os.environ.get("GHOSTFAST_STRICT", "0").strip().lower() in ("1", "true", "yes", "on")


def check_backend_name(name: str, source: str = "backend") -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")


def resolve_backend(requested: Optional[str], device: torch.device) -> tuple[str, Optional[str]]:
    """(concrete backend, fallback reason or None) for a request ('auto', 'triton', 'reference' or None)."""
    requested = default_backend() if requested is None else requested
    check_backend_name(requested)
    available = available_backends(device)
    if requested == "auto":
        return available[0], None
    if requested in available:
        return requested, None
    why = {
        "cpu": "Triton runs CPU tensors only under TRITON_INTERPRET=1",
        "cuda": "Triton is not installed" if not _triton_importable() else "TRITON_INTERPRET=1 is set",
    }.get(device.type, f"no Triton backend for device type {device.type!r}")
    return "reference", f"backend {requested!r} cannot run on {device}: {why}"


_warned: set = set()


def fallback(reason: str, strict: bool) -> None:
    """Apply the fallback policy: raise in strict mode, else warn once per distinct reason."""
    if strict:
        raise GhostfastUnsupported(f"ghostfast cannot run this fused ({reason}) and strict mode is on")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"ghostfast: running eager PyTorch instead of a fused kernel: {reason}",
                      GhostfastFallbackWarning, stacklevel=3)
