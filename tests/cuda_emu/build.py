"""Builds the CUDA emulation library: csrc/cuda/*.cu compiled for the CPU by g++ against the emulation runtime
(tests/cuda_emu/), loaded as torch.ops.ghostfast_emu.

The sources are compiled as they are, force-including cuda_emu.h, after three mechanical rewrites of the lines g++
cannot take, and nothing else (`rewrite` counts them; tests/test_cuda_emulation.py checks every other line is
unchanged):
  - a launch `kernel<<<grid, block, smem, stream>>>(args)` -> `::ghostfast_emu::launch(kernel, grid, block, smem,
    stream)(args)`
  - `extern __shared__ T name[];` -> `T* const name = static_cast<T*>(::ghostfast_emu::dynamic_shared(align));`
  - `__shared__ T name[A][B];` -> `auto& name = ::ghostfast_emu::static_shared<T[A][B]>([] {});`
The rewritten copies and the objects live under a cache directory keyed by the sources, so a rebuild happens only
when something changed. `python tests/cuda_emu/build.py` builds and prints the library's path.
GHOSTFAST_EMU_CSRC=<dir> builds another csrc tree (e.g. a copy with a barrier removed, to see the tests fail),
GHOSTFAST_EMU_CACHE=<dir> moves the cache, GHOSTFAST_EMU_JOBS the parallel compiles (default 2), GHOSTFAST_EMU_OPT
the optimisation flag (default -O1)."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = Path(os.environ.get("GHOSTFAST_EMU_CSRC", ROOT / "csrc"))  # another tree: e.g. a deliberately broken copy
KERNEL_SOURCES = [CSRC / "cuda" / f for f in ("ghost_module.cu", "ghost_module_backward.cu", "dfc.cu",
                                                "dfc_backward.cu")]
EMU_SOURCES = [HERE / "sample_kernels.cu"]
RUNTIME_SOURCES = [HERE / "runtime.cpp", HERE / "bindings.cpp"]
CACHE = Path(os.environ.get("GHOSTFAST_EMU_CACHE", "/tmp/ghostfast_cuda_emu"))

_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(?P<config>.+?)>>>\(")
_DYNAMIC = re.compile(r"^(?P<indent>\s*)extern\s+__shared__\s+(?:__align__\((?P<align>\d+)\)\s+)?"
                      r"(?P<type>[\w:]+(?:\s+[\w:]+)*?)\s+(?P<name>\w+)\[\];(?P<rest>\s*(//.*)?)$")
_STATIC = re.compile(r"^(?P<indent>\s*)__shared__\s+(?:__align__\((?P<align>\d+)\)\s+)?"
                     r"(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)(?P<dims>(?:\[[^\]]+\])+);(?P<rest>\s*(//.*)?)$")


def rewrite(text: str):
    """(the rewritten source, {'launch': n, 'dynamic_shared': n, 'static_shared': n}, changed line numbers)."""
    counts = {"launch": 0, "dynamic_shared": 0, "static_shared": 0}
    out, changed = [], []
    for no, line in enumerate(text.split("\n"), 1):
        new = line
        if _LAUNCH.search(line):
            new, n = _LAUNCH.subn(lambda m: f"::ghostfast_emu::launch({m['kernel']}, {m['config']})(", line)
            counts["launch"] += n
        elif _DYNAMIC.match(line):
            m = _DYNAMIC.match(line)
            t = m["type"]
            new = (f"{m['indent']}{t}* const {m['name']} = static_cast<{t}*>(::ghostfast_emu::dynamic_shared("
                   f"{m['align'] or 1}));{m['rest'] or ''}")
            counts["dynamic_shared"] += 1
        elif _STATIC.match(line):
            m = _STATIC.match(line)
            new = (f"{m['indent']}auto& {m['name']} = ::ghostfast_emu::static_shared<{m['type']}{m['dims']}>"
                   f"([] {{}});{m['rest'] or ''}")
            counts["static_shared"] += 1
        elif "<<<" in line.split("//")[0] or "__shared__" in line.split("//")[0]:
            raise ValueError(f"line {no}: a launch or __shared__ declaration the rewrite does not recognise: {line!r}")
        if new != line:
            changed.append(no)
        out.append(new)
    return "\n".join(out), counts, changed


def _torch_flags():
    import torch
    from torch.utils import cpp_extension

    inc = [f"-isystem{p}" for p in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    lib = Path(torch.__file__).parent / "lib"
    return inc, [abi], [f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"], torch.__version__


def _headers():
    files = sorted(CSRC.glob("*.h")) + sorted((CSRC / "cuda").glob("*.cuh")) + sorted(HERE.rglob("*.h"))
    return [(str(f), f.read_bytes()) for f in files]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuda_emu build failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")


def build(jobs: int | None = None, verbose: bool = False) -> Path:
    """Compiles what changed and links the library; returns its path."""
    inc, defs, libs, torch_version = _torch_flags()
    opt = os.environ.get("GHOSTFAST_EMU_OPT", "-O1")
    common = ["g++", "-std=c++20", opt, "-fPIC", "-g0", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
              "-Wno-unused-variable", "-Wno-unused-but-set-variable", *defs, *inc]
    headers = _headers()
    key = _digest(torch_version, " ".join(common), *[h for pair in headers for h in pair])
    work = CACHE / key
    src_dir = work / "src" / "cuda"
    src_dir.mkdir(parents=True, exist_ok=True)
    # the rewritten tree: every header of csrc/cuda (they include each other as "cuda/<name>"), then the TUs
    for f in sorted((CSRC / "cuda").glob("*.cuh")):
        (src_dir / f.name).write_text(rewrite(f.read_text())[0])
    units = []
    for f in KERNEL_SOURCES + EMU_SOURCES:
        text = rewrite(f.read_text())[0]
        dst = src_dir / f.name
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
        flags = common + ["-I", str(work / "src"), "-I", str(HERE / "include"), "-I", str(CSRC), "-include",
                          str(HERE / "cuda_emu.h"), "-x", "c++"]
        units.append((dst, flags))
    for f in RUNTIME_SOURCES:
        units.append((f, common + ["-I", str(HERE), "-I", str(CSRC)]))

    def compile_one(unit):
        src, flags = unit
        obj = work / (src.stem + "." + _digest(" ".join(flags), src.read_bytes()) + ".o")
        if not obj.exists():
            tmp = obj.with_suffix(".tmp.o")
            _run(["nice", "-n", "10", *flags, "-c", str(src), "-o", str(tmp)])
            tmp.rename(obj)
            if verbose:
                print(f"compiled {src.name}", file=sys.stderr)
        return obj

    jobs = jobs or int(os.environ.get("GHOSTFAST_EMU_JOBS", min(2, os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(compile_one, units))
    lib = work / ("libghostfast_cuda_emu." + _digest(*[o.name for o in objs]) + ".so")
    if not lib.exists():
        tmp = lib.with_suffix(".tmp.so")
        _run(["g++", "-shared", "-o", str(tmp), *map(str, objs), *libs])
        tmp.rename(lib)
    return lib


_LOADED = {}


def load(verbose: bool = False):
    """torch.ops.ghostfast_emu, built and loaded once per process."""
    import torch

    if "ops" not in _LOADED:
        torch.ops.load_library(str(build(verbose=verbose)))
        _LOADED["ops"] = torch.ops.ghostfast_emu
    return _LOADED["ops"]


if __name__ == "__main__":
    print(build(verbose=True))
