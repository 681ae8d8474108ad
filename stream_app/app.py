"""The Faust app: App, topics and tables, wired to the serving model and the metrics.

Reading order of the package: ``contract`` (in ``advrec``) -> ``settings`` -> ``state`` ->
``rocks`` (the tables' RocksDB under one memory budget) -> this module (App, topics,
tables) -> ``agents`` (ingest, batcher, timers) -> ``views`` (HTTP) and ``routing`` (which
worker owns a user) -> ``serving``, ``hotswap`` and ``feed`` (the model: ONNX sessions, the
swap, the bundle topic) -> ``main`` (the ``advrec worker`` CLI).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import faust
from prometheus_client import CollectorRegistry

from advrec.types import ItemId
from stream_app.feed import BundleFeed
from stream_app.flags import FlagFeed
from stream_app.hotswap import BundleWatcher
from stream_app.metrics import StreamMetrics
from stream_app.rocks import STORE_URL
from stream_app.serving import ModelServer
from stream_app.settings import Settings

__all__ = ["ReadPacer", "StreamApp", "create_app"]

log = logging.getLogger(__name__)


class ReadPacer:
    """Spaces reads to ``rate`` per second (0: no pacing) while ingestion has a backlog.

    Ingestion and HTTP share one event loop; eight clients reading as fast as they can took
    ~87% of it and ingestion fell to 0.13x its idle rate. While the worker is behind, reads
    still get answers, just paced, so the stream catches up; with no backlog they run free.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0

    async def wait(self) -> None:
        if self.rate <= 0:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass
class StreamApp:
    """One worker's parts, passed explicitly to the agents and views that use them."""

    settings: Settings
    app: faust.App
    clicks: faust.TopicT
    clicks_dlq: faust.TopicT
    train_batches: faust.TopicT
    items: faust.TopicT
    items_dlq: faust.TopicT
    examples: faust.ChannelT
    user_state: faust.Table
    trending: faust.Table
    metrics: StreamMetrics
    server: ModelServer
    watcher: BundleWatcher
    feed: BundleFeed
    flags: FlagFeed
    trending_cache: list[ItemId] = field(default_factory=list)
    started: bool = False
    backlog: int = 0  # messages between the log end and the last ingested batch
    read_pacer: ReadPacer = field(default_factory=lambda: ReadPacer(0.0))
    behind: Any = None  # stream_app.writebehind.WriteBehind, set by agents.register


def rocksdb_options(s: Settings) -> dict[str, int]:
    """RocksDB sizes for one store (one per table and partition), in place of Faust's.

    Faust's defaults (64 MB memtables x 3 and a 2 GB block cache, per store) let a worker's
    memory climb by the volume written until memtables flush: +68 % in 8 minutes of
    bench/soak.py. Here memtables are small and every store draws its cache, index and
    filter blocks and memtables from one budget per worker (``stream_app.rocks``).
    """
    mib = 1024 * 1024
    return {"write_buffer_size": s.rocksdb_write_buffer_mb * mib, "max_write_buffer_number": 2,
            "memory_budget": s.rocksdb_memory_mb * mib}


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> StreamApp:
    """Build the Faust app with its topics, tables, agents and web views."""
    s = settings
    s.worker_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        s.app_id,
        broker=s.broker,
        store=STORE_URL,
        datadir=str(s.worker_dir),
        autodiscover=False,
        # One key encoding everywhere: raw UTF-8 user ids on `clicks`, in tables and from
        # producers, so table_route lookups hash to the partition that holds the user.
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=s.partitions,
        topic_replication_factor=s.replication,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        web_bind=s.web_bind,
        web_port=s.web_port,
        web_host=s.web_host,
        web_transport="tcp://",
        # Faust's own debug pages (/table/... dumps raw state without our checks, /router,
        # /graph, /stats) are off: the API is what stream_app.views documents.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.session_timeout_s / 3),
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        producer_linger_ms=5,
    )
    clicks = app.topic(s.topic_clicks, key_type=bytes, value_type=bytes,
                       partitions=s.partitions, key_serializer="raw", value_serializer="raw")
    clicks_dlq = app.topic(s.topic_dlq, key_type=bytes, value_type=bytes,
                           key_serializer="raw", value_serializer="raw")
    train_batches = app.topic(s.topic_train, key_type=bytes, value_type=bytes,
                              partitions=1, key_serializer="raw", value_serializer="raw")
    # the catalogue, keyed by item id (advrec.catalogue; one partition: advrec.topics)
    items = app.topic(s.topic_items, key_type=bytes, value_type=bytes, partitions=1,
                      key_serializer="raw", value_serializer="raw")
    items_dlq = app.topic(s.topic_items_dlq, key_type=bytes, value_type=bytes,
                          key_serializer="raw", value_serializer="raw")
    # Keys and values are bytes (raw codec): keys are the UTF-8 user id exactly as on
    # `clicks` (key_type=str would mean JSON keys and misrouted lookups); values are msgpack
    # encoded by stream_app.state (value_type=list/dict would break changelog recovery).
    user_state = app.Table("user_state", default=None, partitions=s.partitions,
                           key_type=bytes, value_type=bytes, options=rocksdb_options(s),
                           help="Per user: last L items, last event time, counts, dedup window")
    trending = app.Table("trending", default=None, partitions=s.partitions,
                         key_type=bytes, value_type=bytes, options=rocksdb_options(s),
                         help="Per partition: item counts in recent event-time buckets")
    metrics = StreamMetrics.create(registry)
    server = ModelServer(max_batch=s.microbatch_max, max_wait_ms=s.microbatch_wait_ms,
                         threads=s.infer_threads, call_timeout_s=s.model_timeout_s,
                         metrics=metrics)
    watcher = BundleWatcher(s.bundle_dir, server, providers=s.ort_providers,
                            threads=s.ort_threads, metrics=metrics, index=s.index)
    feed = BundleFeed(s, watcher, metrics)
    sa = StreamApp(settings=s, app=app, clicks=clicks, clicks_dlq=clicks_dlq,
                   train_batches=train_batches, items=items, items_dlq=items_dlq,
                   examples=app.channel(), user_state=user_state,
                   trending=trending, metrics=metrics, server=server, watcher=watcher,
                   feed=feed, flags=FlagFeed(s, metrics),
                   read_pacer=ReadPacer(s.read_rate_under_backlog))
    from stream_app import agents, views  # registering needs the app; keeps imports acyclic

    agents.register(sa)
    views.register(sa)
    return sa
