"""pytest-benchmark view of the op suite on a handful of shapes: `pytest benchmarks --benchmark-only`.

Three real shapes (a Ghost module at 56x56 and at 14x14, a GhostModuleV2 at 14x14), batch 1 on CPU and 32 on
CUDA, float32, forward, eager vs every ghostfast backend vs the 1x1 conv it replaces (and torch.compile on CUDA).
The full matrix, with CSV output, is `python -m ghostfast bench`."""
import pytest
import torch

from benchmarks.ops import build_provider, ghostfast_backends, ops_for_shape
from benchmarks.shapes import ghost_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 32 if DEVICE.type == "cuda" else 1
ROUNDS = 200 if DEVICE.type == "cuda" else 30


def _pick_shapes():
    """The first Ghost module without attention at 56x56 and at 14x14, and the first with attention at 14x14."""
    shapes = ghost_shapes()
    wanted = [(False, 56), (False, 14), (True, 14)]
    return [next(s for s in shapes if s.has_attention == a and s.H == h) for a, h in wanted]


def _providers():
    providers = ["eager"] + [f"ghostfast-{b}" for b in ghostfast_backends(DEVICE)] + ["conv1x1"]
    if DEVICE.type == "cuda":
        providers.insert(1, "compile")
    return providers


CASES = [(op, shape) for shape in _pick_shapes() for op in ops_for_shape(shape)]


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}[{s.label.replace(' ', '_')}]" for op, s in CASES])
def test_bench_op_forward(benchmark, op, shape, provider):
    if provider == "conv1x1" and op == "dfc_gate":
        pytest.skip("the DFC gate replaces no conv")
    module = build_provider(provider, op, shape).to(DEVICE)
    x = torch.randn(BATCH, shape.in_chs, shape.H, shape.W, device=DEVICE)

    def forward():
        with torch.no_grad():
            out = module(x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark reads a host clock
        return out

    benchmark.group = f"{op} {shape.label}"
    # Fixed rounds instead of pytest-benchmark's calibration keep the CPU run to seconds; the warm-up rounds
    # also compile a compiled provider outside the timing.
    out = benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    assert out.shape[0] == BATCH
