"""`ghostfast.convert(model)`: swap every recognisable Ghost module of a model for its fused drop-in.

Recognition is by structure, not class name: a module with `primary_conv` and `cheap_operation` Sequentials is a
Ghost module; with an active `short_conv` Sequential it carries DFC attention. This covers timm's GhostModule,
GhostModuleV2 and GhostModuleV3 (after reparameterization), Huawei's official GhostModuleV2 ('original' and
'attn' modes) and the paper's GhostModule, and users' copies of them. State_dict keys are unchanged.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch import nn

from .backends import check_backend_name, default_strict, fallback
from .nn import GhostModule, GhostModuleV2, StructureError, _FusedGhostBase

log = logging.getLogger("ghostfast")


@dataclass
class ConversionReport:
    """What `convert` did: (qualified name, kind) per converted module, (name, reason) per skipped one."""

    converted: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"ghostfast.convert: {len(self.converted)} converted, {len(self.skipped)} skipped"]
        lines += [f"  converted {name or '<root>'}: {kind}" for name, kind in self.converted]
        lines += [f"  skipped   {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _is_ghost_like(m: nn.Module) -> bool:
    if not (hasattr(m, "primary_conv") and hasattr(m, "cheap_operation")):
        return False
    # A GhostModuleV3 before reparameterization holds Identity placeholders: reported, not converted.
    return hasattr(m, "primary_rpr_conv") or (isinstance(m.primary_conv, nn.Sequential)
                                              and isinstance(m.cheap_operation, nn.Sequential))


def _plan(m: nn.Module):
    """(wrapper class, kwargs) for a Ghost-like module, or raise StructureError with the reason to skip it."""
    if hasattr(m, "primary_rpr_conv") or getattr(m, "infer_mode", True) is False:
        raise StructureError("GhostModuleV3 is not reparameterized; call timm's reparameterize_model(model) "
                             "(or module.reparameterize()) first")
    mode = getattr(m, "mode", None)
    short = getattr(m, "short_conv", None)
    has_attention = isinstance(short, nn.Sequential) and len(short) > 0 and mode not in ("original",)
    if mode is not None and mode not in ("original", "attn", "shortcut"):
        raise StructureError(f"unknown Ghost module mode {mode!r}")
    if hasattr(m, "infer_mode") and not has_attention:
        # GhostModuleV3 in 'original' mode returns the whole concat, not [:, :out_chs].
        return GhostModule, {"out_chs": m.primary_conv[0].out_channels + m.cheap_operation[0].out_channels}
    if has_attention:
        return GhostModuleV2, {}
    return GhostModule, {}


def convert(model: nn.Module, *, inplace: bool = False, backend: Optional[str] = None, strict: Optional[bool] = None,
            gate_mode: str = "nearest", verbose: bool = False) -> nn.Module:
    """Replace every Ghost module in `model` with a fused ghostfast module and return the model.

    `backend` ('auto', 'triton', 'reference'; default: env GHOSTFAST_BACKEND, else 'auto', read at call time) and
    `strict` (raise instead of falling back to eager; default: env GHOSTFAST_STRICT) apply to every converted module. Modules that look like Ghost modules but cannot run fused
    are left as they are and listed in the report, with a one-time warning (strict: raise). The report is
    attached as `model.ghostfast_report` and logged to the `ghostfast` logger."""
    if backend is not None:
        check_backend_name(backend)
    strict = default_strict() if strict is None else strict
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    targets = [(name, m) for name, m in model.named_modules()
               if _is_ghost_like(m) and not isinstance(m, _FusedGhostBase)]
    for name, m in targets:
        try:
            cls, kwargs = _plan(m)
            kwargs = dict(kwargs, backend=backend, strict=False)
            if cls is GhostModuleV2:
                kwargs["gate_mode"] = gate_mode
            new = cls.from_module(m, **kwargs)
            if new.unsupported_reason is not None:
                raise StructureError(new.unsupported_reason)
        except StructureError as e:
            report.skipped.append((name, str(e)))
            continue
        new.strict = strict
        _set_submodule(model, name, new) if name else None
        if not name:
            model = new
        report.converted.append((name, f"{type(m).__name__} -> ghostfast.nn.{cls.__name__}"))
    if report.skipped:
        details = "; ".join(f"{n}: {why}" for n, why in report.skipped)
        fallback(f"convert left {len(report.skipped)} Ghost module(s) in eager PyTorch ({details})", strict)
    model.ghostfast_report = report
    (print if verbose else log.info)(str(report))
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
