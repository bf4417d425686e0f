"""Issue 13 item 3: the `cpu` backend's own register-blocked GEMM against ATen's (MKL / oneDNN) for x1 = W1 x, per
distinct Ghost-module shape of timm's ghostnet_100 / ghostnetv2_100 / ghostnetv3_100 (benchmarks/shapes.py).

    python -m benchmarks.gemm_choice [--threads 2] [--batches 1 8] [--rounds 7] [--out DIR]

For each shape and batch it times the fused forward (`ghostfast.ops.ghost_module`, backend 'cpu', inference mode,
float32, NCHW and channels_last) with GHOSTFAST_CPU_GEMM=own and =library (the variable is read on each call), the
two interleaved in every round in a fresh random order, plus eager's 1x1 convolution alone (oneDNN: what the library
path's GEMM costs at least). The figure is the median over rounds of each round's mean call time. Writes
gemm_choice.csv (one row per shape, batch and layout, with library / own) beside the other cpu-2core results; the
rule in csrc/cpu/ghost_module_forward.cpp (`library_gemm_wins`) comes from it.
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
import torch.nn.functional as F

from benchmarks.shapes import ghost_shapes
from ghostfast import ops
from ghostfast.reference import BatchNormParams

ROOT = Path(__file__).resolve().parents[1]


def _bn(bn) -> BatchNormParams:
    return BatchNormParams(bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps)


def _mean_call_ms(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target-ms", type=float, default=40.0, help="time per (variant, round)")
    ap.add_argument("--layouts", nargs="+", default=["nchw", "cl"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in ghost_shapes():
        m = shape.module
        conv1, bn1, conv2, bn2 = m.primary_conv[0], m.primary_conv[1], m.cheap_operation[0], m.cheap_operation[1]
        act = "relu" if shape.relu else "none"
        w1, w2 = conv1.weight.detach(), conv2.weight.detach()
        p1, p2 = _bn(bn1), _bn(bn2)
        for batch in args.batches:
            for layout in args.layouts:
                x = torch.randn(batch, shape.in_chs, shape.H, shape.W)
                if layout == "cl":
                    x = x.contiguous(memory_format=torch.channels_last)

                def fused(mode, x=x):
                    os.environ["GHOSTFAST_CPU_GEMM"] = mode
                    return ops.ghost_module(x, w1, p1, w2, p2, shape.out_chs, act=act, backend="cpu")

                with torch.inference_mode():
                    ref = fused("own")
                    lib = fused("library")
                    err = ((lib - ref).norm() / ref.norm()).item()
                    variants = {"own": lambda: fused("own"), "library": lambda: fused("library"),
                                "conv1x1": lambda: F.conv2d(x, w1)}
                    once = max(_mean_call_ms(f, 3) for f in variants.values())
                    reps = max(3, int(args.target_ms / max(once, 1e-3)))
                    times = {k: [] for k in variants}
                    for _ in range(args.rounds):
                        order = list(variants)
                        random.shuffle(order)
                        for k in order:
                            times[k].append(_mean_call_ms(variants[k], reps))
                med = {k: statistics.median(v) for k, v in times.items()}
                row = dict(shape=shape.label, in_chs=shape.in_chs, init=conv1.out_channels, HW=shape.H * shape.W,
                           batch=batch, layout=layout, own_ms=round(med["own"], 4),
                           library_ms=round(med["library"], 4), conv1x1_ms=round(med["conv1x1"], 4),
                           library_over_own=round(med["library"] / med["own"], 3), rel_l2_library_vs_own=f"{err:.1e}")
                rows.append(row)
                print(row, flush=True)
    os.environ.pop("GHOSTFAST_CPU_GEMM", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gemm_choice.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'gemm_choice.csv'}")


if __name__ == "__main__":
    main()
