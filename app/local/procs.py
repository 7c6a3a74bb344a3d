"""Stopping a process we started, by PID: the one way it is done here.

Every long-lived child (server, client agent, benchmark load, the monitor
stack's daemons) is started as the leader of its own process group, so its
PID is also its group's: a SIGTERM to the PID asks for a graceful stop, and
a SIGKILL to the group afterwards takes any worker left behind with it —
without ever naming a process by its command.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

log = logging.getLogger("hongbao.procs")

GONE_TIMEOUT = 2.0  # seconds to wait after SIGKILL for the group's members to be reaped


def _running(pid: int) -> bool:
    """Is ``pid`` alive (not ended, not a zombie waiting for its parent)?"""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_group(target: subprocess.Popen | int, timeout: float = 10.0,
               name: str = "") -> int | None:
    """SIGTERM ``target`` (our child or a PID), wait up to ``timeout``, SIGKILL its group.

    Returns our child's exit status (None if it could not be reaped, or for a
    PID that is not our child). Safe to call twice.
    """
    proc = None if isinstance(target, int) else target  # a Popen (or psutil.Popen)
    pid = proc.pid if proc is not None else int(target)
    if proc.poll() is None if proc is not None else _running(pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if proc.poll() is None if proc is not None else _running(pid):
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing its group",
                        name or "child", pid, timeout)
    try:
        os.killpg(pid, signal.SIGKILL)  # workers left behind, or the leader itself
    except (ProcessLookupError, PermissionError):
        pass
    code = None
    if proc is not None:
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline:  # until the killed members are reaped
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.02)
    return code
