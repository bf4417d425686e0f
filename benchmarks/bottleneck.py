"""Issue 13 item 1: whole-bottleneck conversion (ghostfast.nn.GhostBottleneck) against per-module fusion.

    python -m benchmarks.bottleneck [--threads 1 2] [--reps 150] [--models M ...] [--compile] [--out DIR] [--tag TAG]

Per model (timm ghostnet_100 / ghostnetv2_100 / ghostnetv3_100 (reparameterized), seeded weights and BatchNorm statistics, eval mode, float32,
224x224, batch 1 and 8, `backend="cpu"`) it builds both conversions of the same model in one process,
`ghostfast.convert(model, bottlenecks=False)` (every Ghost module fused, the rest eager: what v0.4 ran) and
`ghostfast.convert(model)` (timm's bottlenecks wrapped whole: the depthwise conv + BatchNorm pairs as one kernel
each), and times them call by call in alternation (which one goes first alternates too), so a busy machine's
drifts hit both alike. Clock: this thread's CPU time at 1 thread (all the work runs on it; other processes' load
does not count), wall time at 2 threads. Figures: the median of each side's call times and the median of the
per-pair ratios (bottleneck / per-module); also eager's median at the same settings and the relative error of each
against eager. `--compile`: both conversions run through `torch.compile` (default inductor), so the per-module
side is what a compiled converted model ran before the bottleneck's direct path was traceable, and the eager column
is `torch.compile` of the eager model (the `compiled` column says so). Rows are appended to bottleneck.csv (tagged
--tag) beside the other cpu-2core results.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import ghostfast
from benchmarks.measure import _git_sha
from benchmarks.report import append_rows
from ghostfast.models import timm_ghostnet

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["tag", "commit", "model", "batch", "threads", "clock", "compiled", "reps", "eager_ms", "per_module_ms", "bottleneck_ms",
          "paired_ratio", "per_module_rel_err", "bottleneck_rel_err"]
CASES = [("ghostnet_100", 1, 1.0), ("ghostnetv2_100", 1, 1.0), ("ghostnetv3_100", 1, 1.0), ("ghostnet_100", 8, 0.2),
         ("ghostnetv2_100", 8, 0.2), ("ghostnetv3_100", 8, 0.2)]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def measure(name: str, batch: int, threads: int, reps: int, compiled: bool = False) -> dict:
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 and not compiled else time.perf_counter  # inductor may use a pool
    eager = timm_ghostnet(name, seed=0)
    per_module = ghostfast.convert(eager, backend="cpu", bottlenecks=False)
    whole = ghostfast.convert(eager, backend="cpu")
    model = eager
    if compiled:
        torch._dynamo.reset()
        model, per_module, whole = (torch.compile(m) for m in (eager, per_module, whole))
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ta, tb, te, ratios = [], [], [], []
    with torch.inference_mode():
        ref = eager(x)
        errs = (_rel(per_module(x), ref), _rel(whole(x), ref))
        for _ in range(3):
            per_module(x), whole(x), model(x)
        for i in range(reps):
            first, second = (per_module, whole) if i % 2 == 0 else (whole, per_module)
            t0 = clock()
            first(x)
            t1 = clock()
            second(x)
            t2 = clock()
            a, b = (t1 - t0, t2 - t1) if i % 2 == 0 else (t2 - t1, t1 - t0)
            ta.append(a)
            tb.append(b)
            ratios.append(b / a)
        for _ in range(max(5, reps // 4)):
            t0 = clock()
            model(x)
            te.append(clock() - t0)
    return {"model": name, "batch": batch, "threads": threads, "clock": "wall" if clock is time.perf_counter
            else "thread", "compiled": "yes" if compiled else "no", "reps": reps, "eager_ms": f"{statistics.median(te) * 1e3:.3f}",
            "per_module_ms": f"{statistics.median(ta) * 1e3:.3f}",
            "bottleneck_ms": f"{statistics.median(tb) * 1e3:.3f}",
            "paired_ratio": f"{statistics.median(ratios):.4f}", "per_module_rel_err": f"{errs[0]:.2e}",
            "bottleneck_rel_err": f"{errs[1]:.2e}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=150, help="alternated pairs at batch 1 (a fifth of them at batch 8)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu-2core")
    p.add_argument("--models", nargs="+", default=sorted({c[0] for c in CASES}))
    p.add_argument("--compile", action="store_true", help="every side through torch.compile")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for threads in args.threads:
        for name, batch, share in [c for c in CASES if c[0] in args.models]:
            row = dict(measure(name, batch, threads, max(10, int(args.reps * share)), args.compile), tag=args.tag, commit=_git_sha())
            rows.append(row)
            print(f"{name} b{batch} {threads} thread(s): eager {row['eager_ms']} ms, per-module {row['per_module_ms']} "
                  f"ms, bottleneck {row['bottleneck_ms']} ms (paired ratio {row['paired_ratio']}; rel. error vs "
                  f"eager {row['per_module_rel_err']} / {row['bottleneck_rel_err']})", flush=True)
    path = args.out / "bottleneck.csv"
    append_rows(str(path), rows, {}, FIELDS)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
