"""`GhostBottleneck`: the GhostNet V1 / V2 / V3 bottleneck as one drop-in module (issue 13 item 1, first steps).

timm's `GhostBottleneck` computes, for input x,

    y = ghost1(x)                                   # a Ghost module (V2: with DFC attention)
    y = bn_dw(conv_dw(y))                           # only with stride > 1: depthwise k x k, stride s
    y = y * gate(conv_expand(act1(conv_reduce(mean_hw(y)))))   # only with SE: ReLU, hard-sigmoid gate
    y = ghost2(y)                                   # a Ghost module without activation
    y += shortcut(x)                                # identity, or Sequential(depthwise, BN, 1x1, BN)

`convert` wraps a whole bottleneck in this module after fusing its two Ghost modules (ghost1 and ghost2 are then
`ghostfast.nn.GhostModule` / `GhostModuleV2`). The wrapper shares the original's submodules, parameters,
buffers, attributes and hooks (state_dict keys unchanged) and has two paths:

- the direct path, for inference calls on the CPU (an input that needs no gradient, the two BatchNorms after
  depthwise convs in eval mode, no hook on a submodule it skips, no tracer / exporter / dispatch mode recording,
  float32 or float64, `ghostfast._C` built): the Ghost modules run fused as usual, and each depthwise conv ->
  BatchNorm pair (conv_dw -> bn_dw, shortcut[0] -> shortcut[1]) runs as one kernel with the BatchNorm folded per
  channel inside it (`_depthwise_bn_kernel`, csrc/cpu/depthwise_bn.cpp: no separate BatchNorm pass over the tensor,
  no fold in Python) where nothing of the pair needs a gradient (else the pair runs as its modules, recorded by
  autograd); SE and the shortcut's 1x1 conv and BatchNorm run as their modules (their hooks fire). Under
  `torch.compile` the same path is traced (dynamo guards on its conditions), the kernel as the functional op
  `ghostfast::depthwise_bn`, so a compiled converted model keeps it;
- the per-module path, every other call: the bottleneck's own forward above over the live submodules (each Ghost
  module fused, everything else eager), so training, hooks, swapped submodules, `torch.export`, TorchScript, fx
  and ONNX export see exactly the original's module calls. A call that autograd records (training, fine-tuning)
  on NCHW float32 / float64 CPU input, outside torch.compile and the `reference` backend, runs them on a
  channels_last copy of x and returns the result copied back to NCHW (`ghostfast.nn.TRAIN_CHANNELS_LAST`): oneDNN's
  depthwise conv backward is 4-10x slower on NCHW than on channels_last (48 channels at 112x112, batch 8: 25.9 vs
  2.5 ms), the two copies per call cost less (backward passes the gradient through them without a copy), and the
  values are the original's up to rounding. Hooks on the submodules see channels_last tensors there.

The kernel folds the live BatchNorm tensors per call (no cache to go stale after optimizer steps or `.data`
edits). It runs on NCHW input, where it measured faster than oneDNN's depthwise conv + BatchNorm inside the
models (benchmarks/results/cpu-2core/NOTES.md); on channels_last input, where oneDNN's depthwise conv is about
twice as fast as on NCHW and the kernel was not faster in isolation, the pair runs as its modules.

Only timm's `GhostBottleneck` (whose forward is the one above) and timm's `GhostBottleneckV3` after
`reparameterize_model` (`GhostBottleneckV3` below: the same stages, its depthwise stage one conv with a bias, its
shortcut an Identity or V1's, `se` an Identity or SE) are wrapped whole; other bottlenecks keep per-module fusion,
and the conversion report says which each one got.
"""
from __future__ import annotations

import sys
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import nn as _gnn
from . import ops
from .backends import _compiled_registrations, check_backend_name, default_backend
from .nn import (_REGISTRATIONS, StructureError, module_class, _adopt, _eval_bn, _FusedGhostBase, _is_batchnorm,
                 _recording_for_deployment, subtree_ids)

# The forward hooks nn.Module runs for every module (torch.nn.modules.module.register_module_forward_hook ...): any
# of them makes a skipped submodule's call observable, so the direct path is off while one is registered.
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_DIRECT_DTYPES = (torch.float32, torch.float64)


def _timm_class(name: str) -> Optional[type]:
    mod = sys.modules.get("timm.models.ghostnet")  # never imports timm
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def timm_bottleneck_types() -> tuple:
    """timm's GhostBottleneck and GhostBottleneckV3 classes where timm's ghostnet module is loaded (never imports
    timm), else ()."""
    return tuple(c for c in (_timm_class("GhostBottleneck"), _timm_class("GhostBottleneckV3")) if c is not None)


class _Plan(NamedTuple):
    dw: Optional[Tuple[nn.Conv2d, nn.Module]]              # conv_dw, bn_dw (stride > 1)
    short: Optional[Tuple[nn.Conv2d, nn.Module]]           # shortcut[0], shortcut[1]; None: identity shortcut
    skipped: Tuple[nn.Module, ...]                        # the submodules the direct path does not call
    bns: Tuple[nn.Module, ...]                            # the BatchNorms the kernel folds


_KERNEL_MAX_SIZE = 7  # the kernel's largest K


def _depthwise(conv: nn.Module, what: str) -> nn.Conv2d:
    if module_class(conv) is not nn.Conv2d:
        raise StructureError(f"{what} is a {module_class(conv).__name__}, not an nn.Conv2d")
    k, st, pad, dil = (tuple(conv.kernel_size), tuple(conv.stride), conv.padding, tuple(conv.dilation))
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
        raise StructureError(f"{what} is not a depthwise conv (groups {conv.groups}, {conv.in_channels} -> "
                             f"{conv.out_channels} channels)")
    if isinstance(pad, str) or conv.padding_mode != "zeros" or len(set(k)) != 1 or len(set(st)) != 1 \
            or len(set(pad)) != 1 or dil != (1, 1) or k[0] > _KERNEL_MAX_SIZE:
        raise StructureError(f"{what} has kernel {k}, stride {st}, padding {pad!r} ({conv.padding_mode}), dilation "
                             f"{dil} (the kernel needs square ones up to {_KERNEL_MAX_SIZE}, zero padding, dilation 1)")
    return conv


def _bn(m: nn.Module, what: str) -> nn.Module:
    if not _is_batchnorm(m, what):
        raise StructureError(f"{what} is a {type(m).__name__}, not a BatchNorm2d")
    return m


def _analyse(b: nn.Module) -> _Plan:
    """The direct path's plan for the bottleneck's live submodules; StructureError when it has no such path."""
    for name in ("ghost1", "ghost2"):
        g = b._modules.get(name)
        if not isinstance(g, _FusedGhostBase):
            raise StructureError(f"{name} is a {type(g).__name__}, not a fused ghostfast Ghost module")
    if isinstance(b, GhostBottleneckV3):
        return _analyse_v3(b)
    skipped: List[nn.Module] = []
    dw = short = None
    conv_dw, bn_dw = b._modules.get("conv_dw"), b._modules.get("bn_dw")
    if (conv_dw is None) != (bn_dw is None):
        raise StructureError("conv_dw and bn_dw are not both present or both None")
    if conv_dw is not None:
        dw = (_depthwise(conv_dw, "conv_dw"), _bn(bn_dw, "bn_dw"))
        skipped += dw
    sc = b._modules.get("shortcut")
    if module_class(sc) is not nn.Sequential or len(sc) not in (0, 4):
        layers = len(sc) if isinstance(sc, nn.Sequential) else "?"
        raise StructureError(f"shortcut is a {module_class(sc).__name__} of {layers} layers (the direct path knows an "
                             "empty Sequential, or depthwise, BN, 1x1, BN)")
    if len(sc) == 4:
        short = (_depthwise(sc[0], "shortcut[0]"), _bn(sc[1], "shortcut[1]"))
        skipped += short
    skipped.append(sc)
    bns = tuple(m for m in skipped if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return _Plan(dw, short, tuple(skipped), bns)


def _analyse_v3(b: nn.Module) -> _Plan:
    """timm's GhostBottleneckV3 after reparameterization: with stride > 1 one depthwise conv with a bias
    (`conv_dw`, `bn_dw` an Identity; or a BatchNorm) in place of the training-time branches; the shortcut an
    Identity or depthwise, BN, 1x1, BN; `se` an Identity or SE."""
    skipped: List[nn.Module] = []
    dw = short = None
    stride = b.__dict__.get("stride")
    if not isinstance(stride, int) or stride < 1:
        raise StructureError(f"stride is {stride!r}, not a positive int")
    if stride > 1:
        if b.__dict__.get("infer_mode") is not True:
            raise StructureError("not reparameterized (infer_mode False: the depthwise stage is a sum of branches); "
                                 "timm's reparameterize_model(model) first")
        conv_dw, bn_dw = b._modules.get("conv_dw"), b._modules.get("bn_dw")
        dw = (_depthwise(conv_dw, "conv_dw"), bn_dw if module_class(bn_dw) is nn.Identity else _bn(bn_dw, "bn_dw"))
        skipped += dw
    sc = b._modules.get("shortcut")
    if module_class(sc) is nn.Sequential and len(sc) == 4:
        short = (_depthwise(sc[0], "shortcut[0]"), _bn(sc[1], "shortcut[1]"))
        skipped += short
    elif module_class(sc) is not nn.Identity:
        raise StructureError(f"shortcut is a {module_class(sc).__name__} (the direct path knows an Identity, or "
                             "depthwise, BN, 1x1, BN)")
    skipped.append(sc)
    bns = tuple(m for m in skipped if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return _Plan(dw, short, tuple(skipped), bns)


def _kernel_registered() -> bool:
    return _compiled_registrations().get("depthwise_bn", False)


def _dw_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module) -> Tensor:
    """bn(conv(x)) for an eval-mode BatchNorm: one kernel on NCHW input, the modules on channels_last (module
    docstring) and wherever autograd must record the pair: the kernel has no backward, and x can need a gradient
    inside an inference call (ghost1's parameters trainable, the pair's frozen), so the tensors are read per call.
    Under torch.compile the kernel is the functional op `ghostfast::depthwise_bn` (a node of the graph)."""
    if not x.is_contiguous():
        return bn(conv(x))
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in (
            *conv._parameters.values(), *bn._parameters.values(), *bn._buffers.values()))):
        return bn(conv(x))
    folded = _eval_bn(conv, None if module_class(bn) is nn.Identity else bn)  # Identity: timm V3's conv_dw
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    shape = ops.depthwise_output_shape(x, k, s, p)
    if shape[2] < 1 or shape[3] < 1:
        return bn(conv(x))  # eager's own error
    if torch.compiler.is_compiling():
        return torch.ops.ghostfast.depthwise_bn(x, conv.weight, *folded, s, p)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _run_kernel(x, conv.weight, *folded, s, p, out)
    return out


def _exporting() -> bool:
    """True inside torch.export's trace, False under torch.compile and in eager. torch 2.11's dynamo folds
    `torch.compiler.is_exporting()` to True under torch.compile too (torch 2.14's reads the flag); torch.export sets
    `torch.compiler._is_exporting_flag` around its trace in both (strict and non-strict), so the flag is read."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _run_kernel(*args) -> None:
    torch.ops.ghostfast._depthwise_bn_kernel(*args)


class GhostBottleneck(nn.Module):
    """timm's GhostNet V1 / V2 bottleneck (module docstring): the Ghost modules fused, and on inference calls each
    depthwise conv -> BatchNorm pair as one kernel. Build with `from_module` (what
    `ghostfast.convert` does); `unsupported_reason` says why the direct path is off for the current structure."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._eager_forward(x)
        return self._dispatch(x)

    def _eager_forward(self, x: Tensor) -> Tensor:
        """The bottleneck's own forward over its live submodules (timm's GhostBottleneck.forward)."""
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.conv_dw(x)
            x = self.bn_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x

    @classmethod
    def from_module(cls, m: nn.Module, *, backend: Optional[str] = None) -> "GhostBottleneck":
        """Wrap timm's GhostBottleneck `m` (its Ghost modules converted first); StructureError otherwise."""
        v12, v3 = _timm_class("GhostBottleneck"), _timm_class("GhostBottleneckV3")
        if v12 is not None and isinstance(m, v12) and type(m).forward is v12.forward:
            cls = GhostBottleneck
        elif v3 is not None and isinstance(m, v3) and type(m).forward is v3.forward:
            cls = GhostBottleneckV3
        else:
            raise StructureError(f"{type(m).__name__} is not timm's GhostBottleneck or GhostBottleneckV3 (whose "
                                 "forward the whole-bottleneck path reproduces)")
        if backend is not None:
            check_backend_name(backend)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        _adopt(self, m, exclude=("backend", "unsupported_reason"))
        self.backend = backend
        self._plan_quick = None
        self._replan()
        return self

    # -- the plan, re-read when a submodule is replaced (as _FusedGhostBase does) ------------------------------
    def _structure_key(self) -> tuple:
        return tuple(subtree_ids(self))

    def _quick_key(self) -> tuple:
        children = self._modules.values()
        return (_REGISTRATIONS[0], len(self._modules), *[len(c._modules) for c in children if c is not None])

    def _replan(self) -> None:
        try:
            self._plan, self.unsupported_reason = _analyse(self), None
        except StructureError as e:
            self._plan, self.unsupported_reason = None, str(e)
        self._plan_key, self._plan_quick = self._structure_key(), self._quick_key()

    def _current_plan(self) -> Optional[_Plan]:
        quick = self._quick_key()
        if quick != self._plan_quick:
            if self._structure_key() != self._plan_key:
                self._replan()
            self._plan_quick = quick
        return self._plan

    # -- dispatch ----------------------------------------------------------------------------------------------
    def _direct_plan(self, x: Tensor) -> Optional[_Plan]:
        """The plan when this call may take the direct path, else None (module docstring). Under torch.compile
        (not export) the same conditions, read by dynamo (it guards on them), with the graph's own tensors."""
        plan = self._current_plan()
        if plan is None or not isinstance(x, Tensor) or x.dtype not in _DIRECT_DTYPES or x.dim() != 4 \
                or x.device.type != "cpu" or not _kernel_registered():
            return None
        if (default_backend() if self.backend is None else self.backend) == "reference":
            return None  # the eager spec, computed as the original computes it
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled() and x.requires_grad:
                return None
        elif not ops._direct(x):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        if any(m.training for m in plan.bns):
            return None
        module = torch.nn.modules.module
        if any(getattr(module, h, None) for h in _GLOBAL_HOOKS):
            return None
        if any(getattr(m, h) for m in plan.skipped for h in _MODULE_HOOKS):
            return None
        return plan

    @torch.jit.unused
    def _dispatch(self, x: Tensor) -> Tensor:
        if _recording_for_deployment(x) or _exporting():
            return self._eager_forward(x)  # first: the tracers and torch.export record the submodule calls
        plan = self._direct_plan(x)
        if plan is not None:
            return self._direct_forward(x, plan)
        if self._channels_last_inside(x):
            return self._eager_forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self._eager_forward(x)

    def _channels_last_inside(self, x: Tensor) -> bool:
        """True when this call runs its submodules on a channels_last copy of x (module docstring): an NCHW CPU
        float32 / float64 input, a call autograd records, backend not `reference`, not under torch.compile."""
        if not _gnn.TRAIN_CHANNELS_LAST or not isinstance(x, Tensor) or x.dim() != 4 or x.device.type != "cpu" \
                or x.dtype not in _DIRECT_DTYPES or not x.is_contiguous() or x.shape[1] == 1:
            return False
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        if (default_backend() if self.backend is None else self.backend) == "reference":
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    @torch.jit.unused
    def _direct_forward(self, x: Tensor, plan: _Plan) -> Tensor:
        shortcut = x
        y = self.ghost1(x)
        if plan.dw is not None:
            y = _dw_bn(y, *plan.dw)
        if self.se is not None:
            y = self.se(y)
        y = self.ghost2(y)
        if plan.short is None:
            y += shortcut
        else:
            sc = self.shortcut
            y += sc[3](sc[2](_dw_bn(shortcut, *plan.short)))
        return y

    def extra_repr(self) -> str:
        how = "direct path" if self._current_plan() is not None else f"per-module: {self.unsupported_reason}"
        return f"backend={self.backend or 'default'}, {how}"


class GhostBottleneckV3(GhostBottleneck):
    """timm's GhostNetV3 bottleneck (`GhostBottleneckV3`) after reparameterization, wrapped whole: its depthwise
    stage is one conv with a bias (run by the kernel, the bias as its shift), its shortcut an Identity or the
    depthwise, BN, 1x1, BN of V1. `GhostBottleneck.from_module` builds it for a GhostBottleneckV3; before
    `reparameterize_model` the plan is off (`unsupported_reason`) and the bottleneck's own forward runs."""

    def _eager_forward(self, x: Tensor) -> Tensor:
        """timm's GhostBottleneckV3.forward over the live submodules, reparameterized (infer_mode) or stride 1."""
        shortcut = x
        x = self.ghost1(x)
        if self.stride > 1:
            if self.infer_mode:
                x = self.conv_dw(x)
                x = self.bn_dw(x)
            else:
                x1 = self.dw_rpr_scale(x)
                for dw_rpr_conv in self.dw_rpr_conv:
                    x1 += dw_rpr_conv(x)
                x = x1
        x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


__all__ = ["GhostBottleneck", "GhostBottleneckV3", "timm_bottleneck_types"]
