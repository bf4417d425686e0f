"""Issue 13 item 4: the stage-1 statistics' gradient of the `cpu` backend per GhostNet shape, by its kernel and by
the two library-GEMM forms (ghostfast/compiled.py, `_stats1_backward_library`: "direct", z1 and both products by
ATen; "closed", grad_x = W1^T d + (W1^T diag(c) W1) x and grad_W1 from the Gram matrix), and which one
`_stats1_form` picks. The rows behind that rule.

    python -m benchmarks.stats1_backward [--threads 1] [--batch 8] [--rounds 7] [--out DIR]

float32, NCHW, grad_x and grad_W1 both needed (a training step's case). Each round times the three in a fresh
random order (median over rounds of one call's wall time, after a warm-up call each); the relative error of each
library form against the kernel is printed with it. Writes stats1_backward.csv beside the other cpu-2core results
(overwritten: one run is the table).
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import time
from pathlib import Path

import torch

from ghostfast import compiled
from ghostfast.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
# (C_in, init, image side): ghostnet_100's stage-1 shapes (both Ghost modules of each bottleneck kind)
SHAPES = [(16, 8, 112), (16, 24, 112), (24, 36, 56), (72, 20, 28), (40, 120, 28), (80, 100, 14), (112, 336, 14),
          (480, 56, 14), (672, 56, 14), (160, 480, 7), (960, 80, 7)]
FIELDS = ["c_in", "init", "hw", "batch", "threads", "kernel_ms", "direct_ms", "closed_ms", "picked",
          "direct_rel_err", "closed_rel_err"]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    be = BACKENDS["cpu"]
    needs = [True, True, False, False, False]
    rows = []
    for c_in, init, hw in SHAPES:
        x = torch.randn(args.batch, c_in, hw, hw, generator=gen)
        w1 = torch.randn(init, c_in, 1, 1, generator=gen) * c_in ** -0.5
        a, c = torch.randn(init, generator=gen) * 1e-3, torch.randn(init, generator=gen) * 1e-3
        mean = torch.randn(init, generator=gen)
        s1, b1, w2 = torch.ones(init), torch.zeros(init), torch.randn(init, 1, 3, 3, generator=gen)

        def kernel():
            os.environ["GHOSTFAST_CPU_GEMM"] = "own"
            try:
                return be.ghost_module_stats_backward(x, w1, s1, b1, w2, "relu", 1, a, c, mean, needs)
            finally:
                del os.environ["GHOSTFAST_CPU_GEMM"]

        variants = {"kernel": kernel,
                    "direct": lambda: compiled._stats1_backward_library("direct", x, w1, a, c, mean, needs),
                    "closed": lambda: compiled._stats1_backward_library("closed", x, w1, a, c, mean, needs)}
        outs = {k: fn() for k, fn in variants.items()}  # warm-up, and the results compared
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            order = list(variants)
            rng.shuffle(order)
            for k in order:
                times[k].append(_time(variants[k]))
        med = {k: statistics.median(v) for k, v in times.items()}

        def err(form):
            return max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(outs[form][:2], outs["kernel"][:2]))

        picked = compiled._stats1_form(x, w1, needs) or "kernel"
        rows.append({"c_in": c_in, "init": init, "hw": hw, "batch": args.batch, "threads": args.threads,
                     "kernel_ms": f"{med['kernel']:.2f}", "direct_ms": f"{med['direct']:.2f}",
                     "closed_ms": f"{med['closed']:.2f}", "picked": picked,
                     "direct_rel_err": f"{err('direct'):.1e}", "closed_rel_err": f"{err('closed'):.1e}"})
        best = min(med, key=med.get)
        print(f"{c_in:4d} -> {init:3d} at {hw:3d}x{hw:<3d}: kernel {med['kernel']:6.2f}  direct {med['direct']:6.2f}  "
              f"closed {med['closed']:6.2f} ms; picked {picked} (fastest {best}); rel err direct "
              f"{err('direct'):.1e} closed {err('closed'):.1e}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "stats1_backward.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
