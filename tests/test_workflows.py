"""Converted modules behave like the originals in the workflows around a clean call: frozen BatchNorms through
convert, fused optimizers, `.data` and `eps` edits, inference_mode then autograd, submodules replaced after
conversion (re-plan, or eager with a warning), hooks carried over, extra_repr, a ratio-1 module. Every check
compares with the original eager module on random data, per fused backend."""
import copy
import warnings

import pytest
import timm.models.ghostnet as timm_ghost
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import ghostfast
from ghostfast.backends import GhostfastFallbackWarning
from ghostfast.models import randomize_batchnorm_
from ghostfast.nn import GhostModule, GhostModuleV2
import kernel_backends
from numerics import REL_TOL, assert_close_rel, rel_error
from fused_runs import record_fused_runs

FUSED = kernel_backends.NAMES


def _pair(factory, device, seed=0):
    torch.manual_seed(seed)
    eager = factory()
    randomize_batchnorm_(eager, torch.Generator().manual_seed(seed))
    eager = eager.to(device).eval()
    return eager


def _net(device, seed=0):
    """Two Ghost modules (V1 and V2) in a Sequential, small enough for the Triton interpreter."""
    torch.manual_seed(seed)
    net = nn.Sequential(timm_ghost.GhostModule(8, 12), timm_ghost.GhostModuleV2(12, 16))
    randomize_batchnorm_(net, torch.Generator().manual_seed(seed))
    return net.to(device)


def _bn_flags(model):
    return [(name, m.training) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("backend", FUSED)
def test_convert_keeps_every_batchnorm_flag_frozen_bn_finetuning(backend, device):
    """model.train() then BatchNorms frozen (the usual fine-tuning set-up): convert keeps each BN's own flag,
    and the converted model matches eager in outputs and in the (untouched) running statistics."""
    eager = _net(device).train()
    for i, m in enumerate(m for m in eager.modules() if isinstance(m, nn.BatchNorm2d)):
        if i % 2 == 0:
            m.eval()
    fast = ghostfast.convert(eager, backend=backend, strict=True)
    assert _bn_flags(fast) == _bn_flags(eager)
    assert fast.training and all(m.training for m in fast if isinstance(m, (GhostModule, GhostModuleV2)))
    from_module = GhostModule.from_module(copy.deepcopy(eager[0]), backend=backend)
    assert _bn_flags(from_module) == _bn_flags(eager[0])
    x = torch.randn(2, 8, 6, 7, device=device)
    frozen = [m for m in fast.modules() if isinstance(m, nn.BatchNorm2d) and not m.training]
    before = [m.running_mean.clone() for m in frozen]
    ref = eager(x)
    out = fast(x)
    assert_close_rel(out, ref, torch.float32)
    for m, b in zip(frozen, before):
        assert torch.equal(m.running_mean, b), "a frozen BatchNorm's running statistics changed"
    for (name, a), (_, b) in zip(eager.state_dict().items(), fast.state_dict().items()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name


def test_convert_keeps_frozen_batchnorms_of_timm_ghostnet(device):
    """timm ghostnet_100 with its BatchNorms frozen inside a training model: no BN changes mode."""
    model = ghostfast.models.timm_ghostnet("ghostnet_100").to(device).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.eval()
    fast = ghostfast.convert(model, backend="reference" if device == "cpu" else None)
    assert sum(m.training for m in fast.modules() if isinstance(m, nn.BatchNorm2d)) == 0
    assert _bn_flags(fast) == _bn_flags(model)


@pytest.mark.parametrize("fused_opt", ["SGD", "Adam", "AdamW", "Adagrad"])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_optimizer_steps_take_effect(backend, fused_opt, device):
    """Optimizers with fused=True update parameters without bumping their version counters: the fused path must
    still see the new values (no cache to go stale)."""
    eager = _pair(lambda: timm_ghost.GhostModuleV2(8, 12), device)
    fast = GhostModuleV2.from_module(copy.deepcopy(eager), backend=backend, strict=True)
    x = torch.randn(2, 8, 6, 6, device=device)
    opts = []
    for m in (eager, fast):
        kw = {"lr": 0.1, "fused": True}
        if fused_opt == "SGD":
            kw["momentum"] = 0.9
        opts.append(getattr(torch.optim, fused_opt)(m.parameters(), **kw))
    with torch.no_grad():
        fast(x)  # a first inference call (what used to build the cache)
    for _ in range(2):
        for m, opt in zip((eager, fast), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        with torch.no_grad():
            assert_close_rel(fast(x), eager(x), torch.float32, factor=10)


@pytest.mark.parametrize("backend", FUSED)
def test_data_edits_and_eps_changes_take_effect(backend, device):
    eager = _pair(lambda: timm_ghost.GhostModuleV2(8, 12), device)
    fast = GhostModuleV2.from_module(eager, backend=backend, strict=True)  # shares the submodules
    x = torch.randn(1, 8, 6, 6, device=device)
    with torch.no_grad():
        fast(x)
        edits = [
            lambda: eager.primary_conv[1].running_var.data.mul_(2.0),
            lambda: eager.cheap_operation[1].weight.data.add_(0.5),
            lambda: eager.short_conv[3].running_mean.data.sub_(0.3),
            lambda: eager.short_conv[5].bias.data.mul_(-1.0),
            lambda: eager.primary_conv[0].weight.data.mul_(1.1),
            lambda: setattr(eager.cheap_operation[1], "eps", 0.5),
            lambda: setattr(eager.short_conv[1], "eps", 0.25),
        ]
        for edit in edits:
            edit()
            ref = eager(x)
            fast_out = fast(x)
            assert_close_rel(fast_out, ref, torch.float32)


@pytest.mark.parametrize("edit", ["primary_weight", "cheap_weight", "bn2_running_var", "dfc_h_weight", "bn4_weight"])
@pytest.mark.parametrize("backend", FUSED)
def test_data_edits_of_the_wrong_shape_raise_a_clear_error(backend, edit, device):
    """A `.data` edit that changes a tensor's shape after conversion (the plan keeps the module objects, so nothing
    re-plans): the fused call raises an error naming the tensor and its expected shape, from Python or from the
    compiled kernel's own checks (ghostfast.ops.SELF_CHECKING), never a read out of range or a wrong output."""
    eager = _pair(lambda: timm_ghost.GhostModuleV2(8, 12), device)
    fast = GhostModuleV2.from_module(copy.deepcopy(eager), backend=backend, strict=True)
    x = torch.randn(1, 8, 6, 6, device=device)
    target, name = {
        # C_in + 1: Python's check derives C_in from the weight, and names the input's channels instead
        "primary_weight": (fast.primary_conv[0].weight, "primary_weight|expected input with 9 channels"),
        "cheap_weight": (fast.cheap_operation[0].weight, "cheap_weight"),
        "bn2_running_var": (fast.cheap_operation[1].running_var, "bn2_var"),
        "dfc_h_weight": (fast.short_conv[2].weight, "h_weight"),
        "bn4_weight": (fast.short_conv[3].weight, "bn4_weight"),
    }[edit]
    with torch.no_grad():
        assert_close_rel(fast(x), eager(x), torch.float32)
        shape = list(target.shape)
        shape[-1 if target.dim() == 1 or edit == "dfc_h_weight" else 1] += 1
        target.data = torch.randn(shape, device=device).abs() + 0.5
        with pytest.raises((RuntimeError, ValueError), match=name):
            fast(x)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-params", "trainable-params"])
@pytest.mark.parametrize("backend", FUSED)
def test_inference_mode_then_autograd(backend, frozen, device):
    """A first call under inference_mode, then one with input gradients (frozen parameters: saliency maps,
    adversarial inputs) or parameter gradients: works as eager does."""
    eager = _pair(lambda: timm_ghost.GhostModuleV2(8, 12), device)
    eager.requires_grad_(not frozen)
    fast = GhostModuleV2.from_module(copy.deepcopy(eager), backend=backend, strict=True)
    x = torch.randn(1, 8, 6, 6, device=device)
    with torch.inference_mode():
        fast(x)
    xg = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    fast(xg).sum().backward()
    eager(xe).sum().backward()
    assert rel_error(xg.grad, xe.grad) <= REL_TOL[torch.float32]
    for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
        assert (p.grad is None) == frozen == (q.grad is None), name
        if not frozen:
            assert rel_error(p.grad, q.grad) <= 10 * REL_TOL[torch.float32], name


@pytest.mark.parametrize("backend", FUSED)
def test_replaced_submodules_take_effect(backend, device):
    """A submodule replaced after conversion: the fused path re-plans (new BN, new conv, fuse_conv_bn_eval), or
    runs eagerly with the one-time warning when the new structure has no kernel; extra_repr tells which."""
    eager = _pair(lambda: timm_ghost.GhostModule(8, 12), device)
    fast = GhostModule.from_module(eager, backend=backend)  # shares the submodules: edits reach both
    x = torch.randn(1, 8, 7, 6, device=device)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # a new BatchNorm
        eager.cheap_operation[1] = randomize_batchnorm_(nn.BatchNorm2d(6), gen).to(device).eval()
        with record_fused_runs(device, backend) as runs:
            out = fast(x)
        assert runs.counts["ghost_fwd"] == 1 and not runs.eager_convs_in([fast])
        assert_close_rel(out, eager(x), torch.float32)
        # a new primary conv
        eager.primary_conv[0] = nn.Conv2d(8, 6, 1, bias=False).to(device).eval()
        assert_close_rel(fast(x), eager(x), torch.float32)
        # torch's fuse_conv_bn_eval: conv with a bias, the BatchNorm replaced by Identity
        for seq in (eager.primary_conv, eager.cheap_operation):
            seq[0] = fuse_conv_bn_eval(seq[0], seq[1])
            seq[1] = nn.Identity()
        with record_fused_runs(device, backend) as runs:
            out = fast(x)
        assert runs.counts["ghost_fwd"] == 1 and not runs.eager_convs_in([fast])
        assert_close_rel(out, eager(x), torch.float32)
        assert "fused" in repr(fast) and "eager" not in repr(fast)
        # an activation without a kernel: eager, with a warning naming it, and extra_repr says so
        eager.primary_conv[2] = nn.GELU()
        eager.cheap_operation[2] = nn.GELU()
        with pytest.warns(GhostfastFallbackWarning, match="GELU"):
            out = fast(x)
        assert torch.equal(out, eager(x))
        assert "eager: activation GELU" in repr(fast)
        # back to ReLU: fused again
        eager.primary_conv[2] = nn.ReLU()
        eager.cheap_operation[2] = nn.ReLU()
        with record_fused_runs(device, backend) as runs:
            out = fast(x)
        assert runs.counts["ghost_fwd"] == 1
        assert_close_rel(out, eager(x), torch.float32)


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_carries_hooks_over(inplace, device):
    net = _net(device).eval()
    calls = []
    pre = net[0].register_forward_pre_hook(lambda m, inp: calls.append(("pre", type(m).__name__)))
    net[1].register_forward_hook(lambda m, inp, out: calls.append(("post", tuple(out.shape))))
    net[1].register_forward_hook(lambda m, args, kwargs, out: calls.append(("kw", len(args))), with_kwargs=True)
    fast = ghostfast.convert(net, backend="reference", inplace=inplace)
    assert isinstance(fast[0], GhostModule) and isinstance(fast[1], GhostModuleV2)
    x = torch.randn(1, 8, 6, 6, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GhostfastFallbackWarning)
        fast(x)
    assert calls == [("pre", "GhostModule"), ("post", (1, 16, 6, 6)), ("kw", 1)]
    if inplace:  # the user's handle still removes the hook from the converted module
        pre.remove()
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GhostfastFallbackWarning)
            fast(x)
        assert calls == [("post", (1, 16, 6, 6)), ("kw", 1)]


def test_ratio_one_module_is_skipped_not_converted(device):
    m = _pair(lambda: timm_ghost.GhostModule(8, 8, ratio=1), device)
    with pytest.warns(GhostfastFallbackWarning):
        fast = ghostfast.convert(nn.Sequential(m))
    report = fast.ghostfast_report
    assert not report.converted and len(report.skipped) == 1 and "ratio 1" in report.skipped[0][1]
    x = torch.randn(1, 8, 5, 5, device=device)
    with pytest.raises(RuntimeError) as eager_error:  # timm's own module cannot run a ratio of 1 either
        m(x)
    with pytest.raises(RuntimeError, match="groups") as fast_error:
        fast(x)
    assert str(fast_error.value) == str(eager_error.value)


@pytest.mark.parametrize("backend", FUSED)
def test_inference_call_runs_only_the_fused_ops(backend, device):
    """The BatchNorms fold inside the launches: an eval-mode call under no_grad dispatches exactly the fused ops
    (GhostModule: 1, GhostModuleV2: 2), no per-call folding or casting ops around them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    net = ghostfast.convert(_net(device).eval(), backend=backend, strict=True)
    x = torch.randn(1, 8, 6, 6, device=device)
    for grad_mode in (torch.no_grad, torch.inference_mode):
        with grad_mode():
            for m, expected in ((net[0], ["ghostfast.ghost_module"]),
                                (net[1], ["ghostfast.dfc", "ghostfast.ghost_module"])):
                inp = x if m is net[0] else net[0](x)
                with Ops() as seen:
                    m(inp)
                assert seen.names == expected
