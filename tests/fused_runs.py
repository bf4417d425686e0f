"""Which fused kernels ran, and which eager convolutions, while a block of code ran: the proof that a converted
model really took the fused path (forward and backward), shared by the training, autocast and DDP tests.

Kernel launches are classified as `ghost_fwd`, `ghost_bwd`, `dfc_fwd`, `dfc_bwd`. They are counted from Triton's
interpreter on CPU, from the profiler's CUDA kernels for Triton on a GPU, and from the profiler's
`ghostfast::_*_kernel` events for the compiled `cpu` / `cuda` backends (and `ghostfast::_*_library`: an op the
`cpu` backend runs as library GEMMs, ghostfast/compiled.py)."""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, List

from torch import nn

KINDS = ("ghost_fwd", "ghost_bwd", "dfc_fwd", "dfc_bwd")


def kernel_kind(name: str):
    """`ghost_fwd` ... for a ghostfast kernel's name (Triton function or compiled op), None for anything else."""
    name = name.rsplit("::", 1)[-1]
    backward = "bwd" in name or "backward" in name
    if "ghost_module" in name:
        return "ghost_bwd" if backward else "ghost_fwd"
    if "dfc" in name:
        return "dfc_bwd" if backward else "dfc_fwd"
    return None


class FusedRuns:
    def __init__(self):
        self.kernels: List[str] = []  # raw names, in launch order
        self.convs: List[nn.Conv2d] = []  # every nn.Conv2d whose forward ran

    @property
    def counts(self) -> Counter:
        return Counter(k for k in map(kernel_kind, self.kernels) if k is not None)

    def eager_convs_in(self, modules) -> List[nn.Conv2d]:
        """The eager convolutions that ran inside any of `modules` (e.g. the converted Ghost modules)."""
        inside = {id(c) for m in modules for c in m.modules() if isinstance(c, nn.Conv2d)}
        return [c for c in self.convs if id(c) in inside]


@contextlib.contextmanager
def record_fused_runs(device: str, backend: str) -> Iterator[FusedRuns]:
    runs = FusedRuns()
    conv_forward = nn.Conv2d.forward

    def recording_forward(self, x):
        runs.convs.append(self)
        return conv_forward(self, x)

    nn.Conv2d.forward = recording_forward
    try:
        if backend == "triton" and device == "cpu":
            from triton.runtime.interpreter import InterpretedFunction

            run = InterpretedFunction.run

            def counting(self, *args, **kwargs):
                runs.kernels.append(self.fn.__name__)
                return run(self, *args, **kwargs)

            InterpretedFunction.run = counting
            try:
                yield runs
            finally:
                InterpretedFunction.run = run
        else:
            import torch
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=activities) as prof:
                yield runs
                if device == "cuda":
                    torch.cuda.synchronize()
            for e in prof.events():
                on_gpu = e.device_type == torch.autograd.DeviceType.CUDA
                if backend == "triton" and on_gpu:
                    runs.kernels.append(e.name)
                elif backend != "triton" and not on_gpu and e.name.startswith("ghostfast::_") and \
                        e.name.endswith(("_kernel", "_library")):  # _library: a kernel's library-GEMM form
                    runs.kernels.append(e.name)
    finally:
        nn.Conv2d.forward = conv_forward


def train_launches(module, backend: str, dtype) -> dict:
    """The fused launches one training-mode call of a converted Ghost module makes, forward and backward, from its
    BatchNorms' modes (ghostfast/nn.py `_run_ghost`): the fused op plus one statistics launch per BatchNorm on batch
    statistics each way; on the `cpu` backend with bn2 training in float32 / float64, z1 kept
    (`ghostfast.nn.KEEP_Z1`): bn1's statistics from z1 and the module from z1 forward, two passes backward (the
    statistics' gradients run as library ops)."""
    import torch

    import ghostfast.nn as gnn

    conv1, bn1, conv2, bn2 = module._ghost_layers
    t1, t2 = (bn is not None and bn.training for bn in (bn1, bn2))
    if backend == "cpu" and t2 and gnn.JOINT_BN2_STATS and gnn.KEEP_Z1 and conv2.bias is None and \
            dtype in (torch.float32, torch.float64) and module.out_chs >= conv2.in_channels:
        return {"ghost_fwd": 1 + t1, "ghost_bwd": 2}
    return {"ghost_fwd": 1 + t1 + t2, "ghost_bwd": 1 + t1 + t2}
