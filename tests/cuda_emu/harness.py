"""The `cuda` backend with its kernels executed by the CUDA emulation (build.py): `EmuBackend` is ghostfast's own
`CompiledBackend("cuda")` (the argument arrangement of ghostfast/compiled.py, unchanged) whose `torch.ops.ghostfast`
calls go to `torch.ops.ghostfast_emu`, the host code of csrc/cuda/*.cu compiled for the CPU, launching the emulated
kernels on CPU tensors.

Around each call:
  - every tensor argument is copied into the middle of a NaN-filled buffer (`GUARD` elements either side), so a
    kernel reading past a tensor reads NaN (which reaches the compared outputs) and one writing past it changes a
    guard (checked after the call); inputs must come back unchanged; outputs are copied back;
  - torch fills what the host code allocates with at::empty (the backward's workspaces) with NaN
    (`torch.use_deterministic_algorithms` with `fill_uninitialized_memory`), as the tests poison the outputs;
  - the emulator runs the launch's blocks and each block's threads in the order `schedule` set."""
from __future__ import annotations

import contextlib
import re
from typing import Iterable

import torch

from ghostfast import compiled

from . import build

GUARD = 256  # elements of NaN before and after every tensor argument
ORDERS = {"forward": 0, "reverse": 1, "random": 2}

# the output argument of each entry point: the forwards' `out`, the backwards' `grads` list (last, as the schemas
# in csrc/*.cpp have them), the sample kernels' `out`
OUTPUT_ARGUMENT = {"_ghost_module_kernel": -1, "_ghost_module_backward_kernel": -1, "_dfc_kernel": -1,
                   "_dfc_backward_kernel": -1, "_sample_kernel": 1}
ENTRY_POINTS = tuple(OUTPUT_ARGUMENT)


def ops():
    return build.load()


def schedule(order: str = "forward", block_order: str | None = None, seed: int = 0, sm_count: int = 132):
    """Thread order within a block's phases and block order of the next launches (forward, reverse, random)."""
    ops().configure(ORDERS[order], ORDERS[block_order or order], seed, sm_count)


class GuardError(AssertionError):
    pass


def _guarded_copy(t: torch.Tensor):
    """(a copy of dense `t` in the middle of a NaN-filled buffer, the buffer)."""
    n = t.numel()
    fill = float("nan") if t.is_floating_point() else -12345
    buf = torch.full((n + 2 * GUARD,), fill, dtype=t.dtype)
    view = buf.as_strided(t.shape, t.stride(), GUARD)
    view.copy_(t)
    return view, buf


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def guarded_call(name: str, *args):
    """torch.ops.ghostfast_emu.<name>(*args) on guarded copies of the tensors; raises GuardError when a kernel wrote
    outside a tensor or into an input."""
    out_index = OUTPUT_ARGUMENT[name] % len(args)
    slots = []  # (original, guarded view, buffer, is output, label)

    def guard(t, label, is_out):
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not _dense(t):
            return t
        view, buf = _guarded_copy(t)
        slots.append((t, view, buf, is_out, label))
        return view

    call_args = []
    for i, a in enumerate(args):
        if isinstance(a, (list, tuple)):
            call_args.append([guard(t, f"argument {i}[{j}]", i == out_index) for j, t in enumerate(a)])
        else:
            call_args.append(guard(a, f"argument {i}", i == out_index))
    with fill_uninitialized():
        getattr(ops(), name)(*call_args)
    for orig, view, buf, is_out, label in slots:
        n = orig.numel()
        for part, where in ((buf[:GUARD], "before"), (buf[GUARD + n:], "after")):
            if not (part.isnan().all() if part.is_floating_point() else (part == -12345).all()):
                bad = (~part.isnan()).nonzero().flatten().tolist()
                raise GuardError(f"{name}: a kernel wrote {where} {label} (shape {tuple(orig.shape)}), guard "
                                 f"elements {bad[:5]}")
        if is_out:
            orig.copy_(view)
        elif not _same(view, orig):
            raise GuardError(f"{name}: a kernel wrote into its input {label} (shape {tuple(orig.shape)})")


@contextlib.contextmanager
def fill_uninitialized():
    """at::empty fills with NaN (torch's deterministic mode) while the emulated host code runs."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


class _EmuOps:
    """Stands in for torch.ops.ghostfast inside EmuBackend's calls."""

    def __getattr__(self, name):
        if name not in ENTRY_POINTS:
            raise AttributeError(f"the CUDA emulation has no {name}")
        return lambda *args: guarded_call(name, *args)


_EMU_OPS = _EmuOps()


class EmuBackend(compiled.CompiledBackend):
    """ghostfast's `cuda` backend on CPU tensors, its kernels emulated."""

    def __init__(self):
        super().__init__("cuda")

    def unavailable(self, device_type: str):
        return None if device_type == "cpu" else "the CUDA emulation runs CPU tensors"

    @contextlib.contextmanager
    def _routed(self):
        saved = compiled._ops
        compiled._ops = lambda: _EMU_OPS
        try:
            yield
        finally:
            compiled._ops = saved

    def ghost_module(self, *args):
        with self._routed():
            return super().ghost_module(*args)

    def ghost_module_backward(self, *args):
        with self._routed():
            return super().ghost_module_backward(*args)

    def dfc(self, *args):
        with self._routed():
            return super().dfc(*args)

    def dfc_backward(self, *args):
        with self._routed():
            return super().dfc_backward(*args)


def stats() -> dict:
    keys = ("launches", "blocks", "threads", "barriers", "warp_syncs", "atomics")
    return dict(zip(keys, ops().stats().tolist()))


_KERNEL_OF_ARGS = {"GhostForwardArgs": "ghost_forward_kernel", "GhostBackwardArgs": "ghost_backward_kernel",
                   "DfcForwardArgs": "dfc_forward_kernel", "DfcBackwardArgs": "dfc_backward_kernel",
                   "GradInputArgs": "conv1x1_grad_input_kernel", "GradWeightArgs": "conv1x1_grad_weight_kernel"}


def launches() -> list[dict]:
    """The launches since the last reset: kernel (named by its argument struct), its template's dtypes, the
    instantiation's address (tells instantiations with the same argument types apart, e.g. CB), grid, block, smem."""
    rows = []
    for line in ops().launch_log().splitlines():
        sig, address, grid, block, smem = line.rsplit("|", 4)
        m = re.search(r"P = \{(.*)\}", sig)
        params = m.group(1) if m else sig
        kernel = next((k for a, k in _KERNEL_OF_ARGS.items() if a + "<" in params), "other")
        targs = re.search(r"Args<([^>]*)>", params)
        rows.append(dict(kernel=kernel, types=targs.group(1) if targs else "", address=address, grid=grid,
                         block=block, smem=int(smem), params=params))
    return rows


def reset():
    ops().reset()


def kernels_seen(rows: Iterable[dict]) -> set:
    return {(r["kernel"], r["types"]) for r in rows}
