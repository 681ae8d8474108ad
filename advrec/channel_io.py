"""Channel records through Kafka: publish versions, pointers and pins; read a channel topic.

The format is ``advrec.channel``; this module only moves its records. Both the worker (its
bundle feed and the admin pin) and the trainer (bundles and checkpoints) use it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from advrec.channel import (
    CHUNK_BYTES,
    Manifest,
    Record,
    manifest_key,
    pin_record,
    pointer_record,
    split_version,
    tombstones,
)

__all__ = ["ChannelPublisher", "Published", "follow_topic", "last_record", "publish_to_topic",
           "read_view"]

log = logging.getLogger(__name__)

FETCH_BYTES = 2 * 1024 * 1024  # per fetch of a channel topic (see _consumer)
_RECORD_OVERHEAD = 64 * 1024  # key, msgpack header, Kafka record and batch headers


@dataclass(frozen=True)
class Published:
    """What one publish wrote."""

    version: str
    chunks: int
    bytes: int  # keys and values of every record written (chunks, manifest, pointer)
    first_offset: int
    manifest_offset: int
    seconds: float
    manifest: Manifest
    tombstoned: tuple[str, ...] = ()


class ChannelPublisher:
    """Writes versions, pointers, pins and tombstones to one channel topic (partition 0).

    Idempotent and ``acks=all``: a retried send never duplicates a chunk, and a publish that
    returns has every record on the broker's in-sync replicas.
    """

    def __init__(self, bootstrap: str, topic: str, *, producer_id: str = "",
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.producer_id = producer_id
        self.chunk_bytes = chunk_bytes
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                max_request_size=self.chunk_bytes + _RECORD_OVERHEAD, linger_ms=0,
                request_timeout_ms=30_000)
            await producer.start()
            self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def _send(self, records: Sequence[Record]) -> list[Any]:
        """Send records in order (pipelined) and wait for all; return their metadata."""
        await self.start()
        assert self._producer is not None
        futures = [await self._producer.send(self.topic, value, key=key, partition=0)
                   for key, value in records]
        return list(await asyncio.gather(*futures))

    async def publish(self, version: str, files: Sequence[tuple[str, bytes]], *,
                      meta: dict[str, Any] | None = None,
                      stale: Sequence[tuple[str, int]] = (),
                      make_current: bool = True) -> Published:
        """Write a version's chunks, its manifest, tombstones for ``stale`` versions and (with
        ``make_current``) the pointer, in that order; return what was written."""
        started = time.perf_counter()
        chunks, manifest = split_version(version, files, chunk_bytes=self.chunk_bytes,
                                         meta=meta, producer=self.producer_id)
        sent = await self._send(chunks)
        manifest = dataclasses.replace(manifest, first_offset=sent[0].offset)
        man_value = manifest.value()
        (man_meta,) = await self._send([(manifest_key(version), man_value)])
        dead = [r for v, n in stale if v != version for r in tombstones(v, n)]
        if dead:
            await self._send(dead)
        total = sum(len(k) + len(v or b"") for k, v in chunks) + len(man_value)
        if make_current:
            pointer = pointer_record(version, first_offset=sent[0].offset,
                                     manifest_offset=man_meta.offset, producer=self.producer_id)
            await self._send([pointer])
            total += len(pointer[0]) + len(pointer[1] or b"")
        return Published(version=version, chunks=len(chunks), bytes=total,
                         first_offset=sent[0].offset, manifest_offset=man_meta.offset,
                         seconds=time.perf_counter() - started,
                         manifest=dataclasses.replace(manifest, offset=man_meta.offset),
                         tombstoned=tuple(v for v, _ in stale if v != version))

    async def point(self, version: str) -> int:
        """Write the pointer alone (e.g. to make an already published version current)."""
        (meta,) = await self._send([pointer_record(version, producer=self.producer_id)])
        return int(meta.offset)

    async def pin(self, version: str | None, *, by: str = "", reason: str = "") -> int:
        """Write a pin on ``version`` (None releases it); return the record's offset."""
        (meta,) = await self._send([pin_record(version, by=by, reason=reason)])
        return int(meta.offset)

    async def tombstone(self, stale: Sequence[tuple[str, int]]) -> None:
        await self._send([r for v, n in stale for r in tombstones(v, n)])


def _consumer(bootstrap: str, client_id: str) -> AIOKafkaConsumer:
    # Outside any consumer group: every reader sees the whole topic. One fetch holds at most
    # 2 MiB (a few 512 KiB chunks, and the topic's largest record): a worker rebuilding a
    # bundle while it serves holds little more than the chunk it writes (with 8 MiB, a whole
    # bundle sat in the fetch buffer, and again as records, during the swap).
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, client_id=client_id,
                            enable_auto_commit=False, auto_offset_reset="earliest",
                            fetch_max_bytes=FETCH_BYTES, max_partition_fetch_bytes=FETCH_BYTES)


async def _start(consumer: AIOKafkaConsumer, tp: TopicPartition,
                 stop: asyncio.Event | None) -> bool:
    """Start ``consumer`` and wait until ``tp`` exists; False if ``stop`` was set first."""
    while stop is None or not stop.is_set():
        try:
            await consumer.start()
            break
        except KafkaError as exc:
            log.warning("Kafka not reachable for %s yet (%s); retrying", tp.topic, exc)
            await asyncio.sleep(1.0)
    else:
        return False
    while stop is None or not stop.is_set():
        try:
            if tp.topic in await consumer.topics():  # a metadata request: created later?
                return True
        except KafkaError as exc:
            log.warning("no metadata for %s yet (%s)", tp.topic, exc)
        log.info("waiting for topic %s to exist", tp.topic)
        await asyncio.sleep(1.0)
    return False


async def follow_topic(bootstrap: str, topic: str,
                       handle: Callable[[Any], Awaitable[None] | None], *,
                       stop: asyncio.Event, start_offset: int | None = None,
                       on_caught_up: Callable[[], Awaitable[None] | None] | None = None,
                       until_caught_up: bool = False, client_id: str = "advrec-channel",
                       poll_ms: int = 500) -> int:
    """Read partition 0 of ``topic`` from ``start_offset`` (default: the beginning), calling
    ``handle(record)`` for each record in order, until ``stop`` is set.

    ``on_caught_up`` runs once, when everything that was on the topic at start (its end
    offset then) has been handled; with ``until_caught_up`` the read ends there. Returns the
    next offset to read.
    """
    tp = TopicPartition(topic, 0)
    consumer = _consumer(bootstrap, client_id)
    position = start_offset or 0
    try:
        if not await _start(consumer, tp, stop):
            return position
        consumer.assign([tp])
        if start_offset is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, start_offset)
        end = (await consumer.end_offsets([tp]))[tp]
        position = await consumer.position(tp)
        caught_up = False
        while not stop.is_set():
            if not caught_up and position >= end:
                caught_up = True
                if on_caught_up is not None:
                    result = on_caught_up()
                    if asyncio.iscoroutine(result):
                        await result
                if until_caught_up:
                    break
            try:
                batches = await consumer.getmany(tp, timeout_ms=poll_ms)
            except KafkaError as exc:
                log.warning("reading %s failed (%s); retrying", topic, exc)
                await asyncio.sleep(1.0)
                continue
            for record in batches.get(tp, []):
                result = handle(record)
                if asyncio.iscoroutine(result):
                    await result
                position = record.offset + 1
            if not batches:  # compaction may leave the end beyond the last record
                position = max(position, await consumer.position(tp))
    finally:
        await consumer.stop()
    return position


async def last_record(bootstrap: str, topic: str, *, stop: asyncio.Event | None = None,
                      timeout_s: float = 30.0) -> tuple[Any | None, int]:
    """Return (the last record of partition 0 of ``topic`` or None if it is empty, its end
    offset)."""
    tp = TopicPartition(topic, 0)
    consumer = _consumer(bootstrap, "advrec-channel-tail")
    try:
        if not await _start(consumer, tp, stop):
            return None, 0
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        begin = (await consumer.beginning_offsets([tp]))[tp]
        if end <= begin:
            return None, end
        consumer.seek(tp, end - 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500)
            records = batches.get(tp, [])
            if records:
                return records[-1], end
            if await consumer.position(tp) >= end:  # the last offset was compacted away
                return None, end
        return None, end
    finally:
        await consumer.stop()


async def read_view(bootstrap: str, topic: str, *, stop: asyncio.Event | None = None) -> Any:
    """Return a ``TopicView`` of everything on ``topic`` now (no files are rebuilt)."""
    from advrec.channel import ChannelError, TopicView

    view = TopicView()

    def handle(record: Any) -> None:
        try:
            view.apply(record.key, record.value, record.offset)
        except ChannelError as exc:
            log.warning("%s, offset %d: %s", topic, record.offset, exc)

    await follow_topic(bootstrap, topic, handle, stop=stop or asyncio.Event(),
                       until_caught_up=True, client_id="advrec-channel-view")
    return view


async def publish_to_topic(bootstrap: str, topic: str, version: str,
                           files: Sequence[tuple[str, bytes]], *, keep: int = 5,
                           producer_id: str = "", chunk_bytes: int = CHUNK_BYTES) -> Published:
    """Publish one version as the current one, tombstoning all but the newest ``keep`` (an
    operator's publish: the topic is read first to learn what is on it)."""
    view = await read_view(bootstrap, topic)
    publisher = ChannelPublisher(bootstrap, topic, producer_id=producer_id,
                                 chunk_bytes=chunk_bytes)
    try:
        return await publisher.publish(version, files, stale=view.stale(keep, adding=version))
    finally:
        await publisher.stop()
