"""Packaging for ghostfast.

`kernels/` (the Triton kernels) is installed as the subpackage `ghostfast.kernels`. The compiled backend
`ghostfast._C` (csrc/) arrives with the compiled-backends issue; until then the package is pure Python.
"""
from setuptools import setup

setup(
    name="ghostfast",
    version="0.1.0",
    description="Fused GPU kernels for GhostNet-family Ghost modules and DFC attention",
    packages=["ghostfast", "ghostfast.kernels"],
    package_dir={"ghostfast": "ghostfast", "ghostfast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "timm"], "bench": ["pytest-benchmark", "matplotlib", "tqdm"]},
)
