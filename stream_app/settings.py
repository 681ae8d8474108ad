"""Settings of the stream app: one frozen dataclass filled once from ``ADVREC_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from advrec.config import ConfigError, bootstrap_servers, from_env
from advrec.exclusion import ExclusionRule
from stream_app.retrieval import IndexConfig

__all__ = ["ENV_PREFIX", "Settings", "load_settings"]

ENV_PREFIX = "ADVREC_"


@dataclass(frozen=True)
class Settings:
    """Everything the stream worker can be told; env name = ADVREC_ + field name in capitals."""

    broker: str = "kafka://127.0.0.1:9092"
    app_id: str = "advrec"
    data_dir: str = "var/stream"  # Faust RocksDB tables live here, one folder per worker port
    bundle_dir: str = "var/bundles"  # this worker's cache of bundles rebuilt from the topic
    partitions: int = 4  # of `clicks`; tables and changelogs get the same count
    replication: int = 1
    session_timeout_s: float = 10.0  # a dead worker's partitions move after this (Faust: 60)
    topic_clicks: str = "clicks"
    topic_dlq: str = "clicks-dlq"
    topic_train: str = "train-batches"
    topic_bundles: str = "model-bundles"  # bundles, the pointer and pins (advrec.channel)
    topic_flags: str = "user-flags"  # flagged and re-admitted users (advrec.flags)
    topic_items: str = "items"  # the catalogue (advrec.catalogue), validated by the worker
    topic_items_dlq: str = "items-dlq"  # catalogue records that break the contract
    bundles_keep: int = 5  # versions kept in the cache for rollback (plus live and pinned)
    bundle_max_mb: int = 1024  # a bigger version on the topic is refused (disk bound)
    rocksdb_write_buffer_mb: int = 2  # per table store (table x partition), two of them
    rocksdb_memory_mb: int = 16  # all RocksDB memory of the worker: one cache for every store
    trim_interval_s: float = 10.0  # return memory freed by native code to the OS this often
    history_len: int = 50  # last L items kept per user (bounds state size per user)
    # which past items leave the served list: seen | none | event types (purchase,cart);
    # advrec/exclusion.py. The trainer reads the same variable and trains for it.
    exclude: str = "seen"
    # identities of the most recent events kept per user, for producer retries that arrive
    # with a new offset (Kafka's own redelivery is told by offset: stream_app/state.py)
    dedup_window: int = 32
    ingest_batch: int = 1000  # events taken from the stream at once; table writes coalesce
    ingest_wait_s: float = 0.2  # max wait to fill an ingest batch
    # write-behind state (stream_app/writebehind.py): users' states stay decoded in memory and
    # go to the table once per flush interval (or after this many events), before the events
    # that changed them are acked; off: every batch writes its users through (the old path)
    state_write_behind: bool = True
    state_flush_s: float = 2.0
    state_flush_events: int = 20_000
    state_cache_mb: int = 64  # decoded states kept in memory (least recently used out)
    trending_bucket_s: int = 600  # trending window = trending_buckets x bucket, in event time
    trending_buckets: int = 6
    trending_top: int = 200  # items kept per bucket and partition (= the most k a request asks)
    train_batch_size: int = 256  # examples per message on `train-batches`
    # history items each training example carries: the trainer reads its last
    # ADVREC_TRAINER_MAX_LEN (20) of them, so more only costs encoding (17 % of the loop
    # with 50, py-spy) and bytes on `train-batches`; keep it >= the trainer's max_len
    train_history_len: int = 20
    train_batch_s: float = 2.0  # ...or whatever is collected after this long
    web_bind: str = "127.0.0.1"  # 0.0.0.0 in containers
    web_port: int = 6066
    web_host: str = "127.0.0.1"  # advertised to other workers for routed table lookups
    ort_providers: str = "auto"  # auto | cpu | cuda,cpu
    ort_threads: int = 0  # 0: the container's CPU limit less one core (serving.intra_op_threads)
    # model calls in flight at once, off the event loop; one call already runs on ort_threads
    # cores, and each slot's batches are a share of the requests in the server, so more
    # slots make smaller batches. 2 cores, c=32, ratio to the no-op: 0.53-0.54 with one,
    # 0.41-0.43 with two (mean batch 12.4 vs 6.4)
    infer_threads: int = 1
    # two-stage ranking (stream_app/retrieval.py): catalogues of this many items or more,
    # when the bundle carries the parts, are ranked by a nearest-neighbour index's candidates
    # and the exact score of those alone; smaller ones score every item (0: always two-stage)
    two_stage_items: int = 200_000
    # rows the index returns per request (at least k + the excluded ones); its search breadth
    # is what a request costs: at 1M items, 100 found 0.987 of the top 10 in 4.7 ms per 32
    # users, 300 0.990 in 16 ms (bench/results/ann-sweep.json)
    two_stage_candidates: int = 100
    ann_m: int = 16  # HNSW edges per item: memory and recall
    ann_ef_construction: int = 80  # HNSW build breadth: build time vs recall
    ann_ef_search: int = 100  # HNSW search breadth (at least the candidates)
    # a new bundle refreshes the live index (its graph, the new vectors) until the graph is
    # this old or has grown by this share since its last full build (stream_app/retrieval.py)
    ann_rebuild_after_s: float = 900.0
    ann_rebuild_growth: float = 0.1
    # keep the graph each refresh copied, to refresh it in place at the next load: one more
    # graph in memory (~400 MiB at 1M items), no copy of it per swap (stream_app/retrieval.py)
    ann_spare_graph: bool = True
    microbatch_max: int = 32  # requests merged into one model call
    microbatch_wait_ms: float = 2.0
    # a request whose model call has not answered by then gets a 503 (counted in
    # advrec_model_timeouts_total) instead of waiting for ever on a hung or dead call
    model_timeout_s: float = 2.0
    watch_interval_s: float = 1.0  # how often the live model's age gauge is refreshed
    ready_without_model: bool = False  # declare fallback mode: ready while no bundle exists
    # score each user whose events a batch applied with the live bundle's fake-user detector
    # (when the bundle has one) and keep P(fake) in the user's state (GET /users/{user},
    # advrec_user_suspicion); the trainer's flags decide what is not trained on
    detector_scoring: bool = True
    admin_token: str = ""  # bearer token for /admin/*; empty disables admin endpoints
    max_k: int = 200
    backlog_messages: int = 5000  # ingest this far behind the log end counts as a backlog
    read_rate_under_backlog: float = 300.0  # state/recommendation reads per s while behind
    log_level: str = "info"

    def __post_init__(self) -> None:
        checks = {
            "partitions": self.partitions >= 1,
            "rocksdb_write_buffer_mb": self.rocksdb_write_buffer_mb >= 1,
            "rocksdb_memory_mb": self.rocksdb_memory_mb >= 2,
            "trim_interval_s": self.trim_interval_s > 0,
            "history_len": 1 <= self.history_len <= 1000,
            "dedup_window": self.dedup_window >= 1,
            "ingest_batch": self.ingest_batch >= 1,
            "state_flush_s": self.state_flush_s > 0,
            "state_flush_events": self.state_flush_events >= 1,
            "state_cache_mb": self.state_cache_mb >= 1,
            "train_batch_size": self.train_batch_size >= 1,
            "train_history_len": 1 <= self.train_history_len <= self.history_len,
            "microbatch_max": self.microbatch_max >= 1,
            "two_stage_items": self.two_stage_items >= 0,
            "two_stage_candidates": 1 <= self.two_stage_candidates <= 10_000,
            "ann_m": 2 <= self.ann_m <= 256,
            "ann_ef_construction": self.ann_ef_construction >= 1,
            "ann_ef_search": self.ann_ef_search >= 1,
            "ann_rebuild_after_s": self.ann_rebuild_after_s >= 0,
            "ann_rebuild_growth": self.ann_rebuild_growth >= 0,
            "model_timeout_s": self.model_timeout_s > 0,
            "max_k": 1 <= self.max_k <= 1000,
            "bundles_keep": self.bundles_keep >= 1,
            "bundle_max_mb": self.bundle_max_mb >= 1,
            "web_port": 0 < self.web_port < 65536,
            "ort_providers": self.ort_providers in ("auto", "cpu", "cuda", "cuda,cpu"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"setting {ENV_PREFIX}{name.upper()}={getattr(self, name)!r} is out of range")
        try:
            ExclusionRule.parse(self.exclude)
        except ValueError as exc:
            raise ConfigError(f"setting {ENV_PREFIX}EXCLUDE: {exc}") from None
        if not self.broker.startswith(("kafka://", "aiokafka://")):
            raise ConfigError(f"setting {ENV_PREFIX}BROKER={self.broker!r} must be kafka://host:port")

    @property
    def exclusion(self) -> ExclusionRule:
        return ExclusionRule.parse(self.exclude)

    @property
    def index(self) -> IndexConfig:
        """When and how the worker ranks in two stages (stream_app/retrieval.py)."""
        return IndexConfig(min_items=self.two_stage_items, candidates=self.two_stage_candidates,
                           m=self.ann_m,
                           ef_construction=self.ann_ef_construction,
                           ef_search=self.ann_ef_search,
                           rebuild_after_s=self.ann_rebuild_after_s,
                           rebuild_growth=self.ann_rebuild_growth,
                           spare=self.ann_spare_graph)

    @property
    def worker_dir(self) -> Path:
        """Return this worker's own table directory (two workers on one host must not share)."""
        return Path(self.data_dir) / f"worker-{self.web_port}"

    @property
    def bootstrap(self) -> str:
        """Return the broker list as host:port pairs for plain aiokafka clients."""
        return bootstrap_servers(self.broker)


def load_settings(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Return settings from the environment, with flag overrides (None = not given)."""
    return from_env(Settings, ENV_PREFIX, environ, **overrides)
