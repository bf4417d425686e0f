"""Ahead-of-time compile, for sm_90 and without a GPU, of every Triton kernel variant the launch wrappers of
`kernels/` pick for GhostNet's shapes, with the registers, spills and shared memory each needs.

How: a stand-in Triton driver whose target is `GPUTarget("cuda", 90, 32)` replaces the GPU's; the real wrappers
(`ghost_module_forward`, `ghost_module_stats`, `ghost_module_backward`, `ghost_module_stats_backward`,
`dfc_forward`, `dfc_backward`: what `ghostfast/backend_triton.py` calls) run on meta tensors with TRITON_INTERPRET
unset, so they choose the GPU's configs and Triton's own binder specialises the arguments as it would for CUDA
tensors (an int equal to 1 becomes a constant, one divisible by 16 gets the divisibility hint, every pointer is
16-byte aligned). Triton's `jit_cache_hook` records each launch (signature, constants, attributes, num_warps,
num_stages) and skips it; each distinct launch is then compiled with `triton.compile` (ASTSource) down to a
cubin by the bundled ptxas, whose `-v` log gives registers and spills; `metadata.shared` is the shared memory the
launch asks for. A compile error, or shared memory above sm_90's opt-in limit (232,448 B), fails the run.

    python scripts/aot_sm90.py [--jobs 2]           # the committed table (make aot-sm90), see `select`
    python scripts/aot_sm90.py --set ci --out DIR   # the CI subset (tests/test_aot_sm90.py)

The cases: every distinct Ghost module (and DFC branch) of timm's ghostnet_100 / ghostnetv2_100 / ghostnetv3_100
at 224x224 (`benchmarks/shapes.py`) at batch 1, 32 and 256; each in float32, float16, bfloat16 and float64
(half inputs with BatchNorm vectors in their own dtype and in float32, as under autocast); the forward without a
gate and with a nearest and a bilinear gate, each module's own activation (the edge shapes: all five); the
statistics variants of both stages; the backward for every combination of the gradients that change the kernel (x,
primary weight, gate); the DFC in its three modes, forward and backward (x, conv weight). Plus a few awkward shapes (1-pixel images and gates, 2x2 and
3x3 DFC inputs) where Triton's specialisation of ints equal to 1 changes the program.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Tuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # the kernel modules must be imported with the real JIT, not the interpreter: run again without it
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

SM90_SMEM_LIMIT = 232448  # bytes of shared memory one block may opt in to on sm_90 (227 KB)
REG_CAP = 255
TARGET = GPUTarget("cuda", 90, 32)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BATCHES = (1, 32, 256)
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "sm90-static")
CSV_NAME = "triton_sm90.csv"
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# the constexprs that are tile / block choices of the config functions (the rest are flags)
CONFIG_KEYS = ("HALO_H", "HALO_W", "MARGIN_H", "MARGIN_W", "TILE_H", "TILE_W", "DW", "BLOCK_C", "BLOCK_K",
               "FULL_ROWS", "FULL_W", "CPAD")


# ---- capturing the launches -------------------------------------------------------------------------------------


class StandInDriver:
    """Just enough of a Triton GPU driver for the JIT to bind arguments and pick options for sm_90."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


class Recorder:
    """Triton's jit_cache_hook: records each launch the wrappers make (with the case driving it) and skips it."""

    def __init__(self):
        self.case = None
        self.launches: List[Tuple[dict, object, dict]] = []

    def __call__(self, *, fn, compile, **_):
        self.launches.append((self.case, fn.jit_function, compile))
        return True  # compiled (or not) later, once per distinct launch; nothing runs


def _bn(c: int, dtype, device="meta"):
    return tuple(torch.empty(c, dtype=dtype, device=device) for _ in range(4)) + (1e-5,)


def _half(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ghost_cases(shape, n: int, dtype) -> Iterable[Tuple[dict, Callable]]:
    """(label, call) for every launch variant of one Ghost module shape, batch and dtype."""
    from ghostfast.kernels import ghost_module as gm

    cin, out_c, ratio, dw, h, w = shape["in_chs"], shape["out_chs"], shape["ratio"], shape["dw"], shape["H"], \
        shape["W"]
    init = math.ceil(out_c / ratio)
    cheap = init * (ratio - 1)
    hg, wg = shape.get("Hg", max(1, h // 2)), shape.get("Wg", max(1, w // 2))
    e = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    x, w1, w2 = e(n, cin, h, w), e(init, cin, 1, 1), e(cheap, 1, dw, dw)
    # as the models run them: a gate on the attention modules only (nearest as timm, bilinear as the paper), each
    # module's own activation (relu or none); the edge shapes take every combination and every activation
    if shape.get("attention") is None:
        gates = {"none": None, "nearest": e(n, out_c, hg, wg), "bilinear": e(n, out_c, hg, wg)}
    elif shape["attention"]:
        gates = {"nearest": e(n, out_c, hg, wg), "bilinear": e(n, out_c, hg, wg)}
    else:
        gates = {"none": None}
    acts = gm.ACTIVATIONS if shape.get("relu") is None else ("relu" if shape["relu"] else "none",)
    base = dict(shape=shape["label"], N=n, dtype=DTYPE_NAME[dtype])
    bn_dtypes = (dtype, torch.float32) if _half(dtype) else (dtype,)
    for act in acts:
        for gate_mode, g in gates.items():
            for bdt in bn_dtypes:
                yield (dict(base, op="ghost_module", direction="forward", variant="eval", gate=gate_mode, act=act,
                            bn_dtype=DTYPE_NAME[bdt]),
                       lambda g=g, gate_mode=gate_mode, act=act, bdt=bdt: gm.ghost_module_forward(
                           x, w1, _bn(init, bdt), w2, _bn(cheap, bdt), out_c, act, g,
                           "nearest" if gate_mode == "none" else gate_mode))
        for stage in (1, 2):
            yield (dict(base, op="ghost_module", direction="forward", variant=f"stats{stage}", gate="none",
                        act=act, bn_dtype=DTYPE_NAME[dtype]),
                   lambda stage=stage, act=act: gm.ghost_module_stats(x, w1, _bn(init, dtype), w2, act, stage))
        acc = _acc(dtype)
        s1, b1, s2, b2 = e(init, dt=acc), e(init, dt=acc), e(cheap, dt=acc), e(cheap, dt=acc)
        go = e(n, out_c, h, w)
        for gate_mode, g in gates.items():
            for need_x, need_w1, need_g in itertools.product((True, False), repeat=3):
                if g is None and need_g:
                    continue
                needs = (need_x, need_w1, True, True, True, True, True, need_g)
                yield (dict(base, op="ghost_module", direction="backward", variant="eval", gate=gate_mode, act=act,
                            needs=_needs_label(x=need_x, w1=need_w1, gate=need_g if g is not None else None)),
                       lambda g=g, gate_mode=gate_mode, needs=needs, act=act: gm.ghost_module_backward(
                           go, x, w1, s1, b1, w2, s2, b2, out_c, act, g,
                           "nearest" if gate_mode == "none" else gate_mode, needs))
        for stage in (1, 2):
            for need_x, need_w1 in itertools.product((True, False), repeat=2):
                needs = (need_x, need_w1, True, True, True)
                yield (dict(base, op="ghost_module", direction="backward", variant=f"stats{stage}", gate="none",
                            act=act, needs=_needs_label(x=need_x, w1=need_w1)),
                       lambda stage=stage, needs=needs, act=act: gm.ghost_module_stats_backward(
                           x, w1, s1, b1, w2, act, stage, e(init if stage == 1 else cheap, dt=acc),
                           e(init if stage == 1 else cheap, dt=acc), e(init if stage == 1 else cheap, dt=acc), needs))


def dfc_cases(shape, n: int, dtype) -> Iterable[Tuple[dict, Callable]]:
    """(label, call) for every launch variant of one DFC branch (GhostModuleV2's short_conv), batch and dtype."""
    from ghostfast.kernels import dfc

    cin, c, h, w = shape["in_chs"], shape["out_chs"], shape["H"], shape["W"]
    e = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    x, cw, hw, vw = e(n, cin, h, w), e(c, cin, 1, 1), e(c, 1, 1, 5), e(c, 1, 5, 1)
    base = dict(shape=shape["label"], N=n, dtype=DTYPE_NAME[dtype], act=None)
    bn_dtypes = (dtype, torch.float32) if _half(dtype) else (dtype,)
    acc = _acc(dtype)
    vec = [e(c, dt=acc) for _ in range(6)]
    for mode in ("gate", "nearest", "bilinear"):
        for bdt in bn_dtypes:
            yield (dict(base, op="dfc", direction="forward", variant="eval", gate=mode, bn_dtype=DTYPE_NAME[bdt]),
                   lambda mode=mode, bdt=bdt: dfc.dfc_forward(x, cw, _bn(c, bdt), hw, _bn(c, bdt), vw, _bn(c, bdt),
                                                              mode))
        grad = e(n, c, h // 2, w // 2) if mode == "gate" else e(n, c, h, w)
        for need_x, need_w3 in itertools.product((True, False), repeat=2):
            needs = (need_x, need_w3) + (True,) * 8
            yield (dict(base, op="dfc", direction="backward", variant="eval", gate=mode,
                        needs=_needs_label(x=need_x, w3=need_w3)),
                   lambda mode=mode, needs=needs, grad=grad: dfc.dfc_backward(
                       grad, x, cw, vec[0], vec[1], hw, vec[2], vec[3], vw, vec[4], vec[5], mode, needs))


def _needs_label(**flags) -> str:
    return "+".join(k for k, v in flags.items() if v) or "-"


def model_shapes() -> Tuple[List[dict], List[dict]]:
    """(Ghost module shapes, DFC shapes) of timm's GhostNets at 224x224, from `benchmarks/shapes.py`."""
    from benchmarks.shapes import ghost_shapes

    ghosts, dfcs = [], []
    for s in ghost_shapes():
        d = dict(in_chs=s.in_chs, out_chs=s.out_chs, ratio=s.ratio, dw=s.dw, H=s.H, W=s.W, relu=s.relu,
                 attention=s.has_attention, label=f"{s.in_chs}->{s.out_chs} {s.H}x{s.W} r{s.ratio} dw{s.dw}"
                                                  f"{' relu' if s.relu else ''}{' attn' if s.has_attention else ''}")
        ghosts.append(d)
        if s.has_attention and d["label"] not in {g["label"] for g in dfcs}:
            dfcs.append(dict(d, label=f"dfc {s.in_chs}->{s.out_chs} {s.H}x{s.W}"))
    return ghosts, dfcs


# shapes where ints equal to 1 reach the kernels (1-pixel images and gates, 1x1 pooled DFC inputs, one channel)
EDGE_GHOST = [dict(in_chs=1, out_chs=2, ratio=2, dw=3, H=1, W=1, Hg=1, Wg=1, label="edge 1->2 1x1 gate 1x1"),
              dict(in_chs=3, out_chs=5, ratio=3, dw=3, H=1, W=7, Hg=1, Wg=3, label="edge 3->5 1x7 gate 1x3"),
              dict(in_chs=4, out_chs=6, ratio=2, dw=5, H=6, W=1, Hg=3, Wg=1, label="edge 4->6 6x1 dw5 gate 3x1")]
EDGE_DFC = [dict(in_chs=1, out_chs=1, H=2, W=2, label="edge dfc 1->1 2x2"),
            dict(in_chs=3, out_chs=5, H=3, W=9, label="edge dfc 3->5 3x9")]
EDGE_BATCHES = (1, 2)


def all_cases() -> Iterable[Tuple[dict, Callable]]:
    ghosts, dfcs = model_shapes()
    for dtype in DTYPES:
        for shape in ghosts:
            for n in BATCHES:
                yield from ghost_cases(shape, n, dtype)
        for shape in dfcs:
            for n in BATCHES:
                yield from dfc_cases(shape, n, dtype)
        for shape in EDGE_GHOST:
            for n in EDGE_BATCHES:
                yield from ghost_cases(shape, n, dtype)
        for shape in EDGE_DFC:
            for n in EDGE_BATCHES:
                yield from dfc_cases(shape, n, dtype)


def capture() -> List[dict]:
    """Every distinct launch the wrappers make over all cases, in first-seen order, each with its cases."""
    recorder = Recorder()
    driver.set_active(StandInDriver())
    knobs.runtime.jit_cache_hook = recorder
    try:
        for label, call in all_cases():
            recorder.case = label
            call()
    finally:
        knobs.runtime.jit_cache_hook = None
    variants: Dict[str, dict] = {}
    for case, jit_fn, comp in recorder.launches:
        key = _launch_key(jit_fn, comp)
        v = variants.get(key)
        if v is None:
            v = variants[key] = dict(key=key, fn=jit_fn, compile=comp, cases=[])
        v["cases"].append(case)
    return list(variants.values())


def _launch_key(jit_fn, comp) -> str:
    text = repr((jit_fn.fn.__name__, sorted(comp["signature"].items()), sorted(comp["constants"].items()),
                 sorted((k, repr(a)) for k, a in comp["configs"][0].items()), comp["num_warps"],
                 comp["num_stages"]))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---- describing a launch --------------------------------------------------------------------------------------


def describe(v: dict) -> dict:
    """The table's descriptive columns of a launch: kernel, dtype, op/direction/variant flags, config."""
    fn, comp = v["fn"], v["compile"]
    names = [p.name for p in fn.params]
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    consts = {names[path[0]]: val for path, val in comp["constants"].items()}
    config = [f"{k}={consts[k]}" for k in CONFIG_KEYS if k in consts]
    flags = [f"{k}={_short(val)}" for k, val in consts.items()
             if k in constexpr_names and k not in CONFIG_KEYS and not k.startswith("BN")]
    bn = "".join(k[-1] for k, val in consts.items() if k.startswith("BN") and k.endswith(("W", "B", "M", "V"))
                 and val is True and "HAS" in k)
    spec1 = [k for k, val in consts.items() if k not in constexpr_names]
    sig = comp["signature"]
    ptr_types = sorted({t for t in sig.values() if t.startswith("*")})
    first = v["cases"][0]
    cases = v["cases"]
    return dict(
        kernel=fn.fn.__name__,
        op=first["op"], direction=first["direction"],
        variant="/".join(sorted({c["variant"] for c in cases})),
        dtype=first["dtype"],
        gate="/".join(sorted({c["gate"] for c in cases})),
        act="/".join(sorted({str(c["act"]) for c in cases})),
        needs="/".join(sorted({c.get("needs", "") for c in cases})) or "",
        config=" ".join(config),
        num_warps=comp["num_warps"], num_stages=comp["num_stages"],
        flags=" ".join(flags) + (f" BN={bn}" if bn else ""),
        ptr_types=" ".join(ptr_types),
        spec1=" ".join(spec1),
        launches=len(cases),
        example=f"{first['shape']} N={first['N']}",
        variant_id=v["key"],
    )


def _short(val) -> str:
    s = str(val)
    return s.replace("triton.language.", "").replace("True", "1").replace("False", "0")


# ---- compiling ------------------------------------------------------------------------------------------------

_PTXAS_LOG: List[str] = []


def _install_ptxas_log_capture():
    """Wraps the NVIDIA backend's make_cubin so its `ptxas -v` log (printed with dump_ptxas_log) is kept."""
    from triton.backends.nvidia import compiler as nv

    if getattr(nv.CUDABackend.make_cubin, "_aot_wrapped", False):
        return
    original = nv.CUDABackend.make_cubin

    def make_cubin(self, *args, **kwargs):
        buf = io.StringIO()
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(buf):
                return original(self, *args, **kwargs)
        finally:
            knobs.nvidia.dump_ptxas_log = old
            _PTXAS_LOG.append(buf.getvalue())

    make_cubin._aot_wrapped = True
    nv.CUDABackend.make_cubin = make_cubin


def _ptxas_again(ptx: str) -> str:
    """ptxas -v on a cached kernel's PTX (a cache hit runs no ptxas), with Triton's own flags."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(TARGET.arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{TARGET.arch}a", src,
                            "-o", os.path.join(d, "k.o")], capture_output=True, text=True, check=True)
    return r.stderr + r.stdout


def _ptxas_figures(kernel) -> dict:
    """Registers and spills of a compiled kernel: from the ptxas log of this compile, else (a cache hit runs no
    ptxas) from the figures kept beside Triton's cache by an earlier run, else from ptxas run again."""
    import json

    side = os.path.join(knobs.cache.dir, "aot_sm90_ptxas", f"{kernel.hash}.json")
    log = "".join(_PTXAS_LOG)
    if not log and os.path.exists(side):
        with open(side) as f:
            return json.load(f)
    figures = parse_ptxas(log or _ptxas_again(kernel.asm["ptx"]))
    os.makedirs(os.path.dirname(side), exist_ok=True)
    with open(side + f".{os.getpid()}", "w") as f:
        json.dump(figures, f)
    os.replace(side + f".{os.getpid()}", side)
    return figures


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    regs = [int(m) for m in _RE_REGS.findall(log)]
    spills = [tuple(map(int, m)) for m in _RE_SPILL.findall(log)]
    if not regs or not spills:
        raise RuntimeError(f"could not read the ptxas log:\n{log}")
    stack, st, ld = spills[-1]
    return dict(regs=regs[-1], stack=stack, spill_stores=st, spill_loads=ld)


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost, whatever the load."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compile_variant(v: dict) -> dict:
    """Compiles one launch for sm_90: ptxas figures and shared memory, or the error."""
    from triton.compiler import ASTSource

    comp = v["compile"]
    src = ASTSource(v["fn"], comp["signature"], comp["constants"], comp["configs"][0])
    options = dict(num_warps=comp["num_warps"], num_stages=comp["num_stages"], num_ctas=comp.get("num_ctas", 1))
    for k in ("enable_fp_fusion", "debug"):
        if comp.get(k) is not None:
            options[k] = comp[k]
    _PTXAS_LOG.clear()
    t0 = time.time()
    c0 = _cpu_seconds()
    try:
        kernel = triton.compile(src, target=TARGET, options=options)
    except Exception as e:  # every compile error is a finding: recorded, and the run fails
        msg = f"{type(e).__name__}: {e}"
        return dict(status="compile error", error=" ".join(msg.split())[:600], compile_s=round(time.time() - t0, 1))
    seconds = time.time() - t0
    row = dict(_ptxas_figures(kernel), shared=int(kernel.metadata.shared), compile_s=round(seconds, 1),
               cpu_s=round(_cpu_seconds() - c0, 1), error="")
    problems = []
    if row["shared"] > SM90_SMEM_LIMIT:
        problems.append(f"shared memory {row['shared']} B > sm_90's {SM90_SMEM_LIMIT} B")
    row["status"] = "; ".join(problems) if problems else "ok"
    return row


# ---- which variants to compile ----------------------------------------------------------------------------------


def _weight(d: dict) -> int:
    """More enabled code paths first, so a config is first met (and kept) in its heaviest variant."""
    return -sum(f.endswith("=1") or f == "UPSAMPLE=2" or (f.startswith("ACT=") and f != "ACT=0")
                for f in d["flags"].split())


def _elem_class(dtype: str) -> str:
    return {"fp16": "half", "bf16": "half"}.get(dtype, dtype)


def _features(d: dict, which: str) -> set:
    kd = (d["kernel"], d["dtype"])
    # the activation (ACT, five values) once per kernel and accumulation dtype (fp64, or fp32: every other dtype),
    # not per dtype: it is elementwise math in the accumulator, and the product would double the compiles
    acc = (d["kernel"], "fp64" if d["dtype"] == "fp64" else "fp32-acc")
    feats = {(acc if f.startswith("ACT=") else kd, "flag", f) for f in d["flags"].split()}
    feats |= {(d["kernel"], "spec1", f) for f in d["spec1"].split()}
    if which == "ci":
        return feats | {(d["kernel"], "config", d["config"], d["num_warps"], d["num_stages"])}
    # shared memory and registers scale with the element size: every config once per element size
    return feats | {(d["kernel"], _elem_class(d["dtype"]), "config", d["config"], d["num_warps"], d["num_stages"])}


def select(described: List[dict], which: str) -> List[int]:
    """Indices of the variants to compile. 'all': every captured variant (hours). 'cover' (the committed table):
    greedily, heaviest first, a variant is kept when it brings a config (tiles + warps + stages) not yet compiled
    for its kernel and element size (fp16 and bf16 share one), a flag value not yet compiled for its kernel and
    dtype (the activation: for its kernel and accumulation dtype), or an int argument specialised to 1 not yet seen for its kernel; the rest differ from a kept one only in
    combinations of those, in pointer dtypes or in divisibility hints. 'ci': from those, the same with every
    config once per kernel (any dtype)."""
    order = sorted(range(len(described)), key=lambda i: _weight(described[i]))
    if which == "all":
        return order
    if which == "ci":
        order = select(described, "cover")  # a subset of the table's rows (and of their compile cache)
    seen: set = set()
    keep = []
    for i in order:
        feats = _features(described[i], which)
        if feats - seen:
            seen |= feats
            keep.append(i)
    return keep


# ---- output ---------------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "op", "direction", "variant", "dtype", "gate", "act", "needs", "config", "num_warps",
           "num_stages", "regs", "spill_stores", "spill_loads", "stack", "shared", "status", "flags", "ptr_types",
           "spec1", "launches", "example", "compile_s", "cpu_s", "variant_id", "error")


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)


_VARIANTS: List[dict] = []  # the captured variants, inherited by forked compile workers


def _compile_at(i: int) -> dict:
    _install_ptxas_log_capture()
    return compile_variant(_VARIANTS[i])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=("cover", "ci", "all"), default="cover",
                    help="cover: the committed table (default); ci: the CI subset; all: every captured variant")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder of the CSV (and, for --set cover, README.md)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    ap.add_argument("--list", action="store_true", help="only capture and list the variants, compile nothing")
    ap.add_argument("--limit", type=int, default=0, help="compile at most this many variants (debugging)")
    ap.add_argument("--readme-from", nargs=4, metavar=("CSV", "LAUNCHES", "VARIANTS", "SECONDS"),
                    help="write the table and README.md from the CSV of an earlier cover run")
    args = ap.parse_args(argv)
    if args.readme_from:
        return _readme_from(args.out, *args.readme_from)

    t0 = time.time()
    variants = capture()
    described = [describe(v) for v in variants]
    n_launch = sum(len(v["cases"]) for v in variants)
    idx = [i for i in select(described, args.set) if args.kernel in described[i]["kernel"]]
    if args.limit:
        idx = idx[:args.limit]
    print(f"{n_launch} launches captured, {len(variants)} distinct variants, {len(idx)} to compile "
          f"({time.time() - t0:.0f} s)", flush=True)
    if args.list:
        for i in idx:
            d = described[i]
            print(d["kernel"], d["dtype"], d["variant"], d["gate"], d["needs"], d["config"], d["num_warps"],
                  d["num_stages"], d["spec1"], d["flags"])
        return 0

    _VARIANTS[:] = variants
    rows = []
    if args.jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(args.jobs)
        results = pool.imap(_compile_at, idx)
    else:
        results = map(_compile_at, idx)
    for j, (i, res) in enumerate(zip(idx, results)):
        row = dict(described[i], **res)
        rows.append(row)
        print(f"[{j + 1}/{len(idx)}] {row['kernel']} {row['dtype']} {row['config']} w{row['num_warps']} "
              f"s{row['num_stages']} {row['flags']} -> {row['status']} regs={row.get('regs')} "
              f"spill={row.get('spill_stores')} shared={row.get('shared')} ({row['compile_s']} s)", flush=True)
    if args.jobs > 1:
        pool.close()
        pool.join()
    os.makedirs(args.out, exist_ok=True)
    name = CSV_NAME if args.set == "cover" else f"triton_sm90_{args.set}.csv"
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["config"], r["num_warps"], r["flags"], r["spec1"]))
    write_csv(os.path.join(args.out, name), rows)
    if args.set == "cover" and not args.kernel and not args.limit:
        write_readme(os.path.join(args.out, "README.md"), rows, n_launch, len(variants), time.time() - t0)
    bad = [r for r in rows if r["status"] != "ok"]
    cpu = sum(float(r.get("cpu_s") or 0) for r in rows)
    print(f"{len(rows)} variants compiled in {time.time() - t0:.0f} s ({cpu:.0f} CPU-s of compiles); {len(bad)} "
          f"failed", flush=True)
    for r in bad:
        print(f"FAILED {r['kernel']} {r['dtype']} {r['config']} w{r['num_warps']} s{r['num_stages']} {r['flags']} "
              f"spec1=[{r['spec1']}] ({r['example']}): {r['status']} {r['error']}")
    return 1 if bad else 0


def _readme_from(out: str, path: str, launches: str, variants: str, seconds: str) -> int:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("regs", "spill_stores", "spill_loads", "stack", "shared", "num_warps", "num_stages"):
            r[k] = int(r[k]) if r.get(k) not in (None, "") else None
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, CSV_NAME), rows)
    write_readme(os.path.join(out, "README.md"), rows, int(launches), int(variants), float(seconds))
    return 0


def write_readme(path: str, rows: List[dict], n_launch: int, n_variants: int, seconds: float) -> None:
    """The worst figures per kernel and dtype, and the variants flagged (spills, the 255-register cap)."""
    import triton as _t

    ok = [r for r in rows if r["status"] == "ok" or r.get("regs") is not None]
    groups = defaultdict(list)
    for r in ok:
        groups[(r["kernel"], r["direction"], r["dtype"])].append(r)
    lines = [
        "# Triton kernels compiled for sm_90 without a GPU",
        "",
        f"`make aot-sm90` (`scripts/aot_sm90.py`) captures every launch the wrappers in `kernels/` make for the Ghost "
        f"modules and DFC branches of timm's ghostnet_100 / ghostnetv2_100 / ghostnetv3_100 at batch 1 / 32 / 256 "
        f"(plus a few 1-pixel edge shapes), in fp32 / fp16 / bf16 / fp64 with every gate mode, activation, statistics "
        f"variant and gradient combination: {n_launch} launches, {n_variants} distinct variants (what a GPU would JIT: "
        f"they differ in flags, in which int arguments equal 1 or are divisible by 16, and in pointer dtypes). It "
        f"compiles {len(rows)} of them, heaviest first: every config (tiles, num_warps, num_stages) of each kernel "
        f"once per element size (fp16 and bf16 share one), every flag value of each kernel and dtype (the activation: "
        f"each of its values once per kernel and accumulation dtype), and every int argument specialised to 1 "
        f"({seconds / 60:.0f} min wall on 2 shared CPU cores). Triton "
        f"{_t.__version__}, target `GPUTarget('cuda', 90, 32)`, ptxas `sm_90a`. `{CSV_NAME}` has one row per "
        f"compiled variant: `regs` per thread, `spill_stores` / `spill_loads` / `stack` (bytes per thread, ptxas -v), "
        f"`shared` (what the launch asks for, `metadata.shared`; sm_90's opt-in limit is {SM90_SMEM_LIMIT} B), "
        f"num_warps, num_stages, the flags, `spec1` (int arguments specialised to 1), `launches` (captured launches "
        f"with exactly this variant) and an example shape. CI (`tests/test_aot_sm90.py`) compiles a subset of these "
        f"rows (every config once per kernel, every flag value per kernel and dtype) and checks that every config it "
        f"meets is in this table.",
        "",
        f"Failures (compile errors, shared memory over the limit): {sum(r['status'] != 'ok' for r in rows)}.",
        "",
        "| kernel | dtype | variants | registers (max) | at the 255 cap | spilling | spill stores max (B) | "
        "shared max (B) | warps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (kernel, direction, dtype), rs in sorted(groups.items()):
        lines.append(
            f"| {kernel} | {dtype} | {len(rs)} | {min(r['regs'] for r in rs)}-{max(r['regs'] for r in rs)} | "
            f"{sum(r['regs'] >= REG_CAP for r in rs)} | {sum(r['spill_stores'] > 0 for r in rs)} | "
            f"{max(r['spill_stores'] for r in rs)} | {max(r['shared'] for r in rs)} | "
            f"{'/'.join(str(w) for w in sorted({r['num_warps'] for r in rs}))} |")
    worst = sorted(ok, key=lambda r: -r["spill_stores"])[:10]
    lines += ["", "Worst spills:", "", "| kernel | dtype | config | warps | flags | regs | spill stores (B) | "
              "example |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in worst:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['num_warps']} | {r['flags']} | "
                     f"{r['regs']} | {r['spill_stores']} | {r['example']} |")
    big = sorted(ok, key=lambda r: -r["shared"])[:5]
    lines += ["", "Most shared memory:", "", "| kernel | dtype | config | warps | stages | shared (B) | example |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in big:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['shared']} | {r['example']} |")
    lines += ["", NOTES]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# what the table's figures mean and what this compile found (kept here: the README is regenerated from the run)
NOTES = """## Found and fixed

- **Shared memory over sm_90's limit** (fail at launch with `OutOfResources`): the DFC backward at Triton's
  default `num_stages=3` multi-buffers its dots' operands: 296,960 B in fp32 at 56x56 (GhostNetV2's first attention
  layer), 528,384 B in fp64 on 16x32-lane tiles; the fp64 DFC forward needed 266,240 B. `kernels/dfc.py` now picks
  `num_stages` in its config functions: 1 for every DFC backward (25-133 KB) and for the fp64 forward (32 KB); 3
  for the other forwards (fp32 at most 149,504 B, within the limit but one CTA per SM; fp16 / bf16 16 KB).
- **Compile error on a GPU only**: float64 with a bilinear gate when H, W or the gate's H / W is 1. Triton
  specialises an int argument equal to 1 into a constant, and `_axis_source` called `.to()` on it (a Python int);
  it now uses `tl.cast`. The interpreter does not specialise, so the CPU tests could not see it; the edge shapes
  here (1-pixel images and gates) compile it on every run of CI.
- `kernels/dfc.py` already passes `out_dtype` to every `tl.dot` (the assert of triton 3.6's `semantic.dot` on
  fp64 dots without it).

## Why the spills (not changed: nothing can be timed here, correctness first)

- **Ghost backward** (`_ghost_module_bwd_kernel`) sits at the 255-register cap in most variants: one program
  keeps about six [HALO_H*HALO_W, BLOCK_C] tiles live across the cheap-output loop (y1, its BN'd recompute, gx1,
  y2 / pre2, g2, the gate values; 16 values per thread each at a 16x16 halo, 16 channels and 8 warps), plus the
  int64 addresses of the gate's corners. `NEED_W1` adds the operand tiles of the grad_W1 dot; fp64 doubles every
  tile and a bilinear gate adds four corner tiles, hence the largest spills there. Cheaper tiles would recompute
  more halo (a 16x16 halo already owns only 12x12 pixels at dw 3): worth an autotune on a GPU, not a guess.
- **Ghost forward** with a bilinear gate: the four gate corners and their weights on top of x1 and the
  depthwise accumulator; small spills (hundreds of bytes) at 4 warps.
- **DFC backward** at 16 warps on the 16x32-lane tiles (the 56x56 layer): ptxas allots these variants 64
  registers per thread although a 512-thread block could have 128, and spills 3-16 KB (most with the bilinear
  adjoint, a 6x6 unrolled gather of [BLOCK_C, lanes] tiles, and in fp64). Likewise the fp64 Ghost backward with
  a gate stops at 128 of 255 registers and spills ~6 KB. ptxas chose this without a `.maxnreg` from Triton; what
  to try on a GPU: `maxnreg`, 8 warps, a rolled gather loop, each timed.
"""


if __name__ == "__main__":
    sys.exit(main())
