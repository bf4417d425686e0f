"""Build a development copy of the compiled kernels with torch.utils.cpp_extension.load, outside the package.

    python scripts/dev_build.py [--ops ghost_module dfc] [--cuda] [--name NAME]

Each build gets its own directory under /tmp, so several people (or helpers) can compile different ops at once
without touching ghostfast/_C. In Python:

    import sys; sys.path.insert(0, "scripts"); import dev_build
    dev_build.load(["ghost_module"])        # registers torch.ops.ghostfast._ghost_module_kernel (CPU)

Don't import ghostfast._C in the same process: both would register the same schemas.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_config():
    spec = importlib.util.spec_from_file_location("_ghostfast_build", ROOT / "ghostfast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(ops=("ghost_module", "dfc"), cuda: bool = False, name: str | None = None, verbose: bool = False):
    build = _build_config()
    build.configure_cuda_home()  # before cpp_extension reads CUDA_HOME
    from torch.utils import cpp_extension

    name = name or "ghostfast_dev_" + "_".join(ops) + ("_cuda" if cuda else "")
    build_dir = Path("/tmp") / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.cuda_archs())
    args = build.extra_compile_args(cuda)
    # cpp_extension.load names each object after its source's basename, and csrc/dfc.cpp (the schema) and
    # csrc/cpu/dfc.cpp (the kernel) would both be dfc.o: compile them through uniquely named links.
    staged = build_dir / "src"
    staged.mkdir(exist_ok=True)
    sources = []
    for rel in build.sources(cuda, ops):
        link = staged / rel.replace("/", "_")
        if not link.is_symlink() or link.resolve() != (ROOT / rel).resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(ROOT / rel)
        sources.append(str(link))
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_include_paths=build.include_dirs(),
        extra_ldflags=build.extra_link_args(),
        build_directory=str(build_dir),
        with_cuda=cuda,
        verbose=verbose,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=["ghost_module", "dfc"])
    p.add_argument("--cuda", action="store_true", help="also compile csrc/cuda/<op>.cu (no GPU needed to compile)")
    p.add_argument("--name", default=None)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    module = load(a.ops, a.cuda, a.name, a.verbose)
    print(module.__file__, module.build_info())


if __name__ == "__main__":
    sys.exit(main())
