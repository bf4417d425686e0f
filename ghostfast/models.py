"""Reproducible GhostNet models for the demo, the tests and the benchmarks (timm configs, seeded weights)."""
from __future__ import annotations

import torch
from torch import nn

TIMM_GHOSTNETS = ("ghostnet_100", "ghostnetv2_100", "ghostnetv3_100")


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that folding errors show."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def timm_ghostnet(name: str = "ghostnetv2_100", seed: int = 0, **kwargs) -> nn.Module:
    """timm's `name` with seeded random weights and BN statistics, in eval mode; GhostNetV3 reparameterized."""
    import timm
    from timm.models import reparameterize_model

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    randomize_batchnorm_(model, torch.Generator().manual_seed(seed))
    model.eval()
    if "v3" in name:
        model = reparameterize_model(model)
    return model
