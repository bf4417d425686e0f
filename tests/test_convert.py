"""ghostfast.convert on whole models: timm GhostNet V1/V2/V3 parity per module and end to end, users' own
modules, the conversion report, torch.compile(fullgraph=True) and torch.export of converted modules."""
import copy
import warnings

import pytest
import timm.models.ghostnet as timm_ghost
import torch
from torch import nn

import ghostfast
import kernel_backends
from ghostfast.backends import GhostfastFallbackWarning, GhostfastUnsupported
from ghostfast.models import TIMM_GHOSTNETS, randomize_batchnorm_, timm_ghostnet
from ghostfast.nn import GhostModule, GhostModuleV2
from numerics import assert_close_rel, rel_error
from original_modules import HuaweiGhostModuleV2, PaperGhostModule, PaperGhostNetBlock

# Ghost modules per model: 16 bottlenecks x 2; V2/V3 put attention on ghost1 of every block after the second.
# timm's bottlenecks are wrapped whole too (ghostfast.nn.GhostBottleneck; V3's reparameterized GhostBottleneckV3
# as ghostfast.nn.GhostBottleneckV3), none left to per-module fusion (the report's per_module).
WHOLE = "GhostBottleneck (whole bottleneck)"
WHOLE_V3 = "GhostBottleneckV3 (whole bottleneck)"
EXPECTED = {
    "ghostnet_100": {"GhostModule": 32, WHOLE: 16},
    "ghostnetv2_100": {"GhostModule": 18, "GhostModuleV2": 14, WHOLE: 16},
    "ghostnetv3_100": {"GhostModule": 18, "GhostModuleV2": 14, WHOLE_V3: 16},
}
PER_MODULE = {"ghostnet_100": 0, "ghostnetv2_100": 0, "ghostnetv3_100": 0}


@pytest.mark.slow
@pytest.mark.parametrize("backend", kernel_backends.NAMES)
@pytest.mark.parametrize("name", TIMM_GHOSTNETS)
def test_convert_timm_model_matches_eager(name, backend, device):
    model = timm_ghostnet(name, seed=3).to(device)
    fast = ghostfast.convert(model, backend=backend, strict=True)
    report = fast.ghostfast_report
    assert not report.skipped
    kinds = {}
    for _, kind in report.converted:
        cls = kind.rsplit(".", 1)[-1]
        kinds[cls] = kinds.get(cls, 0) + 1
    assert kinds == EXPECTED[name]
    assert len(report.per_module) == PER_MODULE[name]
    assert fast.state_dict().keys() == model.state_dict().keys()

    # Per module: what each converted module saw and produced inside the converted model (cloned: the bottleneck
    # adds into it in place), against its eager original on the same input. The fused modules run once (the
    # Triton interpreter is slow), the eager ones twice.
    records = {}
    names = {n for n, _ in report.converted}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: records.__setitem__(n, (inp[0].clone(), out.clone())))
             for n, m in fast.named_modules() if n in names]
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        ref = model(x)
        out = fast(x)
        for h in hooks:
            h.remove()
        worst = max(rel_error(o, model.get_submodule(n)(inp)) for n, (inp, o) in records.items())
    assert len(records) == len(names)
    assert worst <= 1e-5, f"worst per-module relative error {worst:.2e}"
    assert_close_rel(out, ref, torch.float32, factor=10)  # 1e-4 for the whole model


def test_convert_user_modules_and_report(device):
    model = PaperGhostNetBlock().to(device)
    randomize_batchnorm_(model, torch.Generator().manual_seed(1))
    model.eval()
    with pytest.warns(GhostfastFallbackWarning, match="unsupported"):
        fast = ghostfast.convert(model, backend="triton")
    report = fast.ghostfast_report
    assert [n for n, _ in report.converted] == ["ghost1", "ghost2", "ghost3"]
    assert report.skipped == [("unsupported", "cheap conv kernel_size (9, 9) (fused needs 1, 3, 5 or 7)")]
    assert isinstance(fast.ghost1, GhostModule) and isinstance(fast.ghost2, GhostModuleV2)
    assert isinstance(fast.ghost3, GhostModule) and isinstance(fast.unsupported, PaperGhostModule)
    assert model.ghost1.__class__ is PaperGhostModule, "inplace=False must leave the input model alone"
    assert "skipped" in str(report) and "unsupported" in str(report)
    x = torch.randn(2, 3, 10, 11, device=device)
    with torch.no_grad():
        assert_close_rel(fast(x), model(x), torch.float32)
    with pytest.raises(GhostfastUnsupported, match="kernel_size"):
        ghostfast.convert(model, backend="triton", strict=True)


def test_convert_inplace_and_idempotent(device):
    model = nn.Sequential(timm_ghost.GhostModule(4, 8), timm_ghost.GhostModuleV2(8, 8)).to(device).eval()
    out = ghostfast.convert(model, inplace=True)
    assert out is model and isinstance(model[0], GhostModule) and isinstance(model[1], GhostModuleV2)
    again = ghostfast.convert(model, inplace=True)
    assert len(again.ghostfast_report.converted) == 0


def test_convert_reports_unreparameterized_v3(device):
    model = nn.Sequential(timm_ghost.GhostModuleV3(4, 8, mode="shortcut")).to(device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GhostfastFallbackWarning)
        fast = ghostfast.convert(model)
    assert fast.ghostfast_report.skipped and "reparameterize" in fast.ghostfast_report.skipped[0][1]


def test_convert_backend_choice(monkeypatch, device):
    model = nn.Sequential(timm_ghost.GhostModule(4, 8)).to(device).eval()
    assert ghostfast.convert(model, backend="reference")[0].backend == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        ghostfast.convert(model, backend="cudnn")
    monkeypatch.setenv("GHOSTFAST_BACKEND", "reference")
    fast = ghostfast.convert(model)
    assert fast[0].backend is None  # read at call time
    assert ghostfast.backends.resolve_backend(fast[0].backend, torch.device(device)) == ("reference", None)
    monkeypatch.setenv("GHOSTFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GHOSTFAST_BACKEND"):
        fast(torch.randn(1, 4, 3, 3, device=device))


def _small_v2(device, backend="triton"):
    m = timm_ghost.GhostModuleV2(8, 12).to(device)
    randomize_batchnorm_(m, torch.Generator().manual_seed(2))
    m.eval()
    return m, GhostModuleV2.from_module(copy.deepcopy(m), backend=backend, strict=True)


@pytest.mark.parametrize("backend", kernel_backends.NAMES + ["auto"])
def test_convert_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    eager, fast = _small_v2(device, backend)
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(2, 8, 9, 7, device=device)
    with torch.no_grad():
        assert_close_rel(compiled(x), eager(x), torch.float32)


@pytest.mark.parametrize("backend", kernel_backends.NAMES)
def test_convert_torch_export(backend, device):
    eager, fast = _small_v2(device, backend)
    x = torch.randn(2, 8, 9, 7, device=device)
    with torch.no_grad():
        exported = torch.export.export(fast, (x,))
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert "ghostfast.dfc.default" in targets and "ghostfast.ghost_module.default" in targets
        assert_close_rel(exported.module()(x), eager(x), torch.float32)


@pytest.mark.parametrize("backend", kernel_backends.NAMES)
def test_convert_torch_compile_fullgraph_train_mode(backend, device):
    """A training step of a converted module under torch.compile(fullgraph=True): batch statistics, running
    statistics updated in the graph, gradients through the statistics ops."""
    torch._dynamo.reset()
    eager, fast = _small_v2(device, backend)
    eager.train()
    fast.train()
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(2, 8, 9, 7, device=device)
    g = torch.randn(2, 12, 9, 7, device=device)
    for _ in range(2):
        grads = torch.autograd.grad((compiled(x) * g).sum(), list(fast.parameters()))
        ref = torch.autograd.grad((eager(x) * g).sum(), list(eager.parameters()))
        for a, b in zip(grads, ref):
            assert_close_rel(a, b, torch.float32)
    for (k, a), (_, b) in zip(fast.state_dict().items(), eager.state_dict().items()):
        if a.is_floating_point():
            assert_close_rel(a, b, torch.float32)
        else:
            assert torch.equal(a, b), k
