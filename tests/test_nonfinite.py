"""NaN and +/-Inf propagate through every fused forward kernel as they do through the eager float64 reference on the
same input (DESIGN.md, Numerics): the same NaN elements, the same +Inf and -Inf elements, the finite ones close.

One non-finite value at a time (N = 1: the compiled kernels split a single image across threads by rows and
channels, which is where a value leaks into a neighbouring row), at every spatial position of small images:
NaN, +Inf and -Inf at each, the channel rotating. Where a configuration rotates the value (and the DFC mode) instead,
every position still gets one non-finite value and every value lands on corners, edges and the interior. Every Ghost
module activation (ghostfast.reference.ACTIVATIONS) in one case or another. About 570 launches per backend."""
import math

import pytest
import torch

import kernel_backends
from kernel_inputs import dfc_reference, ghost_reference, make_dfc_params, make_ghost_params, to_layout
from numerics import nonfinite_mismatch

pytestmark = [pytest.mark.usefixtures("kernel_backend"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]  # numpy, interpreted
VALUES = (math.nan, math.inf, -math.inf)
MODES = ("gate", "nearest", "bilinear")


def _spots(c, h, w, rotate_value):
    """(channel, row, col, value index, k) for every (row, col): all three values each (the channel rotating with
    the value), or one value each (rotating along the positions)."""
    k = 0
    for i in range(h):
        for j in range(w):
            for v in (range(3) if not rotate_value else (k % 3,)):
                yield (k + v) % c, i, j, v, k
            k += 1


def _report(failures, launches, non_finite_out):
    assert not failures, f"{len(failures)} of {launches} launches differ from eager:\n" + "\n".join(failures[:12])
    for v in VALUES:  # the data makes every value reach the output somewhere
        assert non_finite_out[v], f"no {v} input reached the output as a non-finite or saturated value"


# (name, C_in, layout, act, gate_mode, rotate_value, gate positions too)
GHOST_CASES = [
    ("nchw-cin3-nogate", 3, "contiguous", "relu", None, False, False),
    ("channels_last-cin3-bilinear", 3, "channels_last", "none", "bilinear", False, True),
    ("channels_last-cin1-nearest", 1, "channels_last", "relu", "nearest", True, True),
    ("nchw-cin2-nogate-relu6", 2, "contiguous", "relu6", None, True, False),  # no gate: saturated values show as 6
    ("channels_last-cin1-bilinear-hardswish", 1, "channels_last", "hardswish", "bilinear", True, True),
    ("nchw-cin1-nearest-silu", 1, "contiguous", "silu", "nearest", True, True),
]


@pytest.mark.parametrize("case", GHOST_CASES, ids=[c[0] for c in GHOST_CASES])
def test_ghost_module_nonfinite_propagates(case, device):
    _, c_in, layout, act, gate_mode, rotate, gate_spots = case
    n, h, w, init, ratio, dw, out_channels = 1, 5, 6, 4, 2, 3, 7
    p = make_ghost_params(c_in, init, ratio, dw, torch.float32, device)
    clean = torch.randn(n, c_in, h, w, device=device)
    gate = None if gate_mode is None else torch.rand(n, out_channels, 3, 3, device=device)
    mode = gate_mode or "nearest"
    failures, launches, reached = [], 0, {v: 0 for v in VALUES}

    def run(x, g, where):
        nonlocal launches
        launches += 1
        got = kernel_backends.ghost_forward(x, **p, out_channels=out_channels, act=act, gate=g, gate_mode=mode)
        want = ghost_reference(x, p, out_channels, act, g, mode)
        why = nonfinite_mismatch(got, want)
        if why:
            failures.append(f"{where}: {why}")
        return want

    for c, i, j, v, _ in _spots(c_in, h, w, rotate):
        x = clean.clone()
        x[0, c, i, j] = VALUES[v]
        want = run(to_layout(x, layout), gate, f"x[0, {c}, {i}, {j}] = {VALUES[v]}")
        # ReLU6 saturates +-Inf to exactly 6 (or 0): what reaches a gateless output there
        reached[VALUES[v]] += int(not torch.isfinite(want).all() or (act == "relu6" and (want == 6).any()))
    if gate_spots:
        for c, i, j, v, _ in _spots(out_channels, 3, 3, rotate):
            g = gate.clone()
            g[0, c, i, j] = VALUES[v]
            run(to_layout(clean, layout), g, f"gate[0, {c}, {i}, {j}] = {VALUES[v]}")
    _report(failures, launches, reached)


# (name, C_in, C, H, W, layout, rotate_value): with every value at a position, the mode rotates with the value
# (each position sees all three values, each in another mode); with the value rotating, the mode rotates too
DFC_CASES = [
    ("nchw-cin2-c2-8x6", 2, 2, 8, 6, "contiguous", False),  # pooled 4 x 3: vectors span more than a pooled row
    ("channels_last-cin1-c1-6x8", 1, 1, 6, 8, "channels_last", True),
    ("channels_last-cin3-c2-6x6", 3, 2, 6, 6, "channels_last", True),
]


@pytest.mark.parametrize("case", DFC_CASES, ids=[c[0] for c in DFC_CASES])
def test_dfc_nonfinite_propagates(case, device):
    _, c_in, c, h, w, layout, rotate = case
    p = make_dfc_params(c_in, c, torch.float32, device)
    clean = torch.randn(1, c_in, h, w, device=device)
    failures, launches, reached = [], 0, {v: 0 for v in VALUES}
    for ch, i, j, v, k in _spots(c_in, h, w, rotate):
        mode = MODES[(k + v) % 3] if not rotate else MODES[(k // 3) % 3]
        x = clean.clone()
        x[0, ch, i, j] = VALUES[v]
        x = to_layout(x, layout)
        launches += 1
        got = kernel_backends.dfc_forward(x, *p, mode)
        want = dfc_reference(x, p, mode)
        why = nonfinite_mismatch(got, want)
        if why:
            failures.append(f"{mode}, x[0, {ch}, {i}, {j}] = {VALUES[v]}: {why}")
        # after the sigmoid, +-Inf show as exact 0 or 1 (float64 saturates only at |logit| > ~37)
        reached[VALUES[v]] += int(not torch.isfinite(want).all() or ((want == 0) | (want == 1)).any())
    _report(failures, launches, reached)
