"""The benchmark shapes: every distinct Ghost module of timm's ghostnet_100, ghostnetv2_100 and ghostnetv3_100,
found by running each model once at 224x224 with forward hooks (nothing is typed by hand)."""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch import nn

from ghostfast.models import TIMM_GHOSTNETS, timm_ghostnet

IMAGE_SIZE = 224


@dataclass
class GhostShape:
    """One distinct Ghost-module configuration, with the first timm module seen having it (eval mode, CPU)."""

    in_chs: int
    out_chs: int
    ratio: int
    dw: int
    H: int  # input height and width at a 224x224 image
    W: int
    relu: bool
    has_attention: bool
    module: nn.Module = field(repr=False, compare=False)
    models: List[str] = field(default_factory=list, compare=False)  # the models (and layers) using it

    @property
    def key(self) -> Tuple:
        return (self.in_chs, self.out_chs, self.ratio, self.dw, self.H, self.W, self.relu, self.has_attention)

    @property
    def label(self) -> str:
        act = "relu" if self.relu else "linear"
        return f"{self.in_chs}->{self.out_chs} {self.H}x{self.W} r{self.ratio} dw{self.dw} {act}"


def _has_attention(m: nn.Module) -> bool:
    # Same rule as ghostfast.convert: an active short_conv Sequential, except in GhostModuleV3's 'original' mode.
    short = getattr(m, "short_conv", None)
    return isinstance(short, nn.Sequential) and len(short) > 0 and getattr(m, "mode", None) != "original"


def _is_ghost_module(m: nn.Module) -> bool:
    return hasattr(m, "primary_conv") and hasattr(m, "cheap_operation")


@functools.lru_cache(maxsize=None)
def ghost_shapes(models: Tuple[str, ...] = TIMM_GHOSTNETS) -> Tuple[GhostShape, ...]:
    """Distinct Ghost-module shapes of `models`, in order of first appearance (one forward per model)."""
    found: dict = {}
    for name in models:
        model = timm_ghostnet(name)
        seen = []

        def record(module, inputs, output, qualname):
            seen.append((qualname, module, inputs[0].shape))

        handles = [m.register_forward_hook(functools.partial(record, qualname=qn))
                   for qn, m in model.named_modules() if _is_ghost_module(m)]
        with torch.no_grad():
            model(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        for h in handles:
            h.remove()
        for qualname, m, in_shape in seen:
            primary, cheap = m.primary_conv[0], m.cheap_operation[0]
            init = primary.out_channels
            out_chs = getattr(m, "out_chs", None)
            if out_chs is None or getattr(m, "mode", None) == "original":
                out_chs = init + cheap.out_channels  # GhostModuleV3 'original' returns the whole concat
            shape = GhostShape(
                in_chs=in_shape[1], out_chs=int(out_chs), ratio=cheap.out_channels // init + 1,
                dw=cheap.kernel_size[0], H=in_shape[2], W=in_shape[3],
                relu=any(isinstance(layer, nn.ReLU) for layer in m.primary_conv),
                has_attention=_has_attention(m), module=m)
            if shape.key not in found:
                shape.module = copy.deepcopy(m)
                found[shape.key] = shape
            found[shape.key].models.append(f"{name}:{qualname}")
    return tuple(found.values())


def model_names(shape: GhostShape) -> str:
    """'ghostnet_100+ghostnetv2_100' style summary of the models whose layers have `shape`."""
    names = []
    for entry in shape.models:
        model = entry.split(":")[0]
        if model not in names:
            names.append(model)
    return "+".join(names)
