"""Command line: `python -m ghostfast info`, `python -m ghostfast demo` and `python -m ghostfast bench`.

The demo is the package's main job on a default model: build timm's ghostnetv2_100 with seeded random weights,
convert it, check the converted model against eager PyTorch, time both, and print a table. Without a GPU the
Triton kernels run under the Triton CPU interpreter: the check is real, the timings only show the interpreter.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def _prepare_triton_env() -> None:
    # The interpreter must be chosen before any Triton kernel module is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _versions() -> dict:
    import torch

    import ghostfast

    info = {"ghostfast": ghostfast.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "timm"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    info["cuda (torch build)"] = torch.version.cuda or "none"
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


def cmd_info(args) -> int:
    import ghostfast

    for key, value in _versions().items():
        print(f"{key:20s} {value}")
    for device in ("cpu", "cuda"):
        try:
            print(f"{'backends on ' + device:20s} {', '.join(ghostfast.available_backends(device))}")
        except Exception as e:  # a CUDA query on a machine without a driver
            print(f"{'backends on ' + device:20s} unavailable ({e})")
    info = ghostfast.backends.build_info()
    if info is None:
        print(f"{'ghostfast._C':20s} not available ({ghostfast.backends.extension_error()})")
    else:
        print(f"{'ghostfast._C':20s} " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def _time_ms(fn, reps: int, device) -> list:
    import torch

    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def cmd_demo(args) -> int:
    import torch

    import ghostfast
    from ghostfast.models import timm_ghostnet

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Eager float32 convs on a GPU default to TF32 (~1e-3 error); ghostfast computes IEEE float32 unless the user
    # lowers torch's matmul precision. Compare and time both in IEEE float32.
    torch.backends.cudnn.allow_tf32 = False
    backend = ghostfast.backends.resolve_backend(args.backend, device)[0]
    interpreted = backend == "triton" and device.type == "cpu"
    size = args.size or (64 if interpreted else 224)  # the Triton interpreter is far too slow for 224x224
    print(f"ghostfast demo: {args.model}, seeded random weights, batch {args.batch}, {size}x{size}, {device}")
    model = timm_ghostnet(args.model, seed=args.seed).to(device)
    fast = ghostfast.convert(model, backend=args.backend)
    report = fast.ghostfast_report
    whole = sum("whole bottleneck" in kind for _, kind in report.converted)
    print(f"converted {len(report.converted) - whole} Ghost modules, skipped {len(report.skipped)}; "
          f"{whole} bottlenecks whole, {len(report.per_module)} per module")
    x = torch.randn(args.batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(1))
    with torch.inference_mode():
        ref = model(x)
        t0 = time.perf_counter()
        out = fast(x)
        first_call_ms = (time.perf_counter() - t0) * 1e3
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        reps = args.reps or (20 if device.type == "cuda" else 5)
        model(x)  # warm-up; the converted model was warmed up (and its kernels compiled) by the check above
        eager_ms = _time_ms(lambda: model(x), reps, device)
        # Under the interpreter the checked call is the timing: it measures the interpreter, not the kernels.
        fast_ms = [first_call_ms] if interpreted else _time_ms(lambda: fast(x), reps, device)
    label = f"ghostfast [{backend}{', CPU interpreter' if interpreted else ''}]"
    rows = [("eager PyTorch", statistics.median(eager_ms)), (label, statistics.median(fast_ms))]
    print()
    print(f"{'model':38s} {'median ms':>10s} {'speedup':>8s}")
    for name, ms in rows:
        print(f"{name:38s} {ms:10.2f} {rows[0][1] / ms:7.2f}x")
    if interpreted:
        print("(no GPU: the Triton kernels ran under the CPU interpreter, which checks correctness, not speed)")
    ok = rel <= 1e-4 if x.dtype == torch.float32 else rel <= 1e-2
    print(f"\nrelative error vs eager: {rel:.2e} ({'OK' if ok else 'FAIL'}, bound 1e-4)")
    return 0 if ok else 1


def _benchmarks_module():
    """`benchmarks.run` from the repository root (benchmarks/ is not part of the installed package; the editable
    install leaves the repository beside the package), or None when this is not a repository checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        return None
    if root not in sys.path:
        sys.path.insert(0, root)
    import benchmarks.run

    return benchmarks.run


def cmd_bench(args) -> int:
    if getattr(args, "bench_import_error", None):
        print(f"the benchmarks cannot be imported: {args.bench_import_error}", file=sys.stderr)
        return 1
    return _benchmarks_module().run(args)


def ghostfast_backend_names() -> tuple:
    from ghostfast.backends import BACKEND_NAMES

    return BACKEND_NAMES


def main(argv=None) -> int:
    _prepare_triton_env()
    parser = argparse.ArgumentParser(prog="python -m ghostfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends, versions, device")
    demo = sub.add_parser("demo", help="convert timm ghostnetv2_100, check it against eager, time both")
    demo.add_argument("--model", default="ghostnetv2_100", choices=("ghostnet_100", "ghostnetv2_100",
                                                                     "ghostnetv3_100"))
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--size", type=int, default=None,
                      help="input H=W (default 224; 64 when the Triton interpreter runs the kernels)")
    demo.add_argument("--device", default=None)
    demo.add_argument("--backend", default=None, choices=ghostfast_backend_names())
    demo.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on GPU, 5 on CPU)")
    demo.add_argument("--seed", type=int, default=0)
    try:
        bench_module = _benchmarks_module()
    except Exception as e:  # a broken benchmarks/ must not break info and demo; `bench` reports it
        bench_module, bench_error = None, f"{type(e).__name__}: {e}"
    else:
        bench_error = None if bench_module is not None else "benchmarks/ is not beside the package (no checkout)"
    bench = sub.add_parser("bench", help="op and model benchmarks -> CSV files and plots (see README)")
    if bench_module is not None:
        bench_module.add_arguments(bench)
    bench.set_defaults(bench_import_error=bench_error)
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
