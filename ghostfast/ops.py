"""The ghostfast op registry: `torch.library` custom ops, their fake kernels and autograd, backend dispatch.

Public entry points (`ghost_module`, `dfc_gate`, `dfc_attention`) validate their arguments, pick a backend and
call the custom ops `torch.ops.ghostfast.*`, which run the chosen backend's kernel. BatchNorm arrives folded
into per-channel scale and bias (`ghostfast.reference.fold_bn`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import compiled, reference
from .backends import auto_candidates, default_strict, fallback, resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SUPPORTED_DW_SIZES = (1, 3, 5, 7)


def output_memory_format(x: Tensor) -> torch.memory_format:
    """Outputs keep the input's layout: channels_last in, channels_last out; anything else gives NCHW."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _empty_output(x: Tensor, shape: Sequence[int]) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


# ----------------------------------------------------------------------------------------------------------
# Custom ops. `backend` is a concrete name ('triton', 'cpu', 'cuda' or 'reference'), a constant for the graph.
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ghostfast::ghost_module", mutates_args=())
def _ghost_module_op(
    x: Tensor,
    primary_weight: Tensor,
    primary_scale: Tensor,
    primary_bias: Tensor,
    cheap_weight: Tensor,
    cheap_scale: Tensor,
    cheap_bias: Tensor,
    out_channels: int,
    relu: bool,
    gate: Optional[Tensor],
    gate_mode: str,
    backend: str,
) -> Tensor:
    if backend == "triton":
        from .kernels.ghost_module import ghost_module_forward

        return ghost_module_forward(x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                                    cheap_bias, out_channels, relu, gate, gate_mode)
    if backend in ("cpu", "cuda"):
        return compiled.ghost_module_forward(x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                             cheap_scale, cheap_bias, out_channels, relu, gate, gate_mode)
    tensors = (primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias)
    if gate is None:
        return _run_reference(reference.ghost_module_forward, x, tensors, out_channels, relu)
    return _run_reference(reference.ghost_module_forward, x, tensors, out_channels, relu, gate.to(_compute_dtype(x)),
                          gate_mode)


@_ghost_module_op.register_fake
def _(x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels, relu,
      gate, gate_mode, backend):
    return _empty_output(x, (x.shape[0], out_channels, x.shape[2], x.shape[3]))


@torch.library.custom_op("ghostfast::dfc_gate", mutates_args=())
def _dfc_gate_op(
    x: Tensor,
    conv_weight: Tensor,
    conv_scale: Tensor,
    conv_bias: Tensor,
    h_weight: Tensor,
    h_scale: Tensor,
    h_bias: Tensor,
    v_weight: Tensor,
    v_scale: Tensor,
    v_bias: Tensor,
    backend: str,
) -> Tensor:
    params = (conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    if backend == "triton":
        from .kernels.dfc import dfc_gate_forward

        return dfc_gate_forward(x, *params)
    if backend in ("cpu", "cuda"):
        return compiled.dfc_forward(x, *params, mode="gate")
    return _run_reference(reference.dfc_gate_forward, x, params)


@_dfc_gate_op.register_fake
def _(x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias, backend):
    return _empty_output(x, (x.shape[0], conv_weight.shape[0], x.shape[2] // 2, x.shape[3] // 2))


@torch.library.custom_op("ghostfast::dfc_attention", mutates_args=())
def _dfc_attention_op(
    x: Tensor,
    conv_weight: Tensor,
    conv_scale: Tensor,
    conv_bias: Tensor,
    h_weight: Tensor,
    h_scale: Tensor,
    h_bias: Tensor,
    v_weight: Tensor,
    v_scale: Tensor,
    v_bias: Tensor,
    mode: str,
    backend: str,
) -> Tensor:
    params = (conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    if backend == "triton":
        from .kernels.dfc import dfc_attention_forward

        return dfc_attention_forward(x, *params, mode=mode)
    if backend in ("cpu", "cuda"):
        return compiled.dfc_forward(x, *params, mode=mode)
    return _run_reference(reference.dfc_attention_forward, x, params, mode=mode)


@_dfc_attention_op.register_fake
def _(x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias, mode, backend):
    return _empty_output(x, (x.shape[0], conv_weight.shape[0], x.shape[2], x.shape[3]))


@torch.library.custom_op("ghostfast::ghost_module_stats", mutates_args=())
def _ghost_module_stats_op(
    x: Tensor,
    primary_weight: Tensor,
    primary_scale: Tensor,
    primary_bias: Tensor,
    cheap_weight: Tensor,
    relu: bool,
    stage: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Training-mode BatchNorm statistics (mean, biased variance) of z1 (stage 1) or z2 (stage 2), in the
    accumulation dtype: `ghostfast.reference.ghost_module_stats`."""
    args = (x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage)
    if backend == "triton":
        from .kernels.ghost_module import ghost_module_stats

        return ghost_module_stats(*args)
    if backend == "cpu":
        return compiled.ghost_module_stats(*args)
    dt = _compute_dtype(x)
    mean, var = reference.ghost_module_stats(x.to(dt), *[t.to(dt) for t in args[1:5]], relu, stage)
    return mean.contiguous(), var.contiguous()


@_ghost_module_stats_op.register_fake
def _(x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage, backend):
    n = primary_weight.shape[0] if stage == 1 else cheap_weight.shape[0]
    dt = _compute_dtype(x)
    return x.new_empty(n, dtype=dt), x.new_empty(n, dtype=dt)


# ----------------------------------------------------------------------------------------------------------
# Backward ops: the fused backward kernels (Triton or compiled), as custom ops of their own so that a compiled training graph
# keeps them opaque. They have no autograd formula: double backward through them raises a clear error.
# Gradients that are not needed come back as empty placeholders (a custom op cannot return None in a list).
# ----------------------------------------------------------------------------------------------------------


def _grads_or_placeholders(grads, x: Tensor) -> List[Tensor]:
    """Custom-op outputs may not alias each other: kernels that reduce into views of one workspace get their
    gradients cloned apart here (they are per-channel vectors and weights, small)."""
    seen, out = set(), []
    for g in grads:
        if g is None:
            out.append(x.new_empty(0))
            continue
        ptr = g.untyped_storage().data_ptr()
        out.append(g.clone() if ptr in seen else g)
        seen.add(ptr)
    return out


def _fake_grads(inputs: Sequence[Optional[Tensor]], needs: Sequence[bool], x: Tensor) -> List[Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=output_memory_format(t))
            if (t is not None and need) else x.new_empty(0) for t, need in zip(inputs, needs)]


@torch.library.custom_op("ghostfast::ghost_module_backward", mutates_args=())
def _ghost_module_backward_op(
    grad_out: Tensor,
    x: Tensor,
    primary_weight: Tensor,
    primary_scale: Tensor,
    primary_bias: Tensor,
    cheap_weight: Tensor,
    cheap_scale: Tensor,
    cheap_bias: Tensor,
    out_channels: int,
    relu: bool,
    gate: Optional[Tensor],
    gate_mode: str,
    needs: List[bool],
    backend: str,
) -> List[Tensor]:
    args = (grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
            out_channels, relu, gate, gate_mode)
    if backend == "triton":
        from .kernels.ghost_module import ghost_module_backward

        grads = ghost_module_backward(*args, needs=tuple(needs))
    else:
        grads = compiled.ghost_module_backward(*args, needs)
    return _grads_or_placeholders(grads, x)


@_ghost_module_backward_op.register_fake
def _(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
      out_channels, relu, gate, gate_mode, needs, backend):
    inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
    return _fake_grads(inputs, needs, x)


@torch.library.custom_op("ghostfast::dfc_backward", mutates_args=())
def _dfc_backward_op(
    grad: Tensor,
    x: Tensor,
    conv_weight: Tensor,
    conv_scale: Tensor,
    conv_bias: Tensor,
    h_weight: Tensor,
    h_scale: Tensor,
    h_bias: Tensor,
    v_weight: Tensor,
    v_scale: Tensor,
    v_bias: Tensor,
    mode: str,
    needs: List[bool],
    backend: str,
) -> List[Tensor]:
    """Backward of dfc_gate (mode 'gate': `grad` at the pooled resolution) or of dfc_attention (mode 'nearest' or
    'bilinear': `grad` at full resolution)."""
    from .kernels.dfc import dfc_attention_backward, dfc_gate_backward

    params = (conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    if backend != "triton":
        grads = compiled.dfc_backward(grad, x, *params, mode=mode, needs=needs)
    elif mode == "gate":
        grads = dfc_gate_backward(grad, x, *params, needs=tuple(needs))
    else:
        grads = dfc_attention_backward(grad, x, *params, mode=mode, needs=tuple(needs))
    return _grads_or_placeholders(grads, x)


@_dfc_backward_op.register_fake
def _(grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias, mode, needs,
      backend):
    inputs = (x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    return _fake_grads(inputs, needs, x)


@torch.library.custom_op("ghostfast::ghost_module_stats_backward", mutates_args=())
def _ghost_module_stats_backward_op(
    x: Tensor,
    primary_weight: Tensor,
    primary_scale: Tensor,
    primary_bias: Tensor,
    cheap_weight: Tensor,
    relu: bool,
    stage: int,
    coef_a: Tensor,
    coef_c: Tensor,
    mean: Tensor,
    needs: List[bool],
    backend: str,
) -> List[Tensor]:
    """Gradients of sum(dz * z) over the stage's z, dz = coef_a + coef_c * (z - mean) per channel: for (x,
    primary_weight, primary_scale, primary_bias, cheap_weight)."""
    args = (x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage, coef_a, coef_c, mean)
    if backend == "triton":
        from .kernels.ghost_module import ghost_module_stats_backward

        grads = ghost_module_stats_backward(*args, needs=tuple(needs))
    else:
        grads = compiled.ghost_module_stats_backward(*args, needs)
    return _grads_or_placeholders(grads, x)


@_ghost_module_stats_backward_op.register_fake
def _(x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage, coef_a, coef_c, mean, needs,
      backend):
    inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight)
    return _fake_grads(inputs, [n and (stage == 2 or i < 2) for i, n in enumerate(needs)], x)


# ----------------------------------------------------------------------------------------------------------
# Autograd of the forward ops. The fused backends differentiate with their fused backward kernels; the reference
# backend differentiates the reference math (the forward is recomputed in eager PyTorch).
# ----------------------------------------------------------------------------------------------------------


def _save_inputs(ctx, inputs, output, extra: Sequence[Tensor] = ()):
    tensors = [t if isinstance(t, Tensor) else None for t in inputs]
    ctx.tensor_slots = [i for i, t in enumerate(tensors) if t is not None]
    ctx.non_tensors = {i: v for i, v in enumerate(inputs) if not isinstance(v, Tensor)}
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(*[tensors[i] for i in ctx.tensor_slots], *extra)


def _saved_args(ctx) -> list:
    args = [None] * ctx.num_inputs
    for i, v in ctx.non_tensors.items():
        args[i] = v
    for slot, t in zip(ctx.tensor_slots, ctx.saved_tensors):
        args[slot] = t
    return args


def _saved_extra(ctx) -> tuple:
    return tuple(ctx.saved_tensors[len(ctx.tensor_slots):])


def _reference_vjp(ctx, grad_out, reference_fn):
    args = _saved_args(ctx)
    leaves = []
    dt = _compute_dtype(args[0])
    with torch.enable_grad():
        for slot in ctx.tensor_slots:
            t = args[slot].detach().requires_grad_(ctx.needs_input_grad[slot])
            args[slot] = t.to(dt)  # differentiable: gradients come back in each input's own dtype
            if t.requires_grad:
                leaves.append((slot, t))
        out = reference_fn(*args[:-1])  # the last argument is the backend name
        grads = torch.autograd.grad(out, [t for _, t in leaves], None if grad_out is None else grad_out.to(out.dtype),
                                    allow_unused=True)
    result = [None] * ctx.num_inputs
    for (slot, t), g in zip(leaves, grads):
        result[slot] = torch.zeros_like(t) if g is None else g
    return tuple(result)


def _scatter_grads(ctx, slots: Sequence[int], grads: Sequence[Tensor]) -> tuple:
    result = [None] * ctx.num_inputs
    for slot, g in zip(slots, grads):
        result[slot] = g if ctx.needs_input_grad[slot] else None
    return tuple(result)


_GHOST_GRAD_SLOTS = (0, 1, 2, 3, 4, 5, 6, 9)  # x, the six parameters, gate


def _ghost_module_backward(ctx, grad_out):
    args = _saved_args(ctx)
    if args[-1] == "reference":
        return _reference_vjp(ctx, grad_out, reference.ghost_module_forward)
    x, w1, s1, b1, w2, s2, b2, out_channels, relu, gate, gate_mode, backend = args
    needs = [bool(ctx.needs_input_grad[i]) for i in _GHOST_GRAD_SLOTS]
    grads = _ghost_module_backward_op(grad_out, x, w1, s1, b1, w2, s2, b2, out_channels, relu, gate, gate_mode,
                                      needs, backend)
    return _scatter_grads(ctx, _GHOST_GRAD_SLOTS, grads)


def _dfc_backward(mode_of):
    def backward(ctx, grad):
        args = _saved_args(ctx)
        mode = mode_of(args)
        if args[-1] == "reference":
            if mode == "gate":
                return _reference_vjp(ctx, grad, reference.dfc_gate_forward)
            return _reference_vjp(ctx, grad, lambda x, *rest: reference.dfc_attention_forward(x, *rest[:-1],
                                                                                              mode=rest[-1]))
        needs = [bool(ctx.needs_input_grad[i]) for i in range(10)]
        grads = _dfc_backward_op(grad, *args[:10], mode, needs, args[-1])
        return _scatter_grads(ctx, range(10), grads)

    return backward


def _ghost_module_stats_backward(ctx, grad_mean, grad_var):
    """The statistics' gradient reaches z as dz = grad_mean / M + 2 grad_var (z - mean) / M (M = N*H*W)."""
    args = _saved_args(ctx)
    x, w1, s1, b1, w2, relu, stage, backend = args
    (mean,) = _saved_extra(ctx)
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_var is None:
        grad_var = torch.zeros_like(mean)
    if backend == "reference":
        def fn(x, w1, s1, b1, w2, relu, stage):
            m, v = reference.ghost_module_stats(x, w1, s1, b1, w2, relu, stage)
            return m * grad_mean.to(m.dtype) + v * grad_var.to(v.dtype)  # a scalar-valued vjp of both outputs

        return _reference_vjp(ctx, None, lambda *a: fn(*a).sum())
    m = x.shape[0] * x.shape[2] * x.shape[3]
    needs = [bool(ctx.needs_input_grad[i]) for i in range(5)]
    grads = _ghost_module_stats_backward_op(x, w1, s1, b1, w2, relu, stage, grad_mean / m, grad_var * (2.0 / m),
                                            mean, needs, backend)
    if stage == 1:  # z1 depends on x and primary_weight only
        grads = list(grads[:2]) + [None] * 3
    return _scatter_grads(ctx, range(5), grads)


def _setup_stats(ctx, inputs, output):
    _save_inputs(ctx, inputs, output, extra=(output[0],))


def _setup(ctx, inputs, output):
    _save_inputs(ctx, inputs, output)


_ghost_module_op.register_autograd(_ghost_module_backward, setup_context=_setup)
_dfc_gate_op.register_autograd(_dfc_backward(lambda args: "gate"), setup_context=_setup)
_ghost_module_stats_op.register_autograd(_ghost_module_stats_backward, setup_context=_setup_stats)
_dfc_attention_op.register_autograd(_dfc_backward(lambda args: args[10]), setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------
# Validation: a clear error naming what was expected and what came, before any kernel runs.
# ----------------------------------------------------------------------------------------------------------


def _check_input(x: Tensor, op: str, in_channels: int, min_hw: int = 0) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D input [N, C, H, W], got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{op}: expected input with {in_channels} channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected a floating input ({', '.join(str(d) for d in SUPPORTED_DTYPES)}), "
                        f"got {x.dtype}")
    if min_hw and x.numel() and (x.shape[2] < min_hw or x.shape[3] < min_hw):
        raise ValueError(f"{op}: the 2x2 average pool needs H and W >= {min_hw}, got {x.shape[2]}x{x.shape[3]}")


def _check_params(op: str, x: Tensor, named: dict) -> None:
    """Weights (4-D) must have the input's dtype; per-channel scale and bias may also be float32."""
    for name, t in named.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}; expected both on "
                             f"{x.device}")
        allowed = (x.dtype,) if t.dim() == 4 else (x.dtype, torch.float32)
        if t.dtype not in allowed:
            raise TypeError(f"{op}: expected {name} of dtype {' or '.join(map(str, allowed))} to match the input "
                            f"({x.dtype}), got {t.dtype}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _run_reference(fn, x: Tensor, tensors: Sequence[Optional[Tensor]], *args, **kwargs) -> Tensor:
    """The reference backend inside an op: computes in float32 for half inputs, returns the input's dtype."""
    dt = _compute_dtype(x)
    cast = [None if t is None else t.to(dt) for t in tensors]
    out = fn(x.to(dt), *cast, *args, **kwargs)
    return out.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def _check_weight(op: str, name: str, w: Tensor, shape: tuple) -> None:
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{op}: expected {name} of shape {tuple(shape)}, got {tuple(w.shape)}")


def _check_vector(op: str, name: str, v: Tensor, n: int) -> None:
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{op}: expected {name} of shape ({n},), got {tuple(v.shape)}")


def _pick_backend(op: str, x: Tensor, backend: Optional[str], strict: Optional[bool], run=None, key=()) -> str:
    """The concrete backend for this call. `auto` with several fused candidates (CUDA: triton and cuda) is
    settled per op and shape by `_fastest`, with `run(name)` computing the op through backend `name`."""
    strict = default_strict() if strict is None else strict
    name, reason = resolve_backend(backend, x.device, x.dtype)
    if reason is not None:
        fallback(f"{op}: {reason}", strict)
    if name == "auto":
        name = _fastest(op, x, auto_candidates(x.device, x.dtype), run, key)
    return name


# ---- auto on GPUs: the faster of the fused backends, measured once per op and shape -------------------------

_AUTO_CHOICE: dict = {}
_AGREE_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def auto_choices() -> dict:
    """What `auto` picked so far: {(op, shapes...): (backend, {backend: milliseconds})}."""
    return dict(_AUTO_CHOICE)


def _fastest(op: str, x: Tensor, candidates: List[str], run, key) -> str:
    full_key = (op, str(x.device), x.dtype, tuple(x.shape), output_memory_format(x) == torch.channels_last, *key)
    if full_key in _AUTO_CHOICE:
        return _AUTO_CHOICE[full_key][0]
    if len(candidates) == 1 or run is None or torch.compiler.is_compiling() or _is_fake(x):
        return candidates[0]  # tracing: no real data to time; the eager run of the same shape decides
    with torch.no_grad():
        ref = run("reference").double()
        times = {}
        for name in candidates:
            out = run(name)
            err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
            if not err <= _AGREE_TOL[x.dtype]:  # also catches NaN: a kernel that disagrees is never chosen
                fallback(f"{op}: backend {name!r} disagrees with the reference (relative error {err:.2e}) for "
                         f"input {tuple(x.shape)} {x.dtype}; not using it for this shape", strict=False)
                continue
            times[name] = _time_ms(lambda: run(name), x.device)
    best = min(times, key=times.get) if times else "reference"
    _AUTO_CHOICE[full_key] = (best, times)
    return best


def _time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU, a wall clock elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    import statistics
    import time

    fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _is_fake(x: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def ghost_module(
    x: Tensor,
    primary_weight: Tensor,
    primary_scale: Tensor,
    primary_bias: Tensor,
    cheap_weight: Tensor,
    cheap_scale: Tensor,
    cheap_bias: Tensor,
    out_channels: Optional[int] = None,
    relu: bool = True,
    gate: Optional[Tensor] = None,
    gate_mode: str = "nearest",
    *,
    backend: Optional[str] = None,
    strict: Optional[bool] = None,
) -> Tensor:
    """Fused Ghost module, eval mode: `cat(act(conv1x1(x)*s1+b1), act(dw(x1)*s2+b2))[:, :out_channels]`,
    optionally multiplied by `upsample(gate, (H, W), gate_mode)` in the same launch.

    `primary_weight` [init, C_in, 1, 1], `cheap_weight` [init*(ratio-1), 1, dw, dw]; `gate` [N, out, Hg, Wg]."""
    op = "ghostfast.ops.ghost_module"
    if primary_weight.dim() != 4 or primary_weight.shape[2:] != (1, 1):
        raise ValueError(f"{op}: expected a 1x1 primary_weight [init, C_in, 1, 1], got {tuple(primary_weight.shape)}")
    init, c_in = primary_weight.shape[:2]
    _check_input(x, op, c_in)
    if cheap_weight.dim() != 4 or cheap_weight.shape[1] != 1 or cheap_weight.shape[2] != cheap_weight.shape[3]:
        raise ValueError(f"{op}: expected a square depthwise cheap_weight [init*(ratio-1), 1, k, k], got "
                         f"{tuple(cheap_weight.shape)}")
    new = cheap_weight.shape[0]
    if new < init or new % init:
        raise ValueError(f"{op}: cheap_weight has {new} output channels; expected a positive multiple of "
                         f"init={init} (init*(ratio-1))")
    dw = cheap_weight.shape[-1]
    if dw not in SUPPORTED_DW_SIZES:
        raise ValueError(f"{op}: depthwise size must be one of {SUPPORTED_DW_SIZES}, got {dw}")
    out_channels = init + new if out_channels is None else int(out_channels)
    if not 1 <= out_channels <= init + new:
        raise ValueError(f"{op}: out_channels must be in [1, {init + new}], got {out_channels}")
    _check_vector(op, "primary_scale", primary_scale, init)
    _check_vector(op, "primary_bias", primary_bias, init)
    _check_vector(op, "cheap_scale", cheap_scale, new)
    _check_vector(op, "cheap_bias", cheap_bias, new)
    if gate is not None:
        if gate_mode not in reference.GATE_MODES:
            raise ValueError(f"{op}: gate_mode must be one of {reference.GATE_MODES}, got {gate_mode!r}")
        if gate.dim() != 4 or gate.shape[0] != x.shape[0] or gate.shape[1] != out_channels or (
                x.numel() and min(gate.shape[2:]) < 1):
            raise ValueError(f"{op}: expected gate of shape ({x.shape[0]}, {out_channels}, Hg, Wg) with Hg, Wg >= 1, "
                             f"got {tuple(gate.shape)}")
        if gate.dtype != x.dtype:
            raise TypeError(f"{op}: expected gate dtype {x.dtype} (the input's), got {gate.dtype}")
    _check_params(op, x, dict(primary_weight=primary_weight, primary_scale=primary_scale,
                              primary_bias=primary_bias, cheap_weight=cheap_weight, cheap_scale=cheap_scale,
                              cheap_bias=cheap_bias, gate=gate))
    def run(name):
        return _ghost_module_op(x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                                cheap_bias, out_channels, bool(relu), gate, gate_mode, name)

    key = (tuple(primary_weight.shape), tuple(cheap_weight.shape), out_channels, bool(relu),
           None if gate is None else (tuple(gate.shape), gate_mode))
    return run(_pick_backend(op, x, backend, strict, run, key))


def ghost_module_stats(
    x: Tensor,
    primary_weight: Tensor,
    primary_scale: Optional[Tensor],
    primary_bias: Optional[Tensor],
    cheap_weight: Tensor,
    relu: bool,
    stage: int,
    *,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Training-mode BatchNorm statistics of a Ghost module, per channel over N, H, W: (mean, biased variance) of
    z1 = conv1x1(x) (stage 1; primary_scale and primary_bias unused, may be None) or of every channel of
    z2 = dw(act(z1 * primary_scale + primary_bias)) (stage 2). Differentiable (gradients flow through the
    statistics into x and the parameters). `backend`: 'triton', 'cpu' or 'reference' (see
    `ghostfast.backends.stats_backend`). Returned in float32 (float64 for float64 inputs)."""
    op = "ghostfast.ops.ghost_module_stats"
    if stage not in (1, 2):
        raise ValueError(f"{op}: stage must be 1 or 2, got {stage!r}")
    if backend not in ("triton", "cpu", "reference"):
        raise ValueError(f"{op}: backend must be 'triton', 'cpu' or 'reference', got {backend!r}")
    if primary_weight.dim() != 4 or primary_weight.shape[2:] != (1, 1):
        raise ValueError(f"{op}: expected a 1x1 primary_weight [init, C_in, 1, 1], got {tuple(primary_weight.shape)}")
    init, c_in = primary_weight.shape[:2]
    _check_input(x, op, c_in)
    if x.numel() // max(x.shape[1], 1) < 2:
        raise ValueError(f"{op}: batch statistics need more than 1 value per channel, got input of shape "
                         f"{tuple(x.shape)}")
    new = cheap_weight.shape[0]
    if cheap_weight.dim() != 4 or cheap_weight.shape[1] != 1 or new % init or cheap_weight.shape[-1] not in \
            SUPPORTED_DW_SIZES or cheap_weight.shape[-1] != cheap_weight.shape[-2]:
        raise ValueError(f"{op}: expected a square depthwise cheap_weight [init*(ratio-1), 1, k, k] with init={init} "
                         f"and k in {SUPPORTED_DW_SIZES}, got {tuple(cheap_weight.shape)}")
    dt = _compute_dtype(x)
    if primary_scale is None:
        primary_scale = torch.ones(init, dtype=dt, device=x.device)
    if primary_bias is None:
        primary_bias = torch.zeros(init, dtype=dt, device=x.device)
    _check_vector(op, "primary_scale", primary_scale, init)
    _check_vector(op, "primary_bias", primary_bias, init)
    _check_params(op, x, dict(primary_weight=primary_weight, primary_scale=primary_scale, primary_bias=primary_bias,
                              cheap_weight=cheap_weight))
    return _ghost_module_stats_op(x, primary_weight, primary_scale, primary_bias, cheap_weight, bool(relu),
                                  int(stage), backend)


def _check_dfc(op: str, x: Tensor, params: Sequence[Tensor]) -> None:
    conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias = params
    if conv_weight.dim() != 4 or conv_weight.shape[2:] != (1, 1):
        raise ValueError(f"{op}: expected a 1x1 conv_weight [C, C_in, 1, 1], got {tuple(conv_weight.shape)}")
    c, c_in = conv_weight.shape[:2]
    _check_input(x, op, c_in, min_hw=2)
    _check_weight(op, "h_weight", h_weight, (c, 1, 1, 5))
    _check_weight(op, "v_weight", v_weight, (c, 1, 5, 1))
    for name, v in dict(conv_scale=conv_scale, conv_bias=conv_bias, h_scale=h_scale, h_bias=h_bias,
                        v_scale=v_scale, v_bias=v_bias).items():
        _check_vector(op, name, v, c)
    _check_params(op, x, dict(zip(("conv_weight", "conv_scale", "conv_bias", "h_weight", "h_scale", "h_bias",
                                   "v_weight", "v_scale", "v_bias"), params)))


def dfc_gate(x: Tensor, conv_weight: Tensor, conv_scale: Tensor, conv_bias: Tensor, h_weight: Tensor,
             h_scale: Tensor, h_bias: Tensor, v_weight: Tensor, v_scale: Tensor, v_bias: Tensor, *,
             backend: Optional[str] = None, strict: Optional[bool] = None) -> Tensor:
    """Fused DFC attention gate at the pooled resolution [N, C, H//2, W//2]:
    sigmoid(BN5(dw5x1(BN4(dw1x5(BN3(conv1x1(avgpool2x2(x)))))))) in one launch."""
    op = "ghostfast.ops.dfc_gate"
    params = (conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    _check_dfc(op, x, params)

    def run(name):
        return _dfc_gate_op(x, *params, name)

    return run(_pick_backend(op, x, backend, strict, run, (tuple(conv_weight.shape),)))


def dfc_attention(x: Tensor, conv_weight: Tensor, conv_scale: Tensor, conv_bias: Tensor, h_weight: Tensor,
                  h_scale: Tensor, h_bias: Tensor, v_weight: Tensor, v_scale: Tensor, v_bias: Tensor,
                  mode: str = "nearest", *, backend: Optional[str] = None, strict: Optional[bool] = None) -> Tensor:
    """The DFC gate upsampled to x's full H x W (`mode` 'nearest' or 'bilinear'), computed in one launch."""
    op = "ghostfast.ops.dfc_attention"
    if mode not in reference.GATE_MODES:
        raise ValueError(f"{op}: mode must be one of {reference.GATE_MODES}, got {mode!r}")
    params = (conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    _check_dfc(op, x, params)

    def run(name):
        return _dfc_attention_op(x, *params, mode, name)

    return run(_pick_backend(op, x, backend, strict, run, (tuple(conv_weight.shape), mode)))
