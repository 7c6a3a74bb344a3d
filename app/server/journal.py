"""A SET's append-only journal: fixed-size binary records, each with a CRC32.

Why a journal: a SET grants money. Every state change of its ledger
(generation, grant, claim, expiry, campaign change) is appended here
*before* the answer that reveals it is written to the client, so a SET
killed at any instant restarts into exactly the state its clients saw —
nothing granted twice, nothing vanished. Writes are batched per reactor
turn (one ``write(2)`` per batch).

Durability (``--durability``): ``written`` (the default) releases answers
once the batch's ``write(2)`` returned: that survives the process being
killed (the data is in the page cache) but not the machine losing power,
since ``fsync`` runs only about once a second. ``fdatasync`` releases
answers only after the batch's ``fdatasync`` returned (group commit: one
sync per batch, however many records it holds): that survives a machine
crash, at the cost measured by ``make bench-server ARGS=--durability ...``.

A failed write (ENOSPC, EIO) keeps the batch's records pending, cuts the
file back to the last whole batch and raises: the caller releases none of
the batch's answers and stops.

Integrity: a record is ``type u8 | payload | crc32 u32`` over type+payload.
A short or CRC-failing *last* record is a torn write (the process died in
the middle of it): it is dropped on replay. Anything wrong before the last
record is corruption: replay refuses with ``JournalCorrupt`` rather than
guess at money.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator

MAGIC = 0x48424A31  # "HBJ1"

# type byte -> payload layout (one Struct each; sizes are fixed per type)
PAYLOADS: dict[bytes, struct.Struct] = {
    b"H": struct.Struct(">IHHH"),  # header: magic, version, set_id, sets
    b"G": struct.Struct(">II"),  # shake envelope generated: eid, amount
    b"S": struct.Struct(">II"),  # shake envelope granted: eid, userid
    b"P": struct.Struct(">IIIIIIII"),  # group created: eid, r1..r3, a1..a3, expires
    b"C": struct.Struct(">II"),  # group share claimed: eid, userid
    b"X": struct.Struct(">I"),  # group's unclaimed shares expired: eid
    b"Y": struct.Struct(">IQ"),  # shake campaign: rate/s, remaining
    b"F": struct.Struct(">IQII"),  # group campaign: rate/s, remaining, min, max
    b"K": struct.Struct(">" + "Q" * 9),  # snapshot counters (see ledger.COUNTERS)
    b"g": struct.Struct(">II"),  # snapshot: envelope waiting in the bucket
    b"p": struct.Struct(">IIIIIIIIB"),  # snapshot: open group + claimed mask
}
CRC = struct.Struct(">I")
VERSION = 1


class JournalCorrupt(Exception):
    """The journal is damaged before its last record; refuse to guess."""


class JournalRefused(Exception):
    """The journal holds a request the current settings refuse (file and offset in the text)."""


def encode_record(kind: bytes, *fields: int) -> bytes:
    body = kind + PAYLOADS[kind].pack(*fields)
    return body + CRC.pack(zlib.crc32(body))


def record_size(kind: bytes) -> int:
    return 1 + PAYLOADS[kind].size + CRC.size


def record_offsets(records: list[tuple[bytes, tuple]]) -> list[int]:
    """The byte offset of each record ``read_journal`` returned (sizes are fixed per type)."""
    offsets, at = [], 0
    for kind, _ in records:
        offsets.append(at)
        at += record_size(kind)
    return offsets


def _scan(data: bytes, name: str) -> Iterator[tuple[bytes, tuple, int]]:
    offset, end = 0, len(data)
    while offset < end:
        kind = data[offset : offset + 1]
        layout = PAYLOADS.get(kind)
        if layout is None:
            raise JournalCorrupt(f"{name}: unknown record type {kind!r} at byte {offset}")
        size = 1 + layout.size + CRC.size
        if offset + size > end:
            _check_torn(data, offset, name)
            return  # torn tail: the process died while writing this record
        body = data[offset : offset + size - CRC.size]
        (crc,) = CRC.unpack_from(data, offset + size - CRC.size)
        if zlib.crc32(body) != crc:
            if offset + size == end:
                _check_torn(data, offset, name)
                return  # torn tail that reached its full length with garbage
            raise JournalCorrupt(f"{name}: CRC mismatch in record {kind!r} at byte {offset}")
        yield kind, layout.unpack_from(data, offset + 1), offset + size
        offset += size


def _check_torn(data: bytes, offset: int, name: str) -> None:
    """Refuse a "torn tail" that still holds a whole valid record after its start.

    A torn write leaves a prefix of one record and nothing after it. A
    corrupted type byte near the end (e.g. a 13-byte record read as a
    77-byte snapshot record) would otherwise pass for a torn tail and drop
    the valid records behind it silently. A CRC-valid record inside a torn
    prefix by chance has odds of about 2**-32 per position.
    """
    end = len(data)
    for start in range(offset + 1, end):
        layout = PAYLOADS.get(data[start : start + 1])
        if layout is None:
            continue
        size = 1 + layout.size + CRC.size
        if start + size > end:
            continue
        (crc,) = CRC.unpack_from(data, start + size - CRC.size)
        if zlib.crc32(data[start : start + size - CRC.size]) == crc:
            raise JournalCorrupt(
                f"{name}: damaged record at byte {offset} is followed by a valid record at "
                f"byte {start}: corruption, not a torn write")


def read_journal(path: str) -> tuple[list[tuple[bytes, tuple]], int]:
    """All valid records of ``path`` and the count of torn bytes dropped at its end."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return [], 0
    records, good = [], 0
    for kind, fields, end in _scan(data, path):
        records.append((kind, fields))
        good = end
    return records, len(data) - good


DURABILITY = ("written", "fdatasync")  # when an answer may go out: see the module's docstring


class JournalWriter:
    """Buffered appends; ``flush()`` once per reactor turn, ``sync()`` about once a second."""

    def __init__(self, path: str, durability: str = "written") -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}, not {durability!r}")
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.sync_each_flush = durability == "fdatasync"
        self._pending: list[bytes] = []
        self.records = 0
        self.bytes = 0  # written since open
        self._size = os.fstat(self.fd).st_size  # the file's length after the last whole batch
        self._dirty = False
        self.syncs = 0

    def append(self, kind: bytes, *fields: int) -> None:
        self._pending.append(encode_record(kind, *fields))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write everything appended so far (before any answer revealing it is sent).

        Raises OSError when the write (or, in ``fdatasync`` mode, the sync)
        failed; the records stay pending and the file keeps no part of them.
        """
        if not self._pending:
            return
        data = b"".join(self._pending)
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            if self.sync_each_flush:
                os.fdatasync(self.fd)
                self.syncs += 1
        except OSError:
            self._cut_back()
            raise
        self.records += len(self._pending)
        self._pending.clear()
        self.bytes += len(data)
        self._size += len(data)
        self._dirty = not self.sync_each_flush

    def _cut_back(self) -> None:
        """Drop a partly written batch (best effort: replay also drops a torn tail)."""
        try:
            os.ftruncate(self.fd, self._size)
        except OSError:
            pass

    def sync(self, run: Callable[..., object] | None = None) -> None:
        """Flush, then fsync what was written; ``run(os.fsync, fd)`` does the fsync if given.

        The SET passes its thread pool's ``apply``: an fsync took 20-56 ms here
        (measured with ``perf trace`` at 200k connections), and the whole
        process would stand still for it once a second.
        """
        self.flush()
        if self._dirty:
            self._dirty = False  # a write while the fsync runs makes it dirty again
            try:
                if run is None:
                    os.fsync(self.fd)
                else:
                    run(os.fsync, (self.fd,))
            except OSError:
                self._dirty = True
                raise
            self.syncs += 1

    def close(self) -> None:
        self.sync()
        os.close(self.fd)


def write_snapshot(path: str, records: list[bytes]) -> None:
    """Atomically replace ``path`` with ``records`` (compaction after replay)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = b"".join(records)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
