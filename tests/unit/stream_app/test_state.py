"""Per-user state: bounded history, de-duplication of redelivered events, trending windows."""

from __future__ import annotations

from advrec.contract import EVENT_TYPES, MAX_ID_CHARS, ClickEvent
from stream_app.state import UserState, merge_trending, state_size_bound, update_trending

T0 = 1_700_000_000_000


def test_apply_keeps_the_last_l_items_and_returns_the_history_before_the_click() -> None:
    s = UserState()
    examples = [s.apply(ClickEvent("u", f"i{n}", T0 + n), history_len=3, dedup_window=10)
                for n in range(5)]
    assert s.history == ["i2", "i3", "i4"] and s.count == 5 and s.last_ts == T0 + 4
    assert examples[4] is not None and examples[4].history == ("i1", "i2", "i3")


def test_a_redelivered_event_is_not_applied_twice() -> None:
    s = UserState()
    e = ClickEvent("u", "i", T0, id="x")
    assert s.apply(e, 50, 10) is not None
    assert s.apply(e, 50, 10) is None
    assert s.count == 1


def test_events_older_than_the_dedup_window_count_as_redelivered() -> None:
    s = UserState()
    events = [ClickEvent("u", f"i{n}", T0 + n) for n in range(6)]
    for e in events:
        s.apply(e, 50, dedup_window=3)
    assert s.apply(events[0], 50, 3) is None  # fell out of the window, older than the floor
    assert s.count == 6


def test_state_round_trips_through_bytes() -> None:
    s = UserState()
    for n in range(3):
        s.apply(ClickEvent("u", f"i{n}", T0 + n, type="view"), 50, 10)
    again = UserState.from_bytes(s.to_bytes())
    assert again == s
    assert UserState.from_bytes(None) == UserState()


def test_the_serving_path_decodes_exactly_the_history() -> None:
    s = UserState()
    for n in range(60):
        s.apply(ClickEvent("u", f"i{n}", T0 + n, id=f"e{n}"), history_len=50, dedup_window=200)
    assert UserState.history_from_bytes(s.to_bytes()) == s.history == [f"i{n}" for n in
                                                                        range(10, 60)]
    assert UserState.history_from_bytes(None) == UserState.history_from_bytes(b"") == []


def test_trending_keeps_only_the_newest_buckets_and_ranks_by_count() -> None:
    minute = 60_000
    buckets = update_trending({}, [("a", T0), ("b", T0), ("b", T0)], minute, 2, 10)
    buckets = update_trending(buckets, [("c", T0 + 5 * minute)], minute, 2, 10)
    buckets = update_trending(buckets, [("c", T0 + 6 * minute)], minute, 2, 10)
    assert len(buckets) == 2
    assert merge_trending([buckets], k=5, n_buckets=2) == ["c"]
    fresh = update_trending({}, [("a", T0), ("b", T0), ("b", T0)], minute, 2, 10)
    assert merge_trending([fresh, {str(T0 // minute * minute): {"a": 5}}], 2, 2) == ["a", "b"]


async def test_read_pacer_spaces_reads_to_its_rate_and_is_free_at_zero() -> None:
    import asyncio

    from stream_app.app import ReadPacer

    loop = asyncio.get_running_loop()
    started = loop.time()
    paced = ReadPacer(100.0)
    for _ in range(11):
        await paced.wait()
    assert loop.time() - started >= 0.095  # 10 intervals of 10 ms after the first read
    started = loop.time()
    free = ReadPacer(0.0)
    for _ in range(1000):
        await free.wait()
    assert loop.time() - started < 0.05


def test_a_users_state_stays_within_its_bound_however_much_the_user_sends() -> None:
    state = UserState()
    widest = "\U0001f600" * MAX_ID_CHARS  # 4 UTF-8 bytes per character
    for n in range(5000):
        event = ClickEvent(user=widest, item=f"{n:08d}{widest[8:]}", ts=10**12 + n,
                           type=EVENT_TYPES[n % len(EVENT_TYPES)], id=f"{n:0128d}")
        assert state.apply(event, history_len=50, dedup_window=128) is not None
    size = len(state.to_bytes())
    assert len(state.history) == 50 and len(state.fingerprints) == 128
    assert size <= state_size_bound(50, 128) <= 30 * 1024, size


def test_an_event_at_or_below_the_last_applied_offset_is_a_redelivery() -> None:
    s = UserState()
    events = [ClickEvent("u", f"i{n}", T0 + n) for n in range(4)]
    for offset, e in zip((10, 13, 17, 20), events, strict=True):
        assert s.apply(e, 50, dedup_window=1, position=offset) is not None
    # Kafka redelivers from the last commit: offsets 13..20 again, whatever the window holds
    assert [s.apply(e, 50, 1, position=o) for o, e in zip((13, 17, 20), events[1:],
                                                          strict=True)] == [None] * 3
    assert s.count == 4 and s.last_position == 20
    # a producer's retry comes with a new offset: the fingerprint window catches it
    assert s.apply(events[3], 50, 1, position=21) is None and s.last_position == 21


def test_a_typical_users_state_is_well_under_a_kilobyte() -> None:
    s = UserState()
    for n in range(500):
        s.apply(ClickEvent("user-12345", f"sku-{n % 997:05d}", T0 + n, id=f"evt-{n:012d}"),
                history_len=50, dedup_window=16, position=n)
    size = len(s.to_bytes())
    assert size < 900, size  # 848 bytes with 9-character item ids (41 of them the
    # detector's counters and score); 2.9 KB before (128 fingerprints as msgpack ints)
    assert UserState.from_bytes(s.to_bytes()) == s


def test_states_written_before_the_compact_layout_still_decode() -> None:
    import hashlib

    import msgpack

    seen = ClickEvent("u", "b", T0 + 1, id="e-2")
    digest = hashlib.blake2b(seen.fingerprint().encode(), digest_size=8).digest()
    old_hash = int.from_bytes(digest, "big") >> 1  # the 63-bit hash the old layout kept
    old = msgpack.packb([["a", "b"], T0 + 1, 2, {"click": 2}, [11 << 15, T0, old_hash, T0 + 1],
                         T0 - 5], use_bin_type=True)
    s = UserState.from_bytes(old)
    assert s.history == ["a", "b"] and s.fingerprints[0] == (11, T0)
    assert s.floor_ts == T0 - 5 and s.last_position == -1  # no position known: none skipped
    assert s.apply(seen, 50, 16, position=0) is None  # still told apart as a redelivery
    assert s.apply(ClickEvent("u", "c", T0 + 2), 50, 16, position=1) is not None


def test_a_retry_of_the_event_that_set_the_floor_is_still_a_redelivery() -> None:
    s = UserState()
    events = [ClickEvent("u", f"i{n}", T0 + n // 2) for n in range(6)]  # pairs share a ts
    for e in events:
        s.apply(e, 50, dedup_window=2)
    # events 0-3 left the window; 2 and 3 at ts T0 + 1, the floor: both are retries
    assert s.floor_ts == T0 + 1 and len(s.floor_fps) == 2
    assert [s.apply(e, 50, 2) for e in events[:4]] == [None] * 4
    # a new event at the floor's time, with another identity, is new
    assert s.apply(ClickEvent("u", "fresh", T0 + 1), 50, 2) is not None
    assert UserState.from_bytes(s.to_bytes()) == s


def test_each_history_item_keeps_its_event_type_through_trimming_and_bytes() -> None:
    from advrec.exclusion import TYPE_CODES

    state = UserState()
    kinds = ["click", "purchase", "view", "cart", "purchase"]
    for n, kind in enumerate(kinds):
        state.apply(ClickEvent("u", f"i{n}", 1_000 + n, type=kind, id=str(n)), 3, 32)
    back = UserState.from_bytes(state.to_bytes())
    assert back.history == ["i2", "i3", "i4"]
    assert back.history_types == bytes(TYPE_CODES[k] for k in kinds[2:])
    assert UserState.history_from_bytes(state.to_bytes()) == ["i2", "i3", "i4"]


def test_every_applied_event_updates_the_detectors_counters_and_they_persist() -> None:
    s = UserState()
    for n, ts in enumerate((T0, T0 + 2000, T0 + 4000, T0 + 64_000)):
        s.apply(ClickEvent("u", f"i{n}", ts), 50, 10)
        assert s.behaviour.clicks == n + 1
    assert s.apply(ClickEvent("u", "i3", T0 + 64_000), 50, 10) is None  # a retry counts not
    b = s.behaviour
    assert (b.clicks, b.gaps, b.short_gaps) == (4, 3, 2)  # 2 s, 2 s and 60 s apart
    assert (b.first_ts, b.last_ts) == (T0, T0 + 64_000)
    s.suspicion, s.suspicion_rounds = 0.25, 7
    again = UserState.from_bytes(s.to_bytes())
    assert again.behaviour == b and (again.suspicion, again.suspicion_rounds) == (0.25, 7)
    assert again.public()["suspicion"] == {"p_fake": 0.25, "detector_rounds": 7}


def test_a_state_from_before_the_detector_reads_as_never_scored() -> None:
    s = UserState()
    s.apply(ClickEvent("u", "a", T0), 50, 10)
    import msgpack

    fields = msgpack.unpackb(s.to_bytes(), raw=False)
    old = UserState.from_bytes(msgpack.packb(fields[:9], use_bin_type=True))
    assert old.history == ["a"] and old.behaviour.clicks == 0  # counting starts afresh
    assert old.suspicion == -1.0 and old.public()["suspicion"] is None
