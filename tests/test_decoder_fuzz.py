"""The decoder under fuzzing, bounded: every single-byte mutation, hypothesis, and atheris.

The property is ``tests.fuzz_decoder.check`` (incremental and whole decoding
agree, nothing but ProtocolError escapes, frames re-encode to their bytes).
The coverage-guided run (atheris/libFuzzer) needs the ``atheris`` wheel; it
is skipped, and says so, where that is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import protocol as p
from tests import reliability
from tests.fuzz_decoder import SEEDS, check
from tests.reliability import ROOT, Row, record

reliability_table = reliability.reliability_table  # module fixture: prints the table

ATHERIS_SECONDS = 8


def test_every_single_byte_mutation_of_the_seeds():
    tried = 0
    for seed in SEEDS:
        for pos in range(len(seed)):
            for value in range(256):
                mutated = bytearray(seed)
                mutated[pos] = value
                for step in (0, 3):  # whole-ish and in 4-byte chunks
                    check(bytes([step]) + bytes(mutated))
                    tried += 1
    record(Row("decoder: every 1-byte mutation of seed streams", bad_inputs=tried))


U32 = st.integers(0, 2**32 - 1)
TS = st.integers(0, 2**64 - 1)
frames = st.one_of(
    st.builds(p.Login, U32, timestamp=TS),
    st.builds(p.Shake, U32, timestamp=TS),
    st.builds(p.Claim, U32, U32, timestamp=TS),
    st.builds(p.ShakeResult, U32, st.sampled_from([14, 15, 16, 17]), U32, U32, timestamp=TS),
    st.builds(p.EnvelopePush, U32, U32, st.tuples(U32, U32, U32), timestamp=TS),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.tuples(st.integers(0, 400),
                                                        st.integers(0, 255)), max_size=4),
       st.integers(0, 255))
def test_mutated_streams_hypothesis(stream, mutations, step):
    data = bytearray(b"".join(p.encode(f) for f in stream))
    for pos, value in mutations:
        if data:
            data[pos % len(data)] = value
    check(bytes([step]) + bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_hypothesis(data):
    check(data)


def test_coverage_guided_atheris_for_a_bounded_time(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris not installed (pip install atheris): coverage-guided run skipped")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(b"\x00" + seed)
    run = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_decoder", f"-max_total_time={ATHERIS_SECONDS}",
         "-seed=20261125", "-rss_limit_mb=1024", str(corpus)],
        cwd=ROOT, capture_output=True, text=True, timeout=ATHERIS_SECONDS + 60)
    assert run.returncode == 0, run.stderr[-3000:]
    done = re.search(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", run.stderr)
    assert done, run.stderr[-2000:]
    runs, cov, features, corp = map(int, done.groups())
    assert runs > 1000
    record(Row(f"decoder: atheris coverage-guided ({ATHERIS_SECONDS} s)", bad_inputs=runs,
               figures={"edges": cov, "features": features, "corpus": corp}))
