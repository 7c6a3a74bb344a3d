"""Journal integrity: a torn tail is dropped, corruption anywhere else is refused.

Why both levels: the codec tests (no server) try every truncation and every
byte flip of a small journal, exhaustively; the server tests show what an
operator sees — a SET that boots with its ledger exact after a torn write,
and a SET that refuses to boot on a corrupted journal (named in /health,
the log naming the file and byte offset, the file left as it was).
"""

from __future__ import annotations

import re
import time

import pytest

from app import protocol as p
from app.server.journal import MAGIC, VERSION, JournalCorrupt, encode_record, read_journal
from app.server.ledger import Ledger
from tests import reliability
from tests.reliability import Row, ledger_diff, record
from tests.serverproc import Client
from tests.test_server import wait_for

reliability_table = reliability.reliability_table  # module fixture: prints the table


def sample_journal() -> list[bytes]:
    """Records of every size class: header, generations, a grant, a group, a claim, campaigns."""
    recs = [encode_record(b"H", MAGIC, VERSION, 0, 2), encode_record(b"Y", 10, 5)]
    recs += [encode_record(b"G", 2 * i, 10 + i) for i in range(4)]
    recs += [encode_record(b"S", 0, 8), encode_record(b"P", 8, 2, 4, 6, 1, 2, 3, 99)]
    recs += [encode_record(b"C", 8, 4), encode_record(b"F", 1, 0, 1, 9)]
    recs += [encode_record(b"G", 10, 7), encode_record(b"S", 2, 6)]
    return recs


def read_bytes(tmp_path, data: bytes) -> tuple[list, int]:
    path = tmp_path / "j.journal"
    path.write_bytes(data)
    return read_journal(str(path))


def test_sample_journal_replays_into_a_balanced_ledger():
    records, torn = read_journal_from(b"".join(sample_journal()))
    assert torn == 0 and len(records) == len(sample_journal())
    ledger = Ledger(0, 2)
    ledger.replay(records)
    assert ledger.audit()["balanced"]


def read_journal_from(data: bytes) -> tuple[list, int]:
    from app.server.journal import _scan  # the scanner itself, without a file

    records, good = [], 0
    for kind, fields, end in _scan(data, "mem"):
        records.append((kind, fields))
        good = end
    return records, len(data) - good


def test_every_truncation_drops_only_the_torn_record():
    recs = sample_journal()
    data = b"".join(recs)
    bounds = [0]
    for r in recs:
        bounds.append(bounds[-1] + len(r))
    for cut in range(len(data) + 1):
        records, torn = read_journal_from(data[:cut])
        whole = max(i for i, b in enumerate(bounds) if b <= cut)
        assert len(records) == whole, cut
        assert torn == cut - bounds[whole], cut


def test_every_byte_flip_is_refused_or_is_the_last_record_dropped():
    """Flip every byte with 3 masks (and every type byte with all 255): never a silent change."""
    recs = sample_journal()
    data = b"".join(recs)
    last_start = len(data) - len(recs[-1])
    starts, offset = set(), 0
    for r in recs:
        starts.add(offset)
        offset += len(r)
    tried = refused = dropped = 0
    for pos in range(len(data)):
        for mask in range(1, 256) if pos in starts else (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[pos] ^= mask
            tried += 1
            try:
                records, torn = read_journal_from(bytes(damaged))
            except JournalCorrupt as exc:
                assert re.search(r"at byte \d+", str(exc)), exc
                refused += 1
                continue
            # Only damage inside the last record may pass, as a torn tail, and
            # then exactly the records before it come back.
            assert pos >= last_start, (pos, mask, len(records))
            assert len(records) == len(recs) - 1 and torn == len(recs[-1])
            dropped += 1
    assert refused + dropped == tried and refused > dropped
    record(Row("journal: byte flips (codec, exhaustive)", bad_inputs=tried,
               figures={"refused": refused, "dropped_as_torn_last_record": dropped}))


def test_corruption_before_the_tail_names_file_and_offset(tmp_path):
    recs = sample_journal()
    data = bytearray(b"".join(recs))
    data[len(recs[0]) + 3] ^= 0x10  # inside the second record's payload
    with pytest.raises(JournalCorrupt) as err:
        read_bytes(tmp_path, bytes(data))
    assert str(tmp_path / "j.journal") in str(err.value)
    assert f"at byte {len(recs[0])}" in str(err.value)


# ---------------------------------------------------------------- server level
def run_and_stop(server, users: range, supply: int) -> tuple[dict, list[int]]:
    """Generate ``supply`` envelopes, grant one per user, stop gracefully; per-SET ledgers."""
    server.get(f"/yaohongbao?qps=1000&sum={supply}")
    wait_for(lambda: server.stats()["ledger"]["generated"]["count"] == supply)
    granted = []
    for u in users:
        c = Client(server.port)
        try:
            assert c.login(u).result == 0
            answer = c.shake()
            assert answer.result == p.ShakeCode.GOT
            granted.append(answer.envelope_id)
        finally:
            c.close()
    per_set = {s["set"]: s["ledger"] for s in server.stats(audit=True)["per_set"]}
    assert server.terminate() == 0
    return per_set, granted


def test_torn_tail_is_dropped_and_the_set_boots_with_its_ledger_exact(start_server, tmp_path):
    server = start_server(sets=2)
    before, granted = run_and_stop(server, range(1, 21), supply=50)
    journal = tmp_path / "journal"
    # SET 0: half of a grant record appended (killed mid-write of the next grant).
    j0 = journal / "set-000.journal"
    half = encode_record(b"S", 0, 2)[:7]
    j0.write_bytes(j0.read_bytes() + half)
    # SET 1: its real last record cut in the middle.
    j1 = journal / "set-001.journal"
    whole = j1.read_bytes()
    records, _ = read_journal(str(j1))
    last_size = len(encode_record(records[-1][0], *records[-1][1]))
    j1.write_bytes(whole[: len(whole) - last_size // 2])
    expected1 = Ledger(1, 2)
    expected1.replay(records[:-1])  # exactly what survives the cut

    again = start_server(sets=2, port=server.port)
    stats = again.stats(audit=True)
    per_set = {s["set"]: s for s in stats["per_set"]}
    assert per_set[0]["journal"]["replayed"]["torn_bytes"] == len(half)
    assert per_set[1]["journal"]["replayed"]["torn_bytes"] == last_size - last_size // 2
    assert per_set[0]["ledger"] == before[0]  # the half grant never happened
    assert per_set[1]["ledger"] == expected1.audit()
    assert stats["ledger"]["balanced"]
    # Nothing is granted twice afterwards: the rest of the supply goes to new users.
    rest = []
    for u in range(21, 21 + 40):
        c = Client(again.port)
        try:
            c.login(u)
            answer = c.shake()
            if answer.result == p.ShakeCode.GOT:
                rest.append(answer.envelope_id)
        finally:
            c.close()
    # The cut record stands for a write the SET died in, so its answer never
    # left: if it was a grant, that envelope is free again (and only that one).
    unanswered = {records[-1][1][0]} if records[-1][0] == b"S" else set()
    assert set(rest) & set(granted) == unanswered
    final = again.stats(audit=True)["ledger"]
    assert final["balanced"] and final["bucket"]["count"] == 0
    assert final["granted"]["count"] == final["generated"]["count"]
    record(Row("journal: torn tail (half record / cut record)", faults=2,
               survived=f"{again.get('/health')['sets_alive']}/2 SETs booted",
               ledger_diff=ledger_diff(final),
               figures={"torn_bytes": [len(half), last_size - last_size // 2],
                        "granted_before": len(granted), "granted_after": len(rest)}))


def test_corrupted_journal_is_refused_and_reported(start_server, tmp_path):
    server = start_server(sets=2)
    run_and_stop(server, range(1, 11), supply=20)
    j1 = tmp_path / "journal" / "set-001.journal"
    records, _ = read_journal(str(j1))
    offset = len(encode_record(records[0][0], *records[0][1]))  # the second record
    damaged = bytearray(j1.read_bytes())
    damaged[offset + 2] ^= 0x01
    j1.write_bytes(bytes(damaged))

    again = start_server(sets=2, port=server.port)
    health = wait_for(lambda: (h := again.get("/health"))["failed"] and h, timeout=15)
    assert health["status"] == "degraded" and health["sets_alive"] == 1
    assert list(health["failed"]) == ["1"]
    log = again.log_path.read_text()
    assert re.search(rf"SET 1 cannot boot: {re.escape(str(j1))}: CRC mismatch .* at byte "
                     rf"{offset}", log), log[-2000:]
    assert j1.read_bytes() == bytes(damaged)  # left for forensics, not compacted away
    # The other SET keeps serving its own users.
    c = Client(again.port)
    try:
        assert c.login(2).result == 0
        assert c.shake().result in (p.ShakeCode.GOT, p.ShakeCode.NONE_LEFT)
    finally:
        c.close()
    # A user of the refused SET is hung up on at once, not left waiting for
    # an answer that cannot come (its client retries with its backoff).
    orphan = Client(again.port)
    try:
        orphan.send(p.Login(1))
        assert orphan.is_closed(timeout=3)
    finally:
        orphan.close()
    stats = again.stats(audit=True)
    assert stats["ledger"]["complete"] is False  # the sum says it misses SET 1
    record(Row("journal: corrupted middle record", faults=1, bad_inputs=1,
               survived=f"{health['sets_alive']}/2 SETs (refused {len(health['failed'])})",
               ledger_diff=ledger_diff(stats["ledger"]),
               figures={"refused_at_byte": offset, "health": health["status"]}))


def test_journal_with_a_campaign_the_settings_refuse_is_refused_at_boot(start_server, tmp_path):
    """Issue 11 item 2: a replayed request the SET cannot run stops its boot (exit 3, file
    and offset named) instead of crash-looping on every restart."""
    directory = tmp_path / "journal"
    directory.mkdir()
    j1 = directory / "set-001.journal"
    header = encode_record(b"H", MAGIC, VERSION, 1, 2)
    j1.write_bytes(header + encode_record(b"Y", 0, 0) + encode_record(b"F", 5, 10, 100, 1))
    offset = len(header) + len(encode_record(b"Y", 0, 0))
    server = start_server(sets=2)
    health = wait_for(lambda: (h := server.get("/health"))["failed"] and h, timeout=15)
    assert list(health["failed"]) == ["1"] and health["restarts"] == 0
    log = server.log_path.read_text()
    assert re.search(rf"SET 1 cannot boot: {re.escape(str(j1))} at byte {offset}: its group "
                     rf"campaign cannot run with these settings: recipients' userid min 100 > "
                     rf"max 1", log), log[-2000:]
    time.sleep(1.0)
    assert server.get("/health")["restarts"] == 0  # refused once, not a crash loop
    record(Row("journal: replayed campaign refused by settings", faults=1, bad_inputs=1,
               survived=f"{health['sets_alive']}/2 SETs (refused {len(health['failed'])})",
               ledger_diff=ledger_diff(server.stats(audit=True)["ledger"]),
               figures={"refused_at_byte": offset}))
