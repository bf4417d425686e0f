#!/usr/bin/env bash
# Static resource usage (registers, spills, shared memory, stack per thread) of every CUDA kernel of csrc/cuda, as
# ptxas allots them for sm_90: each translation unit compiled to a cubin with the flags of ghostfast/_build.py
# (nvcc -O3 --expt-relaxed-constexpr), then `cuobjdump --dump-resource-usage` (registers, stack, shared, local) and
# ptxas -v's spill stores / loads, one row per kernel instantiation.
# No GPU needed. Writes benchmarks/results/sm90-static/cuda_resource_usage.txt (or $1).
#   PY (default .venv/bin/python): the torch whose headers the kernels include
#   NVCC (default nvcc), CUOBJDUMP (default: cuobjdump on PATH, else the one bundled with triton)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
OUT=${1:-benchmarks/results/sm90-static/cuda_resource_usage.txt}
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || "$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')}
WORK=$(mktemp -d /tmp/ghostfast_cuobjdump.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

INCLUDES=$("$PY" -c 'from torch.utils import cpp_extension as c; print(" ".join("-isystem " + p for p in c.include_paths()))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
FLAGS=(-O3 -lineinfo --expt-relaxed-constexpr -std=c++20 -arch=sm_90 -cubin -Xptxas -v -DGHOSTFAST_WITH_CUDA
       -D_GLIBCXX_USE_CXX11_ABI="$ABI" -Icsrc)
for cu in csrc/cuda/ghost_module.cu csrc/cuda/ghost_module_backward.cu csrc/cuda/dfc.cu csrc/cuda/dfc_backward.cu; do
  name=$(basename "$cu" .cu)
  echo "nvcc $cu" >&2
  # shellcheck disable=SC2086
  nice -n 10 "$NVCC" "${FLAGS[@]}" $INCLUDES "$cu" -o "$WORK/$name.cubin" 2> "$WORK/$name.ptxas"
  "$CUOBJDUMP" --dump-resource-usage "$WORK/$name.cubin" > "$WORK/$name.res"
done

"$PY" - "$WORK" "$OUT" "$(nvcc --version | tail -1)" "$("$CUOBJDUMP" --version | tail -1)" <<'PYEOF'
import re, subprocess, sys
from pathlib import Path

work, out, nvcc_version, cuobjdump_version = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
spills = {}  # mangled name -> (spill stores, spill loads)
for log in work.glob("*.ptxas"):
    fn = None
    for line in log.read_text().splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            fn = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn:
            spills[fn] = (int(m.group(1)), int(m.group(2)))
            fn = None
rows = []
for res in sorted(work.glob("*.res")):
    fn = None
    for line in res.read_text().splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn:
            rows.append((res.stem, fn, *map(int, m.groups()), *spills.get(fn, (-1, -1))))
            fn = None
names = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True).stdout.split("\n")

def short(demangled):
    s = demangled.replace("ghostfast::(anonymous namespace)::", "").replace("ghostfast::", "")
    s = s.replace("c10::Half", "half").replace("c10::BFloat16", "bfloat16")
    return re.sub(r"\(.*\)$", "", s)  # drop the parameter list (the template arguments say it all)

lines = [f"# ptxas resource usage of the csrc/cuda kernels for sm_90 (nvcc -O3 -arch=sm_90 -cubin; "
         f"cuobjdump --dump-resource-usage)",
         f"# {nvcc_version}; cuobjdump {cuobjdump_version}; produced by scripts/cuda_resource_usage.sh",
         "# REG: registers per thread; STACK: stack frame per thread (bytes); SHARED: static shared memory per block "
         "(bytes, with the 1 KB sm_90 reserves per block; the dynamic shared memory is chosen per launch);",
         "# LOCAL: local memory per thread (bytes; spills and local arrays); SPILL_ST / SPILL_LD: ptxas -v's spill stores /"
         " loads (bytes per thread).",
         "# Every kernel is launched with 256 threads (__launch_bounds__(256): at most 255 registers).",
         f"{'file':<24} {'REG':>4} {'STACK':>6} {'SHARED':>7} {'LOCAL':>6} {'SPILL_ST':>8} {'SPILL_LD':>8}  kernel"]
for (file, _, reg, stack, shared, local, sst, sld), name in sorted(zip(rows, names),
                                                                  key=lambda t: (t[0][0], short(t[1]))):
    lines.append(f"{file:<24} {reg:>4} {stack:>6} {shared:>7} {local:>6} {sst:>8} {sld:>8}  {short(name)}")
lines.append(f"# kernels: {len(rows)}; max REG {max(r[2] for r in rows)}, max STACK {max(r[3] for r in rows)}, "
             f"max SHARED {max(r[4] for r in rows)}, max LOCAL {max(r[5] for r in rows)}, "
             f"max spill stores {max(r[6] for r in rows)}, max spill loads {max(r[7] for r in rows)}")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines) + "\n")
print(out)
PYEOF
