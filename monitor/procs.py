"""Process plumbing for monitor.stack: run a command, start a daemon in its own
session, recognise it later by its command line. Stopping it by pid, then its
group, is ``app.local.procs.stop_group`` (the one way it is done).

Why a session per daemon: its process group id is then its pid, so a stop
reaches the daemon's children (gunicorn's workers) without ever naming a
program (no pkill), and a test fixture stops exactly what it started.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL for one group


class StackError(RuntimeError):
    """The stack could not be installed, started or reached."""


def digest(path: Path) -> str:
    """sha256 of a file: the install stamps compare it to skip work."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(argv: list[str], **kw) -> None:
    """Run a setup command to completion (bounded: 10 min); StackError if it fails."""
    try:
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, timeout=600, **kw)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"{' '.join(argv[:3])} ...: {exc}") from exc


def spawn(argv: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a daemon in its own session (pgid = pid), output appended to log."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def is_ours(pid: int, root: Path) -> bool:
    """Is pid alive and one of the daemons of the stack at root?

    Every daemon's arguments name root/conf (statsd.js, --config=carbon.conf,
    --pythonpath); it is matched whole, so /tmp/x does not claim the daemons
    of /tmp/x2, and a reused pid of another program is never signalled.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    conf = str(root / "conf").encode()
    for arg in cmdline.split(b"\0"):
        value = arg.partition(b"=")[2] if arg.startswith(b"--") else arg  # --config=PATH
        if value == conf or value.startswith(conf + b"/"):
            return True
    return False


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
