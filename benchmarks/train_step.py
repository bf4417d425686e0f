"""Issue 13 item 4: an SGD training step (batch statistics) of converted GhostNets on the `cpu` backend against
eager, and the A/B of the training path's forms beside them in the same process.

    python -m benchmarks.train_step [--models ghostnet_100 ghostnetv2_100] [--batch 8] [--threads 2] [--steps 10]
                                    [--forms eager eager-cl z1 z1-cl z1-nchw joint separate auto]
                                    [--tag TAG] [--out DIR]

Forms: `eager` (timm's model), `eager-cl` (the same model and input in channels_last: what a user who knows oneDNN's
layouts would run), and converted (`backend="cpu"`, training mode) with the flags of ghostfast.nn: `z1` (the
default: z1 = W1 x by one library matmul, kept, bn1's statistics from it, the rest of each module from z1 by one op;
each bottleneck computing in channels_last inside from the NCHW input), `z1-cl` (z1 with the model and input in
channels_last, beside eager-cl), `z1-nchw` (TRAIN_CHANNELS_LAST off: the bottlenecks compute in NCHW), `joint`
(KEEP_Z1 off: the kernels recompute z1; bn2's statistics inside the joint op's backward), `separate`
(JOINT_BN2_STATS off too: a statistics op with its own backward pass) and `auto` (the default flags, backend `auto`:
what a conversion without a backend runs). One step = zero_grad, forward at 224x224, cross-entropy, backward,
SGD(momentum) step. The forms are alternated step by step after a warm-up step each (what the machine does to one it
does to all); reported per form: the median step, eager's median over it, and the median of the paired per-round
ratios of the form's step to the default form's (`z1`).
Rows are appended to train_step.csv with the tag (a change's before/after runs side by side).
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
FIELDS = ["tag", "model", "batch", "threads", "steps", "form", "median_ms", "eager_over_form",
          "form_over_default_paired"]
# the ghostfast.nn flags of each converted form (eager: None)
FORMS = {"eager": None, "eager-cl": None,
         "z1": {"JOINT_BN2_STATS": True, "KEEP_Z1": True, "TRAIN_CHANNELS_LAST": True},
         "z1-nchw": {"JOINT_BN2_STATS": True, "KEEP_Z1": True, "TRAIN_CHANNELS_LAST": False},
         "joint": {"JOINT_BN2_STATS": True, "KEEP_Z1": False, "TRAIN_CHANNELS_LAST": True},
         "separate": {"JOINT_BN2_STATS": False, "KEEP_Z1": False, "TRAIN_CHANNELS_LAST": True}}
FORMS["auto"] = FORMS["z1-cl"] = FORMS["z1"]
CHANNELS_LAST = {"eager-cl", "z1-cl"}  # model and input in channels_last
BACKEND = {"auto": "auto"}  # the converted forms' backend: `cpu` unless named here
DEFAULT = "z1"


def _run(name: str, batch: int, steps: int, forms) -> list:
    models = {k: (timm_ghostnet(name, seed=0) if FORMS[k] is None else
                  ghostfast.convert(timm_ghostnet(name, seed=0), backend=BACKEND.get(k, "cpu"))).train()
              for k in forms}
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    inputs = {k: x.contiguous(memory_format=torch.channels_last) if k in CHANNELS_LAST else x for k in forms}
    for k in CHANNELS_LAST & set(forms):
        models[k].to(memory_format=torch.channels_last)
    target = torch.arange(batch) % 1000
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    defaults = {flag: getattr(gnn, flag) for flag in FORMS[DEFAULT]}

    def step(k: str) -> float:
        for flag, value in (FORMS[k] or {}).items():
            setattr(gnn, flag, value)
        try:
            opts[k].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(models[k](inputs[k]), target).backward()
            opts[k].step()
            return (time.perf_counter() - t0) * 1e3
        finally:
            for flag, value in defaults.items():
                setattr(gnn, flag, value)

    for k in forms:
        step(k)
    times = {k: [] for k in forms}
    for _ in range(steps):
        for k in forms:
            times[k].append(step(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in forms:
        row = {"model": name, "batch": batch, "steps": steps, "form": k, "median_ms": f"{med[k]:.1f}",
               "eager_over_form": f"{med['eager'] / med[k]:.3f}" if "eager" in med else "",
               "form_over_default_paired": ""}
        if DEFAULT in times:
            row["form_over_default_paired"] = \
                f"{statistics.median(a / b for a, b in zip(times[k], times[DEFAULT])):.3f}"
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["ghostnet_100", "ghostnetv2_100"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--forms", nargs="+", default=["eager", "eager-cl", "z1", "z1-nchw"], choices=list(FORMS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "train_step.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for name in args.models:
            for row in _run(name, args.batch, args.steps, args.forms):
                row = {"tag": args.tag, "threads": args.threads, **row}
                print(row, flush=True)
                writer.writerow(row)
            f.flush()


if __name__ == "__main__":
    main()
