"""Write-behind state: users' states live decoded in memory while they are active.

The ingest agent applies events to these in-memory states and marks them dirty; once per
``ADVREC_STATE_FLUSH_S`` (and before the offsets of the events that changed them are acked,
so before they can be committed) the dirty states are written to the `user_state` table, one
RocksDB put and one changelog record per user. Table writes and changelog records then grow
with the users active per interval, not with events: a user who clicks twenty times a second
costs one write a second. Reads see the in-memory state at once.

Memory is bounded by a budget: after each flush, clean states leave in least-recently-used
order until the estimate is within it; a state that left is read back from RocksDB when its
user comes back. Dirty states are never evicted (they leave at the next flush).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
from faust.streams import _current_event  # where Faust looks up the event a write belongs to
from faust.types import EventT

from advrec.contract import ClickEvent, TrainingExample
from stream_app.rocks import local_stores
from stream_app.state import TrendingBuckets, UserState

if TYPE_CHECKING:
    from stream_app.app import StreamApp

__all__ = ["CachedState", "StateCache", "WriteBehind", "writing_for"]


@dataclass(slots=True)
class CachedState:
    state: UserState
    partition: int
    size: int  # estimated bytes in memory (UserState.memory_estimate)
    dirty: bool = False
    stored: bool = True  # the table holds a value for this key (False: a new user)


class StateCache:
    """Decoded user states by table key, least recently used first."""

    def __init__(self, budget_bytes: int) -> None:
        assert budget_bytes > 0, "the state cache needs a positive budget"
        self.budget = budget_bytes
        self.entries: OrderedDict[bytes, CachedState] = OrderedDict()
        self.dirty: dict[bytes, CachedState] = {}  # insertion-ordered
        self.size = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> CachedState | None:
        """Return the cached state of ``key`` (and mark it recently used), or None."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def peek(self, key: bytes) -> UserState | None:
        """Return the state of ``key`` if cached, without touching its recency (for reads)."""
        entry = self.entries.get(key)
        return None if entry is None else entry.state

    def add(self, key: bytes, state: UserState, partition: int, *, stored: bool) -> CachedState:
        """Cache a state just read from the table (``stored``) or created for a new user."""
        entry = CachedState(state, partition, state.memory_estimate(), stored=stored)
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= old.size
        self.entries[key] = entry
        self.size += entry.size
        return entry

    def mark_dirty(self, key: bytes, entry: CachedState) -> None:
        if not entry.dirty:
            entry.dirty = True
            self.dirty[key] = entry

    def take_dirty(self) -> list[tuple[bytes, CachedState]]:
        """Return the dirty states (oldest change first) and count them clean from now on;
        their sizes are estimated again, as they may have grown."""
        out = list(self.dirty.items())
        self.dirty.clear()
        for key, entry in out:
            entry.dirty = False
            if self.entries.get(key) is entry:
                self.size -= entry.size
                entry.size = entry.state.memory_estimate()
                self.size += entry.size
        return out

    def evict(self) -> int:
        """Drop clean states, least recently used first, until within the budget."""
        dropped = 0
        while self.size > self.budget and self.entries:
            key, entry = next(iter(self.entries.items()))
            if entry.dirty:  # only at the next flush; keep it and stop (others are newer)
                break
            del self.entries[key]
            self.size -= entry.size
            dropped += 1
        self.evicted += dropped
        return dropped

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Forget every state of ``partitions`` (revoked: their next owner reads the table,
        and the events behind unflushed changes were not acked, so they come again)."""
        gone = set(partitions)
        keys = [k for k, e in self.entries.items() if e.partition in gone]
        for key in keys:
            entry = self.entries.pop(key)
            self.size -= entry.size
            self.dirty.pop(key, None)
        return len(keys)


@contextmanager
def writing_for(event: EventT) -> Iterator[None]:
    """Attribute table writes to ``event``'s partition (its changelog and RocksDB shard).

    Faust routes a table write by the *current* event, and attaches the changelog record to
    it: the record is published when that event is acked, before its offset is committed.
    Each coalesced write is made in the context of an event of the same partition.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class WriteBehind:
    """Applies valid clicks to cached states; flushes them to the tables, then acks.

    Every method runs on the worker's loop under ``lock``: a flush never sees a batch half
    applied, and a revocation never drops states a flush is writing.
    """

    def __init__(self, sa: StreamApp, keys: Any = None) -> None:
        s = sa.settings
        self.sa = sa
        self.keys = keys  # agents.KeyCount: told about users new to the table
        self.cache = StateCache(s.state_cache_mb * 1024 * 1024)
        self.trending: dict[int, TrendingBuckets] = {}
        self.trending_dirty: set[int] = set()
        self.pending: list[EventT] = []  # applied, not yet acked (so not committable)
        self.newest: dict[int, EventT] = {}  # newest pending event per partition
        self.stream: Any = None  # the ingest stream, which acks
        self.lock = asyncio.Lock()
        self.last_flush = time.monotonic()

    def state_of(self, key: bytes, partition: int) -> CachedState:
        """The cached state of ``key``, read from the partition's store on a miss."""
        entry = self.cache.get(key)
        if entry is None:
            db = local_stores(self.sa.user_state).get(partition)
            raw = None if db is None else db.get(key)
            entry = self.cache.add(key, UserState.from_bytes(raw), partition,
                                   stored=raw is not None)
        return entry

    def apply(self, valid: Sequence[tuple[EventT, ClickEvent, int]]) -> tuple[
            list[TrainingExample], int, list[UserState]]:
        """Apply valid clicks (with their events and positions) in memory; return the
        training examples, the number of redelivered copies and the states they changed."""
        s = self.sa.settings
        examples: list[TrainingExample] = []
        changed: dict[bytes, UserState] = {}
        duplicates = 0
        for ev, click, pos in valid:
            msg = ev.message
            entry = self.state_of(msg.key, msg.partition)
            example = entry.state.apply(click, s.history_len, s.dedup_window, position=pos,
                                        example_len=s.train_history_len)
            if example is None:
                duplicates += 1
                continue
            self.cache.mark_dirty(msg.key, entry)
            changed[msg.key] = entry.state
            examples.append(example)
            trending = self.trending.get(msg.partition)
            if trending is None:
                trending = self.trending[msg.partition] = self._load_trending(msg.partition)
            trending.add(click.item, click.ts)
            self.trending_dirty.add(msg.partition)
        return examples, duplicates, list(changed.values())

    def hold(self, events: Sequence[EventT]) -> None:
        """Keep the batch's events unacked until the states they changed are flushed."""
        self.pending.extend(events)
        for ev in events:
            self.newest[ev.message.partition] = ev

    def due(self) -> bool:
        s = self.sa.settings
        return bool(self.pending) and (
            time.monotonic() - self.last_flush >= s.state_flush_s
            or len(self.pending) >= s.state_flush_events)

    async def flush(self) -> int:
        """Write the dirty states and trending counts to the tables, then ack the events
        behind them (Faust commits an offset only once acked, and publishes the changelog
        records attached to an event before committing it). Return the users written."""
        sa, m = self.sa, self.sa.metrics
        started = time.perf_counter()
        assigned = self._assigned()
        written = nbytes = 0
        by_partition: dict[int, list[tuple[bytes, CachedState]]] = {}
        for key, entry in self.cache.take_dirty():
            by_partition.setdefault(entry.partition, []).append((key, entry))
        for partition, items in by_partition.items():
            event = self.newest.get(partition)
            if partition not in assigned or event is None:
                continue  # revoked meanwhile: its next owner applies those events again
            with writing_for(event):
                for key, entry in items:
                    value = entry.state.to_bytes()
                    sa.user_state[key] = value
                    written += 1
                    nbytes += len(key) + len(value)
                    if not entry.stored:
                        entry.stored = True
                        if self.keys is not None:
                            self.keys.inserted(partition)
        for partition in self.trending_dirty & assigned:
            event = self.newest.get(partition)
            if event is not None:
                with writing_for(event):
                    value = msgpack.packb(self.trending[partition].snapshot())
                    sa.trending[str(partition).encode()] = value
                    nbytes += len(value)
        self.trending_dirty.clear()
        pending, self.pending = self.pending, []
        self.newest.clear()
        for ev in pending:
            if ev.message.partition in assigned:
                await self.stream.ack(ev)
        self.cache.evict()
        self.last_flush = time.monotonic()
        m.state_flushed_users.inc(written)
        m.state_written_bytes.inc(nbytes)
        m.state_flush_seconds.observe(time.perf_counter() - started)
        m.state_cached_users.set(len(self.cache))
        m.state_cache_bytes.set(self.cache.size)
        return written

    def revoke(self, partitions: set[int]) -> None:
        """Forget the states and held events of revoked partitions: their events were not
        acked, so whoever owns the partitions next reads them again from the last commit."""
        self.cache.drop_partitions(partitions)
        for partition in partitions:
            self.trending.pop(partition, None)
            self.trending_dirty.discard(partition)
            self.newest.pop(partition, None)
        self.pending = [ev for ev in self.pending if ev.message.partition not in partitions]

    def _assigned(self) -> set[int]:
        topic = self.sa.settings.topic_clicks
        return {tp.partition for tp in self.sa.app.assignor.assigned_actives()
                if tp.topic == topic}

    def _load_trending(self, partition: int) -> TrendingBuckets:
        s = self.sa.settings
        db = local_stores(self.sa.trending).get(partition)
        raw = None if db is None else db.get(str(partition).encode())
        return TrendingBuckets(s.trending_bucket_s * 1000, s.trending_buckets, s.trending_top,
                               msgpack.unpackb(raw, raw=False) if raw else None)
