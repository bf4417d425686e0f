"""Issue 13 item 2: what a converted module call costs beyond its kernel (Python, validation, backend resolution,
dispatch), on the `cpu` backend, at a size where the kernel itself is nearly free.

    python -m benchmarks.overhead [--threads 1] [--rounds 9] [--out DIR] [--tag TAG]

Per module kind (timm's GhostModule, and GhostModuleV2 with DFC attention; float32, inference mode, input
[1, 16, 4, 4]) it times, interleaved in every round in a fresh random order:

  eager      the original timm module
  converted  the ghostfast module (`ghostfast.convert`): what a model pays per Ghost module
  run_op     ghostfast.ops.run_ghost_module / run_dfc with the BatchNorm arguments prepared (the module's last step)
  backend    the `cpu` backend's Python wrapper (ghostfast.compiled), arguments prepared
  kernel     torch.ops.ghostfast._ghost_module_kernel (and _dfc_kernel) into preallocated outputs: the floor

The figure is the median over rounds of each round's mean call time, in microseconds of this thread's CPU time
(one intra-op thread, so all the work runs on it; other processes' load does not count); `converted - kernel` is the
overhead. Then, per model (timm ghostnet_100 / ghostnetv2_100 / ghostnetv3_100, batch 1, 224x224), the converted
modules' calls per forward (counted with forward hooks) times that overhead, against the converted model's time:
the share of a batch-1 forward spent outside the kernels. Writes overhead.csv (rows tagged --tag, appended, so a
before/after pair lives in one file) beside the other cpu-2core results.
"""
from __future__ import annotations

import argparse
import csv
import random
import statistics
import time
from pathlib import Path

import torch

import ghostfast
from ghostfast import ops
from ghostfast.backends import BACKENDS
from ghostfast.nn import _eval_bn

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["tag", "kind", "variant", "us_per_call", "overhead_us", "model", "calls_per_forward", "model_ms",
          "overhead_share"]


def _mean_call_us(fn, reps: int) -> float:
    """CPU time of this thread per call (one intra-op thread: all the work is on it), so that time the thread
    spends descheduled by other processes does not count."""
    t0 = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t0) * 1e6 / reps


def _variants(kind: str):
    """{variant: zero-argument callable} for one module kind."""
    from timm.models.ghostnet import GhostModule, GhostModuleV2

    c = 16
    if kind == "ghost":
        eager = GhostModule(c, c)
    else:
        eager = GhostModuleV2(c, c)
    for mod in eager.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    eager.eval()
    fused = ghostfast.convert(torch.nn.Sequential(eager), backend="cpu")[0].eval()
    x = torch.randn(1, c, 4, 4)
    conv1, bn1, conv2, bn2 = fused._ghost_layers
    p1, p2 = _eval_bn(conv1, bn1), _eval_bn(conv2, bn2)
    w1, w2 = conv1.weight, conv2.weight
    oc, act = fused.out_chs, fused.act
    kernel = torch.ops.ghostfast._ghost_module_kernel
    from ghostfast.compiled import _act_code, _bn
    out = torch.empty(1, oc, 4, 4)
    kargs = (x, w1.contiguous(), *_bn(p1), w2.contiguous(), *_bn(p2), oc, _act_code(act))
    be = BACKENDS["cpu"]
    if kind == "ghost":
        return {
            "eager": lambda: eager(x),
            "converted": lambda: fused(x),
            "run_op": lambda: ops.run_ghost_module(x, w1, p1, w2, p2, oc, act, None, "nearest", "cpu"),
            "backend": lambda: be.ghost_module(x, w1, p1, w2, p2, oc, act, None, "nearest"),
            "kernel": lambda: kernel(*kargs, None, "nearest", out),
        }
    l = fused._dfc_layers
    d = [(l[i].weight, _eval_bn(l[i], l[i + 1])) for i in (0, 2, 4)]
    gate = torch.sigmoid(torch.randn(1, oc, 2, 2))
    gout = torch.empty(1, oc, 2, 2)
    dfc_kernel = torch.ops.ghostfast._dfc_kernel
    dargs = [a for w, p in d for a in (w.contiguous(), *_bn(p))]

    def run_op():
        g = ops.run_dfc(x, d[0][0], d[0][1], d[1][0], d[1][1], d[2][0], d[2][1], "gate", "cpu")
        return ops.run_ghost_module(x, w1, p1, w2, p2, oc, act, g, "nearest", "cpu")

    def backend():
        g = be.dfc(x, d[0][0], d[0][1], d[1][0], d[1][1], d[2][0], d[2][1], "gate")
        return be.ghost_module(x, w1, p1, w2, p2, oc, act, g, "nearest")

    def raw():
        dfc_kernel(x, *dargs, "gate", gout)
        return kernel(*kargs, gate, "nearest", out)

    return {"eager": lambda: eager(x), "converted": lambda: fused(x), "run_op": run_op, "backend": backend,
            "kernel": raw}


def _model_rows(overhead_us: dict, threads: int, rounds: int, tag: str):
    from ghostfast.models import timm_ghostnet

    rows = []
    for name in ("ghostnet_100", "ghostnetv2_100", "ghostnetv3_100"):
        model = timm_ghostnet(name)  # eval mode; V3 reparameterized (the inference form, what convert fuses)
        fast = ghostfast.convert(model, backend="cpu")
        counts = {"ghost": 0, "ghost_dfc": 0}

        def hook(mod, args, out):
            counts["ghost_dfc" if isinstance(mod, ghostfast.nn.GhostModuleV2) and mod.unsupported_reason is None
                   and hasattr(mod, "_dfc_layers") and mod._dfc_layers else "ghost"] += 1

        handles = [m.register_forward_hook(hook) for m in fast.modules()
                   if isinstance(m, ghostfast.nn._FusedGhostBase)]
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            fast(x)
            for h in handles:
                h.remove()
            calls = dict(counts)
            times = []
            for _ in range(rounds):
                times.append(_mean_call_us(lambda: fast(x), 5) / 1e3)
        model_ms = statistics.median(times)
        share = (calls["ghost"] * overhead_us["ghost"] + calls["ghost_dfc"] * overhead_us["ghost_dfc"]) / 1e3
        rows.append({"tag": tag, "kind": "model", "variant": "converted", "model": name,
                     "calls_per_forward": f"{calls['ghost']}+{calls['ghost_dfc']}dfc", "model_ms": f"{model_ms:.2f}",
                     "overhead_share": f"{share / model_ms:.3f}", "overhead_us": f"{share * 1e3:.0f}"})
        print(f"{name}: {calls['ghost']} Ghost + {calls['ghost_dfc']} Ghost/DFC calls, {model_ms:.2f} ms, "
              f"overhead ~{share:.2f} ms ({100 * share / model_ms:.1f}%)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=400, help="calls per (variant, round)")
    ap.add_argument("--tag", default="now")
    ap.add_argument("--no-models", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    rows, overhead = [], {}
    with torch.inference_mode():
        for kind, label in (("ghost", "ghost"), ("dfc", "ghost_dfc")):
            variants = _variants(kind)
            for fn in variants.values():
                fn()
            times = {v: [] for v in variants}
            for _ in range(args.rounds):
                order = list(variants)
                rng.shuffle(order)
                for v in order:
                    times[v].append(_mean_call_us(variants[v], args.reps))
            med = {v: statistics.median(t) for v, t in times.items()}
            overhead[label] = med["converted"] - med["kernel"]
            for v, us in med.items():
                rows.append({"tag": args.tag, "kind": label, "variant": v, "us_per_call": f"{us:.1f}",
                             "overhead_us": f"{us - med['kernel']:.1f}"})
            print(label, "  ".join(f"{v} {us:.1f}" for v, us in med.items()), "us", flush=True)
    if not args.no_models:
        rows += _model_rows(overhead, args.threads, args.rounds, args.tag)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "overhead.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
