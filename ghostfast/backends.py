"""Backend selection: which implementation runs an op for a tensor's device, and the fallback policy.

Backends: `triton` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), `cuda` and `cpu` (the compiled C++
kernels of `ghostfast._C`, csrc/), and `reference` (eager PyTorch, the spec). `auto` picks the fastest available:
`cpu` for CPU tensors; on CUDA tensors the faster of `triton` and `cuda`, measured once per op and shape
(ghostfast.ops). Unsupported configurations fall back to `reference` with a one-time warning naming the reason,
or raise `GhostfastUnsupported` in strict mode. The package works without `ghostfast._C` (Triton, reference).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import List, Optional

import torch

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "reference")

# The dtypes each compiled backend's kernels instantiate (csrc/cpu/*.cpp, csrc/cuda/*.cu).
COMPILED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
_COMPILED_OPS = ("_ghost_module_kernel", "_ghost_module_backward_kernel", "_dfc_kernel", "_dfc_backward_kernel")
# Training-mode BatchNorm statistics of the Ghost module: compiled for CPU only (on CUDA, Triton computes them).
_COMPILED_STATS_OPS = ("_ghost_module_stats_kernel", "_ghost_module_stats_backward_kernel")


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


_C_STATE: dict = {}


def load_extension():
    """`ghostfast._C` (importing it registers the compiled kernels), or None when it was not built."""
    if "module" not in _C_STATE:
        try:
            from . import _C  # noqa: F401
            _C_STATE["module"], _C_STATE["error"] = _C, None
        except ImportError as e:  # not built (e.g. GHOSTFAST_BUILD_C=0) or built against another torch
            _C_STATE["module"], _C_STATE["error"] = None, f"{type(e).__name__}: {e}"
    return _C_STATE["module"]


def extension_error() -> Optional[str]:
    """Why `ghostfast._C` could not be imported, or None."""
    load_extension()
    return _C_STATE["error"]


def build_info() -> Optional[dict]:
    """How `ghostfast._C` was built (compiler, CUDA version and archs, OpenMP, CPU ISA), or None without it."""
    ext = load_extension()
    return None if ext is None else dict(ext.build_info())


def _registered(dispatch_key: str, ops=_COMPILED_OPS) -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ghostfast::{op}", dispatch_key)
                   for op in ops)
    except RuntimeError:  # the schemas are not registered: no extension
        return False


def _compiled_registrations() -> dict:
    """{'cpu': bool, 'cuda': bool}: whether the compiled kernels are registered, read once (at import, below) so
    that backend choice inside a torch.compile trace is plain dict lookups (no import, no dispatcher query)."""
    if "registered" not in _C_STATE:
        load_extension()
        _C_STATE["registered"] = {"cpu": _registered("CPU"), "cuda": _registered("CUDA"),
                                  "cpu_stats": _registered("CPU", _COMPILED_STATS_OPS)}
    return _C_STATE["registered"]


def refresh_compiled() -> dict:
    """Re-read the registrations, e.g. after loading a development build (scripts/dev_build.py) into this process."""
    _C_STATE.pop("registered", None)
    return _compiled_registrations()


def _compiled_runs_on(device_type: str) -> bool:
    """True when the compiled kernels are registered for this device type (`cpu` -> CPU, `cuda` -> CUDA)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    return _compiled_registrations().get(device_type, False)


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """The concrete backends that can run on `device` (default: cuda if present, else cpu), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    names = []
    if device_type == "cpu" and _compiled_runs_on("cpu"):
        names.append("cpu")
    if _triton_runs_on(device_type):
        names.append("triton")
    if device_type == "cuda" and _compiled_runs_on("cuda"):
        names.append("cuda")
    names.append("reference")
    return names


def stats_backend(name: str, device: torch.device) -> tuple[Optional[str], Optional[str]]:
    """(backend computing training-mode BatchNorm statistics next to the fused op running on backend `name`, or
    None; the reason when None). `cuda` has no statistics kernels of its own: Triton computes them on the GPU."""
    if name == "auto":  # several fused candidates: CUDA with triton and cuda
        name = torch.device(device).type
    if name in ("triton", "reference"):
        return name, None
    if name == "cpu":
        if _compiled_registrations().get("cpu_stats", False):
            return "cpu", None
        return None, "ghostfast._C was built without the CPU BatchNorm statistics kernels"
    if name == "cuda":
        if _triton_runs_on(torch.device(device).type):
            return "triton", None
        return None, "the cuda backend computes training-mode BatchNorm statistics with Triton, which cannot run here"
    return None, f"no BatchNorm statistics kernels for backend {name!r}"


def dtype_unsupported(name: str, dtype: torch.dtype) -> Optional[str]:
    """Why backend `name` cannot run `dtype`, or None."""
    if name == "triton" and dtype == torch.bfloat16 and triton_interpreting():
        return "the Triton interpreter does not support bfloat16"
    if name in COMPILED_DTYPES and dtype not in COMPILED_DTYPES[name]:
        return f"the {name} backend has no {dtype} kernels"
    return None


def default_backend() -> str:
    name = os.environ.get("GHOSTFAST_BACKEND", "auto").strip().lower() or "auto"
    check_backend_name(name, source="GHOSTFAST_BACKEND")
    return name


def default_strict() -> bool:
    return os.environ.get("GHOSTFAST_STRICT", "0").strip().lower() in ("1", "true", "yes", "on")


def check_backend_name(name: str, source: str = "backend") -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")


def auto_candidates(device: torch.device, dtype: Optional[torch.dtype] = None) -> List[str]:
    """The fused backends `auto` chooses among. On CPU the compiled kernels, when built, rule out the Triton
    interpreter (a correctness tool, never fast); on CUDA, triton and cuda compete per op and shape."""
    fused = [n for n in available_backends(device)
             if n != "reference" and (dtype is None or not dtype_unsupported(n, dtype))]
    if torch.device(device).type == "cpu" and "cpu" in fused:
        fused = ["cpu"]
    return fused


def resolve_backend(requested: Optional[str], device: torch.device,
                    dtype: Optional[torch.dtype] = None) -> tuple[str, Optional[str]]:
    """(backend, fallback reason or None) for a request (one of BACKEND_NAMES, or None: GHOSTFAST_BACKEND).

    `auto` resolves to the one fused backend that can run `device` and `dtype`, to `reference` when there is
    none, or stays `auto` when several can (CUDA with both `triton` and `cuda`): ghostfast.ops then measures
    which is faster per op and shape."""
    requested = default_backend() if requested is None else requested
    check_backend_name(requested)
    device = torch.device(device)
    available = available_backends(device)
    if requested == "auto":
        fused = auto_candidates(device, dtype)
        return ("auto" if len(fused) > 1 else (fused or ["reference"])[0]), None
    if requested in available:
        why = None if dtype is None else dtype_unsupported(requested, dtype)
        return (requested, None) if why is None else ("reference", f"backend {requested!r}: {why}")
    return "reference", f"backend {requested!r} cannot run on {device}: {_unavailable_reason(requested, device)}"


def _unavailable_reason(name: str, device: torch.device) -> str:
    if name == "triton":
        return {
            "cpu": "Triton runs CPU tensors only under TRITON_INTERPRET=1",
            "cuda": "Triton is not installed" if not _triton_importable() else "TRITON_INTERPRET=1 is set",
        }.get(device.type, f"no Triton backend for device type {device.type!r}")
    if name in ("cpu", "cuda"):
        if load_extension() is None:
            return f"the compiled extension ghostfast._C is not available ({extension_error()})"
        if name != device.type:
            return f"the {name} backend runs {name.upper()} tensors only"
        return f"ghostfast._C was built without {name.upper()} kernels"
    return "unavailable"


_warned: set = set()


def fallback(reason: str, strict: bool) -> None:
    """Apply the fallback policy: raise in strict mode, else warn once per distinct reason."""
    if strict:
        raise GhostfastUnsupported(f"ghostfast cannot run this fused ({reason}) and strict mode is on")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"ghostfast: running eager PyTorch instead of a fused kernel: {reason}",
                      GhostfastFallbackWarning, stacklevel=3)


_compiled_registrations()  # import ghostfast._C now, never for the first time inside a compiled trace
