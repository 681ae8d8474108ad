"""The write-behind state cache: recency, a memory bound, dirty states kept until flushed."""

from __future__ import annotations

from advrec.contract import ClickEvent
from stream_app.state import TrendingBuckets, UserState
from stream_app.writebehind import StateCache

T0 = 1_700_000_000_000


def state(n_items: int) -> UserState:
    s = UserState()
    for n in range(n_items):
        s.apply(ClickEvent("u", f"item-{n}", T0 + n), history_len=50, dedup_window=16, position=n)
    return s


def test_clean_states_leave_least_recently_used_first_within_the_budget() -> None:
    one = state(10).memory_estimate()
    cache = StateCache(budget_bytes=3 * one + 10)
    for k in (b"a", b"b", b"c", b"d"):
        cache.add(k, state(10), partition=0, stored=True)
    cache.get(b"a")  # a is used again: b is now the oldest
    assert cache.evict() == 1 and list(cache.entries) == [b"c", b"d", b"a"]
    assert cache.size <= cache.budget and cache.evicted == 1


def test_a_dirty_state_is_never_evicted_before_its_flush() -> None:
    cache = StateCache(budget_bytes=1)
    entry = cache.add(b"a", state(5), partition=2, stored=False)
    cache.mark_dirty(b"a", entry)
    assert cache.evict() == 0 and b"a" in cache.entries
    (key, flushed), = cache.take_dirty()
    assert key == b"a" and flushed is entry and not entry.dirty and not cache.dirty
    assert cache.evict() == 1 and len(cache) == 0 and cache.size == 0


def test_sizes_follow_states_that_grew_while_dirty() -> None:
    cache = StateCache(budget_bytes=10**6)
    entry = cache.add(b"a", state(1), partition=0, stored=True)
    small = cache.size
    entry.state = state(40)  # the same user, many clicks later
    cache.mark_dirty(b"a", entry)
    cache.take_dirty()
    assert cache.size == entry.state.memory_estimate() > small


def test_revoked_partitions_leave_the_cache_with_their_dirty_states() -> None:
    cache = StateCache(budget_bytes=10**6)
    for k, p in ((b"a", 0), (b"b", 1), (b"c", 1)):
        cache.mark_dirty(k, cache.add(k, state(3), partition=p, stored=True))
    assert cache.drop_partitions({1}) == 2
    assert list(cache.entries) == [b"a"] and list(cache.dirty) == [b"a"]
    assert cache.size == cache.entries[b"a"].size


def test_peek_does_not_count_as_a_use() -> None:
    cache = StateCache(budget_bytes=10**6)
    cache.add(b"a", state(1), 0, stored=True)
    cache.add(b"b", state(1), 0, stored=True)
    assert cache.peek(b"a") is not None and list(cache.entries) == [b"a", b"b"]
    assert cache.peek(b"zzz") is None


def test_trending_buckets_keep_the_newest_windows_in_update_trendings_layout() -> None:
    from stream_app.state import update_trending

    minute = 60_000
    hits = [("x", T0), ("y", T0), ("y", T0), ("z", T0 + 3 * minute), ("z", T0 + 4 * minute)]
    buckets = TrendingBuckets(minute, n_buckets=2, top=5)
    for item, ts in hits:
        buckets.add(item, ts)
    assert buckets.snapshot() == update_trending({}, hits, minute, 2, 5)
    again = TrendingBuckets(minute, 2, 5, stored=buckets.snapshot())
    again.add("z", T0 + 4 * minute)
    assert again.snapshot()[str((T0 + 4 * minute) // minute * minute)] == {"z": 2}
