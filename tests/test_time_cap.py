"""The time-boxing plugin of the GPU run (tests/_time_cap.py) and its shard runner (scripts/gpu_tests.py), on a tiny
suite of sleeping tests run in pytest subprocesses: an overrun fails at the cap with its traceback, the global budget
skips what has not started and cuts what runs past it, a test stuck where SIGALRM cannot reach it ends its process
through faulthandler and the runner resumes the shard without it. No torch in the subprocesses; ~10 s."""
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

CONFTEST = f"""
import sys
sys.path.insert(0, {TESTS_DIR!r})
from _time_cap import *  # noqa
"""

SLEEPERS = """
import signal, time
import pytest

def test_a_fast():
    pass

def test_b_overruns():
    time.sleep(30)

def test_c_short():
    time.sleep(0.5)

def test_d_cut_by_budget():
    time.sleep(30)

def test_e_not_started():
    pass
"""


def _suite(tmp_path, body):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(body))
    return tmp_path


def _pytest(path, env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTFAST_TEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(path), *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60, cwd=str(path))


def _outcomes(junit):
    res = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kids = {child.tag: child for child in case}
        kind = next((k for k in ("failure", "error", "skipped") if k in kids), "passed")
        res[case.get("name")] = (kind, (kids[kind].get("message") or "") if kind in kids else "")
    return res


def test_cap_fails_an_overrun_and_the_budget_skips_the_rest(tmp_path):
    suite = _suite(tmp_path, SLEEPERS)
    log = tmp_path / "progress.log"
    # cap 1.5 s; budget 3 s (+0.3 s for a test running at the deadline): a passes, b fails at 1.5 s, c runs 1.5-2.0,
    # d starts at 2.0 and is cut at 3.3 (before its cap at 3.5), e starts after the deadline
    env = {"GHOSTFAST_TEST_TIMEOUT_S": "1.5", "GHOSTFAST_TEST_BUDGET_S": "3", "GHOSTFAST_TEST_BUDGET_GRACE_S": "0.3",
           "GHOSTFAST_TEST_LOG": str(log)}
    proc = _pytest(suite, env, f"--junitxml={tmp_path / 'junit.xml'}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = _outcomes(tmp_path / "junit.xml")
    assert got["test_a_fast"][0] == "passed"
    assert got["test_b_overruns"][0] == "failure" and "per-test time cap of 1.5 s" in got["test_b_overruns"][1]
    assert "time.sleep(30)" in proc.stdout  # the traceback points into the test
    assert got["test_c_short"][0] == "passed"
    cut = got["test_d_cut_by_budget"]
    assert cut[0] == "skipped" and "while this test was running" in cut[1]
    assert got["test_e_not_started"][0] == "skipped" and "before this test started" in got["test_e_not_started"][1]
    lines = log.read_text().splitlines()
    assert lines[0] == "collected\t5" and lines[-1] == "finished\t1"
    assert sum(line.startswith("end\t") for line in lines) == 5


HANGS = """
import signal, time

def test_a_ok():
    pass

def test_b_stuck_in_c():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as if inside a kernel launch or a compile
    time.sleep(30)

def test_c_after():
    pass

def test_d_after():
    pass
"""


def test_a_hang_ends_the_process_and_the_runner_resumes_without_it(tmp_path):
    suite = _suite(tmp_path, HANGS)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTFAST_TEST_")}
    env.update(GHOSTFAST_TEST_HARD_GRACE_S="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_tests.py"), "run", "--out", str(out),
                           "--tag", "t", "--shards", "2", "--timeout-s", "1", "--budget-s", "40", "--", str(suite)],
                          env=env, capture_output=True, text=True, timeout=90, cwd=str(suite))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = _outcomes(out / "t.xml")
    # shard 0: a, c; shard 1: b (hangs: the process is ended, the shard resumed), d
    assert got["test_a_ok"][0] == got["test_c_after"][0] == got["test_d_after"][0] == "passed", got
    assert got["test_b_stuck_in_c"][0] == "failure" and "hung" in got["test_b_stuck_in_c"][1], got
    summary = (out / "t_summary.txt").read_text()
    assert "3 passed, 1 failed" in summary, summary
    assert "test_b_stuck_in_c" in summary and "resumed" in summary, summary
    assert "test_b_stuck_in_c" in (out / "t_shard1.log").read_text()  # the faulthandler dump names the test


def test_shards_and_select_partition_the_suite(tmp_path):
    suite = _suite(tmp_path, """
        import pytest

        @pytest.mark.parametrize("kernel_backend", ["triton", "cuda"])
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_k(n, kernel_backend):
            pass

        def test_plain():
            pass
    """)

    def collected(**env):
        proc = _pytest(suite, {f"GHOSTFAST_TEST_{k}": v for k, v in env.items()}, "--collect-only")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line}

    triton = collected(SELECT="kernel_backend=triton")
    rest = collected(SELECT="kernel_backend!=triton")
    assert triton == {f"test_k[{n}-triton]" for n in (1, 2, 3)}
    assert rest == {f"test_k[{n}-cuda]" for n in (1, 2, 3)} | {"test_plain"}
    shards = [collected(SELECT="kernel_backend!=triton", SHARD=f"{i}/2") for i in range(2)]
    assert set().union(*shards) == rest and sum(map(len, shards)) == len(rest)
    with pytest.raises(AssertionError):
        collected(SHARD="2/2")


def test_gpu_run_script_parses_and_rejects_unknown_stages(tmp_path):
    script = os.path.join(ROOT, "scripts", "gpu_run.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", script, str(tmp_path / "out"), "tests", "nosuchstage"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown stage nosuchstage" in proc.stderr
