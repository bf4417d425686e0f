"""The backends: one interface (`Backend`), one table (`BACKENDS`), and the selection and fallback policy.

Every backend implements the same six functions with the same signatures (`Backend` below); `ghostfast.ops`
dispatches by lookup in `BACKENDS`, and the tests enumerate backends from the same table. Each backend says what it
cannot run and why (`Backend.unavailable`, `Backend.dtype_unsupported`): that reason is what the fallback warning
and strict mode print.

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
                                  "cpu_stats": _registered("CPU", _COMPILED_STATS_OPS),
                                  "depthwise_bn": _registered("CPU", ("_depthwise_bn_kernel",))}
    return _C_STATE["registered"]


def resolution_state() -> tuple:
    """What backend availability depends on beyond the device and the request: TRITON_INTERPRET and the compiled
    registrations (refreshed by refresh_compiled). Part of the key under which modules cache a resolved backend."""
    return triton_interpreting(), _C_STATE.get("refreshed", 0)  # a count, not id(): dynamo traces this


def refresh_compiled() -> dict:
    """Re-read the registrations, e.g. after loading a development build (scripts/dev_build.py) into this process."""
    _C_STATE.pop("registered", None)
    _C_STATE["refreshed"] = _C_STATE.get("refreshed", 0) + 1
    return _compiled_registrations()


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """The concrete backends that can run on `device` (default: cuda if present, else cpu), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    order = ("cpu", "triton", "cuda", "reference")
    return [n for n in order if BACKENDS[n].unavailable(device_type) is None]


def stats_backend(name: str, device: torch.device) -> tuple[Optional[str], Optional[str]]:
    """(backend computing training-mode BatchNorm statistics next to the fused op running on backend `name`, or
    None; the reason when None). `cuda` has no statistics kernels of its own: Triton computes them on the GPU."""
    if name == "auto":  # several fused candidates: CUDA with triton and cuda
        name = torch.device(device).type
    if name not in BACKENDS:
        return None, f"no BatchNorm statistics kernels for backend {name!r}"
    return BACKENDS[name].stats_backend(torch.device(device).type)


def dtype_unsupported(name: str, dtype: torch.dtype) -> Optional[str]:
    """Why backend `name` cannot run `dtype`, or None."""
    return BACKENDS[name].dtype_unsupported(dtype) if name in BACKENDS else None


def get_backend(name: str) -> "Backend":
    """The backend called `name` (a concrete name: not 'auto'); a clear error for anything else."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {name!r}") from None


def default_backend() -> str:
    name = os.environ.get("GHOSTFAST_BACKEND", "auto").strip().lower() or "auto"
    check_backend_name(name, source="GHOSTFAST_BACKEND")
    return name


def default_strict() -> bool:
    return os.environ.get("GHOSTFAST_STRICT", "0").strip().lower() in ("1", "true", "yes", "on")


def check_backend_name(name: str, source: str = "backend") -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")


def act_unsupported(name: str, act: Optional[str]) -> Optional[str]:
    """Why backend `name` has no kernels for the activation `act`, or None (also for act None: not asked)."""
    if act is None or name not in BACKENDS or act in BACKENDS[name].ACTIVATIONS:
        return None
    return f"no {act} activation in its kernels (it has {', '.join(BACKENDS[name].ACTIVATIONS)})"


def auto_candidates(device: torch.device, dtype: Optional[torch.dtype] = None, act: Optional[str] = None) -> List[str]:
    """The fused backends `auto` chooses among. On CPU the compiled kernels, when built, rule out the Triton
    interpreter (a correctness tool, never fast); on CUDA, triton and cuda compete per op and shape."""
    fused = [n for n in available_backends(device)
             if n != "reference" and (dtype is None or not dtype_unsupported(n, dtype)) and not act_unsupported(n, act)]
    if torch.device(device).type == "cpu" and "cpu" in fused:
        fused = ["cpu"]
    return fused


def resolve_backend(requested: Optional[str], device: torch.device,
                    dtype: Optional[torch.dtype] = None, act: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(backend, fallback reason or None) for a request (one of BACKEND_NAMES, or None: GHOSTFAST_BACKEND).

    `auto` resolves to the one fused backend that can run `device` and `dtype`, to `reference` when there is
    none, or stays `auto` when several can (CUDA with both `triton` and `cuda`): ghostfast.ops then measures
    which is faster per op and shape. `act`: the Ghost module's activation, when the op has one."""
    requested = default_backend() if requested is None else requested
    check_backend_name(requested)
    device = torch.device(device)
    available = available_backends(device)
    if requested == "auto":
        fused = auto_candidates(device, dtype, act)
        if not fused and auto_candidates(device):
            # fused backends run this device, none this dtype / activation: the fallback is worth a warning
            why = "; ".join(filter(None, ((dtype_unsupported(n, dtype) if dtype is not None else None)
                                          or act_unsupported(n, act) for n in auto_candidates(device))))
            return "reference", f"backend 'auto': no fused backend can run this on {device} ({why})"
        return ("auto" if len(fused) > 1 else (fused or ["reference"])[0]), None
    if requested in available:
        why = (None if dtype is None else dtype_unsupported(requested, dtype)) or act_unsupported(requested, act)
        return (requested, None) if why is None else ("reference", f"backend {requested!r}: {why}")
    return "reference", f"backend {requested!r} cannot run on {device}: {_unavailable_reason(requested, device)}"


def _unavailable_reason(name: str, device: torch.device) -> str:
    return BACKENDS[name].unavailable(device.type) or "unavailable"


_warned: set = set()


def fallback(reason: str, strict: bool) -> None:
    """Apply the fallback policy: raise in strict mode, else warn once per distinct reason."""
    if strict:
        raise GhostfastUnsupported(f"ghostfast cannot run this fused ({reason}) and strict mode is on")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"ghostfast: running eager PyTorch instead of a fused kernel: {reason}",
                      GhostfastFallbackWarning, stacklevel=3)



class Backend:
    """The interface every backend implements, with the same signatures (`ghostfast.ops` calls nothing else).

    BatchNorm arguments (`bn1` ... `bn5`) are `ghostfast.reference.BatchNormParams` of live tensors, folded per
    channel inside the forward launches; the backward functions take the folded (scale, shift) vectors in the
    accumulation dtype (the op's autograd folds them) and return one gradient per input, None where `needs` is
    False. `mode` of the DFC functions: 'gate' (pooled resolution) or 'nearest' / 'bilinear' (upsampled)."""

    name: str = ""
    # The Ghost module activations its kernels implement (a subset of ghostfast.reference.ACTIVATIONS).
    ACTIVATIONS: tuple = ("none", "relu", "relu6", "hardswish", "silu")

    # -- what it can run, and why not --------------------------------------------------------------------
    def unavailable(self, device_type: str) -> Optional[str]:
        """Why this backend cannot run tensors of `device_type` here, or None."""
        raise NotImplementedError

    def dtype_unsupported(self, dtype: torch.dtype) -> Optional[str]:
        """Why this backend has no kernels for `dtype` here, or None."""
        return None

    def stats_backend(self, device_type: str) -> tuple[Optional[str], Optional[str]]:
        """(the backend computing training-mode BatchNorm statistics for this one, reason when None)."""
        return self.name, None

    # -- the ops --------------------------------------------------------------------------------------------
    def ghost_module(self, x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode):
        raise NotImplementedError

    def ghost_module_backward(self, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                              cheap_scale, cheap_bias, out_channels, act, gate, gate_mode, needs):
        """-> [x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate]."""
        raise NotImplementedError

    def ghost_module_stats(self, x, primary_weight, bn1, cheap_weight, act, stage):
        """-> (mean, biased var) of z1 (stage 1) or z2 (stage 2), in the accumulation dtype."""
        raise NotImplementedError

    def ghost_module_stats_backward(self, x, primary_weight, primary_scale, primary_bias, cheap_weight, act, stage,
                                    coef_a, coef_c, mean, needs):
        """Gradients of sum(dz * z) over the stage's z with dz = coef_a + coef_c * (z - mean) per channel
        -> [x, primary_weight, primary_scale, primary_bias, cheap_weight] (stage 1: the first two at most)."""
        raise NotImplementedError

    def dfc(self, x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode):
        raise NotImplementedError

    def dfc_backward(self, grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale,
                     v_bias, mode, needs):
        """-> [x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias]."""
        raise NotImplementedError


# The table: every concrete backend, by name. Imported here, after the helpers they use are defined.
from .backend_reference import ReferenceBackend  # noqa: E402
from .backend_triton import TritonBackend  # noqa: E402
from .compiled import CompiledBackend  # noqa: E402

BACKENDS = {
    "triton": TritonBackend(),
    "cpu": CompiledBackend("cpu"),
    "cuda": CompiledBackend("cuda"),
    "reference": ReferenceBackend(),
}

_compiled_registrations()  # import ghostfast._C now, never for the first time inside a compiled trace
