#!/usr/bin/env python3
"""compute-sanitizer (memcheck, racecheck) over one small case per CUDA kernel of the `cuda` backend: the sanitizer
stage of scripts/gpu_run.sh.

  gpu_sanitize.py cases [--device cuda] [--backend cuda]
      runs each case once through `ghostfast.ops` in float32 and checks it against the float64 reference on the CPU:
      the Ghost module forward (ghost_forward_kernel, both channel-block widths, with and without a gate) and backward
      (ghost_backward_kernel, conv1x1_grad_input_kernel, conv1x1_grad_weight_kernel), the DFC forward
      (dfc_forward_kernel, each mode) and backward (dfc_backward_kernel and its conv1x1 gradient kernels).
      Exit status 1 if a case fails or disagrees. `--device cpu --backend cpu` runs the same cases on the CPU (the
      plumbing, without a GPU).
  gpu_sanitize.py run --out DIR [--tools memcheck,racecheck] [--timeout-s S] [--deadline UNIX_S] [--no-sanitizer]
      runs `cases` under each tool in its own process (a process group, killed at its timeout), the log in
      DIR/sanitize_<tool>.log, the tools' summaries in DIR/sanitize_summary.txt. --no-sanitizer runs the cases
      without a tool (the plumbing, on a machine without compute-sanitizer).

Small inputs keep the instrumented runs short: racecheck tracks every shared-memory access. Every kernel the cases
launch is instrumented (torch's own are few: copies, fills, the reductions of the BatchNorm gradients);
GHOSTFAST_SANITIZE_FILTER=1 restricts the tools to ghostfast's kernels (--kernel-regex), retried without the filter
if the tool refuses it. The sanitizer refuses some virtualised machines
('Device not supported', seen on gVisor): recorded as such, not as a kernel error."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a memcheck / racecheck / synccheck report about a kernel's own accesses (not a failed CUDA API call)
KERNEL_ERROR = re.compile(r"Invalid __\w+__ (read|write)|Out-of-range|Misaligned|Race reported|Hazard|hazard detected|"
                          r"Barrier error|Uninitialized __global__|Malloc/Free|Address .* is out of bounds")
KERNELS = ("ghost_forward_kernel", "ghost_backward_kernel", "dfc_forward_kernel", "dfc_backward_kernel",
           "conv1x1_grad_input_kernel", "conv1x1_grad_weight_kernel")


# ---- the cases ----------------------------------------------------------------------------------------------------

def _cases():
    """(name, op, kwargs builder) for each case; shapes small and odd (edges of tiles), channels below and above the
    forward's 8-channel block."""
    return [
        ("ghost fwd+bwd: 8 init channels (CB=8), ratio 2, dw 3, no gate, 9x11",
         "ghost", dict(n=2, c_in=6, out=16, ratio=2, dw=3, h=9, w=11, relu=True, gate=None, cl=False)),
        ("ghost fwd+bwd: 14 init channels (wide CB), ratio 3, dw 3, bilinear gate, channels_last, 10x7",
         "ghost", dict(n=2, c_in=12, out=40, ratio=3, dw=3, h=10, w=7, relu=True, gate="bilinear", cl=True)),
        ("ghost fwd+bwd: 12 init channels, ratio 2, dw 5, nearest gate, no relu, 8x8",
         "ghost", dict(n=1, c_in=8, out=24, ratio=2, dw=5, h=8, w=8, relu=False, gate="nearest", cl=False)),
        ("dfc fwd+bwd: mode gate, 14x14", "dfc", dict(n=2, c_in=16, c=16, h=14, w=14, mode="gate", cl=False)),
        ("dfc fwd+bwd: mode nearest, odd 7x9", "dfc", dict(n=2, c_in=8, c=16, h=7, w=9, mode="nearest", cl=False)),
        ("dfc fwd+bwd: mode bilinear, channels_last, 12x10",
         "dfc", dict(n=1, c_in=16, c=24, h=12, w=10, mode="bilinear", cl=True)),
    ]


def _bn(c, gen):
    import torch

    from ghostfast.reference import BatchNormParams

    return BatchNormParams(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
                           torch.randn(c, generator=gen, dtype=torch.float64) * 0.5,
                           torch.randn(c, generator=gen, dtype=torch.float64) * 0.5,
                           torch.rand(c, generator=gen, dtype=torch.float64) + 0.5, 1e-5)


def _inputs(op, p, gen):
    """float64 CPU leaves: (x, [weights and BatchNorm tensors], call(x, params, backend), output grad shape)."""
    import torch

    from ghostfast import ops
    from ghostfast.reference import BatchNormParams

    x = torch.randn(p["n"], p["c_in"], p["h"], p["w"], generator=gen, dtype=torch.float64)
    if op == "ghost":
        init = -(-p["out"] // p["ratio"])
        cheap = init * (p["ratio"] - 1)
        w1 = torch.randn(init, p["c_in"], 1, 1, generator=gen, dtype=torch.float64) / p["c_in"] ** 0.5
        w2 = torch.randn(cheap, 1, p["dw"], p["dw"], generator=gen, dtype=torch.float64) / p["dw"]
        leaves = [x, w1, *_bn(init, gen)[:4], w2, *_bn(cheap, gen)[:4]]
        if p["gate"]:
            leaves.append(torch.rand(p["n"], p["out"], (p["h"] + 1) // 2, (p["w"] + 1) // 2, generator=gen,
                                     dtype=torch.float64))

        def call(t, backend):
            gate = t[11] if p["gate"] else None
            return ops.ghost_module(t[0], t[1], BatchNormParams(*t[2:6], 1e-5), t[6], BatchNormParams(*t[7:11], 1e-5),
                                    p["out"], p["relu"], gate, p["gate"] or "nearest", backend=backend, strict=True)

        return leaves, call
    c = p["c"]
    cw = torch.randn(c, p["c_in"], 1, 1, generator=gen, dtype=torch.float64) / p["c_in"] ** 0.5
    hw = torch.randn(c, 1, 1, 5, generator=gen, dtype=torch.float64) / 5 ** 0.5
    vw = torch.randn(c, 1, 5, 1, generator=gen, dtype=torch.float64) / 5 ** 0.5
    leaves = [x, cw, *_bn(c, gen)[:4], hw, *_bn(c, gen)[:4], vw, *_bn(c, gen)[:4]]

    def call(t, backend):
        bns = [BatchNormParams(*t[i:i + 4], 1e-5) for i in (2, 7, 12)]
        return ops.dfc(t[0], t[1], bns[0], t[6], bns[1], t[11], bns[2], p["mode"], backend=backend, strict=True)

    return leaves, call


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_case(name, op, p, device, backend, gen):
    import torch

    leaves, call = _inputs(op, p, gen)
    ref_leaves = [t.clone().requires_grad_(True) for t in leaves]
    ref = call(ref_leaves, "reference")
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(grad)

    def to_dev(t, i):
        t = t.to(device=device, dtype=torch.float32)
        if p["cl"] and t.dim() == 4 and i == 0:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(True)

    dev_leaves = [to_dev(t, i) for i, t in enumerate(leaves)]
    out = call(dev_leaves, backend)
    out.backward(grad.to(device=device, dtype=torch.float32))
    if device == "cuda":
        torch.cuda.synchronize()
    errs = {"out": _rel(out.detach(), ref.detach())}
    for i, (d, r) in enumerate(zip(dev_leaves, ref_leaves)):
        if r.grad is not None:
            errs[f"grad{i}"] = _rel(d.grad, r.grad) if d.grad is not None else float("nan")
    worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
    ok = all(e <= 1e-4 for e in errs.values())  # float32 vs float64; NaN fails
    return ok, f"max rel err {errs[worst]:.1e} ({worst}; out {errs['out']:.1e})"


def cmd_cases(args) -> int:
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    failed = 0
    for name, op, p in _cases():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t0 = time.perf_counter()
        try:
            ok, what = run_case(name, op, p, args.device, args.backend, gen)
        except Exception as e:  # noqa: BLE001 - report every case
            ok, what = False, f"{type(e).__name__}: {e}"
        failed += not ok
        print(f"case {'ok  ' if ok else 'FAIL'} {name}: {what} [{time.perf_counter() - t0:.1f} s]", flush=True)
    print(f"cases: {len(_cases()) - failed} ok, {failed} failed (backend {args.backend}, {args.device})", flush=True)
    return 1 if failed else 0


# ---- the sanitizer runs -------------------------------------------------------------------------------------------

def _summary_lines(text):
    keep = [line.strip() for line in text.splitlines()
            if re.search(r"(ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|Device not supported|"
                         r"No supported devices|not supported on this|^case |^cases:|Error: )", line.strip())]
    return keep


def _sanitizer_supports(sanitizer, option):
    try:
        out = subprocess.run([sanitizer, "--help"], capture_output=True, text=True, timeout=60)
        return option in out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run_logged(cmd, log, limit, mode="w", header=""):
    """(exit status or 'timeout', the log's text) of `cmd` run with its output in `log`, killed (its process group)
    after `limit` seconds."""
    with open(log, mode) as f:
        f.write(header + "$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    with open(log, errors="replace") as f:
        return rc, f.read()


def cmd_run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    sanitizer = None if args.no_sanitizer else (shutil.which("compute-sanitizer") or
                                                next((p for p in ("/usr/local/cuda/bin/compute-sanitizer",)
                                                      if os.path.exists(p)), None))
    lines, status = [], 0
    if not args.no_sanitizer and sanitizer is None:
        lines.append("sanitize: compute-sanitizer not found on PATH or in /usr/local/cuda/bin: not run")
        status = 2
    tools = [t for t in args.tools.split(",") if t] if sanitizer or args.no_sanitizer else []
    # Every kernel is instrumented unless GHOSTFAST_SANITIZE_FILTER=1: a filter whose spelling the tool took but
    # matched nothing would report a clean run that checked nothing. The cases launch few of torch's own kernels.
    regex = bool(sanitizer) and os.environ.get("GHOSTFAST_SANITIZE_FILTER") == "1" and \
        _sanitizer_supports(sanitizer, "--kernel-regex")
    cases = [sys.executable, os.path.abspath(__file__), "cases", "--device", args.device, "--backend", args.backend]
    for tool in tools:
        left = (args.deadline - time.time()) if args.deadline else args.timeout_s
        limit = min(args.timeout_s, left)
        if limit < 15:
            lines.append(f"sanitize {tool}: not run, {max(limit, 0):.0f} s left before the stage's deadline")
            status = status or 2
            continue
        cmd = list(cases)
        if sanitizer:
            cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "30"] + \
                (["--kernel-regex", "kns=" + "|".join(KERNELS)] if regex else []) + \
                cmd
        log = os.path.join(args.out, f"sanitize_{tool}.log")
        t0 = time.time()
        rc, text = _run_logged(cmd, log, limit)
        if regex and rc not in (0, 86, "timeout") and "case " not in text and time.time() - t0 < 30:
            # the kernel filter refused (an option spelling this sanitizer does not take): instrument everything
            cmd = [c for c in cmd if c != "--kernel-regex" and not c.startswith("kns=")]
            regex = False
            rc, text = _run_logged(cmd, log, min(limit, args.deadline - time.time() if args.deadline else limit),
                                   "a", "# --kernel-regex refused: again without it\n")
        found = _summary_lines(text)
        unsupported = any("not supported" in s.lower() or "no supported devices" in s.lower() for s in found)
        kernel_errors = [line.strip() for line in text.splitlines() if KERNEL_ERROR.search(line)]
        api_errors = sum(1 for line in text.splitlines() if "Program hit" in line)
        verdict = ("TIMEOUT" if rc == "timeout" else "DEVICE NOT SUPPORTED" if unsupported else
                   "clean" if rc == 0 else f"KERNEL ERRORS ({len(kernel_errors)} reports)" if kernel_errors else
                   f"API errors only ({api_errors}: CUDA calls that failed, e.g. torch probing; see the log)"
                   if rc == 86 and api_errors else f"FAILED (exit {rc})")
        found = kernel_errors[:6] + found
        if rc != 0:
            status = 1
        how = "no sanitizer" if not sanitizer else tool + (" (ghostfast kernels only)" if regex else "")
        lines.append(f"sanitize {tool}: {verdict} [{how}, {time.time() - t0:.0f} s, limit {limit:.0f} s] -> "
                     f"{os.path.basename(log)}")
        lines += [f"    {s}" for s in found]
    with open(os.path.join(args.out, "sanitize_summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cases = sub.add_parser("cases")
    run = sub.add_parser("run")
    for p in (cases, run):
        p.add_argument("--device", default="cuda")
        p.add_argument("--backend", default="cuda")
    run.add_argument("--out", required=True)
    run.add_argument("--tools", default="memcheck,racecheck")
    run.add_argument("--timeout-s", type=float, default=150.0, help="per tool (default 150)")
    run.add_argument("--deadline", type=float, default=None, help="no tool starts or runs past this (Unix s)")
    run.add_argument("--no-sanitizer", action="store_true", help="run the cases without a tool (plumbing check)")
    args = parser.parse_args(argv)
    if args.cmd == "cases":
        sys.path.insert(0, ROOT)
        return cmd_cases(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
