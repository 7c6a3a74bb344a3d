"""The supervisor: spawns the SETs, keeps them alive, and speaks for them.

It is an ``app.arbiter.Arbiter`` (the process model the client agent's
master shares): ``spawn`` starts one SET with a stable ``set_id``; the
arbiter restarts it when it dies (with backoff, and never when it exits
with ``EXIT_BOOT_ERROR``: a SET that cannot boot, e.g. on a corrupted
journal, is reported, not restarted forever, and the others serve on);
``heartbeat`` pings every ready SET, and an answer is its sign of life for
the arbiter's liveness rule; ``handle_term`` stops the tree gracefully;
``ask`` and ``ask_all`` query SETs over their control sockets for the HTTP API.

Each control socket has one reader greenlet that takes every answer line
and hands it to the request with the same sequence number: an asker that
times out just stops waiting. (Reading in the asker lost the first half of
a line when its timeout struck mid-line; the stream then stayed out of step
and three busy SETs at 200k connections looked silent for 20 s and were
killed while they served.)

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
from gevent import socket as gsocket
from gevent import subprocess
from gevent.event import AsyncResult
from gevent.lock import BoundedSemaphore
from gevent.socket import wait_read

from app import settings
from app.arbiter import Arbiter, Slot

log = logging.getLogger("hongbao.supervisor")

STOP_TIMEOUT = 10.0  # graceful stop: seconds before SIGKILL
CONTROL_TIMEOUT = 5.0  # seconds a SET has to answer a control request
HEARTBEAT = 2.0  # seconds between liveness pings
# Seconds a ping may take. Generous, as is the liveness timeout: at load 100
# (1M connections, 140 processes on 2 cores) a healthy SET answered pings
# seconds late, and killing it there only adds a restart to the overload.
HEARTBEAT_TIMEOUT = 5.0


def auto_sets(target_connections: int, reserve: int) -> int:
    """max(cores, ceil(target / (RLIMIT_NOFILE - reserve))): see README "SETs"."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    per_set = max(hard - reserve, 1)
    return max(os.cpu_count() or 1, math.ceil(target_connections / per_set))


class SetHandle(Slot):
    """What the supervisor knows of one SET across its restarts."""

    def __init__(self, set_id: int) -> None:
        super().__init__(set_id, f"SET {set_id}")
        self.set_id = set_id
        self.inbox_recv, self.inbox_send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.inbox_recv, self.inbox_send):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.control: socket.socket | None = None
        self.lock = BoundedSemaphore()  # one request written at a time
        self.seq = 0  # control request number; answers echo it
        self.waiting: dict[int, AsyncResult] = {}  # seq -> the asker's result


class Supervisor(Arbiter[SetHandle]):
    def __init__(self, config: Any) -> None:
        self.config = config
        self.sets = config.sets or auto_sets(config.target_connections, config.fd_reserve)
        settings.check_budget(config, self.sets)  # SettingError: main exits 2 with it
        self.handles = [SetHandle(k) for k in range(self.sets)]
        super().__init__(self.handles, config.liveness_timeout, STOP_TIMEOUT)
        self.port = config.port
        self.started = time.time()
        self.stopped = False
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

    def spawn(self, handle: SetHandle) -> subprocess.Popen:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        outboxes = [h.inbox_send.fileno() for h in self.handles]
        fds = [handle.inbox_recv.fileno(), child_end.fileno(), *outboxes]
        cmd = [sys.executable, "-m", "app.server.set_worker", "--set-id", str(handle.set_id),
               "--sets", str(self.sets), "--port", str(self.port),
               "--inbox", str(handle.inbox_recv.fileno()),
               "--outboxes", ",".join(map(str, outboxes)),
               "--control", str(child_end.fileno()),
               "--config", settings.to_json(self.config)]
        process = subprocess.Popen(cmd, pass_fds=fds, start_new_session=False)
        child_end.close()
        handle.control = gsocket.socket(fileno=parent_end.detach())
        gevent.spawn(self._read_answers, handle, handle.control).name = f"answers-{handle.set_id}"
        log.info("spawned SET %d (pid %d)", handle.set_id, process.pid)
        gevent.spawn(self._await_ready, handle, process)
        return process

    def on_exit(self, handle: SetHandle, code: int) -> None:
        self._close_control(handle)

    def on_boot_error(self, handle: SetHandle, code: int) -> None:
        handle.failed = "cannot boot (see its log: journal or listen error)"
        gevent.spawn(self._refuse_handoffs, handle)

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

    def _await_ready(self, handle: SetHandle, process: subprocess.Popen) -> None:
        """Ping a new SET until it answers: then it is ready (and liveness counts)."""
        while handle.proc is process and process.poll() is None:
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
        handle.control = None

    def _read_answers(self, handle: SetHandle, control: socket.socket) -> None:
        """Every answer line of one SET's control socket, to the request it answers.

        Any answer is a sign of life, also one whose asker has given up.
        Ends with the socket; whoever still waits then gets an OSError.
        """
        reader = control.makefile("rb")
        try:
            while True:
                line = reader.readline()
                if not line:
                    break
                try:
                    answer = json.loads(line)
                    seq = answer.pop("seq")
                except (ValueError, KeyError, AttributeError, TypeError):
                    log.warning("SET %d: unreadable control answer %r", handle.set_id, line[:80])
                    continue
                self.seen(handle)
                waiter = handle.waiting.pop(seq, None)
                if waiter is not None:
                    waiter.set(answer)
        except OSError:
            pass
        finally:
            if handle.control is control:
                for waiter in handle.waiting.values():
                    waiter.set_exception(OSError(f"SET {handle.set_id} closed its control socket"))
                handle.waiting.clear()

    def heartbeat(self) -> None:
        """Ping every ready SET; an answer is its sign of life (a hung loop stays silent)."""
        while not self.stopping.wait(HEARTBEAT):
            def ping(handle: SetHandle) -> None:
                try:
                    self.ask(handle, {"op": "ping"}, timeout=HEARTBEAT_TIMEOUT)
                except (OSError, ValueError, gevent.Timeout):
                    pass

            gevent.joinall([gevent.spawn(ping, h) for h in self.handles if h.ready.is_set()])

    # -------------------------------------------------------------- control
    def ask(self, handle: SetHandle, request: dict, timeout: float = CONTROL_TIMEOUT) -> dict:
        """One request to a SET and its answer (raises gevent.Timeout, OSError).

        Every request carries a sequence number the SET echoes; the socket's
        reader (``_read_answers``) matches answers to requests by it, so an
        answer that comes after its asker timed out is simply dropped.
        """
        with gevent.Timeout(timeout):
            control = handle.control
            if control is None:
                raise OSError(f"SET {handle.set_id} is not running")
            handle.seq += 1
            seq = handle.seq
            result = handle.waiting[seq] = AsyncResult()
            try:
                with handle.lock:
                    control.sendall(json.dumps({**request, "seq": seq}).encode() + b"\n")
                return result.get()
            finally:
                handle.waiting.pop(seq, None)

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
        super().start()
        gevent.spawn(self.heartbeat).name = "heartbeat"
        gevent.signal_handler(signal.SIGTERM, self.handle_term)
        gevent.signal_handler(signal.SIGINT, self.handle_term)

    def handle_term(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: SIGTERM to %d SETs", self.sets)
            self.stopping.set()
            gevent.spawn(self.stop)

    def stop(self) -> None:
        """Graceful: every SET flushes its journal and closes; SIGKILL after the timeout."""
        super().stop()
        self.stopped = True
