"""Deployment paths of converted models: ONNX export (dynamo and TorchScript-based exporters) run in ONNX Runtime,
torch.jit.script / torch.jit.trace (saved and loaded back), torch.fx.symbolic_trace, and timm's own model checks
(forward, grad checkpointing, backward, torchscript, fx forward / backward / scripted, features_only, channels_last)
on converted timm GhostNets. Each recorded graph must hold standard ops only (no ghostfast op: it runs without
ghostfast) and match the original eager model; fx with the converted modules as leaves keeps the fused call.

The whole models run on the C++ `cpu` backend (auto on a GPU); Triton, interpreted on CPU, only on small modules."""
import copy
import functools
import io

import pytest
import timm
import timm.models.ghostnet as timm_ghost
import torch
from torch import nn

import ghostfast
import kernel_backends
from ghostfast.models import randomize_batchnorm_, timm_ghostnet
from ghostfast.nn import GhostModule, GhostModuleV2, _FusedGhostBase
from numerics import assert_close_rel

# torch deprecates TorchScript and the TorchScript-based ONNX exporter; both are what this file tests
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]

DEVICE = kernel_backends.DEVICE
MODEL_BACKEND = "cpu" if DEVICE == "cpu" else None
SMALL_BACKENDS = kernel_backends.NAMES + ["reference"]
MODELS = ("ghostnet_100", "ghostnetv2_100", "ghostnetv3_100")
MODEL_TOL = 10  # x 1e-5: 1e-4 relative for a whole model in float32


def _small_net(backend):
    """timm's GhostModule and GhostModuleV2 in a Sequential, and their conversion."""
    torch.manual_seed(0)
    net = nn.Sequential(timm_ghost.GhostModule(8, 12), timm_ghost.GhostModuleV2(12, 16))
    randomize_batchnorm_(net, torch.Generator().manual_seed(0))
    net = net.to(DEVICE).eval()
    return net, ghostfast.convert(net, backend=backend, strict=True)


def _model(name, **kwargs):
    """timm's `name` (seeded, eval mode) and its conversion; fresh for tests that change modes or weights."""
    model = timm_ghostnet(name, seed=1, **kwargs).to(DEVICE)
    fast = ghostfast.convert(model, backend=MODEL_BACKEND, strict=True)
    assert not fast.ghostfast_report.skipped and fast.ghostfast_report.converted
    return model, fast


@functools.lru_cache(maxsize=None)
def _eval_model(name):
    """`_model(name)` built once, for the tests that only export, record and run it in eval mode."""
    return _model(name)


# odd sizes: the DFC gate pools 9x7 to 4x3 and upsamples back
SMALL_INPUT = (1, 8, 9, 7)
MODEL_INPUT = (1, 3, 64, 64)


# ---- what a recorded graph holds --------------------------------------------------------------------------

def _jit_kinds(graph) -> set:
    kinds = set()
    for node in graph.nodes():
        kinds.add(node.kind())
        for block in node.blocks():
            kinds |= _jit_kinds(block)
    return kinds


def _assert_standard_jit(module):
    kinds = _jit_kinds(module.inlined_graph)
    assert not {k for k in kinds if k.startswith("ghostfast::")}, "the TorchScript graph calls ghostfast ops"
    assert "aten::_convolution" in kinds or "aten::conv2d" in kinds, sorted(kinds)


def _assert_standard_fx(gm: torch.fx.GraphModule):
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("ghostfast.")]
    assert not fused, f"the fx graph calls ghostfast ops: {fused}"
    assert not [m for m in gm.modules() if isinstance(m, _FusedGhostBase)], "the fx graph calls fused modules"
    assert any(isinstance(m, nn.Conv2d) for m in gm.modules())


def _jit_roundtrip(module):
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf, map_location=DEVICE)


# ---- ONNX -------------------------------------------------------------------------------------------------

def _onnx_run(model, x, dynamo: bool):
    """Export `model` at x's shape, check the graph uses standard ONNX operators only, run it in ONNX Runtime."""
    onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (scripts/setup_venv.sh installs it)")
    ort = pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime (scripts/setup_venv.sh)")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (scripts/setup_venv.sh)")
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False)
        proto = onnx.load_from_string(buf.getvalue())
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    domains = {n.domain for n in nodes}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains - {'', 'ai.onnx'}}"
    assert "Conv" in {n.op_type for n in nodes}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("backend", SMALL_BACKENDS)
def test_deploy_onnx_small_modules(backend, dynamo):
    eager, fast = _small_net(backend)
    x = torch.randn(*SMALL_INPUT, device=DEVICE)
    with torch.no_grad():
        ref = eager(x)
        out = _onnx_run(fast, x, dynamo)
    assert_close_rel(out, ref.cpu(), torch.float32, factor=MODEL_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_deploy_onnx_timm_model(dynamo):
    """ghostnet_100 (the small modules above cover GhostModuleV2's DFC gate in both exporters)."""
    eager, fast = _eval_model("ghostnet_100")
    x = torch.randn(*MODEL_INPUT, device=DEVICE)
    with torch.no_grad():
        ref = eager(x)
        out = _onnx_run(fast, x, dynamo)
    assert_close_rel(out, ref.cpu(), torch.float32, factor=MODEL_TOL)


# ---- torch.export ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects")  # the plans' caches
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
@pytest.mark.parametrize("name", MODELS)
def test_deploy_torch_export_timm_model(name, strict):
    """torch.export records the fused ops (an ExportedProgram runs in PyTorch, with ghostfast imported). Non-strict
    export hands out the model's shared submodules (timm's reparameterized GhostNetV3 shares its ReLUs) wrapped in
    proxies whose class subclasses the module's: the modules' plans must still recognise them."""
    eager, fast = _eval_model(name)
    x = torch.randn(*MODEL_INPUT, device=DEVICE)
    with torch.no_grad():
        ref = eager(x)
        exported = torch.export.export(fast, (x,), strict=strict)
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert "ghostfast.ghost_module.default" in targets, sorted(targets)
        assert_close_rel(exported.module()(x), ref, torch.float32, factor=MODEL_TOL)
        assert_close_rel(fast(x), ref, torch.float32, factor=MODEL_TOL)


@pytest.mark.skipif(DEVICE != "cpu" or "cpu" not in kernel_backends.COMPILED,
                    reason="the z1 training ops run on the cpu backend of ghostfast._C")
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
def test_deploy_torch_export_in_training_mode(strict):
    """torch.export of a converted bottleneck in training mode (timm's V2 bottleneck: DFC gate, SE, stride 2, conv
    shortcut): the program records the training ops (ghostfast::ghost_module_z1 and its statistics op), and its
    module matches the eager original in training: output, the input's gradient, every running statistic."""
    torch.manual_seed(0)
    block = nn.Sequential(timm_ghost.GhostBottleneck(16, 48, 24, 3, 2, se_ratio=0.25, mode="attn")).train()
    fast = ghostfast.convert(copy.deepcopy(block), backend="cpu", strict=True).train()
    x = torch.randn(2, 16, 16, 16)
    exported = torch.export.export(fast, (x,), strict=strict)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"ghostfast.ghost_module_z1.default", "ghostfast.ghost_module_z1_stats.default"} <= targets, \
        sorted(targets)
    module, ref_module = exported.module(), copy.deepcopy(block)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, ref = module(xs[0]), ref_module(xs[1])
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert_close_rel(out, ref, torch.float32, factor=10)
    assert_close_rel(xs[0].grad, xs[1].grad, torch.float32, factor=10)
    got, want = module.state_dict(), ref_module.state_dict()
    assert set(want) <= set(got)
    for k, v in want.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], v), k
        elif "running" in k:
            assert_close_rel(got[k], v, torch.float32, factor=10)


# ---- TorchScript and fx -----------------------------------------------------------------------------------

def _record(fast, x, how):
    if how == "script":
        return torch.jit.script(fast)
    if how == "trace":
        return torch.jit.trace(fast, (x,), check_trace=False)  # the check below compares with eager
    return torch.fx.symbolic_trace(fast)


def _check_recorded(recorded, how, x, ref, roundtrip=True):
    if how == "fx":
        _assert_standard_fx(recorded)
    else:
        _assert_standard_jit(recorded)
        if roundtrip:
            recorded = _jit_roundtrip(recorded)  # the saved file is what deployment loads
    # TorchScript's optimizing executor spends seconds on its first calls; the values are the same
    with torch.jit.optimized_execution(False):
        assert_close_rel(recorded(x), ref, torch.float32, factor=MODEL_TOL)


@pytest.mark.parametrize("how", ["script", "trace", "fx"])
@pytest.mark.parametrize("backend", SMALL_BACKENDS)
def test_deploy_jit_fx_small_modules(backend, how):
    eager, fast = _small_net(backend)
    x = torch.randn(*SMALL_INPUT, device=DEVICE)
    with torch.no_grad():
        _check_recorded(_record(fast, x, how), how, x, eager(x))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", MODELS)
def test_deploy_jit_timm_model(name, how):
    """timm's torchscript check (a model built under set_scriptable, scripted) and a trace; fx: the timm fx
    checks below (timm's tracer is a torch.fx symbolic tracer). timm's GhostNetV3 itself does not script (its
    training-time branches), so there the test checks the converted model fails as the original does."""
    if how == "script" and "v3" in name:
        with timm.set_scriptable(True):
            eager, fast = _model(name)
        for m in (eager, fast):
            with pytest.raises(RuntimeError):
                torch.jit.script(m)
        return
    if how == "script":
        with timm.set_scriptable(True):
            eager, fast = _model(name)
    else:
        eager, fast = _eval_model(name)
    x = torch.randn(*MODEL_INPUT, device=DEVICE)
    with torch.no_grad():
        ref = eager(x)
        _check_recorded(_record(fast, x, how), how, x, ref, roundtrip=False)
        # the converted model itself still runs fused afterwards (recording changed nothing)
        assert_close_rel(fast(x), ref, torch.float32, factor=MODEL_TOL)


def test_deploy_fx_leaf_modules_keep_the_fused_call():
    """A tracer told to keep the converted modules as leaves records calls to them: the GraphModule runs fused."""
    from torchvision.models.feature_extraction import create_feature_extractor

    eager, fast = _small_net(kernel_backends.NAMES[-1])
    gm = create_feature_extractor(fast, return_nodes=["1"],
                                  tracer_kwargs={"leaf_modules": [GhostModule, GhostModuleV2]})
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called == ["0", "1"] and isinstance(gm.get_submodule("1"), GhostModuleV2)
    x = torch.randn(*SMALL_INPUT, device=DEVICE)
    with torch.no_grad():
        assert_close_rel(gm(x)["1"], eager(x), torch.float32)


# ---- timm's own model checks on converted models (timm tests/test_models.py: what each test checks) ---------

def _fx_model(model):
    """timm's fx feature extractor (torchvision's, with timm's notrace modules and functions), returning the
    classifier's output, train and eval graphs."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor

    tracer_kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    return create_feature_extractor(model, return_nodes=[model.default_cfg["classifier"]], tracer_kwargs=tracer_kwargs)


def _fx_output(gm, x):
    (out,) = gm(x).values()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_checks_forward_and_grad_checkpointing(name):
    eager, fast = _model(name)
    x = torch.randn(*MODEL_INPUT, device=DEVICE)
    with torch.no_grad():
        ref = eager(x)
        out = fast(x)
        assert out.shape == (1, eager.num_classes) and not out.isnan().any()
        assert_close_rel(out, ref, torch.float32, factor=MODEL_TOL)
        fast.set_grad_checkpointing()
        assert_close_rel(fast(x), out, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_checks_backward(name):
    """Training mode (batch statistics, fused on the cpu backend), a new head: every parameter the original
    trains gets a gradient (timm's GhostNetV3 after reparameterization trains none of its Ghost modules' fused
    convs: its training-mode forward runs the branches reparameterization removed). The gradients' values
    against float64 are tests/test_training.py's."""
    eager, fast = _model(name, num_classes=42, drop_rate=0.0)
    eager.train()
    fast.train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    out, ref = fast(x), eager(x)
    assert out.shape == (2, 42) and not out.isnan().any()
    assert_close_rel(out, ref, torch.float32, factor=MODEL_TOL)
    out.mean().backward()
    ref.mean().backward()
    missing = _without_grad(fast)
    assert missing == _without_grad(eager), f"no gradient for {sorted(missing - _without_grad(eager))[:5]}"
    assert all(p.grad.isfinite().all() for p in fast.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_checks_fx_forward_backward_and_scripted(name):
    eager, fast = _model(name, num_classes=42, drop_rate=0.0)
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    gm = _fx_model(fast)
    _assert_standard_fx(gm)
    scripted = torch.jit.script(gm)
    with torch.inference_mode():
        ref = eager(x)
        assert_close_rel(_fx_output(gm, x), ref, torch.float32, factor=MODEL_TOL)
        assert_close_rel(_fx_output(scripted, x), ref, torch.float32, factor=MODEL_TOL)
    gm.train()
    out = _fx_output(gm, torch.randn(2, 3, 64, 64, device=DEVICE))
    assert out.shape == (2, 42)
    out.mean().backward()
    params = dict(gm.named_parameters())
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for p in fast.parameters())
    eager.train()
    _fx_output(_fx_model(eager), torch.randn(2, 3, 64, 64, device=DEVICE)).mean().backward()
    assert _without_grad(gm) == _without_grad(eager)


def _without_grad(model) -> set:
    return {n for n, p in model.named_parameters() if p.grad is None}


def _feature_extractors(name):
    """(eager, converted) feature extractors three ways: timm's features_only (hooks on the flattened model,
    converted after), feature_cls='getter' (forward_intermediates) and fx (FeatureGraphNet on a converted model)."""
    yield _model(name, features_only=True)
    yield _model(name, features_only=True, feature_cls="getter")
    eager, fast = _eval_model(name)
    levels = tuple(range(len(eager.feature_info)))
    yield (lambda x: eager.forward_intermediates(x, intermediates_only=True)), \
        timm.models.FeatureGraphNet(fast, levels)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_checks_features_only(name):
    size = 96
    x = torch.randn(1, 3, size, size, device=DEVICE)
    for eager, fast in _feature_extractors(name):
        with torch.no_grad():
            ref, outs = eager(x), fast(x)
        channels, reductions = fast.feature_info.channels(), fast.feature_info.reduction()
        assert len(channels) >= 3 and len(outs) == len(ref) == len(channels), type(fast).__name__
        for o, r, c, red in zip(outs, ref, channels, reductions):
            assert o.shape[:2] == (1, c) and max(o.shape[2:]) <= -(-size // red) + 1, (type(fast).__name__, o.shape)
            assert_close_rel(o, r, torch.float32, factor=MODEL_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_checks_channels_last(name):
    eager, fast = _model(name)
    eager = eager.to(memory_format=torch.channels_last)
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.randn(*MODEL_INPUT, device=DEVICE).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close_rel(fast(x), eager(x), torch.float32, factor=MODEL_TOL)
