"""A pytest plugin that keeps a stated, deterministic subset of the collected tests: `-p pytest_subset --subset-every N`.

The tests are grouped by file and, for the kernel tests, by fused backend (the `kernel_backend` parameter: `triton`,
`cpu`, `cuda`); within each group, in collection order, the 1st, (N+1)th, (2N+1)th... test is kept. So every test
file and every backend of each file runs at least once, and the kept tests spread over each file's parametrizations
(dtypes, shapes, modes). The rest are reported as deselected. Used by scripts/test_torch211.sh (the torch 2.11 leg of
CI), with PYTHONPATH pointing at scripts/.
"""
from collections import defaultdict


def pytest_addoption(parser):
    parser.addoption("--subset-every", type=int, default=1, metavar="N",
                     help="keep every Nth test of each (file, kernel backend) group (default 1: all)")


def _group(item):
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("kernel_backend") if callspec is not None else None
    return item.nodeid.split("::", 1)[0], backend


def pytest_collection_modifyitems(config, items):
    every = config.getoption("--subset-every")
    if every <= 1:
        return
    seen = defaultdict(int)
    kept, dropped = [], []
    for item in items:
        key = _group(item)
        (kept if seen[key] % every == 0 else dropped).append(item)
        seen[key] += 1
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config):
    every = config.getoption("--subset-every")
    if every > 1:
        return f"subset: every {every}th test of each (file, kernel backend) group (scripts/pytest_subset.py)"
