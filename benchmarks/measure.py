"""How a benchmark times things: CUDA via triton.testing.do_bench (CUDA events, L2 flushed between calls); CPU by
paired, alternating repetitions of all providers of one case; the device's copy bandwidth; peak CUDA memory."""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import torch

QUANTILES = (0.2, 0.5, 0.8)


@dataclass
class Timing:
    """Quantiles of one provider's time per call, in milliseconds, over `reps` timed calls."""

    p20: float
    p50: float
    p80: float
    reps: int


def _quantiles(times_ms: List[float], reps: int) -> Timing:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], reps)


@dataclass
class TimingBudget:
    """How long to time each provider: `target_ms` of timed calls after `warmup_ms`, `min_reps`..`max_reps` calls."""

    warmup_ms: float
    target_ms: float
    min_reps: int
    max_reps: int


def time_cuda(fn: Callable[[], object], budget: TimingBudget) -> Timing:
    """Quantiles of one function's CUDA time. do_bench flushes the L2 cache before every call, so a small
    problem is not timed out of the cache, and reports device time measured with CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q = do_bench(fn, warmup=budget.warmup_ms, rep=budget.target_ms, quantiles=list(QUANTILES))
        return Timing(q[0], q[1], q[2], reps=-1)  # do_bench picks the count itself and does not return it
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(budget.min_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _quantiles(times, len(times))


def time_cpu_paired(fns: Dict[str, Callable[[], object]], budget: TimingBudget) -> Dict[str, Timing]:
    """Quantiles per provider, timed in alternation (a, b, c, a, b, c, ...) so that a slow phase of a shared,
    noisy machine (another process, frequency changes) hits every provider alike instead of one of them.
    The order rotates each round so that no provider always runs right after the same one."""
    names = list(fns)
    one_call_ms = {}
    for name in names:  # warm-up, and an estimate of each call's cost to choose the repetition count
        start = time.perf_counter()
        warmup_ms = []
        while len(warmup_ms) < 3 or (time.perf_counter() - start) * 1e3 < budget.warmup_ms:
            t0 = time.perf_counter()
            fns[name]()
            warmup_ms.append((time.perf_counter() - t0) * 1e3)
        # The median of the later calls: the first ones carry one-time costs, and a stall is not the typical call.
        one_call_ms[name] = statistics.median(warmup_ms[1:])
    slowest = max(one_call_ms.values())
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.target_ms / max(slowest, 1e-6))))
    times = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(t, reps) for name, t in times.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device copy bandwidth (bytes read + bytes written per second, GB/s): the floor against which
    memory-bound ops are judged. 256 MiB on CUDA (well past L2), 64 MiB on CPU (past the last-level cache)."""
    nbytes = (256 if device.type == "cuda" else 64) * 2 ** 20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    budget = TimingBudget(warmup_ms=20, target_ms=200, min_reps=10, max_reps=50)
    if device.type == "cuda":
        t = time_cuda(lambda: dst.copy_(src), budget)
    else:
        t = time_cpu_paired({"copy": lambda: dst.copy_(src)}, budget)["copy"]
    return 2 * nbytes / (t.p50 * 1e-3) / 1e9


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory one call allocates above what was allocated before it (outputs, workspaces, saved
    activations), in MiB. None on CPU: torch's CPU allocator exposes no peak counter, and tracemalloc does not
    see its allocations, so nothing honest can be reported there."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def device_name(device: torch.device) -> str:
    """Folder name for a device's results: 'NVIDIA-H100-80GB-HBM3', 'cpu-2core' (the machine's cores; the threads
    a run used are a column of its rows)."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")


def _git_sha() -> str:
    # A lent GPU machine gets a copy of the work tree without .git: the caller passes the sha in GHOSTFAST_GIT_SHA.
    if os.environ.get("GHOSTFAST_GIT_SHA"):
        return os.environ["GHOSTFAST_GIT_SHA"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def environment(device: torch.device) -> dict:
    """The columns every row carries: where, with what, when."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    now = datetime.now(timezone.utc)
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": now.strftime("%Y%m%dT%H%M%S"),
    }

