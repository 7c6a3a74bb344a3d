"""The rotating-window scheduler and the latency histogram, with no sockets."""

from collections import Counter
from math import ceil

from hypothesis import given, settings
from hypothesis import strategies as st

from app.client.histogram import Histogram, bounds, bucket
from app.client.schedule import (
    Timeline,
    clip,
    quiet_ticks,
    second_count,
    share,
    split,
    tick_span,
)

T0 = 1_795_000_000  # a wall-clock second of today's size: the arithmetic must not care


def asked(second: int, qps: int, n: int, ticks: int, pacing: str = "even",
          parts: int = 1, quiet: int = 0) -> Counter:
    """Positions asked in ``second`` by a host of ``parts`` processes."""
    seen: Counter = Counter()
    for a, b in split(n, parts):
        for k in range(ticks):
            start, count = tick_span(second, k, qps, n, ticks, pacing, quiet)
            for lo, hi in clip(start, count, n, a, b):
                seen.update(range(lo, hi))
    return seen


def test_share_gives_the_remainder_to_the_first_hosts():
    assert [share(10, 3, i) for i in range(3)] == [4, 3, 3]
    assert [share(2, 3, i) for i in range(3)] == [1, 1, 0]


@given(st.integers(0, 10**7), st.integers(1, 200))
def test_shares_sum_to_the_total(total, hosts):
    shares = [share(total, hosts, i) for i in range(hosts)]
    assert sum(shares) == total and max(shares) - min(shares) <= 1


@given(st.integers(0, 50_000), st.integers(1, 60_000), st.sampled_from([1, 10, 100, 1000]),
       st.integers(0, 10**6))
def test_even_ticks_sum_to_exactly_the_share(qps, n, ticks, dt):
    counts = [tick_span(T0 + dt, k, qps, n, ticks)[1] for k in range(ticks)]
    assert sum(counts) == qps
    assert max(counts) - min(counts) <= 1  # even: no tick carries more than one extra


@given(st.integers(0, 50_000), st.integers(1, 60_000), st.sampled_from([1, 10, 20, 100]),
       st.integers(0, 999), st.integers(0, 10**6))
def test_a_quiet_end_sends_nothing_and_the_rest_sum_to_the_share(qps, n, ticks, quiet_ms, dt):
    quiet = quiet_ticks(ticks, quiet_ms)
    counts = [tick_span(T0 + dt, k, qps, n, ticks, "even", quiet)[1] for k in range(ticks)]
    assert sum(counts) == qps
    active = counts[:ticks - quiet]
    assert not any(counts[ticks - quiet:]) and max(active) - min(active) <= 1
    # the last tick that sends starts at least quiet_ms before the second's end, unless
    # that would leave no tick at all
    assert quiet == ticks - 1 or (ticks - quiet) * 1000 <= (1000 - quiet_ms) * ticks


def test_quiet_ticks_round_up_to_whole_ticks_and_leave_one():
    assert [quiet_ticks(20, ms) for ms in (0, 1, 50, 51, 100, 999)] == [0, 1, 1, 2, 2, 19]
    assert (quiet_ticks(100, 100), quiet_ticks(10, 100), quiet_ticks(1, 500)) == (10, 1, 0)


def test_burst_sends_everything_in_the_first_tick():
    counts = [tick_span(T0, k, 700, 5000, 100, "burst")[1] for k in range(100)]
    assert counts[0] == 700 and sum(counts) == 700


@settings(deadline=None)
@given(st.integers(1, 3000), st.integers(1, 5000), st.integers(1, 6),
       st.sampled_from(["even", "burst"]), st.integers(0, 10**6), st.integers(0, 9))
def test_processes_together_send_the_window_exactly_once(qps, n, parts, pacing, dt, quiet):
    second = T0 + dt
    seen = asked(second, qps, n, 10, pacing, parts, quiet)
    assert sum(seen.values()) == qps
    start = second * qps % n
    expected = Counter((start + i) % n for i in range(qps))
    assert seen == expected


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 500), st.integers(1, 600), st.integers(0, 10**6))
def test_every_user_is_asked_within_n_over_q_seconds(qps, n, dt):
    window = ceil(n / qps)
    seen: Counter = Counter()
    for t in range(T0 + dt, T0 + dt + window):
        seen += asked(t, qps, n, 4)
    assert set(seen) == set(range(n))
    # a contiguous sweep: each user asked floor or ceil of (window * qps / n) times
    assert max(seen.values()) - min(seen.values()) <= 1


def test_over_many_sweeps_users_are_asked_equally_often():
    n, qps = 1000, 250  # 4 s per sweep
    seen: Counter = Counter()
    for t in range(T0, T0 + 40):  # exactly 10 sweeps
        seen += asked(t, qps, n, 10, parts=3)
    assert set(seen.values()) == {10}


def test_clip_handles_more_qps_than_users():
    assert clip(3, 25, 10, 0, 10) == [(0, 10), (0, 10), (3, 8)]
    assert clip(8, 5, 10, 0, 5) == [(0, 3)]
    assert clip(8, 5, 10, 5, 10) == [(8, 10)]


@settings(deadline=None)
@given(st.integers(0, 5000), st.integers(1, 5000), st.integers(1, 5))
def test_second_count_matches_the_split(qps, n, parts):
    total = sum(second_count(qps, n, a, b, T0, 10) for a, b in split(n, parts))
    assert total == qps


def test_split_covers_every_position_once():
    ranges = split(19_001, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == 19_001
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@given(st.integers(0, 10**9))
def test_histogram_bucket_holds_its_value_within_one_sixteenth(us):
    low, high = bounds(bucket(us))
    assert low <= us <= high
    assert high - low <= max(0, low // 8)


def test_histogram_percentiles_and_merge():
    h = Histogram()
    for us in range(1, 1001):  # 1 µs .. 1 ms
        h.record(us * 1000 // 1000)
    other = Histogram(h.to_json())
    other.merge(h)
    assert other.total == 2000
    assert abs(other.percentile(50) - 0.5) < 0.5 * 0.07
    assert abs(other.percentile(99) - 0.99) < 0.99 * 0.07
    assert Histogram().percentile(50) is None


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 1000)), max_size=12),
       st.integers(0, 60))
def test_timeline_in_effect_is_the_latest_change_due_last_added_on_a_tie(changes, tick):
    timeline = Timeline(changes)
    due = [(t, i, q) for i, (t, q) in enumerate(changes) if t <= tick]
    assert timeline.at(tick) == (max(due)[2] if due else 0)
    assert timeline.pending(tick) == any(t > tick for t, _ in changes)


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 1000)), max_size=12),
       st.integers(0, 50))
def test_a_timeline_restarted_from_upcoming_agrees_from_then_on(changes, now):
    whole = Timeline(changes)
    restarted = Timeline(whole.upcoming(now))
    assert [restarted.at(t) for t in range(now, 60)] == [whole.at(t) for t in range(now, 60)]


def test_one_process_can_send_its_hosts_whole_rate_in_a_second_and_is_not_capped_below_it():
    """The window of a second is contiguous in the host's positions: at one million
    (58,823 users a host, three processes, 1,765/s) some seconds fall wholly in one
    process's range. Its closed-loop cap must let it have that second unanswered (capped at
    its third of the rate, a process catching up after a stall skipped users)."""
    from app.client.worker import outstanding_cap

    n, qps, ticks, quiet = 58_823, 1_765, 10, 2
    parts = split(n, 3)
    busiest = 0
    for dt in range(40):  # the window sweeps the range every n/qps = 33 s
        for a, b in parts:
            sent = sum(hi - lo for k in range(ticks)
                       for lo, hi in clip(*tick_span(T0 + dt, k, qps, n, ticks, "even", quiet),
                                          n, a, b))
            busiest = max(busiest, sent)
    assert busiest == qps
    assert outstanding_cap(qps) >= busiest
