"""Shared numerics for the tests: relative error against a float64 reference and per-dtype bounds."""
import torch

# DESIGN.md, Numerics: ||out - ref|| / ||ref|| against a float64 reference.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    ref = ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has NaN/Inf (an unwritten, poisoned element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so elements a kernel forgets to write show up."""
    return torch.full_like(t, float("nan"))


def assert_close_rel(out, ref, dtype, factor=1.0):
    err = rel_error(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} ({dtype})"


def nonfinite_mismatch(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32):
    """None when `out` has NaN, +Inf and -Inf exactly where the float64 reference `ref` has them and its finite
    elements are within `dtype`'s bound, else what differs (DESIGN.md: NaN and Inf propagate as in eager)."""
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    out = out.detach().double()
    ref = ref.detach().double()
    for name, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = mask(out), mask(ref)
        if not torch.equal(got, want):
            extra, missing = (got & ~want).nonzero().tolist(), (want & ~got).nonzero().tolist()
            return f"{name}: {len(extra)} extra (e.g. {extra[:3]}), {len(missing)} missing (e.g. {missing[:3]})"
    finite = torch.isfinite(ref)
    if finite.any():
        err = rel_error(out[finite], ref[finite])
        if not err <= REL_TOL[dtype]:
            return f"finite elements: relative error {err:.2e} > {REL_TOL[dtype]:.1e} ({dtype})"
    return None
