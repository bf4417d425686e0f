"""Packaging for ghostfast.

`kernels/` (the Triton kernels) is installed as the subpackage `ghostfast.kernels`. The compiled backends live in
csrc/ and build into `ghostfast._C` with torch.utils.cpp_extension (ninja when present): the C++ CPU kernels
always, the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found. Switches (GHOSTFAST_CUDA,
GHOSTFAST_CPU_ISA, TORCH_CUDA_ARCH_LIST, MAX_JOBS) are documented in ghostfast/_build.py; GHOSTFAST_BUILD_C=0
installs the pure-Python package (Triton and reference backends only). Install with
`pip install --no-build-isolation -e .` so the extension is built against the torch already installed.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    spec = importlib.util.spec_from_file_location("_ghostfast_build", ROOT / "ghostfast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("GHOSTFAST_BUILD_C", "1").strip() == "0":
        print("ghostfast: GHOSTFAST_BUILD_C=0: installing without the compiled backends (triton and reference only)")
        return [], {}
    build = _load_build_config()
    build.configure_cuda_home()  # before cpp_extension reads CUDA_HOME
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (e.g. `setup.py --version`) need no torch
        return [], {}
    with_cuda, why = build.cuda_decision()
    print(f"ghostfast: building ghostfast._C: CPU kernels ({build.cpu_isa()}); CUDA kernels: "
          f"{'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.cuda_archs())
    cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = cls(
        name="ghostfast._C",
        sources=build.sources(with_cuda),
        include_dirs=build.include_dirs(),
        extra_compile_args=build.extra_compile_args(with_cuda),
        extra_link_args=build.extra_link_args(),
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="ghostfast",
    version="0.1.0",
    description="Fused GPU and CPU kernels for GhostNet-family Ghost modules and DFC attention",
    packages=["ghostfast", "ghostfast.kernels"],
    package_dir={"ghostfast": "ghostfast", "ghostfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "timm"], "bench": ["pytest-benchmark", "matplotlib", "tqdm"]},
)
