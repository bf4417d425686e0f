#!/usr/bin/env python3
"""Run the test suite as N pytest processes over disjoint shards of its tests, inside a wall-clock deadline, and merge
their results: the test stage of scripts/gpu_run.sh.

Why shards of processes: on the GPU the suite's time is mostly Triton compiling kernels (the non-slow tests alone need
~543 distinct compiles of 0.7-4 s of one CPU core each), and a pytest process compiles one kernel at a time. N
processes over one GPU compile N at a time on the machine's 16 cores, and share one Triton cache (TRITON_CACHE_DIR;
its writes are atomic), so a kernel two shards need is compiled once when they meet it at different times. The GPU
itself is shared fine by several processes (each holds a context of ~0.5 GB of 141 GB). The shards take every N-th
collected test (tests/_time_cap.py, GHOSTFAST_TEST_SHARD), so the parametrizations of one test, which cost alike,
spread over all shards; pytest-xdist would do the same with a work queue but is not relied on (assume the GPU image
may lack it).

Each process runs under tests/_time_cap.py: a per-test cap (an overrun fails with its traceback), the shared
deadline (tests not started by then are skipped with the reason), a progress log. A process that dies (a test stuck
in C code past the cap: faulthandler ends it; a crash) is resumed on its remaining tests, without the one it was in,
which is recorded as failed. Past the deadline plus the graces, stragglers are killed.

  gpu_tests.py run --out DIR --tag TAG [--shards N] [--timeout-s CAP] [--budget-s S | --deadline UNIX_S]
                   [--select EXPR] [--nice N] [-- PYTEST_ARGS]     -> DIR/TAG.xml, DIR/TAG_summary.txt, shard logs
  gpu_tests.py merge --out DIR --tag TAG PART_TAG...               -> DIR/TAG.xml, DIR/TAG_summary.txt

Exit status 0 when every test passed or was skipped and no process died, else 1."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_REASON = "global test budget"
# what the runner sets per shard (the graces, GHOSTFAST_TEST_HARD_GRACE_S and _BUDGET_GRACE_S, pass through)
OWN_ENV = {f"GHOSTFAST_TEST_{k}" for k in ("SHARD", "DEADLINE", "BUDGET_S", "LOG", "TIMEOUT_S", "SELECT",
                                           "EXCLUDE_FILE")}


# ---- one shard: a pytest process, resumed after a death ---------------------------------------------------------

class Shard:
    def __init__(self, index, count, args, deadline):
        self.index, self.count, self.args, self.deadline = index, count, args, deadline
        self.attempt, self.proc, self.done, self.hung, self.notes = 0, None, {}, [], []
        self.collected, self.finished, self.started_at, self.wall = None, False, time.time(), 0.0
        self.exit_status = None
        self.log = os.path.join(args.out, f"{args.tag}_shard{index}.log")
        self.junits = []

    def _path(self, suffix):
        extra = f".{self.attempt}" if self.attempt else ""
        return os.path.join(self.args.out, f"{self.args.tag}_shard{self.index}{extra}{suffix}")

    def start(self):
        a = self.args
        env = {k: v for k, v in os.environ.items() if k not in OWN_ENV}
        env.update(PYTHONUNBUFFERED="1", GHOSTFAST_TEST_SHARD=f"{self.index}/{self.count}",
                   GHOSTFAST_TEST_DEADLINE=f"{self.deadline:.3f}", GHOSTFAST_TEST_LOG=self._path(".progress"))
        if a.timeout_s:
            env["GHOSTFAST_TEST_TIMEOUT_S"] = str(a.timeout_s)
        if a.select:
            env["GHOSTFAST_TEST_SELECT"] = a.select
        if self.attempt:
            exclude = self._path(".exclude")
            with open(exclude, "w") as f:
                f.write("\n".join(list(self.done) + self.hung) + "\n")
            env["GHOSTFAST_TEST_EXCLUDE_FILE"] = exclude
        junit = self._path(".xml")
        self.junits.append(junit)
        cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--junitxml={junit}",
               f"--durations={a.durations}", *a.pytest_args]
        out = open(self.log, "a")
        out.write(f"==== {self.args.tag} shard {self.index}/{self.count} attempt {self.attempt}: {' '.join(cmd)}\n")
        out.flush()
        nice = a.nice
        self.proc = subprocess.Popen(cmd, cwd=a.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        out.close()

    def _read_progress(self):
        """(started-but-not-ended node ids, finished?) of the current attempt; records ended tests in self.done."""
        open_ids, finished = {}, False
        try:
            with open(self._path(".progress")) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return [], False
        for line in lines:
            fields = line.split("\t")
            if fields[0] == "collected" and self.collected is None:
                self.collected = int(fields[1])
            elif fields[0] == "start":
                open_ids[fields[1]] = True
            elif fields[0] == "end" and len(fields) == 4:
                open_ids.pop(fields[3], None)
                self.done[fields[3]] = (fields[1], float(fields[2]), self.attempt)
            elif fields[0] == "finished":
                finished = True
                self.exit_status = int(fields[1])
        return list(open_ids), finished

    def _copy_dump(self, what):
        """Append what the dead process wrote into its progress file besides the protocol (faulthandler's dump of
        every thread) to the shard's log, where a reader looks."""
        try:
            with open(self._path(".progress"), errors="replace") as f:
                extra = [line for line in f.read().splitlines()
                         if line.split("\t", 1)[0] not in ("collected", "start", "end", "finished")]
        except FileNotFoundError:
            extra = []
        with open(self.log, "a") as f:
            f.write(f"==== attempt {self.attempt} died {what}; its stack dump:\n" + "\n".join(extra) + "\n")

    def poll(self):
        """True while this shard still runs (or was just resumed)."""
        if self.proc is None:
            return False
        rc = self.proc.poll()
        if rc is None:
            return True
        running, finished = self._read_progress()
        self.proc = None
        if finished:
            self.finished = True
            self.wall = time.time() - self.started_at
            if self.exit_status not in (0, 1, 5):  # 5: no tests collected (fewer tests than shards)
                self.notes.append(f"shard {self.index}: pytest ended with exit status {self.exit_status} "
                                  f"(2 interrupted, 3 internal error, 4 usage error): see {os.path.basename(self.log)}")
            return False
        what = f"in {running[0]}" if running else "between tests"
        self._copy_dump(what)
        self.notes.append(f"shard {self.index}: attempt {self.attempt} died (exit status {rc}) {what}")
        self.hung += running
        if time.time() < self.deadline and self.attempt < self.args.resumes:
            self.attempt += 1
            self.notes[-1] += f"; resumed without {'it' if running else 'the tests done'}"
            self.start()
            return True
        self.wall = time.time() - self.started_at
        return False

    def kill(self):
        if self.proc is not None:
            running, _ = self._read_progress()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.notes.append(f"shard {self.index}: killed at the deadline (+ graces) "
                              f"{'in ' + running[0] if running else 'between tests'}")
            self.hung += running
            self.proc = None
            self.wall = time.time() - self.started_at


# ---- junit: read, synthesize, merge -----------------------------------------------------------------------------

def _nodeid_parts(nodeid):
    parts = nodeid.split("::")
    module = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
    return ".".join([module.replace("/", ".")] + parts[1:-1]), parts[-1]


def _nodeid(case):
    classname, name = case.get("classname", ""), case.get("name", "")
    bits = classname.split(".")
    for cut in range(len(bits), 0, -1):  # tests.test_ops.TestX -> tests/test_ops.py::TestX
        path = "/".join(bits[:cut]) + ".py"
        if os.path.exists(os.path.join(ROOT, path)) or cut == 1:
            return "::".join([path] + bits[cut:] + [name])
    return name


def _case(nodeid, outcome, seconds, message, text=""):
    classname, name = _nodeid_parts(nodeid)
    case = ET.Element("testcase", classname=classname, name=name, time=f"{seconds:.3f}")
    if outcome != "passed":
        tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[outcome]
        child = ET.SubElement(case, tag, message=message)
        child.text = text
    return case


def _read_cases(path):
    try:
        root = ET.parse(path).getroot()
    except (FileNotFoundError, ET.ParseError):
        return None, []
    notes = [p.get("value") for p in root.iter("property") if p.get("name") == "note"]
    return list(root.iter("testcase")), notes


def _outcome(case):
    for child in case:
        if child.tag in ("failure", "error", "skipped"):
            return {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag], child
    return "passed", None


def _dump_of(log_path, nodeid):
    """The faulthandler dump printed after `nodeid` started, from a shard's log or progress file."""
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    at = text.rfind("Thread 0x")
    if at < 0:
        at = text.rfind("Current thread")
    return text[at:at + 4000] if at >= 0 else ""


def write_results(out, tag, cases, notes, wall_s, extra_lines=()):
    suite = ET.Element("testsuite", name=f"ghostfast-{tag}")
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in cases:
        counts[_outcome(case)[0]] += 1
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(counts["failed"]))
    suite.set("errors", str(counts["error"]))
    suite.set("skipped", str(counts["skipped"]))
    suite.set("time", f"{wall_s:.1f}")
    props = ET.SubElement(suite, "properties")
    for note in notes:
        ET.SubElement(props, "property", name="note", value=note)
    suite.extend(cases)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(os.path.join(out, f"{tag}.xml"), encoding="utf-8", xml_declaration=True)

    budget = sum(1 for c in cases if _outcome(c)[0] == "skipped" and BUDGET_REASON in (_outcome(c)[1].get("message")
                                                                                        or ""))
    capped = sum(1 for c in cases if _outcome(c)[0] == "failed" and "per-test time cap" in
                 (_outcome(c)[1].get("message") or ""))
    lines = [f"tests [{tag}]: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
             f"{counts['skipped']} skipped ({budget} by the time budget); {capped} over the per-test cap; "
             f"{wall_s:.0f} s wall", *extra_lines]
    bad = [c for c in cases if _outcome(c)[0] in ("failed", "error")]
    if bad:
        lines.append(f"failed / errors ({len(bad)}):")
        for c in bad[:60]:
            msg = (_outcome(c)[1].get("message") or "").strip().splitlines()
            lines.append(f"  {_nodeid(c)}  {(msg[0] if msg else '')[:200]}")
        if len(bad) > 60:
            lines.append(f"  ... {len(bad) - 60} more in {tag}.xml")
    if notes:
        lines.append("notes:")
        lines += [f"  {n}" for n in notes]
    slow = sorted(cases, key=lambda c: -float(c.get("time") or 0))[:25]
    lines.append("slowest tests:")
    lines += [f"  {float(c.get('time') or 0):7.2f} s  {_nodeid(c)}" for c in slow]
    with open(os.path.join(out, f"{tag}_summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return counts, lines


def collect(shards, out, tag, wall_s, timeout_s):
    cases, notes = [], []
    for s in shards:
        notes += s.notes
        seen = set()
        for attempt, junit in enumerate(s.junits):
            got, _ = _read_cases(junit)
            if got is None:  # the attempt died before writing its junit: its ended tests from the progress log
                for nodeid, (outcome, seconds, att) in s.done.items():
                    if att == attempt and nodeid not in seen:
                        seen.add(nodeid)
                        msg = "" if outcome in ("passed", "skipped") else \
                            f"{outcome} (its process died before writing junit; see {tag}_shard{s.index}.log)"
                        cases.append(_case(nodeid, outcome, seconds, msg))
                continue
            for case in got:
                seen.add(_nodeid(case))
                cases.append(case)
        for nodeid in s.hung:
            if nodeid not in seen:
                seen.add(nodeid)
                cap = f" past the per-test cap of {timeout_s:g} s" if timeout_s else ""
                cases.append(_case(nodeid, "failed", 0.0, f"hung{cap}: it did not return to Python (stuck in C code "
                                                          "or killed at the deadline); its process was ended",
                                   _dump_of(s.log, nodeid)))
        if s.collected is not None and s.finished is False:
            missing = s.collected - len([n for n in seen])
            if missing > 0:
                notes.append(f"shard {s.index}: {missing} of its {s.collected} tests never ran (its process was "
                             "ended and not resumed)")
    shard_walls = ", ".join(f"{s.wall:.0f}" for s in shards)
    return write_results(out, tag, cases, notes, wall_s, [f"{len(shards)} shards, wall s each: {shard_walls}"])


def cmd_run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    deadline = args.deadline if args.deadline else time.time() + args.budget_s
    grace = float(os.environ.get("GHOSTFAST_TEST_BUDGET_GRACE_S", 20)) + \
        float(os.environ.get("GHOSTFAST_TEST_HARD_GRACE_S", 30)) + 10
    t0 = time.time()
    shards = [Shard(i, args.shards, args, deadline) for i in range(args.shards)]
    for s in shards:
        s.start()
    while True:
        running = [s for s in shards if s.poll()]
        if not running:
            break
        if time.time() > deadline + grace:
            for s in running:
                s.kill()
            break
        time.sleep(0.5)
    counts, lines = collect(shards, args.out, args.tag, time.time() - t0, args.timeout_s)
    print("\n".join(lines[:2]))
    dead = any(s.notes for s in shards)
    return 0 if counts["failed"] == counts["error"] == 0 and not dead else 1


def cmd_merge(args) -> int:
    cases, notes, wall, missing = [], [], 0.0, []
    for part in args.parts:
        got, part_notes = _read_cases(os.path.join(args.out, f"{part}.xml"))
        if got is None:
            missing.append(part)
            continue
        cases += got
        notes += [f"[{part}] {n}" for n in part_notes]
        root = ET.parse(os.path.join(args.out, f"{part}.xml")).getroot()
        wall += sum(float(s.get("time") or 0) for s in root.iter("testsuite"))
    extra = [f"parts: {', '.join(args.parts)}" + (f" (missing: {', '.join(missing)})" if missing else "")]
    counts, lines = write_results(args.out, args.tag, cases, notes, wall, extra)
    print("\n".join(lines[:2]))
    return 0 if counts["failed"] == counts["error"] == 0 and not missing else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", required=True)
    run.add_argument("--tag", default="tests")
    run.add_argument("--shards", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    run.add_argument("--timeout-s", type=float, default=None, help="per-test cap (GHOSTFAST_TEST_TIMEOUT_S)")
    run.add_argument("--budget-s", type=float, default=600.0, help="deadline from now (default 600)")
    run.add_argument("--deadline", type=float, default=None, help="absolute deadline, Unix seconds")
    run.add_argument("--select", default="", help="GHOSTFAST_TEST_SELECT, e.g. kernel_backend=triton")
    run.add_argument("--nice", type=int, default=0)
    run.add_argument("--resumes", type=int, default=3, help="times a dead shard is resumed (default 3)")
    run.add_argument("--durations", type=int, default=10)
    run.add_argument("--cwd", default=os.getcwd())
    run.add_argument("pytest_args", nargs="*", default=["tests"])
    merge = sub.add_parser("merge")
    merge.add_argument("--out", required=True)
    merge.add_argument("--tag", default="tests")
    merge.add_argument("parts", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        if not args.pytest_args:
            args.pytest_args = ["tests"]
        return cmd_run(args)
    return cmd_merge(args)


if __name__ == "__main__":
    sys.exit(main())
