"""Prometheus metrics of the stream app, declared in one place with an injected registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from advrec.bundle import REJECT_REASONS
from advrec.catalogue import ITEM_REASONS
from advrec.channel import REJECT_REASONS as CHANNEL_REJECT_REASONS
from advrec.contract import REASONS

__all__ = ["CATALOGUE_OUTCOMES", "FALLBACK_CAUSES", "StreamMetrics"]

# Why a recommendation came from the trending list (label of advrec_fallback_answers_total).
FALLBACK_CAUSES = ("no_model", "no_history", "no_known_items", "model_error")
# What became of a record of the catalogue topic (label of advrec_catalogue_items_total):
# valid, dead-lettered, or a tombstone that deletes its item.
CATALOGUE_OUTCOMES = ("ok", "dead_letter", "deleted")

# Ingest batches take 1-100 ms on 2 cores; a stuck batch shows up in the 1-10 s buckets.
_PROCESS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
# A batch-1 model call is ~0.3 ms and a routed request a few ms; SLO thinking starts at 50 ms.
_REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# P(fake): most real users sit near 0; flags start at the trainer's threshold (0.999 default)
_SUSPICION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0)


@dataclass(frozen=True)
class StreamMetrics:
    """Every metric the stream worker exports (prefix ``advrec_``)."""

    registry: CollectorRegistry
    events_consumed: Counter
    events_invalid: Counter
    events_duplicate: Counter
    dlq_writes: Counter
    processing_seconds: Histogram
    table_keys: Gauge
    rocksdb_memory: Gauge
    consumer_lag: Gauge
    examples_emitted: Counter
    train_batches_sent: Counter
    request_seconds: Histogram
    fallback_answers: Counter
    model_info: Info
    model_version_timestamp: Gauge
    model_load_seconds: Histogram
    index_build_seconds: Histogram
    index_rebuild_seconds: Histogram
    model_age_seconds: Gauge
    model_swaps: Counter
    bundles_rejected: Counter
    microbatch_size: Histogram
    model_timeouts: Counter
    provider_info: Info
    model_ready: Gauge
    model_pinned: Gauge
    state_flushed_users: Counter
    state_written_bytes: Counter
    state_flush_seconds: Histogram
    state_cached_users: Gauge
    state_cache_bytes: Gauge
    pin_info: Info
    bundle_chunks_rejected: Counter
    bundles_assembled: Counter
    bundle_deltas: Counter
    bundle_feed_records: Counter
    bundle_feed_bytes: Counter
    bundle_feed_cpu: Counter
    flagged_users: Gauge
    user_suspicion: Histogram
    suspicion_seconds: Histogram
    catalogue_items: Counter
    catalogue_items_invalid: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None,
               prefix: str = "advrec") -> StreamMetrics:
        """Declare the metrics on ``registry`` (a fresh one if None: one per test)."""
        r = CollectorRegistry(auto_describe=True) if registry is None else registry
        p = prefix
        m = cls(
            registry=r,
            events_consumed=Counter(f"{p}_events_consumed", "Click messages read from Kafka",
                                    registry=r),
            events_invalid=Counter(f"{p}_events_invalid", "Messages rejected, by reason",
                                   ["reason"], registry=r),
            events_duplicate=Counter(f"{p}_events_duplicate",
                                     "Redelivered events recognised and not applied again",
                                     registry=r),
            dlq_writes=Counter(f"{p}_dlq_writes", "Messages written to the dead-letter topic",
                               registry=r),
            processing_seconds=Histogram(f"{p}_ingest_batch_seconds",
                                         "Time to validate and apply one ingest batch",
                                         buckets=_PROCESS_BUCKETS, registry=r),
            table_keys=Gauge(f"{p}_table_keys", "Keys held locally, by table (counted once "
                             "per assigned partition, then on insert)", ["table"], registry=r),
            rocksdb_memory=Gauge(f"{p}_rocksdb_memory_bytes",
                                 "RocksDB memory of the worker's stores, by kind: cache (the "
                                 "one shared block cache, memtables charged to it included), "
                                 "memtables, table_readers", ["kind"], registry=r),
            consumer_lag=Gauge(f"{p}_consumer_lag_messages",
                               "Messages behind the log end, by topic partition",
                               ["topic", "partition"], registry=r),
            examples_emitted=Counter(f"{p}_train_examples", "Training examples emitted",
                                     registry=r),
            train_batches_sent=Counter(f"{p}_train_batches_sent",
                                       "Mini-batches published to train-batches", registry=r),
            request_seconds=Histogram(f"{p}_http_request_seconds", "HTTP request latency",
                                      ["endpoint", "status_class"], buckets=_REQUEST_BUCKETS,
                                      registry=r),
            fallback_answers=Counter(f"{p}_fallback_answers",
                                     "Recommendations answered by the trending fallback",
                                     ["cause"], registry=r),
            model_info=Info(f"{p}_model", "The bundle being served", registry=r),
            model_version_timestamp=Gauge(f"{p}_model_created_timestamp_seconds",
                                          "Creation time of the live bundle", registry=r),
            model_load_seconds=Histogram(f"{p}_model_load_seconds",
                                         "Time to verify, load and warm a bundle",
                                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
                                         registry=r),
            # HNSW over 1M items x 64 took 60-80 s on one core (bench/ann.py); 10k, ~0.3 s
            index_build_seconds=Histogram(f"{p}_index_build_seconds",
                                          "Time to build a bundle's nearest-neighbour index "
                                          "(two-stage ranking), part of the load time",
                                          buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120,
                                                   300), registry=r),
            index_rebuild_seconds=Histogram(f"{p}_index_rebuild_seconds",
                                            "Time of a fresh nearest-neighbour graph built in "
                                            "the background, off every load; observed when a "
                                            "load takes it over",
                                            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200),
                                            registry=r),
            model_age_seconds=Gauge(f"{p}_model_age_seconds",
                                    "Now minus the last event time the live model trained on",
                                    registry=r),
            model_swaps=Counter(f"{p}_model_swaps", "Bundles swapped in (incl. rollbacks)",
                                registry=r),
            bundles_rejected=Counter(f"{p}_bundles_rejected", "Bundles refused, by reason",
                                     ["reason"], registry=r),
            microbatch_size=Histogram(f"{p}_microbatch_size", "Requests per model call",
                                      buckets=_BATCH_BUCKETS, registry=r),
            model_timeouts=Counter(f"{p}_model_timeouts", "Requests answered 503 because "
                                   "their model call did not answer within "
                                   "ADVREC_MODEL_TIMEOUT_S", registry=r),
            provider_info=Info(f"{p}_onnxruntime", "onnxruntime providers in use", registry=r),
            model_ready=Gauge(f"{p}_model_ready", "1 while a warmed model is serving",
                              registry=r),
            state_flushed_users=Counter(f"{p}_state_flushed_users", "User states written to "
                                        "the user_state table (one changelog record each)",
                                        registry=r),
            state_written_bytes=Counter(f"{p}_state_written_bytes", "Bytes (keys and values) "
                                        "written to the state tables, hence to their "
                                        "changelogs", registry=r),
            state_flush_seconds=Histogram(f"{p}_state_flush_seconds", "Time to write the dirty "
                                          "states and ack the events behind them",
                                          buckets=_PROCESS_BUCKETS, registry=r),
            state_cached_users=Gauge(f"{p}_state_cached_users",
                                     "User states held decoded in memory", registry=r),
            state_cache_bytes=Gauge(f"{p}_state_cache_bytes", "Estimated memory of the "
                                    "decoded states (bounded by ADVREC_STATE_CACHE_MB)",
                                    registry=r),
            model_pinned=Gauge(f"{p}_model_pinned", "1 while a pin on the bundle topic holds "
                               "the fleet on one version", registry=r),
            pin_info=Info(f"{p}_model_pin", "The pinned version and who pinned it (empty: "
                          "no pin)", registry=r),
            bundle_chunks_rejected=Counter(f"{p}_bundle_chunks_rejected",
                                           "Records of the bundle topic refused, by reason",
                                           ["reason"], registry=r),
            bundles_assembled=Counter(f"{p}_bundles_assembled", "Versions rebuilt from the "
                                      "bundle topic into the local cache", registry=r),
            bundle_deltas=Counter(f"{p}_bundle_deltas", "Versions that came as a delta and "
                                  "were rebuilt whole from their base in the cache",
                                  registry=r),
            bundle_feed_records=Counter(f"{p}_bundle_feed_records",
                                        "Records read from the bundle topic", registry=r),
            bundle_feed_bytes=Counter(f"{p}_bundle_feed_bytes",
                                      "Bytes (keys and values) read from the bundle topic",
                                      registry=r),
            bundle_feed_cpu=Counter(f"{p}_bundle_feed_cpu_seconds",
                                    "CPU time of the bundle feed's thread", registry=r),
            flagged_users=Gauge(f"{p}_flagged_users", "Users flagged as fake on the flags "
                                "topic now (the trainer does not train on them)", registry=r),
            user_suspicion=Histogram(f"{p}_user_suspicion", "P(fake) of each user scored at "
                                     "ingest by the live bundle's detector",
                                     buckets=_SUSPICION_BUCKETS, registry=r),
            suspicion_seconds=Histogram(f"{p}_suspicion_seconds", "Time to score one ingest "
                                        "batch's users with the detector",
                                        buckets=_PROCESS_BUCKETS, registry=r),
            catalogue_items=Counter(f"{p}_catalogue_items", "Records read from the catalogue "
                                    "topic, by outcome", ["outcome"], registry=r),
            catalogue_items_invalid=Counter(f"{p}_catalogue_items_invalid",
                                            "Catalogue records rejected, by reason",
                                            ["reason"], registry=r),
        )
        # Known label values start at 0: increase() misses a series whose first sample is 1.
        for reason in REASONS:
            m.events_invalid.labels(reason=reason)
        for reason in dict.fromkeys(REJECT_REASONS + CHANNEL_REJECT_REASONS):
            m.bundles_rejected.labels(reason=reason)
        for reason in CHANNEL_REJECT_REASONS:
            m.bundle_chunks_rejected.labels(reason=reason)
        for cause in FALLBACK_CAUSES:
            m.fallback_answers.labels(cause=cause)
        for outcome in CATALOGUE_OUTCOMES:
            m.catalogue_items.labels(outcome=outcome)
        for reason in ITEM_REASONS:
            m.catalogue_items_invalid.labels(reason=reason)
        return m
