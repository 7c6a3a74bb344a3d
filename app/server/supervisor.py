"""The supervisor: spawns the SETs, keeps them alive, and speaks for them.

It reads like a small pre-fork master (gunicorn's arbiter):
``spawn_set`` starts one SET with a stable ``set_id``; ``keep_set`` is the
greenlet that restarts it when it dies (with backoff, and never when it
exits with ``EXIT_BOOT_ERROR``: a SET that cannot boot, e.g. on a corrupted
journal, is reported, not restarted forever); ``handle_term`` stops the
tree gracefully; ``ask`` and ``ask_all`` query SETs over their control
sockets for the HTTP API.

What outlives a SET's restart, so nothing is lost in between: its inbox
(the Unix datagram socket that other SETs hand its users to — created here,
once) and its journal. SETs are started as fresh interpreters rather than
forked from this gevent process, so no hub, greenlet or listener of the
supervisor leaks into them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

import gevent
from gevent import subprocess
from gevent.event import Event
from gevent.lock import BoundedSemaphore
from gevent.socket import wait_read

from app.server.set_worker import EXIT_BOOT_ERROR

log = logging.getLogger("hongbao.supervisor")

RESTART_BACKOFF = (0.0, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before the n-th quick restart
STABLE_AFTER = 10.0  # a SET that ran this long restarts without backoff next time
STOP_TIMEOUT = 10.0  # graceful stop: seconds before SIGKILL
CONTROL_TIMEOUT = 5.0  # seconds a SET has to answer a control request
HEARTBEAT = 2.0  # seconds between liveness pings
HEARTBEAT_MISSES = 3  # a SET silent this many pings in a row is killed and restarted
# Seconds a ping may take; a hung SET is killed after ~3 x 7 s. Generous: at
# load 100 (1M connections, 140 processes on 2 cores) a healthy SET answered
# pings seconds late, and killing it there only adds a restart to the overload.
HEARTBEAT_TIMEOUT = 5.0


def auto_sets(target_connections: int, reserve: int) -> int:
    """max(cores, ceil(target / (RLIMIT_NOFILE - reserve))): see README "SETs"."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    per_set = max(hard - reserve, 1)
    return max(os.cpu_count() or 1, math.ceil(target_connections / per_set))


def share(total: int, k: int, parts: int) -> int:
    """Part ``k`` of ``total`` split over ``parts`` so the parts sum exactly to it."""
    return total // parts + (1 if k < total % parts else 0)


class SetHandle:
    """What the supervisor knows of one SET across its restarts."""

    def __init__(self, set_id: int) -> None:
        self.set_id = set_id
        self.inbox_recv, self.inbox_send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.inbox_recv, self.inbox_send):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.process: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.reader: Any = None
        self.lock = BoundedSemaphore()
        self.ready = Event()
        self.restarts = 0
        self.started_at = 0.0
        self.failed: str | None = None  # why it will not be restarted
        self.misses = 0
        self.last_exit: int | None = None
        self.seq = 0  # control request number; answers echo it


class Supervisor:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.sets = config.sets or auto_sets(config.target_connections, config.fd_reserve)
        self.handles = [SetHandle(k) for k in range(self.sets)]
        self.port = config.port
        self.stopping = Event()
        self.started = time.time()
        self._port_guard: socket.socket | None = None

    # -------------------------------------------------------------- startup
    def reserve_port(self) -> int:
        """Bind the shared port (SO_REUSEPORT) first, so port 0 resolves to one port."""
        guard = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        guard.bind((self.config.host, self.port))
        self.port = guard.getsockname()[1]
        self._port_guard = guard  # bound, never listening: holds the port for us
        return self.port

    def worker_config(self) -> dict:
        keys = ("host", "journal_dir", "login_timeout", "shake_budget", "amount_min",
                "amount_max", "group_amount_min", "group_amount_max", "claim_ttl", "statsd",
                "log_level", "durability")
        return {k: getattr(self.config, k) for k in keys}

    def spawn_set(self, handle: SetHandle) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        outboxes = [h.inbox_send.fileno() for h in self.handles]
        fds = [handle.inbox_recv.fileno(), child_end.fileno(), *outboxes]
        cmd = [sys.executable, "-m", "app.server.set_worker", "--set-id", str(handle.set_id),
               "--sets", str(self.sets), "--port", str(self.port),
               "--inbox", str(handle.inbox_recv.fileno()),
               "--outboxes", ",".join(map(str, outboxes)),
               "--control", str(child_end.fileno()),
               "--config", json.dumps(self.worker_config())]
        handle.process = subprocess.Popen(cmd, pass_fds=fds, start_new_session=False)
        child_end.close()
        from gevent import socket as gsocket

        handle.control = gsocket.socket(fileno=parent_end.detach())
        handle.reader = handle.control.makefile("rb")
        handle.started_at = time.time()
        handle.misses = 0
        log.info("spawned SET %d (pid %d)", handle.set_id, handle.process.pid)

    def keep_set(self, handle: SetHandle) -> None:
        """Run one SET for the supervisor's lifetime, restarting it when it dies."""
        quick = 0
        while not self.stopping.is_set():
            self.spawn_set(handle)
            gevent.spawn(self._await_ready, handle)
            code = handle.process.wait()
            handle.ready.clear()
            handle.last_exit = code
            self._close_control(handle)
            if self.stopping.is_set():
                return
            if code == EXIT_BOOT_ERROR:
                handle.failed = "cannot boot (see its log: journal or listen error)"
                log.error("SET %d cannot boot; not restarting it", handle.set_id)
                gevent.spawn(self._refuse_handoffs, handle)
                return
            ran = time.time() - handle.started_at
            quick = 0 if ran > STABLE_AFTER else quick + 1
            why = "perhaps out of memory" if code == -signal.SIGKILL else f"exit {code}"
            delay = RESTART_BACKOFF[min(quick, len(RESTART_BACKOFF) - 1)]
            handle.restarts += 1
            log.warning("SET %d died (%s) after %.1fs; restart #%d in %.1fs", handle.set_id,
                        why, ran, handle.restarts, delay)
            if delay:
                self.stopping.wait(delay)

    def _refuse_handoffs(self, handle: SetHandle) -> None:
        """Close every connection handed to a SET that cannot boot.

        Its inbox outlives it, so other SETs keep handing it its users; the
        sockets would sit in the inbox queue, open and unanswered, until each
        client gave up (the agent after its 10 s login timeout). Closed, a
        client sees EOF at once and retries with its backoff.
        """
        sock = handle.inbox_recv
        sock.setblocking(False)
        while not self.stopping.is_set():
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(sock, 1024, 4)
            except BlockingIOError:
                try:
                    wait_read(sock.fileno(), timeout=1.0)
                except TimeoutError:
                    pass
                continue
            except OSError:
                return
            for fd in fds:
                os.close(fd)

    def _await_ready(self, handle: SetHandle) -> None:
        process = handle.process
        while handle.process is process and process.poll() is None:
            try:
                self.ask(handle, {"op": "ping"}, timeout=2.0)
                handle.ready.set()
                return
            except (OSError, ValueError, gevent.Timeout):
                gevent.sleep(0.05)

    def _close_control(self, handle: SetHandle) -> None:
        if handle.control is not None:
            try:
                handle.control.close()
            except OSError:
                pass
        handle.control = handle.reader = None

    def heartbeat(self) -> None:
        """Kill a SET that stops answering (hung loop); keep_set restarts it."""
        while not self.stopping.is_set():
            self.stopping.wait(HEARTBEAT)
            for handle in self.handles:
                if not handle.ready.is_set() or handle.process is None:
                    continue
                try:
                    self.ask(handle, {"op": "ping"}, timeout=HEARTBEAT_TIMEOUT)
                    handle.misses = 0
                except (OSError, ValueError, gevent.Timeout):
                    handle.misses += 1
                    if handle.misses >= HEARTBEAT_MISSES and handle.process.poll() is None:
                        log.error("SET %d silent for %d pings; killing it", handle.set_id,
                                  handle.misses)
                        handle.process.kill()

    # -------------------------------------------------------------- control
    def ask(self, handle: SetHandle, request: dict, timeout: float = CONTROL_TIMEOUT) -> dict:
        """One request/answer on a SET's control socket (serialised per SET).

        Every request carries a sequence number the SET echoes: an answer that
        arrives after its asker timed out is skipped by the next asker instead
        of being taken for its own answer (a slow-booting SET used to answer
        a timed-out ping to the following /stats request).
        """
        with handle.lock, gevent.Timeout(timeout):
            if handle.control is None:
                raise OSError(f"SET {handle.set_id} is not running")
            handle.seq += 1
            seq = handle.seq
            handle.control.sendall(json.dumps({**request, "seq": seq}).encode() + b"\n")
            while True:
                line = handle.reader.readline()
                if not line:
                    raise OSError(f"SET {handle.set_id} closed its control socket")
                answer = json.loads(line)
                if answer.pop("seq", seq) == seq:
                    return answer

    def ask_all(self, make_request: Any) -> list[dict | None]:
        """Ask every SET at once; None for a SET that is down or did not answer."""
        def one(handle: SetHandle) -> dict | None:
            try:
                return self.ask(handle, make_request(handle.set_id))
            except (OSError, ValueError, gevent.Timeout):
                return None

        jobs = [gevent.spawn(one, h) for h in self.handles]
        gevent.joinall(jobs)
        return [job.value for job in jobs]

    def alive(self) -> int:
        return sum(1 for h in self.handles if h.ready.is_set())

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every SET is ready or has failed to boot (that one is not waited for)."""
        deadline = time.time() + timeout
        for handle in self.handles:
            while not handle.ready.wait(min(0.1, max(0.0, deadline - time.time()))):
                if handle.failed:
                    break
                if time.time() >= deadline:
                    return False
        return all(h.ready.is_set() for h in self.handles)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.reserve_port()
        self.keepers = [gevent.spawn(self.keep_set, h) for h in self.handles]
        self.heartbeat_greenlet = gevent.spawn(self.heartbeat)
        gevent.signal_handler(signal.SIGTERM, self.handle_term)
        gevent.signal_handler(signal.SIGINT, self.handle_term)

    def handle_term(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: SIGTERM to %d SETs", self.sets)
            self.stopping.set()
            gevent.spawn(self.stop)

    def stop(self) -> None:
        """Graceful: every SET flushes its journal and closes; SIGKILL after the timeout."""
        self.stopping.set()
        for handle in self.handles:
            if handle.process is not None and handle.process.poll() is None:
                handle.process.terminate()
        deadline = time.time() + STOP_TIMEOUT
        for handle in self.handles:
            if handle.process is None:
                continue
            try:
                handle.process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.error("SET %d did not stop in %.0fs; killing", handle.set_id, STOP_TIMEOUT)
                handle.process.kill()
                handle.process.wait()
        self.stopped = True
