"""Stopping a child process we started, by PID: the one way it is done here.

Every long-lived child (server, client agent, benchmark load) is started in
its own session, so its PID is also its process group: a SIGTERM to the PID
asks for a graceful stop, and a SIGKILL to the group afterwards takes any
worker left behind with it — without ever naming a process by its command.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger("hongbao.procs")


def stop_group(proc: subprocess.Popen, timeout: float = 10.0, name: str = "") -> int | None:
    """SIGTERM ``proc``, wait up to ``timeout``, then SIGKILL its process group.

    Returns the exit status (None if it could not be reaped). Safe to call twice.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing its group",
                        name or "child", proc.pid, timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, or the child itself
    except (ProcessLookupError, PermissionError):
        pass
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None
