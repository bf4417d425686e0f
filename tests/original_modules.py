"""Stand-ins for Ghost modules ghostfast must convert that timm does not ship: the paper's GhostModule
(`oup`, a `relu` flag, an empty Sequential for "no activation") and Huawei's official GhostModuleV2
('original' and 'attn' modes). Written from the papers' descriptions; the eager forwards are the spec."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def _primary_and_cheap(inp, oup, kernel_size, ratio, dw_size, stride, relu):
    init = math.ceil(oup / ratio)
    new = init * (ratio - 1)
    primary = nn.Sequential(
        nn.Conv2d(inp, init, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(init),
        nn.ReLU(inplace=True) if relu else nn.Sequential(),
    )
    cheap = nn.Sequential(
        nn.Conv2d(init, new, dw_size, 1, dw_size // 2, groups=init, bias=False),
        nn.BatchNorm2d(new),
        nn.ReLU(inplace=True) if relu else nn.Sequential(),
    )
    return primary, cheap


class PaperGhostModule(nn.Module):
    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        self.oup = oup
        self.primary_conv, self.cheap_operation = _primary_and_cheap(inp, oup, kernel_size, ratio, dw_size, stride,
                                                                     relu)

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.oup]


class HuaweiGhostModuleV2(nn.Module):
    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True, mode=None):
        super().__init__()
        self.mode = mode
        self.oup = oup
        self.gate_fn = nn.Sigmoid()
        self.primary_conv, self.cheap_operation = _primary_and_cheap(inp, oup, kernel_size, ratio, dw_size, stride,
                                                                     relu)
        if mode == "attn":
            self.short_conv = nn.Sequential(
                nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
                nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, kernel_size=(1, 5), stride=1, padding=(0, 2), groups=oup, bias=False),
                nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, kernel_size=(5, 1), stride=1, padding=(2, 0), groups=oup, bias=False),
                nn.BatchNorm2d(oup),
            )

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)[:, :self.oup]
        if self.mode != "attn":
            return out
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        return out * F.interpolate(self.gate_fn(res), size=out.shape[-2:], mode="nearest")


class PaperGhostNetBlock(nn.Module):
    """A tiny user network holding the paper's modules, to convert as a whole."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ghost1 = PaperGhostModule(8, 13, ratio=3, dw_size=5)
        self.ghost2 = HuaweiGhostModuleV2(13, 10, mode="attn")
        self.ghost3 = HuaweiGhostModuleV2(10, 6, relu=False, mode="original")
        self.unsupported = PaperGhostModule(6, 8, dw_size=9)  # a 9x9 cheap conv has no kernel

    def forward(self, x):
        return self.unsupported(self.ghost3(self.ghost2(self.ghost1(self.stem(x)))))
