"""Agents and timers: ``ingest`` validates and applies clicks, ``batcher`` feeds the trainer,
``check_catalogue`` validates the catalogue's records."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgpack
from faust.types import EventT

from advrec.catalogue import InvalidItem, decode_item
from advrec.contract import (
    ClickEvent,
    InvalidEvent,
    TrainingExample,
    decode_message,
    encode_batch,
    encode_dead_letter,
    encode_key,
    partition_for,
)
from advrec.memory import release_freed_memory
from stream_app.rocks import local_stores, shared_memory
from stream_app.state import UserState, merge_trending, position, update_trending
from stream_app.suspicion import score_users
from stream_app.writebehind import WriteBehind, writing_for

if TYPE_CHECKING:
    from stream_app.app import StreamApp

__all__ = ["Ingest", "KeyCount", "StreamGauges", "TrainBatcher", "apply_batch",
           "check_catalogue_batch", "register", "validated"]

log = logging.getLogger(__name__)


class KeyCount:
    """Keys of a table per active partition: one scan when assigned, then +1 per insert.

    ``len(table)`` walks every key on the event loop (~60 ms per 100k keys, every time);
    RocksDB's ``estimate-num-keys`` counts each overwrite still in the memtable (10x off
    for a table rewritten every batch). Keys are never deleted, so inserts are enough.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.by_partition: dict[int, int] = {}

    def inserted(self, partition: int) -> None:
        if partition in self.by_partition:  # else the next refresh's scan sees the key
            self.by_partition[partition] += 1

    def refresh(self, active: set[int]) -> int:
        """Forget revoked partitions, scan newly assigned ones once; return the total."""
        store = self.table.data
        for partition in self.by_partition.keys() - active:
            del self.by_partition[partition]
        for partition in active - self.by_partition.keys():
            db = local_stores(self.table).get(partition)
            self.by_partition[partition] = 0 if db is None else store._size1(db)
        return sum(self.by_partition.values())


def rocksdb_memory(tables: Sequence[Any], budget: int) -> dict[str, int]:
    """RocksDB's own memory figures for the worker's local stores, summed over stores.

    ``cache`` is the one block cache all stores share (data, index and filter blocks, and
    the memtables charged to it), ``memtables`` and ``table_readers`` are summed per store.
    """
    totals = {"cache": shared_memory(budget)[0].get_usage(), "memtables": 0, "table_readers": 0}
    for table in tables:
        for db in list(local_stores(table).values()):
            try:
                totals["memtables"] += db.property_int_value(
                    "rocksdb.cur-size-all-mem-tables") or 0
                totals["table_readers"] += db.property_int_value(
                    "rocksdb.estimate-table-readers-mem") or 0
            except Exception:  # a store being closed by a rebalance: skip it this round
                continue
    return totals


Valid = tuple[EventT, ClickEvent, int]  # the message's event, the click, its position


async def validated(sa: StreamApp, events: Sequence[EventT]) -> tuple[list[Valid], int]:
    """Decode and check a batch of ``clicks`` messages (single events or envelopes);
    dead-letter the bad events with their reason; return the good ones in order, each with
    the Faust event of its message and its position, and how many events the batch held."""
    s, m = sa.settings, sa.metrics
    now_ms = int(time.time() * 1000)  # one clock read per batch, not per event
    good: list[Valid] = []
    n_events = 0
    for ev in events:
        msg = ev.message
        decoded = decode_message(ev.value, msg.key, now_ms=now_ms)
        if not isinstance(decoded[0], InvalidEvent) or len(decoded) > 1:  # it was readable
            expected = partition_for(msg.key, s.partitions)
            if msg.partition != expected:  # the whole message goes: one dead letter
                decoded = [InvalidEvent("wrong_partition", (
                    f"key {msg.key[:40]!r} belongs on partition {expected} (murmur2), came "
                    f"on {msg.partition}: set the producer's partitioner to murmur2"))]
        n_events += len(decoded)
        for i, click in enumerate(decoded):
            if not isinstance(click, InvalidEvent):
                good.append((ev, click, position(msg.offset, i)))
                continue
            m.events_invalid.labels(reason=click.reason).inc()
            raw = (click.original if click.original is not None
                   else ev.value if isinstance(ev.value, bytes) else None)
            await sa.clicks_dlq.send(
                key=msg.key if isinstance(msg.key, bytes) else None,
                value=encode_dead_letter(click.reason, click.detail, raw, msg.key, msg.topic,
                                         msg.partition, msg.offset, click.index))
            m.dlq_writes.inc()
    return good, n_events


async def check_catalogue_batch(sa: StreamApp, events: Sequence[EventT]) -> None:
    """Check a batch of ``items`` records against the catalogue contract; dead-letter the bad
    ones with their reason, as ``validated`` does clicks.

    A tombstone (null value) deletes its item and is only counted. The worker keeps no
    catalogue: the trainer follows the topic itself, so this is where a catalogue owner's
    mistakes show (``items-dlq``, ``advrec_catalogue_items_invalid_total``).
    """
    m = sa.metrics
    now_ms = int(time.time() * 1000)
    for ev in events:
        msg = ev.message
        if ev.value is None:
            m.catalogue_items.labels(outcome="deleted").inc()
            continue
        try:
            decode_item(ev.value, msg.key, now_ms=now_ms)
        except InvalidItem as exc:
            log.warning("catalogue record %s[%d]@%d dead-lettered: %s", msg.topic,
                        msg.partition, msg.offset, exc)
            key = msg.key if isinstance(msg.key, bytes) else None
            await sa.items_dlq.send(
                key=key,
                value=encode_dead_letter(exc.reason, exc.detail,
                                         ev.value if isinstance(ev.value, bytes) else None,
                                         key, msg.topic, msg.partition, msg.offset))
            m.catalogue_items_invalid.labels(reason=exc.reason).inc()
            m.catalogue_items.labels(outcome="dead_letter").inc()
            continue
        m.catalogue_items.labels(outcome="ok").inc()


async def apply_batch(sa: StreamApp, events: Sequence[EventT],
                      keys: KeyCount | None = None) -> list[TrainingExample]:
    """Validate a batch of ``clicks`` messages, dead-letter the bad, apply the good, writing
    each user's state through to the table (``ADVREC_STATE_WRITE_BEHIND=0``).

    Writes are coalesced: one ``user_state`` write per user and one ``trending`` write per
    partition per batch (a write per event costs ~4x the throughput on RocksDB).
    """
    s, m = sa.settings, sa.metrics
    by_user: dict[str, list[tuple[EventT, Any, int]]] = defaultdict(list)
    by_partition: dict[int, EventT] = {}
    valid, n_events = await validated(sa, events)
    for ev, click, pos in valid:
        by_user[click.user].append((ev, click, pos))
        by_partition.setdefault(ev.message.partition, ev)
    examples: list[TrainingExample] = []
    trending_hits: dict[int, list[tuple[str, int]]] = defaultdict(list)
    duplicates = 0
    changed: list[tuple[str, UserState, EventT, bool]] = []  # user, state, event, is new
    for user, items in by_user.items():
        first_ev = items[0][0]
        with writing_for(first_ev):
            raw = sa.user_state.get(encode_key(user))
        state = UserState.from_bytes(raw)
        seen = {f for f, _ in state.fingerprints}
        applied = False
        for ev, click, pos in items:
            example = state.apply(click, s.history_len, s.dedup_window, seen,
                                  position=pos, example_len=s.train_history_len)
            if example is None:
                duplicates += 1
                continue
            applied = True
            examples.append(example)
            trending_hits[ev.message.partition].append((click.item, click.ts))
        if applied:
            changed.append((user, state, first_ev, raw is None))
    if s.detector_scoring:
        score_users(sa.server, m, [state for _, state, _, _ in changed])
    for user, state, first_ev, new in changed:
        with writing_for(first_ev):
            value = state.to_bytes()
            sa.user_state[encode_key(user)] = value
        m.state_flushed_users.inc()
        m.state_written_bytes.inc(len(value) + len(user))
        if new and keys is not None:
            keys.inserted(first_ev.message.partition)
    for partition, hits in trending_hits.items():
        with writing_for(by_partition[partition]):
            key = str(partition).encode()
            old = sa.trending.get(key)
            buckets = msgpack.unpackb(old, raw=False) if old else {}
            value = msgpack.packb(update_trending(
                buckets, hits, s.trending_bucket_s * 1000, s.trending_buckets, s.trending_top))
            sa.trending[key] = value
            m.state_written_bytes.inc(len(value))
    if duplicates:
        m.events_duplicate.inc(duplicates)
    # counted last, so a reader that sees a batch consumed also sees its verdicts counted
    m.events_consumed.inc(n_events)
    return examples


def backlog_after(consumer: Any, events: Sequence[EventT]) -> int:
    """Return how far behind the log end the newest event of each partition is (summed)."""
    last: dict[Any, int] = {}
    for ev in events:
        tp = ev.message.tp
        last[tp] = max(last.get(tp, -1), ev.message.offset)
    behind = 0
    for tp, offset in last.items():
        try:
            behind += max(0, consumer.highwater(tp) - offset - 1)
        except Exception:  # highwater unknown until the first fetch response
            continue
    return behind


class Ingest:
    """The ``ingest`` agent's work on each batch of ``clicks`` messages, and the flushes of
    write-behind state around it (a timer, revoked partitions, shutdown)."""

    def __init__(self, sa: StreamApp, keys: KeyCount) -> None:
        self.sa = sa
        self.keys = keys
        self.behind = sa.behind = WriteBehind(sa, keys)

    async def write_through(self, events: Sequence[EventT]) -> None:
        """``ADVREC_STATE_WRITE_BEHIND=0``: every batch writes its users to the tables."""
        sa = self.sa
        started = time.perf_counter()
        examples = await apply_batch(sa, events, self.keys)
        sa.backlog = backlog_after(sa.app.consumer, events)
        if examples:
            await sa.examples.send(value=examples)
        sa.metrics.processing_seconds.observe(time.perf_counter() - started)

    async def write_behind(self, events: Sequence[EventT]) -> None:
        """Apply a batch to the in-memory states; its events stay unacked (so uncommitted)
        until a flush has written the states they changed to the tables."""
        sa, m, behind = self.sa, self.sa.metrics, self.behind
        started = time.perf_counter()
        async with behind.lock:
            valid, n_events = await validated(sa, events)
            examples, duplicates, changed = behind.apply(valid)
            if sa.settings.detector_scoring:
                score_users(sa.server, m, changed)
            behind.hold(events)
            if duplicates:
                m.events_duplicate.inc(duplicates)
            m.events_consumed.inc(n_events)
            if behind.due():
                await behind.flush()
        sa.backlog = backlog_after(sa.app.consumer, events)
        if examples:
            await sa.examples.send(value=examples)
        m.processing_seconds.observe(time.perf_counter() - started)

    async def flush_if_due(self) -> None:
        """An idle stream still gets its last changes written and its events acked."""
        behind = self.behind
        try:
            if behind.due():
                async with behind.lock:
                    if behind.due():
                        await behind.flush()
        except Exception:
            log.exception("could not flush user states; will retry")

    async def revoke(self, revoked: Any) -> None:
        """Forget the states of partitions another worker now owns."""
        parts = {tp.partition for tp in revoked if tp.topic == self.sa.settings.topic_clicks}
        if parts:
            async with self.behind.lock:
                self.behind.revoke(parts)

    async def flush_at_shutdown(self) -> None:
        try:
            async with self.behind.lock:
                if self.behind.pending:
                    await self.behind.flush()
        except Exception:  # the events stay unacked: applied again after the restart
            log.warning("could not flush user states at shutdown", exc_info=True)


class TrainBatcher:
    """Cuts the training examples ``ingest`` emits into ``train-batches`` messages: full
    batches of ``train_batch_size`` at once, a partial one when its oldest example has
    waited ``train_batch_s``."""

    def __init__(self, sa: StreamApp) -> None:
        self.sa = sa
        self.pending: list[TrainingExample] = []
        self.pending_since = 0.0  # when the oldest pending example came (monotonic)

    async def add(self, examples: Sequence[TrainingExample]) -> None:
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.extend(examples)
        await self.flush(force=self.stale())

    def stale(self) -> bool:
        return time.monotonic() - self.pending_since >= self.sa.settings.train_batch_s

    async def flush_if_stale(self) -> None:
        try:
            if self.pending and self.stale():
                await self.flush(force=True)
        except Exception:
            log.exception("could not publish a training batch; will retry")

    async def flush(self, force: bool) -> None:
        """Send every full batch pending, and with ``force`` the rest as one more."""
        s, m = self.sa.settings, self.sa.metrics
        while len(self.pending) >= s.train_batch_size or (force and self.pending):
            batch = self.pending[: s.train_batch_size]
            del self.pending[: len(batch)]
            self.pending_since = time.monotonic()
            await self.sa.train_batches.send(key=b"batch",
                                             value=encode_batch(batch, source=s.app_id))
            m.train_batches_sent.inc()
            m.examples_emitted.inc(len(batch))


class StreamGauges:
    """What the worker reports every few seconds: RocksDB memory, keys per table, and the
    consumer lag of each ``clicks`` partition it owns (a revoked one's series is removed)."""

    def __init__(self, sa: StreamApp, keys: KeyCount) -> None:
        self.sa = sa
        self.keys = keys
        self.lag_labels: set[tuple[str, str]] = set()

    def report(self) -> None:
        sa, s, m = self.sa, self.sa.settings, self.sa.metrics
        memory = rocksdb_memory((sa.user_state, sa.trending), s.rocksdb_memory_mb * 2**20)
        for kind, value in memory.items():
            m.rocksdb_memory.labels(kind=kind).set(value)
        app = sa.app
        try:
            consumer = app.consumer
            if not (app.rebalancing or app.tables.recovery.in_recovery):  # tables complete
                active = {tp.partition for tp in app.assignor.assigned_actives()
                          if tp.topic == s.topic_clicks}
                m.table_keys.labels(table="user_state").set(self.keys.refresh(active))
            self.report_lag(consumer)
        except Exception:
            log.debug("stream gauges not available yet", exc_info=True)

    def report_lag(self, consumer: Any) -> None:
        s, m = self.sa.settings, self.sa.metrics
        assigned = {(tp.topic, str(tp.partition)) for tp in consumer.assignment()}
        for labels in self.lag_labels - assigned:  # now another worker's to report
            m.consumer_lag.remove(*labels)
        self.lag_labels.intersection_update(assigned)
        for tp in consumer.assignment():
            if tp.topic != s.topic_clicks:
                continue
            end = consumer.highwater(tp)
            if end is None:  # no fetch from this partition yet
                continue
            read = consumer._read_offset.get(tp)  # last offset handed to the stream
            lag = end if read is None else max(0, end - read - 1)
            m.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
            self.lag_labels.add((tp.topic, str(tp.partition)))


def register(sa: StreamApp) -> None:
    """Attach the agents, timers and signal handlers of the stream to ``sa.app``."""
    app, s = sa.app, sa.settings
    user_keys = KeyCount(sa.user_state)
    ingesting = Ingest(sa, user_keys)
    batching = TrainBatcher(sa)
    gauges = StreamGauges(sa, user_keys)

    @app.agent(sa.clicks, name="ingest")
    async def ingest(stream: Any) -> None:
        if not s.state_write_behind:
            async for events in stream.take_events(s.ingest_batch, within=s.ingest_wait_s):
                await ingesting.write_through(events)
            return
        ingesting.behind.stream = stream
        async for events in stream.noack_take(s.ingest_batch, within=s.ingest_wait_s):
            await ingesting.write_behind(events)

    @app.agent(sa.items, name="check_catalogue")
    async def check_catalogue(stream: Any) -> None:
        # a catalogue changes slowly: small batches, and a lone record waits at most 1 s
        async for events in stream.take_events(100, within=1.0):
            await check_catalogue_batch(sa, events)

    @app.timer(max(0.05, s.state_flush_s / 2))
    async def flush_states() -> None:
        await ingesting.flush_if_due()

    @app.on_partitions_revoked.connect
    async def forget_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        await ingesting.revoke(revoked)

    @app.on_before_shutdown.connect
    async def flush_before_shutdown(app: Any, **kwargs: Any) -> None:
        await ingesting.flush_at_shutdown()

    @app.agent(sa.examples, name="batcher")
    async def batcher(stream: Any) -> None:
        async for chunk in stream:
            await batching.add(chunk)

    @app.timer(max(0.1, s.train_batch_s / 2))
    async def flush_stale_examples() -> None:
        await batching.flush_if_stale()

    @app.task
    async def follow_bundles() -> None:
        await sa.server.start()
        await sa.feed.start()  # its own thread: reads the bundle topic, swaps via the watcher
        await app.tables.recovery.completed.wait()  # the first assignment's state is local
        sa.started = True

    @app.on_before_shutdown.connect
    async def stop_feed(app: Any, **kwargs: Any) -> None:
        await sa.feed.stop()
        flags_stop.set()

    flags_stop = asyncio.Event()

    @app.task
    async def follow_flags() -> None:
        try:
            await sa.flags.run(flags_stop)
        except Exception:
            log.exception("the flags feed stopped; /admin/flagged shows what was read")

    @app.timer(s.watch_interval_s)
    async def refresh_model_age() -> None:
        sa.watcher.update_age()  # the live model ages between swaps too

    @app.timer(2.0)
    async def refresh_trending() -> None:
        try:
            parts = [msgpack.unpackb(v, raw=False) for _, v in sa.trending.items() if v]
            sa.trending_cache = merge_trending(parts, s.max_k, s.trending_buckets)
        except Exception:
            log.exception("could not refresh the trending list")

    @app.timer(s.trim_interval_s)
    async def trim_native_heap() -> None:
        # RocksDB memtables (freed at every flush), onnxruntime sessions and aiohttp buffers
        # come and go through glibc malloc, which keeps what they free; without giving it
        # back the worker's RSS crept up ~3 MB a minute in bench/soak.py
        release_freed_memory()

    @app.timer(5.0)
    async def report_stream_gauges() -> None:
        gauges.report()
