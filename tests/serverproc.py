"""Test helpers: a real server subprocess and a small blocking protocol client.

The server runs in its own process group and is always stopped by PID
(SIGTERM, then SIGKILL of the group), also when a test fails.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from app import protocol as p
from app.local.procs import stop_group

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"hongbao-server listening port=(\d+) control=([\d.]+):(\d+) sets=(\d+)")


class ServerProcess:
    def __init__(self, journal_dir: Path, sets: int = 4, extra: list[str] | None = None,
                 port: int = 0) -> None:
        self.journal_dir = journal_dir
        self.sets = sets
        self.extra = extra or []
        self.port = port
        self.control_port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = journal_dir.parent / f"server-{time.time_ns()}.log"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "app.server", "--host", "127.0.0.1",
               "--port", str(self.port), "--control", f"127.0.0.1:{self.control_port}",
               "--sets", str(self.sets), "--journal-dir", str(self.journal_dir), *self.extra]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            match = READY.search(line)
            if match:
                self.port = int(match.group(1))
                self.control_port = int(match.group(3))
                return self
        self.stop()
        raise RuntimeError(f"server did not start; log:\n{self.log_path.read_text()[-3000:]}")

    def get(self, path: str, timeout: float = 10.0) -> dict:
        url = f"http://127.0.0.1:{self.control_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            body["_status"] = exc.code
            return body

    def stats(self, audit: bool = False) -> dict:
        return self.get("/stats?audit=1" if audit else "/stats")

    def set_pids(self) -> list[int]:
        return [s["pid"] for s in self.stats()["per_set"] if s["up"]]

    def wait_healthy(self, timeout: float = 20.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                health = self.get("/health", timeout=2)
                if health.get("status") == "ok":
                    return health
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy in {timeout}s: {self.get('/health')}")

    def terminate(self, timeout: float = 20.0) -> int:
        """Graceful stop (SIGTERM to the supervisor); returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc, 15.0, "server")  # SIGKILL of the group: any SET left behind
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()
        self.proc = None


class Client:
    """A blocking one-user client over a real socket (for tests, not load)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = p.Decoder()
        self.frames: list = []
        self.userid = 0

    def send(self, *frames: p.Frame) -> None:
        self.sock.sendall(b"".join(p.encode(f) for f in frames))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> p.Frame:
        self.sock.settimeout(timeout)
        while not self.frames:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("closed by server")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def recv_type(self, kind: type, timeout: float = 5.0) -> p.Frame:
        """The next frame of ``kind``; frames of other kinds before it are kept aside."""
        aside = []
        try:
            while True:
                frame = self.recv(timeout)
                if isinstance(frame, kind):
                    return frame
                aside.append(frame)
        finally:
            self.frames[:0] = aside

    def login(self, userid: int) -> p.LoginResult:
        self.userid = userid
        self.send(p.Login(userid, int(time.time())))
        return self.recv_type(p.LoginResult)

    def shake(self, userid: int = 0) -> p.ShakeResult:
        self.send(p.Shake(userid, int(time.time())))
        return self.recv_type(p.ShakeResult)

    def claim(self, envelope_id: int, userid: int = 0) -> p.ClaimResult:
        self.send(p.Claim(userid, envelope_id, int(time.time())))
        return self.recv_type(p.ClaimResult)

    def is_closed(self, timeout: float = 3.0) -> bool:
        """True once the server has closed this connection (EOF or reset)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
