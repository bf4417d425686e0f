"""DistributedDataParallel and SyncBatchNorm with converted models.

- DDP (two CPU processes, gloo on 127.0.0.1): a small GhostNet (stem + two timm GhostBottlenecks with DFC
  attention) converted vs eager, both wrapped in DDP, two SGD steps per mode. Eval mode with trainable parameters
  runs the fused forward and backward kernels; its all-reduced gradients match eager DDP's and equal the mean of
  the ranks' local (non-DDP) gradients. Train mode runs fused too, BatchNorm with batch statistics (statistics
  kernels; the DFC branch eager), and matches eager DDP the same way.
- SyncBatchNorm: after `nn.SyncBatchNorm.convert_sync_batchnorm` (and timm's `convert_sync_batchnorm`) the
  Ghost modules still convert; in eval mode SyncBatchNorm computes from running statistics like BatchNorm2d and
  folds (fused). In training it needs the process group's batch statistics: the converted module runs its
  original submodules with a one-time warning naming SyncBatchNorm (strict mode raises), and under DDP behaves
  exactly as eager does (on CPU tensors, SyncBatchNorm's training forward refuses to run, in both).
"""
import contextlib
import copy
import math
import os
import socket
import tempfile
import time
import warnings
from datetime import timedelta

import pytest
import timm.models.ghostnet as timm_ghost
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import ghostfast
from fused_runs import record_fused_runs
from ghostfast.backends import GhostfastFallbackWarning, GhostfastUnsupported
from ghostfast.models import randomize_batchnorm_
from ghostfast.nn import GhostModule, GhostModuleV2
from numerics import rel_error

WORLD = 2
STEPS = 2
TIMEOUT_S = 120  # the whole two-process run; each collective times out after 60 s
TOL = 1e-5  # float32


class TinyGhostNet(nn.Module):
    """A stem and two GhostBottlenecks with DFC attention (the second strided, with SE), few channels. The stem
    has no BatchNorm, so that with SyncBatchNorm the first one a forward meets is inside a Ghost module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            timm_ghost.GhostBottleneck(8, 16, 12, mode="attn"),
            timm_ghost.GhostBottleneck(12, 24, 16, stride=2, se_ratio=0.25, mode="attn"),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = TinyGhostNet()
    randomize_batchnorm_(model, torch.Generator().manual_seed(seed))
    return model


def _ghost_modules(model):
    return [m for m in model.modules() if isinstance(m, (GhostModule, GhostModuleV2))]


def _rank_data(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 10, generator=gen)


# ------------------------------------------------------------------------------------------------------------
# The two-process run
# ------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(model, rank, train, record=None, dtype=torch.float32):
    """STEPS SGD steps of `model` (DDP-wrapped or not) on this rank's data: per step the loss and the gradients."""
    model.train(train)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = []
    for step in range(STEPS):
        x, t = (v.to(dtype) for v in _rank_data(rank, step))
        opt.zero_grad(set_to_none=True)
        with (record_fused_runs("cpu", "triton") if record is not None else contextlib.nullcontext()) as runs:
            loss = F.mse_loss(model(x), t)
            loss.backward()
        if record is not None:
            record.append(dict(runs.counts))
        out.append({"loss": loss.detach(), "grads": {n.removeprefix("module."): p.grad.clone()
                                                     for n, p in model.named_parameters()}})
        opt.step()
    return out


def _attempt(fn):
    """(result, None), or (None, message) where SyncBatchNorm's training forward refuses CPU tensors."""
    try:
        return fn(), None
    except ValueError as e:
        return None, str(e)


def _variant(base, rank, wrap):
    """Per mode: the eager model and its converted copy (both wrapped by `wrap`), then the unwrapped eager model
    (this rank's own gradients), STEPS steps each; errors and fallback warnings recorded."""
    result = {}
    for mode in ("eval", "train"):
        train = mode == "train"
        fast = ghostfast.convert(copy.deepcopy(base), backend="triton")
        entry = {"converted": [type(m).__name__ for m in _ghost_modules(fast)], "launches": []}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GhostfastFallbackWarning)
            entry["eager"], entry["eager_error"] = _attempt(lambda: _steps(wrap(copy.deepcopy(base)), rank, train))
            entry["fused"], entry["fused_error"] = _attempt(lambda: _steps(wrap(fast), rank, train, entry["launches"]))
            entry["local"], entry["local_error"] = _attempt(lambda: _steps(copy.deepcopy(base), rank, train))
            if train and wrap is not _unwrapped:  # the float64 yardstick of train mode's ill-conditioned gradients
                entry["eager64"], _ = _attempt(lambda: _steps(wrap(copy.deepcopy(base).double()), rank, train,
                                                              dtype=torch.float64))
        entry["warnings"] = [str(w.message) for w in caught if issubclass(w.category, GhostfastFallbackWarning)]
        result[mode] = entry
    return result


def _unwrapped(m):
    return m


def _worker(rank, port, out_dir):
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        from torch.nn.parallel import DistributedDataParallel as DDP

        result = {"ddp": _variant(tiny_model(), rank, DDP)}
        # SyncBatchNorm: DDP refuses to wrap it on CPU ("only work with GPU modules"), so the SyncBatchNorm model
        # runs unwrapped inside the process group, where its training forward would reduce batch statistics
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_model())
        result["ddp_sync_bn_error"] = _attempt(lambda: DDP(copy.deepcopy(sync)))[1]
        result["sync_bn"] = _variant(sync, rank, _unwrapped)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results():
    """One two-process gloo run for this module's tests: each rank's results, from the file it wrote."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    pytest.fail(f"the {WORLD}-process run did not finish within {TIMEOUT_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(10)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _worst(got, want):
    return max(rel_error(got[k], want[k]) for k in want)


def _floored(got, want, floor):
    return float((got.double() - want.double()).norm() / max(float(want.double().norm()), floor))


def _check_train_grads(fused, eager, eager64, what):
    """Train mode: batch statistics make the gradients ill-conditioned (eager float32 itself is ~7e-6 from float64
    on some tensors here, and a BatchNorm bias whose batch mean the next BatchNorm removes has a ~1e-17 gradient:
    rounding noise in float32). Every fused tensor must be within 2x eager float32's worst error against float64,
    relative errors floored at 1% of the whole gradient's norm (as tests/test_training.py)."""
    floor = 1e-2 * math.sqrt(sum(float(v.double().norm()) ** 2 for v in eager64.values()))
    bound = max(TOL, 2 * max(_floored(eager[k], eager64[k], floor) for k in eager64))
    for k in eager64:
        err = _floored(fused[k], eager64[k], floor)
        assert err <= bound, f"{what} {k}: {err:.2e} vs float64 > {bound:.2e} (2x eager float32's worst)"


def _check_steps(ranks, mode, all_reduced):
    for r in ranks:
        assert not (r["eager_error"] or r["fused_error"] or r["local_error"]), r
    for step in range(STEPS):
        for r in ranks:
            fused, eager = r["fused"][step], r["eager"][step]
            assert abs(fused["loss"].item() - eager["loss"].item()) <= TOL * abs(eager["loss"].item()), step
            if mode == "train":
                _check_train_grads(fused["grads"], eager["grads"], r["eager64"][step]["grads"], f"train step {step}")
                continue
            worst = _worst(fused["grads"], eager["grads"])
            assert worst <= TOL, f"{mode} step {step}: converted vs eager gradients differ by {worst:.2e}"
        if all_reduced:  # every rank holds the same gradients
            for key in ranks[0]["fused"][step]["grads"]:
                assert torch.equal(ranks[0]["fused"][step]["grads"][key], ranks[1]["fused"][step]["grads"][key]), key
    local = [r["local"][0]["grads"] for r in ranks]
    mean = {k: sum(g[k] for g in local) / WORLD for k in local[0]}
    assert _worst(local[0], mean) > 1e-2, "the ranks' data must differ for the test to mean much"
    if all_reduced and mode == "train":  # ... the mean of the ranks' local gradients, up to train mode's rounding:
        # |fused - mean| <= |fused - float64| + |float64 - mean|, each within 2x eager float32's worst error
        want = ranks[0]["eager64"][0]["grads"]
        floor = 1e-2 * math.sqrt(sum(float(v.double().norm()) ** 2 for v in want.values()))
        eager_worst = max(_floored(ranks[0]["eager"][0]["grads"][k], want[k], floor) for k in want)
        for k in want:
            err = _floored(ranks[0]["fused"][0]["grads"][k], mean[k], floor)
            assert err <= max(TOL, 4 * eager_worst), f"{k}: all-reduced vs the mean of local gradients {err:.2e}"
    elif all_reduced:  # ... the mean of the ranks' local gradients
        assert _worst(ranks[0]["fused"][0]["grads"], mean) <= TOL
    else:
        assert _worst(ranks[0]["fused"][0]["grads"], local[0]) <= TOL


FUSED_STEP = {"ghost_fwd": 4, "dfc_fwd": 2, "ghost_bwd": 4, "dfc_bwd": 2}
# train mode: per Ghost module the fused op and two statistics launches each way; the DFC branch runs eagerly
FUSED_TRAIN_STEP = {"ghost_fwd": 12, "ghost_bwd": 12}


@pytest.mark.slow
def test_ddp_two_processes_converted_matches_eager(two_process_results):
    ranks = [r["ddp"] for r in two_process_results]
    for r in ranks:
        assert r["eval"]["converted"] == ["GhostModuleV2", "GhostModule"] * 2
        assert r["eval"]["launches"] == [FUSED_STEP] * STEPS, "eval mode must run the fused kernels"
        assert not r["eval"]["warnings"], r["eval"]["warnings"]
        assert r["train"]["launches"] == [FUSED_TRAIN_STEP] * STEPS, "train mode must run the fused kernels"
        assert not r["train"]["warnings"], r["train"]["warnings"]
    _check_steps([r["eval"] for r in ranks], "eval", all_reduced=True)
    _check_steps([r["train"] for r in ranks], "train", all_reduced=True)


@pytest.mark.slow
def test_sync_batchnorm_in_a_process_group(two_process_results):
    """Eval: SyncBatchNorm folds and runs fused inside a process group (no statistics to reduce). Train: the
    converted model runs the original submodules after a warning naming SyncBatchNorm, so it fails exactly as
    eager does (SyncBatchNorm's training forward refuses CPU tensors)."""
    for r in two_process_results:
        assert r["ddp_sync_bn_error"] and "SyncBatchNorm" in r["ddp_sync_bn_error"]  # torch's own rule, on CPU
    ranks = [r["sync_bn"] for r in two_process_results]
    for r in ranks:
        assert r["eval"]["converted"] == ["GhostModuleV2", "GhostModule"] * 2
        assert r["eval"]["launches"] == [FUSED_STEP] * STEPS
        assert not r["eval"]["warnings"], r["eval"]["warnings"]
    _check_steps([r["eval"] for r in ranks], "eval", all_reduced=False)
    for r in ranks:
        train = r["train"]
        assert train["eager_error"] and train["fused_error"] == train["eager_error"], train
        assert any("SyncBatchNorm" in w and "training mode" in w for w in train["warnings"]), train["warnings"]
        assert not any(train["launches"]), train["launches"]


# ------------------------------------------------------------------------------------------------------------
# SyncBatchNorm in one process
# ------------------------------------------------------------------------------------------------------------


def _sync_bn_models(convert_fn, strict=True):
    eager = convert_fn(tiny_model()).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in eager.blocks.modules())
    fast = ghostfast.convert(eager, backend="triton", strict=strict)
    kinds = [kind for _, kind in fast.ghostfast_report.converted]
    # 4 Ghost modules, and their 2 bottlenecks wrapped whole (SyncBatchNorm folds like BatchNorm2d in eval mode)
    assert sum("whole bottleneck" not in k for k in kinds) == 4 and not fast.ghostfast_report.skipped
    assert sum("whole bottleneck" in k for k in kinds) == 2
    assert fast.state_dict().keys() == eager.state_dict().keys()
    return eager, fast


def _timm_convert_sync_batchnorm():
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm


@pytest.mark.parametrize("convert_fn", [nn.SyncBatchNorm.convert_sync_batchnorm, "timm"], ids=["torch", "timm"])
def test_sync_batchnorm_eval_folds_and_runs_fused(convert_fn, device):
    if convert_fn == "timm":
        convert_fn = _timm_convert_sync_batchnorm()
    eager, fast = _sync_bn_models(convert_fn)
    eager, fast = eager.to(device), fast.to(device)
    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    with record_fused_runs(device, "triton") as runs:
        out = fast(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(fast.parameters()))
    ref = eager(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + list(eager.parameters()))
    assert dict(runs.counts) == {"ghost_fwd": 4, "dfc_fwd": 2, "ghost_bwd": 4, "dfc_bwd": 2}
    assert not runs.eager_convs_in(_ghost_modules(fast))
    assert rel_error(out, ref) <= 10 * TOL
    for g, r in zip(grads, ref_grads):
        assert rel_error(g, r) <= 10 * TOL


def test_sync_batchnorm_training_falls_back_with_warning(device, monkeypatch):
    """Training with SyncBatchNorm: the original submodules (outside a process group SyncBatchNorm computes like
    BatchNorm2d, which both do here), a warning naming SyncBatchNorm, an error in strict mode. The converted
    bottlenecks stay in NCHW (ghostfast.nn.TRAIN_CHANNELS_LAST off) so that the original's values come out exactly."""
    monkeypatch.setattr(ghostfast.nn, "TRAIN_CHANNELS_LAST", False)
    eager, fast = _sync_bn_models(nn.SyncBatchNorm.convert_sync_batchnorm, strict=False)
    eager, fast = eager.to(device).train(), fast.to(device).train()
    x = torch.randn(4, 3, 16, 16, device=device)
    ghostfast.backends._warned.clear()
    with pytest.warns(GhostfastFallbackWarning, match="SyncBatchNorm"):
        with record_fused_runs(device, "triton") as runs:
            out = fast(x)
    ref = eager(x)
    assert not runs.counts
    assert torch.equal(out, ref)
    for (k, a), (_, b) in zip(fast.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), k
    for m in _ghost_modules(fast):
        m.strict = True
    with pytest.raises(GhostfastUnsupported, match="SyncBatchNorm"):
        fast(x)


def test_batchnorm_like_layers_that_do_more_are_not_folded(device):
    """A BatchNorm subclass with its own forward (timm's BatchNormAct2d: norm + activation) is not folded as a
    plain BatchNorm: the module is reported and left in eager PyTorch."""
    from timm.layers import BatchNormAct2d

    m = timm_ghost.GhostModule(8, 12)
    m.primary_conv[1] = BatchNormAct2d(m.primary_conv[1].num_features, act_layer=nn.ReLU)
    m.primary_conv[2] = nn.Identity()
    model = nn.Sequential(m).to(device).eval()
    with pytest.warns(GhostfastFallbackWarning, match="BatchNormAct2d"):
        fast = ghostfast.convert(model, backend="triton")
    assert fast.ghostfast_report.skipped and not fast.ghostfast_report.converted
