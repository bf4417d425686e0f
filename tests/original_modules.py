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


# ---- Huawei's GhostNetV3 module (Efficient-AI-Backbones ghostnetv3_pytorch/ghostnetv3.py) -----------------------
# Re-parameterizable branches while training; `reparameterize()` folds them into `primary_conv` / `cheap_operation`
# (biased convs, no BatchNorm) and sets infer_mode. Gate options are plain attributes set in __init__.


def _conv_bn(inp, oup, kernel_size, stride, padding, groups=1):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(inp, oup, kernel_size, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(oup))
    return seq


def _fold_conv_bn(weight, bn):
    std = (bn.running_var + bn.eps).sqrt()
    s = bn.weight / std
    return weight * s.view(-1, 1, 1, 1), bn.bias - bn.running_mean * s


class HuaweiGhostModuleV3(nn.Module):
    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True, mode=None):
        super().__init__()
        self.gate_fn = nn.Sigmoid()
        self.gate_loc = "before"
        self.inter_mode = "nearest"
        self.scale = 1.0
        self.infer_mode = False
        self.num_conv_branches = 3
        self.mode = mode
        self.oup = oup
        self.stride = stride
        init = math.ceil(oup / ratio)
        new = init * (ratio - 1)
        self.init_channels, self.new_channels = init, new
        self.kernel_size, self.dw_size = kernel_size, dw_size
        self.primary_rpr_skip = nn.BatchNorm2d(inp) if inp == init and stride == 1 else None
        self.primary_rpr_conv = nn.ModuleList(
            [_conv_bn(inp, init, kernel_size, stride, kernel_size // 2) for _ in range(self.num_conv_branches)])
        self.primary_rpr_scale = _conv_bn(inp, init, 1, stride, 0) if kernel_size > 1 else None
        self.primary_activation = nn.ReLU(inplace=True) if relu else None
        self.cheap_rpr_skip = nn.BatchNorm2d(init) if init == new else None
        self.cheap_rpr_conv = nn.ModuleList(
            [_conv_bn(init, new, dw_size, 1, dw_size // 2, groups=init) for _ in range(self.num_conv_branches)])
        self.cheap_rpr_scale = _conv_bn(init, new, 1, 1, 0, groups=init) if dw_size > 1 else None
        self.cheap_activation = nn.ReLU(inplace=True) if relu else None
        if mode == "ori_shortcut_mul_conv15":
            self.short_conv = nn.Sequential(
                nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, kernel_size=(1, 5), stride=1, padding=(0, 2), groups=oup, bias=False),
                nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, kernel_size=(5, 1), stride=1, padding=(2, 0), groups=oup, bias=False),
                nn.BatchNorm2d(oup))

    def _branches(self, x, skip, scale, convs):
        out = 0 if skip is None else skip(x)
        if scale is not None:
            out = out + scale(x)
        for conv in convs:
            out = out + conv(x)
        return out

    def forward(self, x):
        if self.infer_mode:
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
        else:
            x1 = self._branches(x, self.primary_rpr_skip, self.primary_rpr_scale, self.primary_rpr_conv)
            if self.primary_activation is not None:
                x1 = self.primary_activation(x1)
            x2 = self._branches(x1, self.cheap_rpr_skip, self.cheap_rpr_scale, self.cheap_rpr_conv)
            if self.cheap_activation is not None:
                x2 = self.cheap_activation(x2)
        out = torch.cat([x1, x2], dim=1)
        if self.mode == "ori":
            return out
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        if self.gate_loc == "before":
            return out[:, :self.oup] * F.interpolate(self.gate_fn(res / self.scale), size=out.shape[-2:],
                                                     mode=self.inter_mode)
        return out[:, :self.oup] * self.gate_fn(F.interpolate(res, size=out.shape[-2:], mode=self.inter_mode))

    @torch.no_grad()
    def _fused(self, convs, scale, skip, k, groups, in_per_group):
        w, b = 0, 0
        for conv in convs:
            cw, cb = _fold_conv_bn(conv.conv.weight, conv.bn)
            w, b = w + cw, b + cb
        if scale is not None:
            sw, sb = _fold_conv_bn(scale.conv.weight, scale.bn)
            w, b = w + F.pad(sw, [k // 2] * 4), b + sb
        if skip is not None:
            ident = torch.zeros(skip.num_features, in_per_group, k, k)
            for i in range(skip.num_features):
                ident[i, i % in_per_group, k // 2, k // 2] = 1
            iw, ib = _fold_conv_bn(ident, skip)
            w, b = w + iw, b + ib
        return w, b

    @torch.no_grad()
    def reparameterize(self):
        if self.infer_mode:
            return
        inp = self.primary_rpr_conv[0].conv.in_channels
        init, new = self.init_channels, self.new_channels
        w1, b1 = self._fused(self.primary_rpr_conv, self.primary_rpr_scale, self.primary_rpr_skip, self.kernel_size,
                             1, inp)
        w2, b2 = self._fused(self.cheap_rpr_conv, self.cheap_rpr_scale, self.cheap_rpr_skip, self.dw_size, init, 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init, self.kernel_size, self.stride, self.kernel_size // 2, bias=True),
            self.primary_activation if self.primary_activation is not None else nn.Sequential())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, new, self.dw_size, 1, self.dw_size // 2, groups=init, bias=True),
            self.cheap_activation if self.cheap_activation is not None else nn.Sequential())
        self.primary_conv[0].weight.copy_(w1)
        self.primary_conv[0].bias.copy_(b1)
        self.cheap_operation[0].weight.copy_(w2)
        self.cheap_operation[0].bias.copy_(b2)
        for name in ("primary_rpr_conv", "primary_rpr_scale", "primary_rpr_skip", "cheap_rpr_conv",
                     "cheap_rpr_scale", "cheap_rpr_skip"):
            delattr(self, name)
        self.infer_mode = True


class HuaweiGhostNetV3Stack(nn.Module):
    """Ghost modules as Huawei's GhostBottleneck uses them: ghost1 'ori' in the first blocks, then
    'ori_shortcut_mul_conv15'; ghost2 'ori' without ReLU. `reparameterize()` as the model's own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = HuaweiGhostModuleV3(8, 16, mode="ori")
        self.g2 = HuaweiGhostModuleV3(16, 16, relu=False, mode="ori")
        self.g3 = HuaweiGhostModuleV3(16, 24, mode="ori_shortcut_mul_conv15")
        self.g4 = HuaweiGhostModuleV3(24, 12, relu=False, mode="ori")

    def forward(self, x):
        return self.g4(self.g3(self.g2(self.g1(self.stem(x)))))

    def reparameterize(self):
        for m in self.modules():
            if isinstance(m, HuaweiGhostModuleV3):
                m.reparameterize()


# ---- ultralytics YOLO (ultralytics/nn/modules/conv.py, block.py; BaseModel.fuse in nn/tasks.py) ------------------


def autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class DWConv(Conv):
    def __init__(self, c1, c2, k=1, s=1, d=1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class GhostConv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, g=1, act=True):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, k, s, None, g, act=act)
        self.cv2 = Conv(c_, c_, 5, 1, None, c_, act=act)

    def forward(self, x):
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


class UltralyticsGhostBottleneck(nn.Module):
    def __init__(self, c1, c2, k=3, s=1):
        super().__init__()
        c_ = c2 // 2
        self.conv = nn.Sequential(
            GhostConv(c1, c_, 1, 1),
            DWConv(c_, c_, k, s, act=False) if s == 2 else nn.Identity(),
            GhostConv(c_, c2, 1, 1, act=False))
        self.shortcut = (nn.Sequential(DWConv(c1, c1, k, s, act=False), Conv(c1, c2, 1, 1, act=False)) if s == 2
                         else nn.Identity())

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)


class C3Ghost(nn.Module):
    def __init__(self, c1, c2, n=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(UltralyticsGhostBottleneck(c_, c_) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class UltralyticsGhostNet(nn.Module):
    """A small YOLO-ghost-like backbone: GhostConv 1x1 s1 and 3x3 s2, GhostBottlenecks (s1, s2), a C3Ghost."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(Conv(3, 16, 3, 2), GhostConv(16, 32, 3, 2), UltralyticsGhostBottleneck(32, 32),
                                    UltralyticsGhostBottleneck(32, 48, 3, 2), C3Ghost(48, 48), GhostConv(48, 24, 1, 1))

    def forward(self, x):
        return self.layers(x)


@torch.no_grad()
def ultralytics_fuse(model: nn.Module) -> nn.Module:
    """What ultralytics' BaseModel.fuse() does to Conv blocks: BN folded into a biased conv, `bn` deleted, the
    instance's forward replaced by forward_fuse."""
    for m in model.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(m.conv, m.bn).requires_grad_(False)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


# ---- Ghost-ResNet (Efficient-AI-Backbones ghostnet_pytorch/ghost_resnet.py) ----------------------------------------


class GhostResNetModule(nn.Conv2d):
    """The Ghost-ResNet GhostModule: an nn.Conv2d subclass without a weight; biased conv1 (k x k, stride, padding)
    and depthwise conv2, no BatchNorm or activation in the forward (its bn1, bn2, weight1, weight2 are unused)."""

    def __init__(self, in_channels, out_channels, kernel_size, dw_size=3, ratio=2, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.weight = None
        self.ratio = ratio
        self.dw_size = dw_size
        self.init_channels = math.ceil(out_channels / ratio)
        self.new_channels = self.init_channels * (ratio - 1)
        self.conv1 = nn.Conv2d(in_channels, self.init_channels, kernel_size, self.stride, padding=self.padding)
        self.conv2 = nn.Conv2d(self.init_channels, self.new_channels, dw_size, 1, padding=int(dw_size / 2),
                               groups=self.init_channels)
        self.weight1 = nn.Parameter(torch.empty(self.init_channels, in_channels, kernel_size, kernel_size))
        self.bn1 = nn.BatchNorm2d(self.init_channels)
        if self.new_channels > 0:
            self.weight2 = nn.Parameter(torch.empty(self.new_channels, 1, dw_size, dw_size))
            self.bn2 = nn.BatchNorm2d(self.out_channels - self.init_channels)
        nn.init.kaiming_uniform_(self.weight1)
        if self.new_channels > 0:
            nn.init.kaiming_uniform_(self.weight2)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x):
        x1 = self.conv1(x)
        if self.new_channels == 0:
            return x1
        x2 = self.conv2(x1)
        x2 = x2[:, :self.out_channels - self.init_channels, :, :]
        return torch.cat([x1, x2], 1)


class GhostResNetBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, s=4, d=3):
        super().__init__()
        self.conv1 = GhostResNetModule(inplanes, planes, kernel_size=1, dw_size=d, ratio=s, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = GhostResNetModule(planes, planes, kernel_size=3, dw_size=d, ratio=s, padding=1, stride=stride,
                                       bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = GhostResNetModule(planes, planes * 4, kernel_size=1, dw_size=d, ratio=s, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class TinyGhostResNet(nn.Module):
    def __init__(self, s=4, d=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(GhostResNetModule(16, 32, ratio=s, dw_size=d, kernel_size=1, stride=2, bias=False))
        self.layer1 = nn.Sequential(GhostResNetBottleneck(16, 8, 2, down, s, d), GhostResNetBottleneck(32, 8, 1, None, s, d))

    def forward(self, x):
        return self.layer1(self.relu(self.bn1(self.conv1(x))))
