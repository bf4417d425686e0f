"""A pytest plugin that keeps a stated, deterministic subset of the collected tests: `-p pytest_subset --subset-every N`.

A test is kept when the CRC-32 of its node id is 0 modulo N: about one test in N, spread over each file's
parametrizations (dtypes, shapes, modes) without the periodicity of taking every Nth (which would keep one value of
an inner parameter only). The tests are grouped by file and by backend (a `kernel_backend` or `backend` parameter:
`triton`, `cpu`, `cuda`, `reference`, `auto`); a group the hash left empty keeps its first test, so every test file
and every backend of each file runs. The rest are reported as deselected. Used by scripts/test_torch211.sh (the
torch 2.11 leg of CI), with PYTHONPATH pointing at scripts/.

`--subset-no-slow-interpreter` first drops the whole-model tests (marker `slow`) of the `triton` backend while
Triton runs under its CPU interpreter (TRITON_INTERPRET=1): about a minute each, where they test what the per-module
Triton tests and the whole-model tests of the other backends test together; the leg's budget goes to coverage.
"""
import os
import zlib


def pytest_addoption(parser):
    parser.addoption("--subset-every", type=int, default=1, metavar="N",
                     help="keep about one test in N, at least one per (file, backend) group (default 1: all)")
    parser.addoption("--subset-no-slow-interpreter", action="store_true",
                     help="drop the slow (whole-model) tests of the triton backend under TRITON_INTERPRET=1")


def _group(item):
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    backend = params.get("kernel_backend", params.get("backend"))
    return item.nodeid.split("::", 1)[0], backend if isinstance(backend, str) else None


def _slow_interpreted(item) -> bool:
    return item.get_closest_marker("slow") is not None and _group(item)[1] == "triton"


def pytest_collection_modifyitems(config, items):
    every = config.getoption("--subset-every")
    if config.getoption("--subset-no-slow-interpreter") and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        slow = [item for item in items if _slow_interpreted(item)]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not _slow_interpreted(item)]
    if every <= 1:
        return
    keep = {id(item) for item in items if zlib.crc32(item.nodeid.encode()) % every == 0}
    groups = {}
    for item in items:
        groups.setdefault(_group(item), []).append(item)
    for members in groups.values():
        if not any(id(m) in keep for m in members):
            keep.add(id(members[0]))
    kept = [item for item in items if id(item) in keep]
    dropped = [item for item in items if id(item) not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config):
    every = config.getoption("--subset-every")
    if every > 1:
        return f"subset: about one test in {every}, at least one per (file, backend) (scripts/pytest_subset.py)"
