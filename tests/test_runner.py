"""The local-fleet runner's process handling: deadlines on ready lines, stop by PID then group.

Small real processes (``python -c``), no servers: a child that never prints its
ready line, or prints half a line and hangs, cannot hang the caller; a child
that ignores SIGTERM and leaves a grandchild behind is gone after ``stop``.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from app.local.procs import stop_group
from app.local.runner import Service, niced

READY = re.compile(r"^ready (\d+)")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("code", [
    "import time; time.sleep(60)",  # silent
    "import sys, time; sys.stdout.write('rea'); sys.stdout.flush(); time.sleep(60)",  # half
    "print('not the line', flush=True); import time; time.sleep(60)",  # another line
])
def test_a_child_without_its_ready_line_fails_within_the_deadline_and_is_stopped(tmp_path,
                                                                                  code):
    service = Service("silent", python(code), tmp_path / "silent.log", READY)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start within 1s"):
        service.start(timeout=1.0)
    assert time.monotonic() - started < 1.0 + 10.0  # the deadline, plus the stop's own wait
    assert service.exited() is not None


def test_lines_after_the_ready_line_are_read_under_a_deadline_too(tmp_path):
    code = ("import sys, time; print('ready 7', flush=True); print('one', flush=True); "
            "sys.stdin.readline(); print('two', flush=True); time.sleep(60)")
    service = Service("talker", python(code), tmp_path / "talker.log", READY, stdin=True)
    try:
        assert service.start(timeout=10).group(1) == "7"
        assert service.read_line(5) == "one"
        assert service.read_line(0.3) is None  # it waits for us: no line, no hang
        service.send_line("go")
        assert service.read_line(5) == "two"
    finally:
        service.stop()
    assert service.exited() is not None


def test_stop_group_kills_a_child_that_ignores_sigterm_and_its_grandchild(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = ("import os, signal, subprocess, sys, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); "
            "print('ready 1', flush=True); time.sleep(60)")
    service = Service("stubborn", python(code), tmp_path / "stubborn.log", READY)
    service.start(timeout=10)
    grandchild = int(pidfile.read_text())
    assert alive(service.pid) and alive(grandchild)
    code = stop_group(service.proc, timeout=0.5, name="stubborn")
    assert code == -9  # SIGTERM ignored: SIGKILL of the group after the timeout
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
    assert stop_group(service.proc, timeout=0.5) == -9  # safe to call twice
    assert os.getpgid(os.getpid()) != service.pid  # we never were in its group


def test_a_child_leads_its_own_group_in_our_session_so_nice_counts(tmp_path):
    """With autogroup scheduling a session of its own would be a CPU share of its own:
    11 SETs then got the share of one of 17 niced client agents (runner.Service)."""
    code = "import time; print('ready 1', flush=True); time.sleep(60)"
    service = Service("grouped", niced(python(code), 5), tmp_path / "grouped.log", READY)
    try:
        service.start(timeout=10)
        assert os.getpgid(service.pid) == service.pid  # stop_group's SIGKILL reaches its group
        assert os.getsid(service.pid) == os.getsid(0)  # not a session (an autogroup) of its own
        assert os.getpriority(os.PRIO_PROCESS, service.pid) == os.getpriority(
            os.PRIO_PROCESS, 0) + 5
        autogroup = f"/proc/{service.pid}/autogroup"
        if os.path.exists(autogroup):
            # Empty where a cpu cgroup, not an autogroup, schedules the task (as under CI's
            # runner); then both are empty. Otherwise the same "/autogroup-N nice K" line.
            with open(autogroup) as theirs, open("/proc/self/autogroup") as ours:
                assert theirs.read() == ours.read()
    finally:
        service.stop()


def test_process_figures_sum_a_whole_tree_as_psutil_reads_it(tmp_path):
    """CPU and RSS of a root and its grandchild, from one pass over /proc, match psutil's."""
    import psutil

    from app.local.procs import stop_group as stop
    from app.local.runner import process_figures

    pidfile = tmp_path / "grandchild.pid"
    burn = "x = 0\nfor i in range(4 * 10**6): x += i\nimport time; time.sleep(60)"
    code = ("import subprocess, sys, time; "
            f"p = subprocess.Popen([sys.executable, '-c', {burn!r}]); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); "
            "blob = bytearray(30 << 20); print('ready 1', flush=True); time.sleep(60)")
    service = Service("tree", python(code), tmp_path / "tree.log", READY)
    service.start(timeout=10)
    try:
        grandchild = int(pidfile.read_text())
        deadline = time.monotonic() + 20
        while psutil.Process(grandchild).status() != psutil.STATUS_SLEEPING:
            assert time.monotonic() < deadline, "the grandchild never finished burning"
            time.sleep(0.05)
        procs = [psutil.Process(service.pid), psutil.Process(grandchild)]
        expected_cpu = sum(sum(p.cpu_times()[:2]) for p in procs)
        expected_rss = sum(p.memory_info().rss for p in procs)
        cpu, rss = process_figures([service.pid, 999_999_999])  # a gone root is skipped
        assert cpu == pytest.approx(expected_cpu, abs=0.02) and cpu > 0.1
        assert rss == expected_rss and rss > 30 << 20
        assert process_figures([grandchild])[1] == procs[1].memory_info().rss  # a subtree alone
    finally:
        stop(service.proc, timeout=1, name="tree")
