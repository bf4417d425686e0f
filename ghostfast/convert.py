"""`ghostfast.convert(model)`: swap every recognisable Ghost module of a model for its fused drop-in.

Recognition is by structure (`_ghost_kind`): a module with `primary_conv` and `cheap_operation` Sequentials is a
Ghost module; with an active `short_conv` Sequential it carries DFC attention. This covers timm's GhostModule,
GhostModuleV2 and GhostModuleV3 (after reparameterization), Huawei's official GhostModuleV2 ('original' and
'attn' modes) and GhostNetV3 ('ori' and 'ori_shortcut_mul_conv15', after `reparameterize()`), the paper's
GhostModule (any kernel_size and stride), and users' copies of them. ultralytics YOLO's GhostConv (`cv1`, `cv2`
Conv blocks, also after `model.fuse()`) and Ghost-ResNet's GhostModule (`conv1`, `conv2` in an nn.Conv2d) are
recognised by their own layouts. Every Ghost-like module that is not converted is listed in the report with the
reason. State_dict keys are unchanged.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import nn

from .backends import check_backend_name, default_strict, fallback
from .bottleneck import GhostBottleneck
from .nn import GhostConv, GhostConv2d, GhostModule, GhostModuleV2, StructureError, _FusedGhostBase

log = logging.getLogger("ghostfast")


@dataclass
class ConversionReport:
    """What `convert` did: (qualified name, kind) per converted module, (name, reason) per skipped one."""

    converted: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    # bottlenecks (modules holding ghost1, ghost2 and shortcut) left to per-module fusion, with the reason
    per_module: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"ghostfast.convert: {len(self.converted)} converted, {len(self.skipped)} skipped"
                 + (f", {len(self.per_module)} bottleneck(s) fused per module" if self.per_module else "")]
        lines += [f"  converted {name or '<root>'}: {kind}" for name, kind in self.converted]
        lines += [f"  skipped   {name or '<root>'}: {why}" for name, why in self.skipped]
        lines += [f"  per-module {name or '<root>'}: {why}" for name, why in self.per_module]
        return "\n".join(lines)


def _conv_of(m: Optional[nn.Module]) -> Optional[nn.Conv2d]:
    """The Conv2d of an ultralytics-style Conv block (`.conv`), or None."""
    conv = getattr(m, "conv", None) if isinstance(m, nn.Module) else None
    return conv if isinstance(conv, nn.Conv2d) else None


def _depthwise_after(first: Optional[nn.Conv2d], second: Optional[nn.Conv2d]) -> bool:
    """True when `second` is a depthwise conv over `first`'s output channels (the Ghost module's cheap operation)."""
    return (first is not None and second is not None and second.in_channels == first.out_channels
            and second.groups == second.in_channels and second.out_channels % second.groups == 0)


def _ghost_kind(m: nn.Module) -> Optional[str]:
    """Which Ghost layout `m` has ('ghost', 'ghostconv', 'ghostresnet'), or None: recognised by structure.
    'ghost': `primary_conv` and `cheap_operation` (timm V1/V2/V3, Huawei V1/V2/V3, the paper, users' copies),
    or the un-reparameterized branches of a GhostNetV3 module (`primary_rpr_conv`); 'ghostconv': ultralytics'
    GhostConv (`cv1` and `cv2` Conv blocks only, cv2 depthwise over cv1's output); 'ghostresnet': Ghost-ResNet's
    module (`conv1`, `conv2` Conv2d, conv2 depthwise over conv1's output, inside an nn.Conv2d without weight)."""
    if hasattr(m, "primary_rpr_conv"):
        return "ghost"
    if hasattr(m, "primary_conv") and hasattr(m, "cheap_operation"):
        return "ghost" if isinstance(m.primary_conv, nn.Sequential) and isinstance(m.cheap_operation,
                                                                                  nn.Sequential) else None
    children = set(m._modules)
    if children == {"cv1", "cv2"} and _depthwise_after(_conv_of(m.cv1), _conv_of(m.cv2)):
        return "ghostconv"
    if {"conv1", "conv2"} <= children and isinstance(m.conv1, nn.Conv2d) and isinstance(m.conv2, nn.Conv2d) \
            and _depthwise_after(m.conv1, m.conv2) and (isinstance(m, nn.Conv2d) or "ghost" in type(m).__name__.lower()):
        return "ghostresnet"
    return None


def _plan(m: nn.Module, kind: str):
    """(wrapper class, kwargs) for a Ghost-like module, or raise StructureError with the reason to skip it."""
    if kind == "ghostconv":
        if "ghost" not in type(m).__name__.lower():
            raise StructureError(f"{type(m).__name__} has GhostConv's structure (cv1, depthwise cv2) but not its "
                                 "name; if its forward is cat(cv1(x), cv2(cv1(x))), wrap it with "
                                 "ghostfast.nn.GhostConv.from_module")
        return GhostConv, {}
    if kind == "ghostresnet":
        if not (isinstance(m, nn.Conv2d) and m.weight is None):
            raise StructureError(f"{type(m).__name__} has Ghost-ResNet's structure (conv1, depthwise conv2) but is "
                                 "not its nn.Conv2d subclass without a weight; if its forward is cat(conv1(x), "
                                 "conv2(conv1(x))[:, :out - init]), wrap it with ghostfast.nn.GhostConv2d.from_module")
        return GhostConv2d, {"out_chs": m.out_channels}
    if hasattr(m, "primary_rpr_conv") or getattr(m, "infer_mode", True) is False:
        raise StructureError("GhostNetV3 module is not reparameterized; call timm's reparameterize_model(model), "
                             "or model.reparameterize() (Huawei's GhostNetV3; module.reparameterize() per module), "
                             "first")
    mode = getattr(m, "mode", None)
    short = getattr(m, "short_conv", None)
    has_attention = isinstance(short, nn.Sequential) and len(short) > 0 and mode not in ("original", "ori")
    if mode is not None and mode not in _MODES:
        raise StructureError(f"unknown Ghost module mode {mode!r} (known: {', '.join(_MODES)})")
    if (hasattr(m, "infer_mode") or mode == "ori") and not has_attention:
        # GhostNetV3 (timm's 'original', Huawei's 'ori') returns the whole concat, not [:, :out_chs].
        return GhostModule, {"out_chs": m.primary_conv[0].out_channels + m.cheap_operation[0].out_channels}
    if has_attention:
        return GhostModuleV2, {}
    return GhostModule, {}


# Ghost module modes: Huawei's GhostNetV2 ('original', 'attn'), timm's GhostNetV3 ('original', 'shortcut'),
# Huawei's GhostNetV3 ('ori', 'ori_shortcut_mul_conv15').
_MODES = ("original", "attn", "shortcut", "ori", "ori_shortcut_mul_conv15")


def convert(model: nn.Module, *, inplace: bool = False, backend: Optional[str] = None, strict: Optional[bool] = None,
            gate_mode: str = "nearest", bottlenecks: bool = True, verbose: bool = False) -> nn.Module:
    """Replace every Ghost module in `model` with a fused ghostfast module and return the model.

    `backend` ('auto', 'triton', 'reference'; default: env GHOSTFAST_BACKEND, else 'auto', read at call time) and
    `strict` (raise instead of falling back to eager; default: env GHOSTFAST_STRICT) apply to every converted module. Modules that look like Ghost modules but cannot run fused
    are left as they are and listed in the report, with a one-time warning (strict: raise).

    `bottlenecks`: also wrap each timm GhostBottleneck whose Ghost modules were converted in
    `ghostfast.nn.GhostBottleneck` (ghostfast/bottleneck.py: on inference calls each depthwise conv -> BatchNorm
    pair runs as one kernel); other bottlenecks (modules holding ghost1, ghost2 and a shortcut) are fused per
    module and listed in the report's `per_module` with the reason. The report is attached as
    `model.ghostfast_report` and logged to the `ghostfast` logger."""
    if backend is not None:
        check_backend_name(backend)
    strict = default_strict() if strict is None else strict
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    if isinstance(model, torch.fx.GraphModule):
        report.skipped.append(("", "a torch.fx.GraphModule: tracing inlined its Ghost modules into standard ops, "
                                   "so nothing is left to swap; convert the model before tracing it"))
    targets = []
    for name, m in model.named_modules():
        kind = None if isinstance(m, _FusedGhostBase) else _ghost_kind(m)
        if kind is not None and not any(name.startswith(t + ".") for t, _, _ in targets if t):
            targets.append((name, m, kind))
    for name, m, kind in targets:
        try:
            cls, kwargs = _plan(m, kind)
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
    if bottlenecks:
        model = _convert_bottlenecks(model, backend, report)
    if report.skipped:
        details = "; ".join(f"{n}: {why}" for n, why in report.skipped)
        fallback(f"convert left {len(report.skipped)} Ghost module(s) in eager PyTorch ({details})", strict)
    model.ghostfast_report = report
    (print if verbose else log.info)(str(report))
    return model


def _convert_bottlenecks(model: nn.Module, backend: Optional[str], report: ConversionReport) -> nn.Module:
    for name, m in list(model.named_modules()):
        if isinstance(m, GhostBottleneck) or not {"ghost1", "ghost2", "shortcut"} <= set(m._modules):
            continue
        try:
            new = GhostBottleneck.from_module(m, backend=backend)
            if new.unsupported_reason is not None:
                raise StructureError(new.unsupported_reason)
        except StructureError as e:
            report.per_module.append((name, str(e)))
            continue
        if name:
            _set_submodule(model, name, new)
        else:
            model = new
        report.converted.append((name, f"{type(m).__name__} -> ghostfast.nn.{type(new).__name__} (whole bottleneck)"))
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
