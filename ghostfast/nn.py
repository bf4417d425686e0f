"""Drop-in Ghost modules that run the fused ops: `GhostModule` (V1, V3 after reparameterization) and
`GhostModuleV2` (DFC attention; timm V2, Huawei's 'attn' mode, timm V3 'shortcut' mode).

They keep the original submodules (`primary_conv`, `cheap_operation`, `short_conv`), so state_dict keys are
identical to timm's, Huawei's and the paper's modules. Every call reads the live submodules: each BatchNorm's own
train/eval flag, its current tensors (passed to the kernels, which fold them per channel inside the launch:
there is no cache to go stale after fused optimizers, `.data` edits, `eps` changes or `inference_mode`), and the
current structure (a submodule replaced after conversion re-plans the module, or runs eagerly with the usual
one-time warning when the new structure has no kernel). Under `torch.autocast` the fused ops run in the autocast
dtype, as eager autocast runs the convolutions. `SyncBatchNorm` computes like `BatchNorm2d` in eval mode.

Training mode: a BatchNorm in training mode normalises with batch statistics, computed by fused statistics
kernels (`ghostfast.ops.ghost_module_stats`: one launch for z1, one for z2) and passed to the fused op as its
mean and var, differentiably, so gradients flow through the statistics; running statistics are updated as
`nn.BatchNorm2d` updates them (momentum or cumulative average, unbiased running_var, num_batches_tracked).
GhostModuleV2's DFC branch runs eagerly while its BatchNorms are in training mode (its gate still enters the
fused Ghost op). SyncBatchNorm in training mode, and configurations without a fused kernel, run the eager
submodules.

Deployment: while a tracer or exporter records the model for another runtime (`torch.jit.script`,
`torch.jit.trace`, `torch.onnx.export` with either exporter, `torch.fx.symbolic_trace`), the modules run their
original eager submodules, so the recorded graph is the original module's math in standard ops, which TorchScript,
ONNX Runtime and fx tools understand without ghostfast. `torch.compile` and `torch.export` record the fused ops.
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .backends import check_backend_name, default_backend, default_strict, fallback, resolve_backend
from .backends import resolution_state, stats_backend
from .reference import GATE_MODES, BatchNormParams


class StructureError(ValueError):
    """A module does not have the structure of a fusable Ghost module; the message says why."""


def module_class(m: nn.Module) -> type:
    """The class of `m` for the exact-type checks below. Non-strict `torch.export` hands a module's attributes
    out wrapped in a proxy whose class subclasses both torch's `_AttrProxy` and the module's class (when the
    model shares a submodule, as timm's reparameterized GhostNetV3 shares its ReLUs); a plan re-analysed during
    that trace must see the module's own class."""
    cls = type(m)
    proxy = getattr(sys.modules.get("torch.fx.experimental.proxy_tensor"), "_AttrProxy", None)
    if proxy is not None and issubclass(cls, proxy):
        return next(c for c in cls.__mro__ if not issubclass(c, proxy))
    return cls


# Activation modules with a fused kernel, by exact type (a subclass may compute something else).
_ACT_TYPES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}


def _act_kind(m: Optional[nn.Module]) -> str:
    if m is None or isinstance(m, nn.Identity) or (isinstance(m, nn.Sequential) and len(m) == 0):
        return "none"
    kind = _ACT_TYPES.get(module_class(m))
    if kind is None:
        raise StructureError(f"activation {module_class(m).__name__} has no fused kernel (ReLU, ReLU6, Hardswish, "
                             "SiLU or none)")
    return kind


_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _is_batchnorm(m: nn.Module, what: str) -> bool:
    """True for a BatchNorm that folds: `BatchNorm2d` or `SyncBatchNorm` (which computes like BatchNorm2d from
    its running statistics in eval mode), or a subclass keeping their forward. Raises StructureError for other
    BatchNorm layers (1d/3d, or norm+act layers such as timm's BatchNormAct2d, whose forward does more)."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) or module_class(m).forward not in _BN_FORWARDS:
        raise StructureError(f"{what} has a {module_class(m).__name__}, not a plain BatchNorm2d or SyncBatchNorm "
                             "(no fused kernel)")
    if m.running_mean is None or m.running_var is None:
        raise StructureError(f"{what} has a {type(m).__name__} without running statistics "
                             "(track_running_stats=False)")
    return True


def _split_conv_bn_act(seq: nn.Module, what: str) -> Tuple[nn.Conv2d, Optional[nn.BatchNorm2d], str]:
    """Read `Sequential(Conv2d, [BatchNorm2d | SyncBatchNorm], [activation])` (the layouts of timm, Huawei, the
    paper, and GhostNetV3 after reparameterization, which drops the BatchNorm and gives the conv a bias)."""
    if not isinstance(seq, nn.Sequential) or len(seq) == 0 or not isinstance(seq[0], nn.Conv2d):
        raise StructureError(f"{what} is not a Sequential starting with a Conv2d")
    layers = [seq[0]] + [m for m in list(seq)[1:] if not isinstance(m, nn.Identity)]
    conv, rest = layers[0], layers[1:]
    bn = None
    if rest and _is_batchnorm(rest[0], what):
        bn, rest = rest[0], rest[1:]
    if len(rest) > 1:
        raise StructureError(f"{what} has unexpected layers after the conv: {[type(m).__name__ for m in rest]}")
    act = _act_kind(rest[0] if rest else None)
    return conv, bn, act


def _conv_is(conv: nn.Conv2d, kernel, padding, groups) -> Optional[str]:
    if tuple(conv.kernel_size) != tuple(kernel):
        return f"kernel_size {tuple(conv.kernel_size)} (fused needs {tuple(kernel)})"
    if tuple(conv.stride) != (1, 1):
        return f"stride {tuple(conv.stride)} (fused needs 1)"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)} (fused needs 1)"
    if isinstance(conv.padding, str) or tuple(conv.padding) != tuple(padding):
        return f"padding {conv.padding} (fused needs {tuple(padding)})"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (fused needs 'zeros')"
    if conv.groups != groups:
        return f"groups {conv.groups} (fused needs {groups})"
    return None


def _primary_geometry(conv: nn.Conv2d) -> Tuple[Optional[ops.PrimaryConv], Optional[str]]:
    """(stride / padding / dilation of a primary conv of any kernel size, None) or (None, why it has no kernel)."""
    if conv.groups != 1:
        return None, f"groups {conv.groups} (fused needs 1)"
    if conv.padding_mode != "zeros":
        return None, f"padding_mode {conv.padding_mode!r} (fused needs 'zeros')"
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # 'same' (stride 1): symmetric when the dilated kernel is odd, as torch pads
            span = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(v % 2 for v in span):
                return None, f"padding 'same' with an even kernel {tuple(conv.kernel_size)} (asymmetric)"
            padding = tuple(v // 2 for v in span)
    return ops.PrimaryConv(tuple(conv.stride), tuple(padding), tuple(conv.dilation)), None


def _eval_bn(conv: nn.Conv2d, bn: Optional[nn.Module]) -> BatchNormParams:
    """conv -> [BN in eval mode] as the live tensors the kernels fold (no arithmetic: a conv bias before a BN, rare,
    costs one subtraction; without a BN it is the shift). Read from the modules' parameter and buffer dicts (what
    attribute access returns, without nn.Module.__getattr__'s lookups: this runs per module call)."""
    bias = conv._parameters.get("bias")
    if bn is None:
        return BatchNormParams(None, bias, None, None, 0.0)
    params, buffers = bn._parameters, bn._buffers
    mean = buffers["running_mean"]
    if bias is not None:
        mean = mean - bias.to(mean.dtype)
    return BatchNormParams(params.get("weight"), params.get("bias"), mean, buffers["running_var"], float(bn.eps))


# Training on the `cpu` backend with bn2 on batch statistics: the joint op (ops.run_ghost_module_bn2_batch: one
# backward pass carries the statistics' gradient); False: a statistics op and its own backward pass (A/B runs).
JOINT_BN2_STATS = True
# ... and with z1 = W1 x kept (float32 / float64): the library convolution computes it once, bn1's statistics come
# from it by autograd, and the kernels read it instead of recomputing it in each pass (ops.run_ghost_module_z1);
# False: the joint op above (A/B runs).
KEEP_Z1 = True
# A whole bottleneck (ghostfast.bottleneck) whose call autograd records on the CPU runs inside in channels_last from
# NCHW input (one copy in, one out; oneDNN's depthwise conv backward is 4-10x slower on NCHW); False: NCHW (A/B).
TRAIN_CHANNELS_LAST = True


def _batch_stats(bn: Optional[nn.Module]) -> bool:
    """True when this BatchNorm normalises with batch statistics in its current mode (training mode)."""
    return bn is not None and bn.training


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int,
                          conv_bias: Optional[Tensor]) -> None:
    """What nn.BatchNorm2d's training forward does to its buffers, given the batch mean and biased variance of the
    conv output without its bias (`conv_bias`, if any, shifts the mean only)."""
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
        else:
            factor = bn.momentum
        if conv_bias is not None:
            mean = mean + conv_bias.to(mean.dtype)
        unbiased = var * (count / (count - 1))
        bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _train_bn(bn: nn.BatchNorm2d, conv: nn.Conv2d, mean: Tensor, var: Tensor, count: int) -> BatchNormParams:
    """A training-mode BatchNorm with the batch statistics of its conv's output without the conv bias (they stay
    differentiable), and the running-statistics update.

    A conv bias cancels against the batch mean: it stays in the graph with an exactly zero gradient (eager
    PyTorch computes rounding noise there), so optimizers see a zero gradient, not a missing one."""
    _update_running_stats(bn, mean.detach(), var.detach(), count, conv.bias)
    if conv.bias is not None:
        mean = mean + 0.0 * conv.bias.to(mean.dtype)
    return BatchNormParams(bn.weight, bn.bias, mean, var, float(bn.eps))


# What autocast casts: floating tensors except float64.
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _cast_weight(w: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """A conv weight in `dtype`, as autocast casts it for eager convolutions (differentiably); BatchNorm tensors
    stay as they are (the kernels read any floating dtype)."""
    if dtype is None or w.dtype == dtype or w.dtype not in _AUTOCAST_ELIGIBLE:
        return w
    return w.to(dtype)


def _primary_gemm(x: Tensor, w1: Tensor) -> Tensor:
    """z1 = conv1x1(x, w1) as one library matmul, in x's memory format (differentiable): forward and backward
    measured ~15% faster than the 1x1 convolution on NCHW at batch 8 (benchmarks/results/cpu-2core/NOTES.md)."""
    n, c, h, w = x.shape
    init = w1.shape[0]
    wm = w1.reshape(init, c)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return (x.permute(0, 2, 3, 1).reshape(-1, c) @ wm.t()).view(n, h, w, init).permute(0, 3, 1, 2)
    return torch.matmul(wm, x.reshape(n, c, h * w)).view(n, init, h, w)


def _fused_region(x: Tensor):
    """Autocast off while the fused op runs: its inputs are already in the autocast dtype, and nothing inside the
    op (the reference math, auto's measuring) may be cast again."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _recording_for_deployment(x) -> bool:
    """True while `torch.jit.trace`, `torch.onnx.export` (the TorchScript-based exporter traces; the dynamo one sets
    its own flag around its torch.export) or `torch.fx.symbolic_trace` (x is a Proxy) records this call: the
    eager submodules run, so the graph holds standard ops. A traced graph of the fused op would also bake in the
    backend name, and no Python side effect (the running-statistics update) is recorded. torch.export and
    torch.compile set none of these flags and record the fused ops."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or isinstance(x, torch.fx.Proxy)


def _make_act(act_layer: Optional[Type[nn.Module]]) -> nn.Module:
    if act_layer is None or act_layer is nn.Identity:
        return nn.Identity()
    return act_layer(inplace=True)


def _ghost_layers(in_chs, out_chs, kernel_size, ratio, dw_size, stride, act_layer, dd):
    """`primary_conv` and `cheap_operation` laid out as timm's GhostModule lays them out."""
    init = math.ceil(out_chs / ratio)
    new = init * (ratio - 1)
    primary = nn.Sequential(nn.Conv2d(in_chs, init, kernel_size, stride, kernel_size // 2, bias=False, **dd),
                            nn.BatchNorm2d(init, **dd), _make_act(act_layer))
    cheap = nn.Sequential(nn.Conv2d(init, new, dw_size, 1, dw_size // 2, groups=init, bias=False, **dd),
                          nn.BatchNorm2d(new, **dd), _make_act(act_layer))
    return primary, cheap


# The hook dictionaries of nn.Module: carried over (shared) when a module is wrapped, so that hooks registered on the
# original keep firing and their handles keep removing them.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


# Counts every submodule registration in the process (nn.Module's global hook): a converted module re-checks its
# structure only after one (see _FusedGhostBase._current_plan).
_REGISTRATIONS = [0]


def _count_registration(module, name, submodule):
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)

# Attributes of the fused modules themselves, never copied from the wrapped module.
_OWN_ATTRIBUTES = frozenset({"training", "out_chs", "backend", "strict", "gate_mode", "unsupported_reason", "act",
                             "_plan_quick", "_plan_key", "_resolved", "_plan_bn_list",
                             "dump_patches", "call_super_init", "forward"})


def _adopt(new: nn.Module, m: nn.Module, exclude=()) -> None:
    """Make the freshly built module `new` hold `m`'s own submodules, parameters and buffers (shared objects:
    identical state_dict keys and named_modules), its public attributes (e.g. `in_channels`, `stride`) but those
    `new`'s class defines or `exclude` names, `m`'s train/eval flag (not .train(): that would reset every
    BatchNorm's own flag, frozen BNs) and `m`'s hooks (shared dicts: their handles keep removing them)."""
    for name, child in m._modules.items():
        new._modules[name] = child
    for name, param in m._parameters.items():
        new._parameters[name] = param
    for name, buf in m._buffers.items():
        new._buffers[name] = buf
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    for name, value in vars(m).items():
        if not name.startswith("_") and name not in _OWN_ATTRIBUTES and name not in exclude \
                and not hasattr(type(new), name) and not isinstance(value, (nn.Module, Tensor)) and not callable(value):
            setattr(new, name, value)
    new.training = m.training
    for name in _HOOK_DICTS:
        if name in vars(m):
            setattr(new, name, getattr(m, name))


def subtree_ids(root: nn.Module) -> List[int]:
    """Every module's identity under `root` (itself first), in order: a replaced or deleted submodule changes it.
    Walked over the `_modules` dicts directly, as the converted modules compare it per call."""
    ids, stack = [], [root]
    while stack:
        m = stack.pop()
        ids.append(id(m))
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return ids


class _FusedGhostBase(nn.Module):
    """Shared machinery: structure analysis (re-planned when a submodule is replaced), backend choice, fallback
    policy, the live BatchNorm arguments.

    `forward` is what TorchScript compiles: the eager submodules (`_eager_forward`, scriptable); everything
    else (`_dispatch`, `_fused_forward`, the plan) is Python that TorchScript never sees."""

    __jit_unused_properties__ = ["oup"]

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._eager_forward(x)
        return self._dispatch(x)

    @torch.jit.unused
    def _dispatch(self, x: Tensor) -> Tensor:
        if _recording_for_deployment(x):
            return self._eager_forward(x)
        return self._fused_forward(x)

    def _init_options(self, out_chs: int, backend: Optional[str], strict: Optional[bool], gate_mode: str = "nearest"):
        if backend is not None:
            check_backend_name(backend)
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        self.out_chs = int(out_chs)
        self.backend = backend
        self.strict = strict
        self.gate_mode = gate_mode
        self._plan_key = self._plan_quick = None
        self._replan()
        if self.unsupported_reason is not None and self._is_strict():
            fallback(self.unsupported_reason, True)

    @classmethod
    def _wrap(cls, m: nn.Module, submodules, out_chs, backend, strict, gate_mode="nearest"):
        """A new module holding `m`'s own submodules, parameters and buffers (shared objects: identical state_dict
        keys and named_modules), its public attributes (e.g. `in_channels`, `mode`), `m`'s train/eval flag (its
        BatchNorms keep their own) and `m`'s hooks. `submodules`: the ones the fused forward needs."""
        missing = [name for name in submodules if not isinstance(getattr(m, name, None), nn.Module)]
        if missing:
            raise StructureError(f"{type(m).__name__} has no submodule {', '.join(missing)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        _adopt(self, m)
        if out_chs is None:
            out_chs = getattr(m, "out_chs", getattr(m, "oup", None))
        if out_chs is None:
            raise StructureError(f"{type(m).__name__} has neither out_chs nor oup; pass out_chs=")
        self._init_options(out_chs, backend, strict, gate_mode)
        return self

    @property
    def oup(self) -> int:  # the name Huawei's and the paper's modules use
        return self.out_chs

    def _is_strict(self) -> bool:
        return default_strict() if self.strict is None else bool(self.strict)

    # -- the plan: what the current submodules are, re-read when one is replaced ------------------------------
    def _structure_key(self) -> tuple:
        """Every submodule's identity, in order (a replaced or deleted submodule changes it); walked over the
        `_modules` dicts directly, as this runs per call."""
        return (self.out_chs, *subtree_ids(self))

    def _current_plan(self) -> Optional[str]:
        """The reason this module cannot run fused now, or None; re-analysed when a submodule was replaced.

        Per call only `_quick_key` is compared: it changes whenever a module is registered anywhere (nn.Module's
        global registration hook, `_REGISTRATIONS`), a submodule of the containers is deleted (their sizes), or an
        attribute the plan reads (out_chs, the gate options) changes; then the full structure key decides."""
        quick = self._quick_key()
        if quick != self._plan_quick:
            if self._structure_key() != self._plan_key:
                self._replan()
            self._plan_quick = quick
        return self.unsupported_reason

    def _replan(self) -> None:
        self._resolved = {}  # (backend request, device, dtype, BatchNorm modes, strict, state) -> fused backend
        self._analyse()
        self._plan_bn_list = tuple(self._plan_bns()) if self.unsupported_reason is None else ()
        self._plan_key = self._structure_key()
        self._plan_quick = self._quick_key()

    def _quick_key(self) -> tuple:
        children = self._modules.values()
        return (_REGISTRATIONS[0], self.out_chs, len(self._modules),
                *[len(c._modules) for c in children if c is not None], *self._gate_key())

    def _gate_key(self) -> tuple:
        return ()

    def _ghost_parts(self) -> Tuple[Tuple[nn.Conv2d, Optional[nn.Module], str], Tuple[nn.Conv2d, Optional[nn.Module], str]]:
        """((conv, BatchNorm or None, activation) of the primary half, the same of the cheap half), read from the
        live submodules; StructureError when they do not have that form. Timm's, Huawei's and the paper's layout:
        `primary_conv` and `cheap_operation` Sequentials."""
        return (_split_conv_bn_act(self.primary_conv, "primary_conv"),
                _split_conv_bn_act(self.cheap_operation, "cheap_operation"))

    def _analyse_ghost(self) -> Optional[str]:
        try:
            (conv1, bn1, act1), (conv2, bn2, act2) = self._ghost_parts()
        except StructureError as e:
            return str(e)
        # A tuple, not attributes: submodule attributes would add state_dict keys.
        self._ghost_layers = (conv1, bn1, conv2, bn2)
        if act1 != act2:
            return f"primary activation {act1!r} differs from cheap activation {act2!r}"
        self.act = act1
        self._primary, why = _primary_geometry(conv1)
        if why:
            return f"primary conv {why}"
        init = conv1.out_channels
        k = conv2.kernel_size[0]
        if conv2.out_channels == 0:
            return "cheap conv has no output channels (ratio 1: no cheap half to fuse)"
        if conv2.in_channels != init or conv2.out_channels % init:
            return "cheap conv channels do not follow the primary conv"
        if k not in ops.SUPPORTED_DW_SIZES:
            return f"cheap conv kernel_size {tuple(conv2.kernel_size)} (fused needs 1, 3, 5 or 7)"
        why = _conv_is(conv2, (k, k), (k // 2, k // 2), init)
        if why:
            return f"cheap conv {why}"
        if not 1 <= self.out_chs <= init + conv2.out_channels:
            return f"out_chs {self.out_chs} outside [1, {init + conv2.out_channels}]"
        return None

    def _analyse(self) -> None:
        self.unsupported_reason = self._analyse_ghost()

    # -- dispatch -----------------------------------------------------------------------------------------
    def _autocast_dtype(self, x: Tensor) -> Optional[torch.dtype]:
        """The dtype eager autocast would run this module's convolutions in, or None (no autocast for x's device,
        or an input autocast leaves alone: float64)."""
        if not torch.is_autocast_enabled(x.device.type) or x.dtype not in _AUTOCAST_ELIGIBLE:
            return None
        return torch.get_autocast_dtype(x.device.type)

    def _fused_backend(self, x: Tensor) -> Tuple[Optional[str], Optional[torch.dtype]]:
        """(backend to run the fused op with, or None to run the eager submodules; autocast's dtype or None).
        Resolved once per module call."""
        reason = self._current_plan()
        if reason is not None:
            fallback(f"{type(self).__name__}: {reason}", self._is_strict())
            return None, None
        self._check_input(x)
        autocast_dtype = self._autocast_dtype(x)
        return self._backend_for(x, autocast_dtype or x.dtype), autocast_dtype

    def _backend_for(self, x: Tensor, dtype: torch.dtype) -> Optional[str]:
        strict = self._is_strict()
        requested = default_backend() if self.backend is None else self.backend
        modes = tuple(m.training for m in self._plan_bn_list)
        # (batch >= 2: `auto` trains CPU tensors fused from batch 2 on, _resolve)
        key = (requested, x.device, dtype, modes, strict, resolution_state(), x.shape[0] >= 2)
        cached = self._resolved.get(key)  # a fused backend resolved before for this plan, device, dtype and modes
        if cached is not None:
            if any(modes) and x.numel() // max(x.shape[1], 1) < 2:
                return None  # eager raises BatchNorm's own error: one value per channel has no batch statistics
            return cached
        train_bns = self._training_bns()
        if any(isinstance(m, nn.SyncBatchNorm) for m in train_bns):
            fallback(f"{type(self).__name__} in training mode with SyncBatchNorm (batch statistics reduced across "
                     "processes have no fused kernel; the original submodules run)", strict)
            return None
        if train_bns and x.numel() // max(x.shape[1], 1) < 2:
            return None  # eager raises BatchNorm's own error: one value per channel has no batch statistics
        name = self._resolve(x, dtype, requested, self._ghost_batch_stats(), strict)
        if name is not None:  # only a fused backend is cached: every fallback is decided (and warned about) anew
            self._resolved[key] = name
        return name

    def _resolve(self, x: Tensor, dtype: torch.dtype, requested: str, batch_stats: bool, strict: bool):
        if requested == "auto" and x.device.type == "cpu" and batch_stats:
            # `auto` runs what is fastest. On CPU the z1 path (_run_ghost_z1) trains faster than eager
            # (benchmarks/results/cpu-2core/train_step.csv, tag cl-inside-v1: 1.31x / 1.28x paired on ghostnet_100 /
            # ghostnetv2_100, where `auto` through the original submodules gave 1.07x / 1.15x); the other training
            # forms of the C++ kernels lose to oneDNN's convolution backward (0.66x / 0.85x), so where the z1 path
            # does not apply the original submodules run, silently. At batch 1 the z1 path loses too (0.90x / 0.94x
            # eager at 224x224; batch 2 1.05x / 1.06x, batch 4 1.58x / 1.23x). backend='cpu' trains fused always.
            if not self._keeps_z1(dtype) or x.shape[0] < 2:
                return None
            name, reason = resolve_backend("cpu", x.device, dtype, act=self.act)
            if reason is not None or stats_backend(name, x.device)[0] is None:
                return None
            return name
        name, reason = resolve_backend(requested, x.device, dtype, act=self.act)
        if reason is not None:
            fallback(f"{type(self).__name__}: {reason}", strict)
            return None
        if name == "reference":
            return None
        if batch_stats:
            stats, why = stats_backend(name, x.device)
            if stats is None:
                fallback(f"{type(self).__name__} in training mode: {why}; the original submodules run", strict)
                return None
        return name

    def _plan_bns(self) -> List[nn.Module]:
        """The BatchNorms the fused forward computes (of the analysed layers)."""
        _, bn1, _, bn2 = self._ghost_layers
        return [m for m in (bn1, bn2) if m is not None]

    def _training_bns(self) -> List[nn.Module]:
        """The BatchNorms the fused forward computes that use batch statistics now (training mode)."""
        return [m for m in self._plan_bns() if m.training]

    def _keeps_z1(self, dtype: torch.dtype) -> bool:
        """True when a `cpu` training call in `dtype` takes the z1 path (_run_ghost): bn2 on batch statistics, no
        cheap-conv bias, float32 / float64, out_channels >= the cheap conv's input channels, the flags on."""
        _, _, conv2, bn2m = self._ghost_layers
        return (JOINT_BN2_STATS and KEEP_Z1 and _batch_stats(bn2m) and conv2.bias is None
                and dtype in (torch.float32, torch.float64) and self.out_chs >= conv2.in_channels)

    def _ghost_batch_stats(self) -> bool:
        _, bn1, _, bn2 = self._ghost_layers
        return _batch_stats(bn1) or _batch_stats(bn2)

    def _ghost_args(self, x: Tensor, dtype: Optional[torch.dtype], backend: str, bn2_stats: bool = True) -> tuple:
        """(primary_weight, bn1, cheap_weight, bn2) for this call, from the live submodules; `x` is the fused
        op's input (the primary conv's columns, `ops.primary_columns`). A BatchNorm in training mode normalises
        with the batch statistics of its input, computed by the statistics kernels (differentiable), and has its
        running statistics updated; one in eval mode passes its running statistics."""
        conv1, bn1, conv2, bn2 = self._ghost_layers
        w1, w2 = _cast_weight(conv1.weight, dtype), _cast_weight(conv2.weight, dtype)
        if w1.shape[-2:] != (1, 1):  # a k x k primary conv: its weight over primary_columns' patch channels
            w1 = w1.reshape(w1.shape[0], -1, 1, 1)
        p1 = None if _batch_stats(bn1) else _eval_bn(conv1, bn1)
        p2 = None if _batch_stats(bn2) else _eval_bn(conv2, bn2)
        if p1 is None or p2 is None:
            stats, _ = stats_backend(backend, x.device)
            count = x.shape[0] * x.shape[2] * x.shape[3]
            if p1 is None:
                mean, var = ops.run_ghost_module_stats(x, w1, BatchNormParams(), w2, self.act, 1, stats)
                p1 = _train_bn(bn1, conv1, mean, var, count)
            if p2 is None and bn2_stats:
                mean, var = ops.run_ghost_module_stats(x, w1, p1, w2, self.act, 2, stats)
                p2 = _train_bn(bn2, conv2, mean, var, count)
        return w1, p1, w2, p2

    def _run_ghost(self, x: Tensor, dtype: Optional[torch.dtype], backend: str, gate: Optional[Tensor]) -> Tensor:
        x, _ = ops.primary_columns(x, self._ghost_layers[0].weight, self._primary)
        _, _, conv2, bn2m = self._ghost_layers
        if backend == "cpu" and JOINT_BN2_STATS and _batch_stats(bn2m) and conv2.bias is None:
            if self._keeps_z1(x.dtype):
                return self._run_ghost_z1(x, dtype, backend, gate)
            # bn2 on batch statistics: one op computes them and the module, its backward both (ops.py)
            w1, bn1, w2, _ = self._ghost_args(x, dtype, backend, bn2_stats=False)
            out, mean, var = ops.run_ghost_module_bn2_batch(x, w1, bn1, w2, bn2m.weight, bn2m.bias, float(bn2m.eps),
                                                            self.out_chs, self.act, gate, self._gate_mode_now(),
                                                            backend)
            _update_running_stats(bn2m, mean, var, x.shape[0] * x.shape[2] * x.shape[3], None)
            return out
        w1, bn1, w2, bn2 = self._ghost_args(x, dtype, backend)
        return ops.run_ghost_module(x, w1, bn1, w2, bn2, self.out_chs, self.act, gate, self._gate_mode_now(), backend)

    def _run_ghost_z1(self, x: Tensor, dtype: Optional[torch.dtype], backend: str, gate: Optional[Tensor]) -> Tensor:
        """Training on the `cpu` backend with z1 kept: z1 = W1 x by a library GEMM (differentiable, as eager
        computes it), bn1's batch statistics from it (ops.run_ghost_module_z1_stats; its running statistics in
        eval mode), and the rest of the module, bn2 on batch statistics, by one op from z1
        (ops.run_ghost_module_z1)."""
        conv1, bn1m, conv2, bn2m = self._ghost_layers
        w1, w2 = _cast_weight(conv1.weight, dtype), _cast_weight(conv2.weight, dtype)
        if w1.shape[-2:] != (1, 1):  # a k x k primary conv: its weight over primary_columns' patch channels
            w1 = w1.reshape(w1.shape[0], -1, 1, 1)
        z1 = _primary_gemm(x, w1)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if _batch_stats(bn1m):
            mean, var = ops.run_ghost_module_z1_stats(z1, backend)
            p1 = _train_bn(bn1m, conv1, mean, var, count)
        else:
            p1 = _eval_bn(conv1, bn1m)
        out, mean2, var2 = ops.run_ghost_module_z1(z1, p1, w2, bn2m.weight, bn2m.bias, float(bn2m.eps), self.out_chs,
                                                   self.act, gate, self._gate_mode_now(), backend)
        _update_running_stats(bn2m, mean2, var2, count, None)
        return out

    def _gate_mode_now(self) -> str:
        return self.gate_mode

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a Tensor input, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
        conv1 = self._ghost_layers[0]
        w = conv1.weight
        if x.shape[1] != conv1.in_channels:
            raise ValueError(f"{name}: expected input with {conv1.in_channels} channels, got "
                             f"{x.shape[1]} (input shape {tuple(x.shape)})")
        if x.device != w.device:
            raise ValueError(f"{name}: input is on {x.device} but the weights are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name}: expected input of dtype {w.dtype} (the weights'), got {x.dtype}")

    def _eager_ghost(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.out_chs]

    def extra_repr(self) -> str:
        reason = self._current_plan()
        fused = "fused" if reason is None else f"eager: {reason}"
        return f"out_chs={self.out_chs}, backend={self.backend or 'default'}, {fused}"


class _GhostOnly(_FusedGhostBase):
    """A Ghost module without attention: one fused launch, or its eager submodules (`_eager_ghost`)."""

    def _eager_forward(self, x: Tensor) -> Tensor:
        return self._eager_ghost(x)

    def _fused_forward(self, x: Tensor) -> Tensor:
        backend, dtype = self._fused_backend(x)
        if backend is None:
            return self._eager_ghost(x)
        with _fused_region(x):
            x = x if dtype is None else x.to(dtype)
            return self._run_ghost(x, dtype, backend, None)


class GhostModule(_GhostOnly):
    """Ghost module (GhostNet V1, and V3 after reparameterization) running as one fused kernel in eval mode.

    Same constructor and state_dict as timm's `GhostModule`; `from_module` wraps an existing module."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, act_layer: Optional[Type[nn.Module]] = nn.ReLU, *, backend: Optional[str] = None,
                 strict: Optional[bool] = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.primary_conv, self.cheap_operation = _ghost_layers(in_chs, out_chs, kernel_size, ratio, dw_size, stride,
                                                                act_layer, dd)
        self._init_options(out_chs, backend, strict)

    @classmethod
    def from_module(cls, m: nn.Module, *, out_chs: Optional[int] = None, backend: Optional[str] = None,
                    strict: Optional[bool] = None) -> "GhostModule":
        """Wrap `m` (anything with `primary_conv` and `cheap_operation`), sharing its submodules and parameters.
        `out_chs` defaults to `m.out_chs` or `m.oup`."""
        return cls._wrap(m, ("primary_conv", "cheap_operation"), out_chs, backend, strict)



class GhostModuleV2(_FusedGhostBase):
    """Ghost module with DFC attention (GhostNetV2; GhostNetV3 'shortcut' mode): two fused launches in eval mode,
    the DFC gate at the pooled resolution, then the Ghost module with the gate upsampled in its epilogue.

    `gate_mode` 'nearest' (timm and the official code) or 'bilinear' (the paper's text)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, act_layer: Optional[Type[nn.Module]] = nn.ReLU, *, gate_mode: str = "nearest",
                 backend: Optional[str] = None, strict: Optional[bool] = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.primary_conv, self.cheap_operation = _ghost_layers(in_chs, out_chs, kernel_size, ratio, dw_size, stride,
                                                                act_layer, dd)
        self.short_conv = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False, **dd),
            nn.BatchNorm2d(out_chs, **dd),
            nn.Conv2d(out_chs, out_chs, (1, 5), 1, (0, 2), groups=out_chs, bias=False, **dd),
            nn.BatchNorm2d(out_chs, **dd),
            nn.Conv2d(out_chs, out_chs, (5, 1), 1, (2, 0), groups=out_chs, bias=False, **dd),
            nn.BatchNorm2d(out_chs, **dd),
        )
        self._init_options(out_chs, backend, strict, gate_mode)

    @classmethod
    def from_module(cls, m: nn.Module, *, out_chs: Optional[int] = None, gate_mode: str = "nearest",
                    backend: Optional[str] = None, strict: Optional[bool] = None) -> "GhostModuleV2":
        """Wrap `m` (with `primary_conv`, `cheap_operation` and `short_conv`), sharing its submodules."""
        return cls._wrap(m, ("primary_conv", "cheap_operation", "short_conv"), out_chs, backend, strict, gate_mode)

    def _analyse(self) -> None:
        reason = self._analyse_gate()
        reason = self._analyse_ghost() or reason
        if reason is None:
            reason = self._analyse_dfc()
        self.unsupported_reason = reason

    def _gate_key(self) -> tuple:
        # per call: the instance dict first (where _wrap copies Huawei's attributes), as getattr with a default on
        # an nn.Module pays for __getattr__'s AttributeError (~1 us) when the attribute is absent
        d, cls = self.__dict__, type(self)
        return tuple(d[name] if name in d else getattr(cls, name, None) for name in ("gate_loc", "inter_mode", "scale")) \
            + (self.gate_mode,)

    def _structure_key(self) -> tuple:
        return super()._structure_key() + self._gate_key()

    def _analyse_gate(self) -> Optional[str]:
        """How the gate is applied, from the live attributes of Huawei's GhostNetV3 module where present
        (`gate_loc` 'before': upsample(sigmoid(res / scale)); 'after': sigmoid(upsample(res)); `inter_mode`),
        else `gate_mode` with the sigmoid first. Read into `_gate_loc`, `_gate_interp`, `_gate_scale` (what the
        eager forward uses too); the reason when the fused kernels cannot apply it."""
        loc, interp, scale = getattr(self, "gate_loc", "before"), getattr(self, "inter_mode", None), 1.0
        interp = self.gate_mode if interp is None else interp
        self._gate_loc, self._gate_interp = str(loc), str(interp)
        if loc == "before":
            scale = getattr(self, "scale", 1.0)
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale == 0:
                self._gate_scale = 1.0
                return f"gate scale {scale!r} is not a non-zero number"
        self._gate_scale = float(scale)
        gate_fn = self._modules.get("gate_fn")
        if gate_fn is not None and module_class(gate_fn) is not nn.Sigmoid:
            return f"gate_fn {type(gate_fn).__name__} (fused needs Sigmoid)"
        if interp not in GATE_MODES:
            return f"inter_mode {interp!r} (fused needs one of {GATE_MODES})"
        if loc not in ("before", "after"):
            return f"gate_loc {loc!r} (fused needs 'before' or 'after')"
        if loc == "after" and interp != "nearest":
            return f"gate_loc 'after' with inter_mode {interp!r}: the sigmoid after a {interp} upsample has no fused " \
                   "kernel (with 'nearest' it equals the sigmoid before)"
        return None

    def _analyse_dfc(self) -> Optional[str]:
        layers = list(self.short_conv) if isinstance(self.short_conv, nn.Sequential) else []
        try:
            shape_ok = len(layers) == 6 and all(isinstance(layers[i], nn.Conv2d) for i in (0, 2, 4)) and all(
                _is_batchnorm(layers[i], "short_conv") for i in (1, 3, 5))
        except StructureError as e:
            return str(e)
        if not shape_ok:
            return "short_conv is not Sequential(Conv2d, BN, Conv2d 1x5, BN, Conv2d 5x1, BN)"
        c = self.out_chs
        conv3, conv4, conv5 = layers[0], layers[2], layers[4]
        if conv3.out_channels != c or conv4.out_channels != c or conv5.out_channels != c:
            return f"short_conv channels differ from out_chs={c}"
        for what, conv, kernel, padding, groups in (("short_conv 1x1", conv3, (1, 1), (0, 0), 1),
                                                    ("short_conv 1x5", conv4, (1, 5), (0, 2), c),
                                                    ("short_conv 5x1", conv5, (5, 1), (2, 0), c)):
            why = _conv_is(conv, kernel, padding, groups)
            if why:
                return f"{what} {why}"
        self._dfc_layers = tuple(layers)
        return None

    def _plan_bns(self) -> List[nn.Module]:
        return super()._plan_bns() + [self._dfc_layers[i] for i in (1, 3, 5)]

    def _gate_mode_now(self) -> str:
        return self._gate_interp

    def _eager_res(self, x: Tensor) -> Tensor:
        """The DFC branch before the sigmoid, at the pooled resolution."""
        return self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))

    def _eager_upsample(self, g: Tensor, size: List[int]) -> Tensor:
        if self._gate_interp == "bilinear":
            return F.interpolate(g, size=size, mode="bilinear", align_corners=False)
        return F.interpolate(g, size=size, mode=self._gate_interp)  # as the original calls it

    def _eager_forward(self, x: Tensor) -> Tensor:
        res = self._eager_res(x)  # first, as the original modules compute it
        out = self._eager_ghost(x)
        size = [out.shape[-2], out.shape[-1]]
        if self._gate_loc == "after":
            return out * torch.sigmoid(self._eager_upsample(res, size))
        if self._gate_scale != 1.0:
            res = res / self._gate_scale
        return out * self._eager_upsample(torch.sigmoid(res), size)

    def _fused_forward(self, x: Tensor) -> Tensor:
        backend, dtype = self._fused_backend(x)
        if backend is None:
            return self._eager_forward(x)
        l = self._dfc_layers
        gate = None
        if any(_batch_stats(l[i]) for i in (1, 3, 5)):
            # batch statistics in the DFC branch: it runs eagerly (autocast included), at the pooled resolution;
            # its gate is upsampled and applied in the fused Ghost op's epilogue (the sigmoid commutes with a
            # nearest upsample: gate_loc 'after' is the same gate)
            res = self._eager_res(x)
            gate = torch.sigmoid(res if self._gate_scale == 1.0 else res / self._gate_scale)
        with _fused_region(x):
            x = x if dtype is None else x.to(dtype)
            if gate is None:
                bn5 = _eval_bn(l[4], l[5])
                if self._gate_scale != 1.0:  # sigmoid(res / scale): the last BatchNorm's affine divided by scale
                    bn5 = _divided(bn5, self._gate_scale, l[4].out_channels)
                gate = ops.run_dfc(x, _cast_weight(l[0].weight, dtype), _eval_bn(l[0], l[1]),
                                   _cast_weight(l[2].weight, dtype), _eval_bn(l[2], l[3]),
                                   _cast_weight(l[4].weight, dtype), bn5, "gate", backend)
            return self._run_ghost(x, dtype, backend, gate if gate.dtype == x.dtype else gate.to(x.dtype))


def _divided(bn: BatchNormParams, scale: float, n: int) -> BatchNormParams:
    """`bn`'s output divided by `scale`: weight and bias divided (a missing one is 1 or 0), differentiably."""
    ref = next(t for t in bn.tensors() if t is not None)
    weight = torch.ones(n, dtype=ref.dtype, device=ref.device) if bn.weight is None else bn.weight
    bias = torch.zeros(n, dtype=ref.dtype, device=ref.device) if bn.bias is None else bn.bias
    return BatchNormParams(weight / scale, bias / scale, bn.mean, bn.var, bn.eps)


def _conv_module_part(m: nn.Module, what: str) -> Tuple[nn.Conv2d, Optional[nn.Module], str]:
    """(conv, BatchNorm or None, activation) of an ultralytics-style `Conv` block: `.conv`, `.bn` (absent after
    ultralytics' `fuse()`, which folds it into a conv bias), `.act`: act(bn(conv(x)))."""
    conv = getattr(m, "conv", None)
    if not isinstance(conv, nn.Conv2d):
        raise StructureError(f"{what} has no Conv2d `.conv`")
    extra = sorted(set(m._modules) - {"conv", "bn", "act"})
    if extra:
        raise StructureError(f"{what} has submodules beyond conv, bn, act: {extra}")
    bn = m._modules.get("bn")
    if bn is not None and not _is_batchnorm(bn, what):
        if not isinstance(bn, nn.Identity):
            raise StructureError(f"{what}.bn is a {type(bn).__name__}, not a BatchNorm2d")
        bn = None
    return conv, bn, _act_kind(m._modules.get("act"))


class GhostConv(_GhostOnly):
    """ultralytics YOLO's `GhostConv` as one fused launch: `y = cv1(x); cat(y, cv2(y))`, where `cv1` is a `Conv`
    (conv k x k, stride s + BN + SiLU by default; `act=False`: none) and `cv2` its 5x5 depthwise `Conv`. Also
    after ultralytics' `model.fuse()` (BN folded into the conv bias). Wraps an existing module, sharing its
    submodules (`cv1.conv.weight`, `cv1.bn.*`, ... state_dict keys unchanged)."""

    @classmethod
    def from_module(cls, m: nn.Module, *, backend: Optional[str] = None,
                    strict: Optional[bool] = None) -> "GhostConv":
        conv = getattr(getattr(m, "cv1", None), "conv", None)
        if not isinstance(conv, nn.Conv2d):
            raise StructureError(f"{type(m).__name__} has no cv1.conv Conv2d")
        return cls._wrap(m, ("cv1", "cv2"), 2 * conv.out_channels, backend, strict)

    def _ghost_parts(self):
        return _conv_module_part(self.cv1, "cv1"), _conv_module_part(self.cv2, "cv2")

    def _analyse_ghost(self) -> Optional[str]:
        reason = super()._analyse_ghost()
        if reason is None and self._ghost_layers[2].out_channels != self._ghost_layers[0].out_channels:
            return "cv2 is not a depthwise conv with cv1's channel count"
        return reason

    def _eager_ghost(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)



class GhostConv2d(_GhostOnly):
    """The Ghost module of Ghost-ResNet (Huawei's ghost_resnet.py, an `nn.Conv2d` subclass): `x1 = conv1(x)`
    (k x k, stride, padding; biased), `cat(x1, conv2(x1)[:, :out - init])` (biased depthwise), no BatchNorm or
    activation inside, as one fused launch. Wraps an existing module, sharing its parameters and attributes."""

    @classmethod
    def from_module(cls, m: nn.Module, *, out_chs: Optional[int] = None, backend: Optional[str] = None,
                    strict: Optional[bool] = None) -> "GhostConv2d":
        if out_chs is None:
            out_chs = getattr(m, "out_channels", None)
        return cls._wrap(m, ("conv1", "conv2"), out_chs, backend, strict)

    def _ghost_parts(self):
        parts = []
        for name in ("conv1", "conv2"):
            conv = self._modules.get(name)
            if not isinstance(conv, nn.Conv2d):
                raise StructureError(f"{name} is not a Conv2d")
            parts.append((conv, None, "none"))
        return tuple(parts)

    def _eager_ghost(self, x: Tensor) -> Tensor:
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        return torch.cat([x1, x2[:, :self.out_chs - x1.shape[1]]], 1)



__all__: List[str] = ["GhostConv", "GhostConv2d", "GhostModule", "GhostModuleV2", "StructureError"]

from .bottleneck import GhostBottleneck, GhostBottleneckV3  # noqa: E402  (it builds on the modules above)

__all__ += ["GhostBottleneck", "GhostBottleneckV3"]
