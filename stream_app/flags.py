"""The worker's view of flagged users: it follows the flags topic (advrec.flags) into a book,
for the admin to list, and writes re-admissions back to it for the trainer to act on.

The active trainer's detector flags users; it is the one place that decides. Every worker
keeps the whole book (one record per flagged or re-admitted user: small beside the user
state), so any worker answers ``GET /admin/flagged`` and takes ``POST .../readmit``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from advrec.channel_io import follow_topic
from advrec.flags import READMITTED, FlagBook, FlagRecord, publish_flags
from stream_app.metrics import StreamMetrics
from stream_app.settings import Settings

__all__ = ["FlagFeed"]

log = logging.getLogger(__name__)


class FlagFeed:
    """The flags topic as this worker has read it, and the way to re-admit a user."""

    def __init__(self, settings: Settings, metrics: StreamMetrics) -> None:
        self.s = settings
        self.m = metrics
        self.book = FlagBook()
        self.caught_up = asyncio.Event()
        self._producer: Any = None
        self._lock = asyncio.Lock()

    def _handle(self, record: Any) -> None:
        parsed = self.book.apply_raw(record.key, record.value)
        if parsed is None and record.value is not None:
            log.warning("skipping a record on %s that is not a flag record (offset %d)",
                        self.s.topic_flags, record.offset)
        self.m.flagged_users.set(self.book.n_flagged)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the flags topic until ``stop`` is set (a task on the worker's loop)."""
        try:
            await follow_topic(self.s.bootstrap, self.s.topic_flags, self._handle, stop=stop,
                               on_caught_up=self.caught_up.set,
                               client_id=f"advrec-flags-{self.s.web_port}")
        finally:
            if self._producer is not None:
                await self._producer.stop()

    async def readmit(self, user: str, *, by: str, note: str = "") -> FlagRecord:
        """Write a re-admission of ``user`` to the flags topic (and to this book at once)."""
        from aiokafka import AIOKafkaProducer

        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self.s.bootstrap, acks="all",
                                            client_id=f"advrec-flags-admin-{self.s.web_port}")
                await producer.start()
                self._producer = producer
        record = FlagRecord(user=user, state=READMITTED, by=by, note=note)
        await publish_flags(self._producer, self.s.topic_flags, [record])
        self.book.apply(record)
        self.m.flagged_users.set(self.book.n_flagged)
        return record
