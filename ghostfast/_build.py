"""Build configuration of the compiled extension `ghostfast._C`, shared by setup.py and scripts/dev_build.py.

Environment switches:
  GHOSTFAST_CUDA       auto (default) | 1 (require the CUDA backend) | 0 (CPU only)
  GHOSTFAST_CPU_ISA    auto (default: avx2 when the build host has it) | avx2 | generic
  TORCH_CUDA_ARCH_LIST the CUDA archs; default: the visible GPUs', else 9.0 (H100 / H200)
  MAX_JOBS             parallel compile jobs (ninja), as torch.utils.cpp_extension reads it
This module imports nothing from ghostfast, so setup.py can load it before the package is installed.
"""
from __future__ import annotations

import os
import platform
import shutil
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
OPS = ("ghost_module", "dfc", "depthwise_bn")
DEFAULT_CUDA_ARCHS = "9.0"


def _host_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def cpu_isa() -> str:
    isa = os.environ.get("GHOSTFAST_CPU_ISA", "auto").strip().lower() or "auto"
    if isa == "auto":
        isa = "avx2" if _host_has_avx2() else "generic"
    if isa not in ("avx2", "generic"):
        raise ValueError(f"GHOSTFAST_CPU_ISA must be auto, avx2 or generic, got {isa!r}")
    return isa


def cxx_flags() -> List[str]:
    """C++ flags: optimised, OpenMP (ATen's parallel backend), and ATen's at::vec compiled for the host's ISA."""
    flags = ["-O3", "-fopenmp"]  # the C++ standard: torch.utils.cpp_extension picks the one torch needs
    if cpu_isa() == "avx2":
        # at::vec picks its AVX2 specialisations from these macros (as ATen's own per-ISA kernels are built).
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                  "-DGHOSTFAST_CPU_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    return flags


def cuda_archs() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    try:
        import torch

        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{a}.{b}" for a, b in caps)
    except Exception:  # noqa: BLE001 - no driver: fall through to the default
        pass
    return DEFAULT_CUDA_ARCHS


def nvcc_flags() -> List[str]:
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def _is_cuda_toolkit(path: Path) -> bool:
    has_lib = any((path / lib / "libcudart.so").exists() for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))
    return (path / "bin" / "nvcc").exists() and (path / "include" / "cuda_runtime_api.h").exists() and has_lib


def configure_cuda_home() -> Optional[str]:
    """Point CUDA_HOME at a real toolkit before torch.utils.cpp_extension is imported (it reads it once).

    torch guesses the toolkit from `which nvcc`; where nvcc is a wrapper script (/usr/local/bin/nvcc exec-ing
    /usr/local/cuda-13.0/bin/nvcc) that guess has no libcudart. An explicit CUDA_HOME / CUDA_PATH always wins."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for c in candidates:
        if _is_cuda_toolkit(c):
            os.environ["CUDA_HOME"] = str(c)
            return str(c)
    return None


def cuda_decision() -> tuple[bool, str]:
    """(build the CUDA backend?, why) from GHOSTFAST_CUDA, torch's CUDA build and the toolkit."""
    want = os.environ.get("GHOSTFAST_CUDA", "auto").strip().lower() or "auto"
    if want not in ("auto", "0", "1"):
        raise ValueError(f"GHOSTFAST_CUDA must be auto, 0 or 1, got {want!r}")
    if want == "0":
        return False, "GHOSTFAST_CUDA=0"
    configure_cuda_home()
    import torch
    from torch.utils import cpp_extension

    reason = None
    if torch.version.cuda is None:
        reason = "torch is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit (nvcc) found"
    if reason is None:
        return True, f"CUDA {torch.version.cuda}, archs {cuda_archs()}"
    if want == "1":
        raise RuntimeError(f"GHOSTFAST_CUDA=1 but the CUDA backend cannot be built: {reason}")
    return False, reason


def sources(with_cuda: bool, ops=OPS) -> List[str]:
    """Schema file per op, its CPU translation units (`cpu/<op>.cpp`, `cpu/<op>_*.cpp`), its CUDA ones when built
    (`cuda/<op>.cu`, `cuda/<op>_*.cu`), and the pybind11 bindings. Shared layers are headers."""
    files = [CSRC / "bindings.cpp"]
    if with_cuda:
        files.append(CSRC / "cuda" / "build_info.cu")
    for op in ops:
        files.append(CSRC / f"{op}.cpp")
        files += [CSRC / "cpu" / f"{op}.cpp"] if (CSRC / "cpu" / f"{op}.cpp").exists() else []
        files += sorted((CSRC / "cpu").glob(f"{op}_*.cpp"))
        if with_cuda:
            files += [CSRC / "cuda" / f"{op}.cu"] if (CSRC / "cuda" / f"{op}.cu").exists() else []
            files += sorted((CSRC / "cuda").glob(f"{op}_*.cu"))
    return [str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f) for f in files]


def defines(with_cuda: bool) -> List[str]:
    # Only identifiers here: string defines do not survive every compiler-invocation path intact.
    return ["-DGHOSTFAST_WITH_CUDA"] if with_cuda else []


def extra_compile_args(with_cuda: bool) -> Dict[str, List[str]]:
    args = {"cxx": cxx_flags() + defines(with_cuda)}
    if with_cuda:
        args["nvcc"] = nvcc_flags() + defines(with_cuda)
    return args


def include_dirs() -> List[str]:
    return [str(CSRC)]


def extra_link_args() -> List[str]:
    return ["-fopenmp"]
