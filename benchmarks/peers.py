"""ghostfast against what users would pick instead on a CPU, in one interleaved run with a fixed thread count:
eager PyTorch, torch.compile, ONNX Runtime (CPU execution provider) and OpenVINO (both running the eager model's
`torch.onnx.export`), `converted` (ghostfast.convert, backend auto) and `converted+compile`; timm's ghostnet_100,
ghostnetv2_100, ghostnetv3_100 (reparameterized) and mobilenetv3_large_100 (the reference point: eager, compile,
ONNX Runtime, OpenVINO); batch 1 and 8 at 224x224, float32; inference, and an SGD training step (eager, compile,
converted, and converted with backend 'cpu': the fused training kernels, which `auto` does not pick on CPU).

    python -m benchmarks.peers [--threads 2] [--rounds 5] [--models ...] [--quick] [--out DIR] [--readme]

How providers are kept from disturbing each other: every (model, provider) runs in its own worker process, and only
one worker runs at a time. The parent walks the cases round by round, each round visiting the providers in a new
random order; a worker times `reps` calls of one case (after its warm-up: compile, session creation and two calls,
excluded) and replies, then the parent waits 50 ms (other pools' spin-waits end: libgomp's spin, TBB's) before the
next request. ONNX Runtime runs with `session.intra_op.allow_spinning=0`. Each provider gets the same thread count
(torch.set_num_threads, ORT intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS); OpenVINO is held to float32
(INFERENCE_PRECISION_HINT f32: its CPU plugin may otherwise compute in a lower precision). A figure is the median of every
call over all rounds (wall clock); the interquartile range is stored beside it.

Correctness: each worker returns its output for the same input; every provider must be within 1e-4 (relative, L2)
of eager, or its row says so. ONNX Runtime / OpenVINO are optional (`make bench-venv` installs them): without them
their rows are absent and the CSV's notes say so.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("ghostnet_100", "ghostnetv2_100", "ghostnetv3_100", "mobilenetv3_large_100")
INFER = ("eager", "compile", "onnxruntime", "openvino", "converted", "converted+compile")
TRAIN = ("eager", "compile", "converted", "converted-cpu")
REFERENCE_MODELS = ("mobilenetv3_large_100",)  # not Ghost: no converted providers
BATCHES = (1, 8)
SIZE = 224

WORKER = r'''
import io, json, os, sys, time, warnings
import torch
threads = int(sys.argv[1]); model_name = sys.argv[2]; provider = sys.argv[3]
torch.set_num_threads(threads)
warnings.simplefilter("ignore")
torch.manual_seed(0)
import timm
import ghostfast
from ghostfast.models import timm_ghostnet, randomize_batchnorm_

def base():
    if model_name.startswith("ghostnet"):
        return timm_ghostnet(model_name, seed=3)
    m = timm.create_model(model_name, pretrained=False)
    randomize_batchnorm_(m, torch.Generator().manual_seed(3))
    return m.eval()

cache = {}

def runner(workload, batch):
    key = (workload, batch)
    if key in cache:
        return cache[key]
    torch.manual_seed(1)
    x = torch.randn(batch, 3, SIZE, SIZE)
    model = base()
    if workload == "inference":
        if provider in ("onnxruntime", "openvino"):
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
            if provider == "onnxruntime":
                import onnxruntime as ort
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
                feed = {"x": x.numpy()}
                fn = lambda: sess.run(None, feed)[0]
            else:
                import openvino as ov
                core = ov.Core()
                compiled = core.compile_model(core.read_model(buf.getvalue()), "CPU",
                                              {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                               "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"})
                req = compiled.create_infer_request()
                xn = x.numpy()
                fn = lambda: req.infer({0: xn})[compiled.output(0)]
            out_fn = lambda: torch.as_tensor(fn())
        else:
            if provider.startswith("converted"):
                model = ghostfast.convert(model, backend="auto")
            if provider.endswith("compile"):
                model = torch.compile(model, dynamic=False)
            def fn():
                with torch.inference_mode():
                    return model(x)
            out_fn = fn
    else:  # one SGD step, batch statistics (train mode), random labels
        if provider == "converted":
            model = ghostfast.convert(model, backend="auto")
        elif provider == "converted-cpu":
            model = ghostfast.convert(model, backend="cpu")
        model.train()
        step_model = torch.compile(model, dynamic=False) if provider == "compile" else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        y = torch.randint(0, 1000, (batch,))
        def fn():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
            loss.backward()
            opt.step()
            return loss
        out_fn = None
    for _ in range(2):
        fn()
    first = None
    if out_fn is not None:
        first = out_fn().detach().float().reshape(-1)[:2000].tolist()
    cache[key] = (fn, first)
    return cache[key]

print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        fn, first = runner(req["workload"], req["batch"])
        times = []
        for _ in range(req["reps"]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print("RESULT " + json.dumps({"times": times, "out": first if req.get("out") else None}), flush=True)
    except Exception as e:
        print("RESULT " + json.dumps({"error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
'''


class Worker:
    def __init__(self, threads: int, model: str, provider: str):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        env.pop("TRITON_INTERPRET", None)
        code = WORKER.replace("SIZE", str(SIZE))
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(threads), model, provider], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, cwd=str(ROOT))
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"worker exited (rc {self.proc.wait()})")

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def providers_for(model: str, workload: str) -> list:
    names = list(INFER if workload == "inference" else TRAIN)
    if model in REFERENCE_MODELS:
        names = [p for p in names if not p.startswith("converted")]
    return [p for p in names if p not in ("onnxruntime", "openvino") or _available(p)]


def _rel(out, ref) -> float:
    import math

    num = math.sqrt(sum((a - b) ** 2 for a, b in zip(out, ref)))
    den = math.sqrt(sum(b * b for b in ref)) or 1.0
    return num / den


def run(args) -> list:
    rows = []
    rng = random.Random(0)
    cases = [(w, b) for w in args.workloads for b in args.batches]
    for model in args.models:
        names = sorted({p for w in args.workloads for p in providers_for(model, w)}, key=(INFER + TRAIN).index)
        workers = {}
        for p in names:
            try:
                workers[p] = Worker(args.threads, model, p)
            except RuntimeError as e:
                print(f"{model} {p}: worker failed to start ({e})", file=sys.stderr)
        samples = {(c, p): [] for c in cases for p in workers}
        outs, errors = {}, {}
        for rnd in range(args.rounds):
            for case in cases:
                order = [p for p in workers if p in providers_for(model, case[0])]
                rng.shuffle(order)
                for p in order:
                    if (case, p) in errors:
                        continue
                    if rnd == 0:  # warm-up and output check, untimed
                        res = workers[p].request(workload=case[0], batch=case[1], reps=1, out=True)
                        if "error" in res:
                            errors[(case, p)] = res["error"]
                            continue
                        outs[(case, p)] = res["out"]
                    reps = args.reps if case[1] == 1 else max(2, args.reps // 4)
                    if case[0] == "train_step":
                        reps = max(2, reps // 3)
                    res = workers[p].request(workload=case[0], batch=case[1], reps=reps)
                    time.sleep(0.05)
                    if "error" in res:
                        errors[(case, p)] = res["error"]
                        continue
                    samples[(case, p)].extend(res["times"])
            print(f"{model}: round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        for w in workers.values():
            w.close()
        for case in cases:
            ref_out = outs.get((case, "eager"))
            eager_ms = None
            for p in workers:
                if p not in providers_for(model, case[0]):
                    continue
                t = sorted(samples[(case, p)])
                row = {"model": model, "workload": case[0], "batch": case[1], "provider": p, "threads": args.threads,
                       "median_ms": "", "q1_ms": "", "q3_ms": "", "calls": len(t), "rel_err_vs_eager": "",
                       "note": errors.get((case, p), "")}
                if t:
                    q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
                    row.update(median_ms=f"{statistics.median(t) * 1e3:.3f}", q1_ms=f"{q[0] * 1e3:.3f}",
                               q3_ms=f"{q[2] * 1e3:.3f}")
                    if p == "eager":
                        eager_ms = statistics.median(t) * 1e3
                if ref_out is not None and outs.get((case, p)) is not None:
                    err = _rel(outs[(case, p)], ref_out)
                    row["rel_err_vs_eager"] = f"{err:.1e}"
                    if err > 1e-4:
                        row["note"] = (row["note"] + "; " if row["note"] else "") + "output differs from eager > 1e-4"
                rows.append(row)
            for row in rows:
                if row["model"] == model and (row["workload"], row["batch"]) == case and row["median_ms"] and eager_ms:
                    row["speedup_vs_eager"] = f"{eager_ms / float(row['median_ms']):.2f}"
    return rows


def best_peer_table(rows) -> str:
    """Markdown: per model, workload and batch, each provider's median and ghostfast's standing against the fastest
    peer (compile, ONNX Runtime, OpenVINO for inference; eager and compile for training)."""
    header = ["model", "workload", "batch"] + list(dict.fromkeys(r["provider"] for r in rows)) + ["converted vs best peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((r["model"], r["workload"], r["batch"]) for r in rows))
    for key in keys:
        sel = {r["provider"]: r for r in rows if (r["model"], r["workload"], r["batch"]) == key}
        peers = [p for p in ("compile", "onnxruntime", "openvino") if p in sel and sel[p]["median_ms"]]
        if key[1] == "train_step":
            peers = [p for p in ("eager", "compile") if p in sel and sel[p]["median_ms"]]
        best = min((float(sel[p]["median_ms"]) for p in peers), default=None)
        ours = [float(sel[p]["median_ms"]) for p in ("converted", "converted+compile", "converted-cpu")
                if p in sel and sel[p]["median_ms"]]
        cells = [key[0], key[1], str(key[2])]
        for p in header[3:-1]:
            r = sel.get(p)
            cells.append(r["median_ms"] if r and r["median_ms"] else ("n/a" if r is None else "failed"))
        cells.append(f"{best / min(ours):.2f}x" if best and ours else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="calls per request at batch 1 (fewer at batch 8 / train)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--workloads", nargs="+", default=["inference", "train_step"])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 5 calls, batch 1 inference only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.reps, args.batches, args.workloads = 2, 5, [1], ["inference"]
    t0 = time.time()
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["model", "workload", "batch", "provider", "threads", "median_ms", "q1_ms", "q3_ms", "calls",
              "speedup_vs_eager", "rel_err_vs_eager", "note"]
    with open(out / "peers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    table = best_peer_table(rows)
    import torch

    env = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "wall_s": round(time.time() - t0)}
    for mod in ("onnxruntime", "openvino"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = "not installed"
    (out / "peers.md").write_text(f"# ghostfast vs peers (benchmarks/peers.py)\n\n{json.dumps(env)}\n\nmedian ms\n\n"
                                  f"{table}\n")
    print(table)
    _plot(rows, out / "peers.png")
    return 0


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(dict.fromkeys((r["model"], r["workload"], r["batch"]) for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 1.2), 4.5))
    width = 0.8 / len(provs)
    for i, p in enumerate(provs):
        vals = []
        for k in keys:
            r = next((r for r in rows if (r["model"], r["workload"], r["batch"]) == k and r["provider"] == p), None)
            vals.append(float(r["median_ms"]) if r and r["median_ms"] else 0)
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=p)
    ax.set_xticks([j + 0.4 for j in range(len(keys))])
    ax.set_xticklabels([f"{m}\n{w} b{b}" for m, w, b in keys], fontsize=7)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
