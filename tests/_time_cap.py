"""Per-test time cap, global wall-clock budget, shards and a progress log for time-boxed runs (the GPU lease:
scripts/gpu_tests.py). Registered from tests/conftest.py; inert unless one of its environment variables is set, so
`make test` is unchanged. pytest-timeout and pytest-xdist are not needed (the GPU image may lack them).

  GHOSTFAST_TEST_TIMEOUT_S  per-test cap in seconds (setup + call + teardown together). An overrun raises
                            TimeCapExceeded where the test is (SIGALRM): a failure carrying the test's traceback.
                            If the test is stuck in C code and does not return to Python within
                            GHOSTFAST_TEST_HARD_GRACE_S (default 30) more, faulthandler dumps every thread's stack
                            into the progress log (else stderr) and ends the process (exit status 1): the runner
                            sees which test hung in the progress log and resumes the shard without it.
  GHOSTFAST_TEST_DEADLINE   absolute time (Unix seconds) after which tests that have not started are skipped
  GHOSTFAST_TEST_BUDGET_S   or: the same, relative to this module's import (the session's start)
                            A test still running at the deadline gets GHOSTFAST_TEST_BUDGET_GRACE_S (default 20)
                            more, then is skipped mid-run (reason: the budget), so a session ends with its report.
  GHOSTFAST_TEST_SHARD      "i/n": run every n-th collected test from the i-th (0 <= i < n)
  GHOSTFAST_TEST_SELECT     "param=value" keeps only tests parametrized with that value; "param!=value" drops them
                            (e.g. kernel_backend=triton: the Triton half of the kernel tests)
  GHOSTFAST_TEST_EXCLUDE_FILE  a file of node ids (one a line) to deselect (a shard resumed after a crash)
  GHOSTFAST_TEST_LOG        progress log, written and flushed per event: "collected N", "start <nodeid>",
                            "end <outcome> <seconds> <nodeid>", "finished <exitstatus>" (tab-separated)

The alarm is armed only inside the setup, call and teardown phases (never inside pytest's own code between them).
SIGALRM interrupts Python code and blocking waits; a kernel launch or a compile in C code is reached by the
faulthandler backstop only."""
import faulthandler
import os
import signal
import sys
import time

import pytest

__all__ = ["pytest_collection_modifyitems", "pytest_runtest_setup", "pytest_runtest_call", "pytest_runtest_teardown",
           "pytest_runtest_logstart", "pytest_runtest_logreport", "pytest_sessionfinish"]


def _float_env(name, default=None):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from e


CAP_S = _float_env("GHOSTFAST_TEST_TIMEOUT_S")
HARD_GRACE_S = _float_env("GHOSTFAST_TEST_HARD_GRACE_S", 30.0)
BUDGET_GRACE_S = _float_env("GHOSTFAST_TEST_BUDGET_GRACE_S", 20.0)
DEADLINE = _float_env("GHOSTFAST_TEST_DEADLINE")
if DEADLINE is None and _float_env("GHOSTFAST_TEST_BUDGET_S") is not None:
    DEADLINE = time.time() + _float_env("GHOSTFAST_TEST_BUDGET_S")
_TIMED = (CAP_S is not None or DEADLINE is not None) and hasattr(signal, "setitimer")


class TimeCapExceeded(BaseException):
    """A test ran past GHOSTFAST_TEST_TIMEOUT_S. A BaseException, so that `except Exception` in the code under test
    (e.g. a backend fallback guard) cannot swallow it; pytest reports it as a failure."""


# ---- the progress log ------------------------------------------------------------------------------------------

_LOG = None


def _log(*fields):
    global _LOG
    path = os.environ.get("GHOSTFAST_TEST_LOG")
    if not path:
        return
    if _LOG is None:
        _LOG = open(path, "a", buffering=1)
    _LOG.write("\t".join(str(f) for f in fields) + "\n")
    _LOG.flush()


def pytest_runtest_logstart(nodeid, location):
    _log("start", nodeid)


_OUTCOME = {}  # nodeid -> (outcome, seconds) over the three phases


def pytest_runtest_logreport(report):
    outcome, seconds = _OUTCOME.get(report.nodeid, ("passed", 0.0))
    seconds += getattr(report, "duration", 0.0) or 0.0
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped and outcome == "passed":
        outcome = "skipped"
    _OUTCOME[report.nodeid] = (outcome, seconds)
    if report.when == "teardown":
        _log("end", outcome, f"{seconds:.2f}", report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    _log("finished", int(exitstatus))


# ---- shards and selection --------------------------------------------------------------------------------------

def _selected(item, expr):
    negate = "!=" in expr
    name, value = expr.split("!=" if negate else "=", 1)
    callspec = getattr(item, "callspec", None)
    has = callspec is not None and name.strip() in callspec.params and \
        str(callspec.params[name.strip()]) == value.strip()
    return not has if negate else has


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    keep = list(items)
    expr = os.environ.get("GHOSTFAST_TEST_SELECT", "").strip()
    if expr:
        if "=" not in expr:
            raise pytest.UsageError(f"GHOSTFAST_TEST_SELECT must be param=value or param!=value, got {expr!r}")
        keep = [it for it in keep if _selected(it, expr)]
    shard = os.environ.get("GHOSTFAST_TEST_SHARD", "").strip()
    if shard:
        try:
            index, count = (int(v) for v in shard.split("/"))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            raise pytest.UsageError(f"GHOSTFAST_TEST_SHARD must be i/n with 0 <= i < n, got {shard!r}") from None
        keep = keep[index::count]
    exclude_file = os.environ.get("GHOSTFAST_TEST_EXCLUDE_FILE", "").strip()
    if exclude_file:
        with open(exclude_file) as f:
            excluded = {line.strip() for line in f if line.strip()}
        keep = [it for it in keep if it.nodeid not in excluded]
    if len(keep) != len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
        items[:] = keep
    _log("collected", len(items))


# ---- the cap and the budget ------------------------------------------------------------------------------------

_ITEM_START = {}


def _on_alarm(signum, frame):
    nodeid, start = _CURRENT
    now = time.time()
    if CAP_S is not None and now >= start + CAP_S - 0.05:
        raise TimeCapExceeded(f"{nodeid} ran {now - start:.1f} s, past the per-test time cap of {CAP_S:g} s "
                              "(GHOSTFAST_TEST_TIMEOUT_S)")
    pytest.skip(f"the global test budget (GHOSTFAST_TEST_DEADLINE) ran out while this test was running "
                f"({now - start:.1f} s in)")


_CURRENT = (None, 0.0)


def _arm(item, phase):
    """Arm SIGALRM for what is left of this test's time (cap and budget), plus the faulthandler backstop."""
    global _CURRENT
    start = _ITEM_START.setdefault(item.nodeid, time.time())
    _CURRENT = (item.nodeid, start)
    limits = []
    if CAP_S is not None:
        limits.append(start + CAP_S)
    if DEADLINE is not None:
        limits.append(max(DEADLINE, start) + BUDGET_GRACE_S)
    left = min(limits) - time.time()
    if phase == "teardown":
        left = max(left, 10.0)  # an overrun test still gets its teardown (fixtures release GPU memory, patches)
    left = max(left, 0.01)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, left)
    log_file = _LOG if _LOG is not None else sys.stderr
    try:
        faulthandler.dump_traceback_later(left + HARD_GRACE_S, exit=True, file=log_file)
    except (ValueError, AttributeError, OSError):  # a stream without a file descriptor
        pass


def _disarm():
    signal.setitimer(signal.ITIMER_REAL, 0)
    faulthandler.cancel_dump_traceback_later()


def _timed_phase(item, phase):
    if not _TIMED:
        yield
        return
    _arm(item, phase)
    try:
        yield
    finally:
        _disarm()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    if DEADLINE is not None and time.time() > DEADLINE:
        # a skip mark, not a raise (a hookwrapper must not raise before it yields): pytest's skipping plugin skips
        # the test before any fixture is set up
        item.add_marker(pytest.mark.skip(reason="the global test budget ran out before this test started "
                                                "(GHOSTFAST_TEST_DEADLINE)"))
        yield
        return
    yield from _timed_phase(item, "setup")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    yield from _timed_phase(item, "call")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    yield from _timed_phase(item, "teardown")
