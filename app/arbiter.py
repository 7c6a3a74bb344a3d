"""One process model for the server's supervisor and the client agent's master.

In the manner of a pre-fork arbiter: a fixed number of slots, each kept
filled by one child process for the arbiter's lifetime. Why one model: a SET
and a client worker fail in the same ways (crash, hang, cannot boot) and are
judged by the same rules.

- **Spawn**: ``spawn(slot)`` (the owner's) starts the child; ``keep`` waits
  for it and reaps it.
- **Back off**: a child that dies is restarted after ``RestartPolicy``'s delay
  — none the first time, growing while it keeps dying quickly, back to none
  once it ran ``STABLE_AFTER`` seconds.
- **Liveness**: the owner calls ``seen(slot)`` on every sign of life (a
  heartbeat answered, a report line). A ready child silent for the liveness
  timeout is killed (SIGKILL) and so restarted like a dead one.
- **Boot error**: a child exiting ``EXIT_BOOT_ERROR`` (3) cannot boot and is
  never restarted; the owner's ``on_boot_error`` decides (the server serves
  on with the other SETs, the agent halts and exits 3).
- **Graceful stop**: ``request_stop`` (SIGTERM unless the owner says
  otherwise) to every child, a bounded wait, then SIGKILL.
- **Scheduling**: each child (a SET, a client worker) calls
  ``batch_scheduling`` as it boots.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Generic, TypeVar

import gevent
from gevent import subprocess
from gevent.event import Event

log = logging.getLogger("hongbao.arbiter")

EXIT_BOOT_ERROR = 3  # a child that cannot boot: never restarted
RESTART_BACKOFF = (0.0, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before the n-th quick restart
STABLE_AFTER = 10.0  # a child that ran this long restarts without backoff next time
LIVENESS_CHECK = 1.0  # seconds between liveness checks


def batch_scheduling() -> None:
    """Ask the kernel not to let this child preempt the process that just wrote to it.

    Both ends batch on purpose: a SET coalesces a client's burst into one
    read (``Reactor``), a client worker reads the answers to its tick
    together. Woken by the first byte, neither should cut in while the
    writer is still writing. A SCHED_BATCH task is scheduled like any other
    (same nice, same share) but does not preempt on wake-up; on a core of its
    own nothing changes, since an idle core runs it at once.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or refused: schedule as usual
        log.info("SCHED_BATCH not set: %s", exc)


class RestartPolicy:
    """The delay before a restart: grows while a child keeps dying quickly, resets after."""

    def __init__(self, backoff: tuple[float, ...] = RESTART_BACKOFF,
                 stable_after: float = STABLE_AFTER) -> None:
        self.backoff = backoff
        self.stable_after = stable_after
        self.quick = 0  # restarts in a row after runs shorter than stable_after

    def delay(self, ran: float) -> float:
        """Seconds to wait before restarting a child that ran ``ran`` seconds."""
        self.quick = 0 if ran >= self.stable_after else self.quick + 1
        return self.backoff[min(self.quick, len(self.backoff) - 1)]


class Slot:
    """One child's place, kept across its restarts."""

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.policy = RestartPolicy()
        self.restarts = 0
        self.started_at = 0.0
        self.last_seen = 0.0  # monotonic time of the last sign of life
        self.ready = Event()  # set by the owner once the child serves; liveness counts then
        self.failed: str | None = None  # why it will not be restarted

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


S = TypeVar("S", bound=Slot)


class Arbiter(Generic[S]):
    """Keeps ``slots`` filled; the owner subclasses it and fills in ``spawn``."""

    def __init__(self, slots: list[S], liveness_timeout: float, stop_timeout: float) -> None:
        self.slots = slots
        self.liveness_timeout = liveness_timeout
        self.stop_timeout = stop_timeout
        self.stopping = Event()
        self.keepers: list[gevent.Greenlet] = []

    # ----------------------------------------------------------- owner's part
    def spawn(self, slot: S) -> subprocess.Popen:
        """Start the child of ``slot`` and return it (called again for every restart)."""
        raise NotImplementedError

    def on_exit(self, slot: S, code: int) -> None:
        """The child of ``slot`` was reaped (before any restart): release what it held."""

    def on_boot_error(self, slot: S, code: int) -> None:
        """The child of ``slot`` cannot boot; it is not restarted."""

    def request_stop(self, slot: S) -> None:
        """Ask the child of ``slot`` to stop gracefully."""
        if slot.running():
            slot.proc.terminate()

    # ------------------------------------------------------------- machinery
    def start(self) -> None:
        self.keepers = [gevent.spawn(self.keep, slot) for slot in self.slots]
        for keeper, slot in zip(self.keepers, self.slots, strict=True):
            keeper.name = f"keep-{slot.name}"
        gevent.spawn(self.watch_liveness).name = "liveness"

    def seen(self, slot: S) -> None:
        """A sign of life of ``slot``'s child (a heartbeat answer, a report)."""
        slot.last_seen = time.monotonic()

    def keep(self, slot: S) -> None:
        """Run ``slot``'s child for the arbiter's lifetime, restarting it when it dies."""
        while not self.stopping.is_set():
            slot.ready.clear()
            slot.started_at = time.time()
            slot.last_seen = time.monotonic()
            slot.proc = self.spawn(slot)
            code = slot.proc.wait()
            slot.ready.clear()
            self.on_exit(slot, code)
            if self.stopping.is_set():
                return
            if code == EXIT_BOOT_ERROR:
                slot.failed = f"cannot boot (exit {code}; see its log)"
                log.error("%s cannot boot (exit %d); not restarting it", slot.name, code)
                self.on_boot_error(slot, code)
                return
            ran = time.time() - slot.started_at
            delay = slot.policy.delay(ran)
            slot.restarts += 1
            why = ("killed, perhaps out of memory or silent" if code == -signal.SIGKILL
                   else f"exit {code}")
            log.warning("%s died (%s) after %.1fs; restart #%d in %.1fs", slot.name, why, ran,
                        slot.restarts, delay)
            if delay:
                self.stopping.wait(delay)

    def watch_liveness(self) -> None:
        """Kill a ready child silent for longer than the liveness timeout; keep restarts it."""
        while not self.stopping.wait(LIVENESS_CHECK):
            now = time.monotonic()
            for slot in self.slots:
                silent = now - slot.last_seen
                if slot.ready.is_set() and slot.running() and silent > self.liveness_timeout:
                    log.error("%s silent for %.1fs (liveness timeout %.1fs); killing it",
                              slot.name, silent, self.liveness_timeout)
                    slot.ready.clear()
                    slot.proc.kill()

    def restarts(self) -> int:
        """Restarts of every slot so far (what /health reports)."""
        return sum(slot.restarts for slot in self.slots)

    def stop(self) -> None:
        """Graceful: ask every child to stop, wait up to the stop timeout, then SIGKILL."""
        self.stopping.set()
        for slot in self.slots:
            try:
                self.request_stop(slot)
            except OSError:
                pass  # already gone
        deadline = time.time() + self.stop_timeout
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.error("%s did not stop in %.0fs; killing it", slot.name, self.stop_timeout)
                slot.proc.kill()
                slot.proc.wait()
