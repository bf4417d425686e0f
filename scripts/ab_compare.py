"""Before/after timing of two ghostfast checkouts on this CPU, interleaved process by process.

    python scripts/ab_compare.py --a /tmp/before --b . [--rounds 6] [--threads 2] [--csv out.csv]

Each checkout must have its `ghostfast._C` built in place (`GHOSTFAST_CUDA=0 python setup.py build_ext --inplace`,
or an editable install). A round runs one worker process per checkout, alternating which goes first, and each
worker times every case (converted timm modules and whole models, eval mode, batch 1 (models also 8), float32) for `--reps`
calls after a warm-up (wall clock, or with --threads 1 --clock thread the calling thread's CPU time, steady on a
shared machine); the figure per case is the median over rounds of each worker's median, so slow drifts of a
busy machine hit both sides alike. Prints a table and, with --csv, writes one row per case and checkout.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# (label, what) -- the Ghost modules whose DFC / Ghost fold costs the most, and the two models at batch 1 and 8
CASES = [
    ("GhostModuleV2 960->960 7x7 (fold of 3x960 DFC BNs)", ("v2", 960, 960, 7)),
    ("GhostModuleV2 80->200 14x14", ("v2", 80, 200, 14)),
    ("GhostModuleV2 24->72 56x56", ("v2", 24, 72, 56)),
    ("GhostModule 160->960 7x7", ("v1", 160, 960, 7)),
    ("GhostModule 16->16 112x112", ("v1", 16, 16, 112)),
    ("ghostnet_100 b1 224", ("model", "ghostnet_100", 224)),
    ("ghostnetv2_100 b1 224", ("model", "ghostnetv2_100", 224)),
    ("ghostnet_100 b8 224", ("model", "ghostnet_100", 224, 8)),
    ("ghostnetv2_100 b8 224", ("model", "ghostnetv2_100", 224, 8)),
]

WORKER = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(int(sys.argv[1]))
reps = int(sys.argv[2])
cases = json.loads(sys.argv[3])
clock = time.thread_time if sys.argv[4] == "thread" else time.perf_counter
import timm
from timm.models import ghostnet as tg
import ghostfast
from ghostfast.models import randomize_batchnorm_
warnings.simplefilter("ignore")
torch.manual_seed(0)
out = {}
for label, what in cases:
    if what[0] == "model":
        net = timm.create_model(what[1], pretrained=False).eval()
        x = torch.randn(what[3] if len(what) > 3 else 1, 3, what[2], what[2])
    else:
        kind, cin, cout, hw = what
        net = (tg.GhostModuleV2(cin, cout) if kind == "v2" else tg.GhostModule(cin, cout)).eval()
        x = torch.randn(1, cin, hw, hw)
    randomize_batchnorm_(net, torch.Generator().manual_seed(1))
    net = ghostfast.convert(net, backend="cpu")
    times = []
    with torch.no_grad():
        for _ in range(max(3, reps // 5)):
            net(x)
        for _ in range(reps):
            t0 = clock()
            net(x)
            times.append(clock() - t0)
    times.sort()
    out[label] = times[len(times) // 2] * 1e3
print("RESULT " + json.dumps(out))
"""


def run_worker(src: Path, threads: int, reps: int, clock: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-c", WORKER, str(threads), str(reps), json.dumps(CASES), clock]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(src))
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker for {src} failed:\n{res.stdout}\n{res.stderr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, type=Path, help="the 'before' checkout")
    p.add_argument("--b", required=True, type=Path, help="the 'after' checkout")
    p.add_argument("--label-a", default="before")
    p.add_argument("--label-b", default="after")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: CPU time of the calling thread (with --threads 1 all the work runs there), which a "
                        "busy machine's preemption does not inflate")
    p.add_argument("--csv", type=Path)
    args = p.parse_args()
    sides = {args.label_a: args.a.resolve(), args.label_b: args.b.resolve()}
    medians = {k: [] for k in sides}
    order = list(sides)
    for r in range(args.rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            medians[k].append(run_worker(sides[k], args.threads, args.reps, args.clock))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    print(f"| case | {args.label_a} ms | {args.label_b} ms | {args.label_b} / {args.label_a} |")
    print("| --- | ---: | ---: | ---: |")
    for label, _ in CASES:
        a = statistics.median(m[label] for m in medians[args.label_a])
        b = statistics.median(m[label] for m in medians[args.label_b])
        print(f"| {label} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
        for side, v, rounds in ((args.label_a, a, medians[args.label_a]), (args.label_b, b, medians[args.label_b])):
            rows.append({"case": label, "side": side, "src": str(sides[side]), "median_ms": f"{v:.4f}",
                         "round_medians_ms": " ".join(f"{m[label]:.4f}" for m in rounds),
                         "threads": args.threads, "reps": args.reps, "clock": args.clock})
    if args.csv:
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
