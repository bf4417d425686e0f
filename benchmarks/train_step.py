"""Issue 13 item 4: an SGD training step (batch statistics) of converted GhostNets on the `cpu` backend against
eager, and the A/B of a training-path change beside them in the same process.

    python -m benchmarks.train_step [--models ghostnet_100 ghostnetv2_100] [--batch 8] [--threads 2] [--steps 10]
                                    [--tag TAG] [--out DIR]

Per model: eager timm, converted (`backend="cpu"`, training mode) with bn2's statistics in the joint op
(`ghostfast.nn.JOINT_BN2_STATS`, the default) and the same with the separate statistics op and its own backward
pass. One step = zero_grad, forward at 224x224, cross-entropy, backward, SGD(momentum) step. The three are
alternated step by step after a warm-up step each (what the machine does to one it does to all); reported: the
median step per form and the median of the paired per-round ratios. Rows are appended to train_step.csv with the
tag (a change's before/after runs side by side).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import ghostfast
import ghostfast.nn as gnn
from ghostfast.models import timm_ghostnet

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["tag", "model", "batch", "threads", "steps", "eager_ms", "joint_ms", "separate_ms",
          "eager_over_joint", "separate_over_joint_paired"]


def _run(name: str, batch: int, steps: int) -> dict:
    eager = timm_ghostnet(name, seed=0).train()
    joint = ghostfast.convert(timm_ghostnet(name, seed=0), backend="cpu").train()
    separate = ghostfast.convert(timm_ghostnet(name, seed=0), backend="cpu").train()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    target = torch.arange(batch) % 1000
    forms = {"eager": (eager, True), "joint": (joint, True), "separate": (separate, False)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, (m, _) in forms.items()}

    def step(k: str) -> float:
        model, flag = forms[k]
        gnn.JOINT_BN2_STATS = flag
        try:
            opts[k].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opts[k].step()
            return (time.perf_counter() - t0) * 1e3
        finally:
            gnn.JOINT_BN2_STATS = True

    for k in forms:
        step(k)
    times = {k: [] for k in forms}
    paired = []
    for _ in range(steps):
        for k in forms:
            times[k].append(step(k))
        paired.append(times["separate"][-1] / times["joint"][-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "steps": steps, "eager_ms": f"{med['eager']:.1f}",
            "joint_ms": f"{med['joint']:.1f}", "separate_ms": f"{med['separate']:.1f}",
            "eager_over_joint": f"{med['eager'] / med['joint']:.3f}",
            "separate_over_joint_paired": f"{statistics.median(paired):.3f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["ghostnet_100", "ghostnetv2_100"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.out) / "train_step.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for name in args.models:
            row = {"tag": args.tag, "threads": args.threads, **_run(name, args.batch, args.steps)}
            print(row, flush=True)
            writer.writerow(row)
            f.flush()


if __name__ == "__main__":
    main()
