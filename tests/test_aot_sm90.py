"""The Triton kernels compiled for sm_90 with Triton's own compiler and no GPU (scripts/aot_sm90.py): the CI subset
of the launches the wrappers make for GhostNet's shapes (every kernel x config, every kernel x dtype x flag value,
every int argument a launch specialises to 1) must compile and fit sm_90's shared memory, and the committed table
(`make aot-sm90`) must hold every config the wrappers pick today.

Runs the script in a subprocess: the kernel modules must be imported with the real JIT, while this test session
imports them under the interpreter (TRITON_INTERPRET=1, tests/conftest.py)."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "aot_sm90.py")
TABLE = os.path.join(ROOT, "benchmarks", "results", "sm90-static", "triton_sm90.csv")
SMEM_LIMIT = 232448
KERNELS = ("_ghost_module_fwd_kernel", "_ghost_module_bwd_kernel", "_dfc_kernel", "_dfc_backward_kernel")
DTYPES = ("fp32", "fp16", "bf16", "fp64")

pytest.importorskip("triton")


def _config_key(row):
    # fp16 and bf16 share their configs: the table compiles each once per element size
    elem = "half" if row["dtype"] in ("fp16", "bf16") else row["dtype"]
    return row["kernel"], elem, row["config"], row["num_warps"], row["num_stages"]


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot_sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(min(2, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, SCRIPT, "--set", "ci", "--jobs", jobs, "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert proc.returncode == 0, "sm_90 AOT compile failed:\n" + "\n".join(failed or [proc.stdout[-3000:],
                                                                                       proc.stderr[-3000:]])
    with open(out / "triton_sm90_ci.csv") as f:
        return list(csv.DictReader(f))


def test_aot_sm90_ci_subset_compiles_and_fits(ci_rows):
    assert {(r["kernel"], r["dtype"]) for r in ci_rows} == {(k, d) for k in KERNELS for d in DTYPES}
    for r in ci_rows:
        assert r["status"] == "ok", r
        assert int(r["shared"]) <= SMEM_LIMIT, r
        assert 0 < int(r["regs"]) <= 255, r
    # the GPU's int==1 specialisation is reproduced: fp64 bilinear gates on 1-pixel images compiled
    assert any(r["kernel"] == "_ghost_module_fwd_kernel" and r["dtype"] == "fp64" and "GATE_BILINEAR=1" in r["flags"]
               and {"H", "W"} & set(r["spec1"].split()) for r in ci_rows)


def test_aot_sm90_committed_table_is_current(ci_rows):
    """Every config the wrappers pick today is in the committed table, compiled without a failure: after a change
    to a config function or a kernel signature, run `make aot-sm90` and commit the table."""
    with open(TABLE) as f:
        table = list(csv.DictReader(f))
    assert all(r["status"] == "ok" for r in table), [r for r in table if r["status"] != "ok"][:3]
    committed = {_config_key(r) for r in table}
    missing = sorted({_config_key(r) for r in ci_rows} - committed)
    assert not missing, f"configs not in {os.path.relpath(TABLE, ROOT)} (run `make aot-sm90`): {missing[:5]}"
