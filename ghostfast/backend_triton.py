"""The `triton` backend: the Triton kernels of `kernels/` (`ghostfast.kernels`) behind the `Backend` interface.

Runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (the interpreter: a correctness tool, not timed).
The kernel modules are imported on first use: importing ghostfast does not import triton."""
from __future__ import annotations

from typing import Optional

import torch

from .backends import Backend, _triton_importable, triton_interpreting


class TritonBackend(Backend):
    name = "triton"

    def unavailable(self, device_type: str) -> Optional[str]:
        if not _triton_importable():
            return "Triton is not installed"
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device"
            return "TRITON_INTERPRET=1 is set" if triton_interpreting() else None
        if device_type == "cpu":
            return None if triton_interpreting() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return f"no Triton backend for device type {device_type!r}"

    ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")  # kernels/ghost_module.py ACTIVATIONS

    def dtype_unsupported(self, dtype: torch.dtype) -> Optional[str]:
        if dtype == torch.bfloat16 and triton_interpreting():
            return "the Triton interpreter does not support bfloat16"
        return None

    def ghost_module(self, x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode):
        from .kernels import ghost_module

        return ghost_module.ghost_module_forward(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate,
                                                 gate_mode)

    def ghost_module_backward(self, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                              cheap_scale, cheap_bias, out_channels, act, gate, gate_mode, needs):
        from .kernels import ghost_module

        return list(ghost_module.ghost_module_backward(grad_out, x, primary_weight, primary_scale, primary_bias,
                                                       cheap_weight, cheap_scale, cheap_bias, out_channels, act,
                                                       gate, gate_mode, needs))

    def ghost_module_stats(self, x, primary_weight, bn1, cheap_weight, act, stage):
        from .kernels import ghost_module

        return ghost_module.ghost_module_stats(x, primary_weight, bn1, cheap_weight, act, stage)

    def ghost_module_stats_backward(self, x, primary_weight, primary_scale, primary_bias, cheap_weight, act, stage,
                                    coef_a, coef_c, mean, needs):
        from .kernels import ghost_module

        return list(ghost_module.ghost_module_stats_backward(x, primary_weight, primary_scale, primary_bias,
                                                             cheap_weight, act, stage, coef_a, coef_c, mean, needs))

    def dfc(self, x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode):
        from .kernels import dfc

        return dfc.dfc_forward(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode)

    def dfc_backward(self, grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale,
                     v_bias, mode, needs):
        from .kernels import dfc

        return list(dfc.dfc_backward(grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight,
                                     v_scale, v_bias, mode, needs))
