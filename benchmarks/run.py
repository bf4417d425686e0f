"""`python -m ghostfast bench`: choose the cases for the device (quick or full), run them within a time budget,
append the rows to `<out>/<device>/<suite>.csv`, then draw the plots from those files."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Sequence

import torch

from . import report
from .measure import TimingBudget, copy_bandwidth_gbps, environment
from .memory import COLUMNS as MEMORY_COLUMNS
from .memory import memory_plan, run_memory_case
from .models import ModelCase, run_model_case
from .ops import DIRECTIONS, OpCase, ghostfast_backends, ops_for_shape, run_op_case
from .shapes import GhostShape, ghost_shapes

SUITES = ("ops", "models", "memory")

# Per-provider timing: quick runs time each provider for ~0.1 s, full runs a little longer. On CUDA these are
# do_bench's warm-up and repetition windows in milliseconds (it flushes L2 before each call).
OP_TIMING = {
    ("cpu", True): TimingBudget(warmup_ms=20, target_ms=100, min_reps=10, max_reps=200),
    ("cpu", False): TimingBudget(warmup_ms=50, target_ms=300, min_reps=15, max_reps=500),
    ("cuda", True): TimingBudget(warmup_ms=2, target_ms=5, min_reps=10, max_reps=100),
    ("cuda", False): TimingBudget(warmup_ms=3, target_ms=10, min_reps=20, max_reps=200),
}
MODEL_TIMING = {
    ("cpu", True): TimingBudget(warmup_ms=300, target_ms=1500, min_reps=8, max_reps=50),
    ("cpu", False): TimingBudget(warmup_ms=500, target_ms=4000, min_reps=10, max_reps=100),
    ("cuda", True): TimingBudget(warmup_ms=20, target_ms=100, min_reps=10, max_reps=100),
    ("cuda", False): TimingBudget(warmup_ms=50, target_ms=300, min_reps=20, max_reps=200),
}
# Default wall-clock budget per suite in seconds (None: unlimited). Cases run in priority order, so a budget
# cuts the least important ones; skipped cases are listed in <out>/<device>/skipped_<suite>.txt.
DEFAULT_BUDGET_S = {
    ("cpu", True): {"ops": None, "models": None, "memory": 120},
    ("cpu", False): {"ops": 1800, "models": 1200, "memory": 1500},
    ("cuda", True): {"ops": 240, "models": 240, "memory": 60},
    ("cuda", False): {"ops": 420, "models": 300, "memory": 120},
}


# ------------------------------------------------------------------------------------------------------------
# The plans: which cases run, most important first.
# ------------------------------------------------------------------------------------------------------------


def _op_cases(shapes: Sequence[GhostShape], batches, dtypes, layouts, directions, providers: Callable) -> List[OpCase]:
    cases = []
    for direction in directions:
        for dtype in dtypes:
            for layout in layouts:
                for batch in batches:
                    for shape in shapes:
                        for op in ops_for_shape(shape):
                            case = OpCase(op, shape, batch, dtype, layout, direction, ())
                            case.providers = tuple(providers(case))
                            cases.append(case)
    return cases


def _dedupe(cases: List[OpCase]) -> List[OpCase]:
    """One case per configuration. A configuration listed again later with more providers moves to that later
    place with the union of providers (an expensive provider is planned late on purpose)."""
    by_key = {}
    for c in cases:
        key = (c.op, c.shape.key, c.batch, c.dtype, c.layout, c.direction)
        earlier = by_key.pop(key, None)
        if earlier is not None and set(c.providers) <= set(earlier.providers):
            by_key[key] = earlier
            continue
        if earlier is not None:
            c.providers = tuple(dict.fromkeys(earlier.providers + c.providers))
        by_key[key] = c
    order = {id(c): i for i, c in enumerate(cases)}
    return sorted(by_key.values(), key=lambda c: order[id(c)])


def op_plan(device: torch.device, quick: bool, shapes: Sequence[GhostShape]) -> List[OpCase]:
    """Quick: batch 1 (CPU) or 256 (CUDA), float32 (CPU) or float16 (CUDA), contiguous, forward.
    Full CPU: batch 1 and 8, float32 and float16, both layouts, all directions, torch.compile on float32
    contiguous forward. Full CUDA: batch 1, 32, 256, float32/float16/bfloat16, both layouts, all directions;
    torch.compile (default mode) at batch 256 float16 contiguous (forward, forward+backward), max-autotune on
    the largest shape with and without attention (each such compile takes tens of seconds). Forward first (the
    backward has no fused kernels yet): a time budget cuts the tail, the backward at small batches."""
    backends = [f"ghostfast-{b}" for b in ghostfast_backends(device)]
    fast = [b for b in backends if b != "ghostfast-reference"]

    def base(case: OpCase, compile_modes=()) -> List[str]:
        providers = ["eager", *compile_modes]
        # The reference backend is the fallback; where a fused backend exists its backward is eager's, so it is
        # timed forward only.
        providers += backends if (not fast or case.direction == "forward") else fast
        if case.op != "dfc_gate":
            providers.append("conv1x1")
        return providers

    with_compile = lambda case: base(case, ("compile",))  # noqa: E731
    if device.type == "cpu":
        if quick:
            return _op_cases(shapes, [1], ["float32"], ["contiguous"], ["forward"], base)
        return _dedupe(
            _op_cases(shapes, [1, 8], ["float32"], ["contiguous"], ["forward"], with_compile)
            + _op_cases(shapes, [1, 8], ["float32", "float16"], ["contiguous", "channels_last"], DIRECTIONS,
                        base))
    if quick:
        return _op_cases(shapes, [256], ["float16"], ["contiguous"], ["forward"], with_compile)
    autotune_shapes = _one_per_op(shapes)
    all_dtypes = ["float16", "float32", "bfloat16"]
    both_layouts = ["contiguous", "channels_last"]
    return _dedupe(
        _op_cases(shapes, [256], ["float16"], ["contiguous"], ["forward"], with_compile)
        + _op_cases(shapes, [256], ["float32", "bfloat16"], ["contiguous"], ["forward"], base)
        + _op_cases(shapes, [32, 1], all_dtypes, both_layouts, ["forward"], base)
        + _op_cases(shapes, [256], all_dtypes, ["channels_last"], ["forward"], base)
        + _op_cases(autotune_shapes, [256], ["float16"], ["contiguous"], ["forward"],
                    lambda case: base(case, ("compile", "compile-max-autotune")))
        + _op_cases(shapes, [256], ["float16"], ["contiguous"], ["forward+backward"], with_compile)
        + _op_cases(shapes, [256, 32], all_dtypes, both_layouts, ["forward+backward", "backward"], base)
        + _op_cases(shapes, [1], all_dtypes, both_layouts, ["forward+backward", "backward"], base))


def _one_per_op(shapes: Sequence[GhostShape]) -> List[GhostShape]:
    """For max-autotune: the largest-activation shape with attention and the one without."""
    def activation(s):
        return s.in_chs * s.H * s.W
    picked = []
    for attention in (False, True):
        candidates = [s for s in shapes if s.has_attention == attention]
        if candidates:
            picked.append(max(candidates, key=activation))
    return picked


def model_plan(device: torch.device, quick: bool, models: Sequence[str]) -> List[ModelCase]:
    """Quick: ghostnetv2_100 inference (batch 1 on CPU, 256 float16 on CUDA, + compile on CUDA). Full: every
    model, inference and an SGD training step, with and without torch.compile, headline configurations first."""
    every = ("eager", "compile", "converted", "converted+compile")
    no_compile = ("eager", "converted")
    first = "ghostnetv2_100" if "ghostnetv2_100" in models else models[0]
    ordered = [first] + [m for m in models if m != first]
    if device.type == "cpu":
        if quick:
            return [ModelCase(first, "inference", 1, "float32", "contiguous", no_compile)]
        return ([ModelCase(m, "inference", 1, "float32", "contiguous", every) for m in ordered]
                + [ModelCase(m, "train_step", 8, "float32", "contiguous", every) for m in ordered]
                + [ModelCase(m, "inference", 8, "float32", "contiguous", no_compile) for m in ordered])
    if quick:
        return [ModelCase(first, "inference", 256, "float16", "contiguous", every)]
    return ([ModelCase(m, "inference", 256, "float16", "contiguous", every) for m in ordered]
            + [ModelCase(m, "inference", 1, "float32", "contiguous", no_compile) for m in ordered]
            + [ModelCase(m, "inference", 256, "float32", "contiguous", no_compile) for m in ordered]
            + [ModelCase(m, "inference", 256, "float16", "channels_last", no_compile) for m in ordered]
            + [ModelCase(first, "train_step", 128, "float32", "contiguous", every)]
            # converted+compile of a training step: timed on the first model only (the device-time budget)
            + [ModelCase(m, "train_step", 128, "float32", "contiguous", ("eager", "converted", "compile"))
               for m in ordered[1:]])


# ------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------


def _progress(cases: list, desc: str):
    """tqdm when installed; otherwise one plain line per case."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(cases, desc=desc, unit="case", file=sys.stderr)
        for case in bar:
            bar.set_postfix_str(case.label, refresh=False)
            yield case
        return
    start = time.monotonic()
    for i, case in enumerate(cases):
        print(f"[{desc} {i + 1}/{len(cases)} {time.monotonic() - start:6.0f}s] {case.label}", flush=True)
        yield case


def run_suite(suite: str, cases: list, run_case: Callable, out_dir: str, env: dict, budget_s,
              columns=report.COLUMNS) -> int:
    """Run `cases` in order, appending each case's rows as soon as they exist (a killed run keeps them)."""
    path = report.csv_path(out_dir, env["device"], suite)
    start = time.monotonic()
    skipped, done = [], 0
    for case in _progress(cases, suite):
        if budget_s is not None and time.monotonic() - start > budget_s:
            skipped.append(case.label)
            continue
        try:
            rows = run_case(case)
        except Exception as e:  # noqa: BLE001 - one broken case must not lose a GPU lease's remaining cases
            print(f"{suite}: case failed, skipped: {case.label}: {type(e).__name__}: {e}", flush=True)
            continue
        report.append_rows(path, rows, env, columns)
        done += 1
    print(f"{suite}: {done} cases in {time.monotonic() - start:.0f} s -> {path}")
    if skipped:
        skipped_path = os.path.join(os.path.dirname(path), f"skipped_{suite}.txt")
        with open(skipped_path, "a") as f:
            f.write(f"# run {env['run_id']}: budget {budget_s} s reached, {len(skipped)} cases not run\n")
            f.write("\n".join(skipped) + "\n")
        print(f"{suite}: time budget of {budget_s} s reached, {len(skipped)} cases skipped (listed in "
              f"{skipped_path})")
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small plan: CPU batch 1 float32 contiguous forward ops + ghostnetv2_100 inference")
    parser.add_argument("--suite", choices=SUITES + ("all",), default="all",
                        help="ops, models, memory (tensors saved for the backward, peak CUDA memory), or all")
    parser.add_argument("--out", default=None, help=f"results root (default {report.RESULTS_DIR}); rows go to "
                                                    "OUT/<device>/<suite>.csv, plots beside them")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads; default: all cores), recorded in every row")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget per suite in seconds (default: none for --quick on CPU, 30/20 min "
                             "for a full CPU run, 7/5 min on CUDA); 0 = unlimited")
    parser.add_argument("--max-shapes", type=int, default=None,
                        help="only the first N distinct Ghost-module shapes (env GHOSTFAST_BENCH_MAX_SHAPES)")
    parser.add_argument("--models", default=None,
                        help="comma-separated timm model names (default: ghostnet_100,ghostnetv2_100,ghostnetv3_100)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    parser.add_argument("--plot-only", action="store_true", help="only draw the plots from OUT's CSV files")
    parser.add_argument("--update-readme", action="store_true",
                        help="rewrite README.md's benchmark section from benchmarks/results and exit")


def run(args: argparse.Namespace) -> int:
    from ghostfast.models import TIMM_GHOSTNETS

    out_dir = os.path.abspath(args.out or report.RESULTS_DIR)
    if args.update_readme:
        readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
        report.update_readme(readme, report.RESULTS_DIR)
        print(f"updated the benchmark section of {readme}")
        return 0
    if args.plot_only:
        if not os.path.isdir(out_dir):
            print(f"no results folder {out_dir}")
            return 1
        for device in sorted(os.listdir(out_dir)):
            if os.path.isdir(os.path.join(out_dir, device)):
                for png in report.plot_device(os.path.join(out_dir, device)):
                    print(f"plot: {png}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    # float32 is compared in IEEE precision on every provider: ghostfast's kernels use IEEE dots by default, while
    # eager cuDNN convolutions would silently use TF32 (a different, ~1e-3 accurate, computation).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    suites = SUITES if args.suite == "all" else (args.suite,)
    models = tuple(args.models.split(",")) if args.models else TIMM_GHOSTNETS
    max_shapes = args.max_shapes or int(os.environ.get("GHOSTFAST_BENCH_MAX_SHAPES", "0")) or None
    key = (device.type, bool(args.quick))
    budgets = dict(DEFAULT_BUDGET_S[key])
    if args.budget_s is not None:
        budgets = {s: (args.budget_s or None) for s in SUITES}
    plans = {}
    if "ops" in suites:
        shapes = ghost_shapes()[:max_shapes] if max_shapes else ghost_shapes()
        plans["ops"] = op_plan(device, args.quick, shapes)
    if "models" in suites:
        plans["models"] = model_plan(device, args.quick, models)
    if "memory" in suites:
        shapes = ghost_shapes()[:max_shapes] if max_shapes else ghost_shapes()
        plans["memory"] = memory_plan(device, args.quick, shapes, models)
    if args.dry_run:
        for suite, cases in plans.items():
            print(f"{suite}: {len(cases)} cases (budget {budgets[suite]} s)")
            for case in cases:
                print(f"  {case.label}: {', '.join(case.providers)}")
        return 0
    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"ghostfast bench on {env['device']} ({device}), {env['threads']} threads, copy bandwidth "
          f"{copy_gbps:.1f} GB/s, backends {', '.join(ghostfast_backends(device))}, git {env['git_sha']}")
    if "ops" in plans:
        budget = OP_TIMING[key]
        run_suite("ops", plans["ops"], lambda case: run_op_case(case, device, budget, copy_gbps), out_dir, env,
                  budgets["ops"])
    if "models" in plans:
        budget = MODEL_TIMING[key]
        run_suite("models", plans["models"], lambda case: run_model_case(case, device, budget), out_dir, env,
                  budgets["models"])
    if "memory" in plans:
        run_suite("memory", plans["memory"], lambda case: run_memory_case(case, device), out_dir, env,
                  budgets["memory"], MEMORY_COLUMNS)
    for png in report.plot_device(os.path.join(out_dir, env["device"])):
        print(f"plot: {png}")
    return 0
