"""Prometheus metrics of the trainer, declared in one place with an injected registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["EXPORT_OUTCOMES", "TrainerMetrics"]

# What became of an export (label of advrec_trainer_exports_total).
# pinned: an operator's pin holds the fleet on one version, so nothing is exported
EXPORT_OUTCOMES = ("published", "rejected_quality", "rejected_parity", "failed", "pinned")
CATALOGUE_OUTCOMES = ("encoded", "unchanged", "deleted", "rejected")

# A training step on 2 cores takes ~50-500 ms; an export 0.2-2 s; checkpoints similar.
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# P(fake): the detector flags at 0.999 by default, so the top buckets are fine-grained
SCORE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1.0)


@dataclass(frozen=True)
class TrainerMetrics:
    """Every metric the trainer exports (prefix ``advrec_trainer_``)."""

    registry: CollectorRegistry
    batches: Counter
    examples: Counter
    loss: Gauge
    d_accuracy: Gauge
    g_reward: Gauge
    prequential: Gauge
    replay_fill: Gauge
    vocab_size: Gauge
    items_expired: Counter
    exports: Counter
    export_seconds: Histogram
    step_seconds: Histogram
    checkpoint_seconds: Histogram
    consumed_offset: Gauge
    resumed_offset: Gauge
    model_info: Info
    active: Gauge
    takeovers: Counter
    checkpoint_publish_seconds: Histogram
    checkpoint_bytes: Gauge
    bundle_bytes: Gauge
    bundle_bytes_published: Counter
    pinned: Gauge
    train_fraction: Gauge
    backlog: Gauge
    lag: Gauge
    shed_examples: Counter
    skipped_batches: Counter
    flagged_users: Gauge
    filtered_examples: Counter
    held_examples: Gauge
    suspect_users: Gauge
    detector_rounds: Gauge
    detector_threshold: Gauge
    detector_scores: Histogram
    catalogue_items: Counter
    content_items: Gauge
    content_cold_rows: Gauge
    encode_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None,
               prefix: str = "advrec_trainer") -> TrainerMetrics:
        """Declare the metrics on ``registry`` (a fresh one if None: one per test)."""
        r = CollectorRegistry(auto_describe=True) if registry is None else registry
        p = prefix
        m = cls(
            registry=r,
            batches=Counter(f"{p}_batches", "Mini-batches trained on", registry=r),
            examples=Counter(f"{p}_examples", "Examples trained on", registry=r),
            loss=Gauge(f"{p}_loss", "Latest loss, by kind (ml, g, d, pg, apr)", ["kind"],
                       registry=r),
            d_accuracy=Gauge(f"{p}_d_accuracy",
                             "Discriminator accuracy on real vs generated items, by side",
                             ["side"], registry=r),
            g_reward=Gauge(f"{p}_g_reward", "Mean reward D gives to G's samples", registry=r),
            prequential=Gauge(f"{p}_prequential",
                              "Test-then-train quality of the last batch, by metric and "
                              "variant (A: a re-click is a miss; B: it may hit)",
                              ["metric", "variant"], registry=r),
            replay_fill=Gauge(f"{p}_replay_fill_ratio", "Replay buffer fill (0..1)",
                              registry=r),
            vocab_size=Gauge(f"{p}_vocab_size", "Items the model knows", registry=r),
            items_expired=Counter(f"{p}_items_expired", "Items that left a bounded "
                                  "vocabulary (no click for ADVREC_TRAINER_ITEM_TTL_S)",
                                  registry=r),
            exports=Counter(f"{p}_exports", "Bundles exported, by outcome "
                            "(published, rejected_quality, rejected_parity, failed)",
                            ["outcome"], registry=r),
            export_seconds=Histogram(f"{p}_export_seconds", "Time to export and publish",
                                     buckets=_STEP_BUCKETS, registry=r),
            step_seconds=Histogram(f"{p}_step_seconds", "Time to evaluate and train a batch",
                                   buckets=_STEP_BUCKETS, registry=r),
            checkpoint_seconds=Histogram(f"{p}_checkpoint_seconds", "Time to checkpoint",
                                         buckets=_STEP_BUCKETS, registry=r),
            consumed_offset=Gauge(f"{p}_consumed_offset",
                                  "Offset of the next train-batches message to train on",
                                  registry=r),
            resumed_offset=Gauge(f"{p}_resumed_offset",
                                 "Offset training resumed at after the last start (-1: none)",
                                 registry=r),
            model_info=Info(f"{p}_model", "Last published bundle", registry=r),
            active=Gauge(f"{p}_active", "1 while this trainer owns train-batches", registry=r),
            takeovers=Counter(f"{p}_takeovers", "Times this trainer became active and resumed "
                              "from a checkpoint another trainer published", registry=r),
            checkpoint_publish_seconds=Histogram(
                f"{p}_checkpoint_publish_seconds", "Time to write a checkpoint to its topic",
                buckets=_STEP_BUCKETS, registry=r),
            checkpoint_bytes=Gauge(f"{p}_checkpoint_bytes",
                                   "Bytes of the last checkpoint published", registry=r),
            bundle_bytes=Gauge(f"{p}_bundle_bytes", "Bytes of the last bundle published "
                               "(chunks, manifest, pointer)", registry=r),
            bundle_bytes_published=Counter(f"{p}_bundle_bytes_published", "Bytes written "
                                           "to the bundle topic, by kind (full, delta)",
                                           ["kind"], registry=r),
            pinned=Gauge(f"{p}_pinned", "1 while a pin on the bundle topic stops publishing",
                         registry=r),
            train_fraction=Gauge(f"{p}_train_fraction", "Share of the last batch trained on "
                                 "(below 1 while shedding load)", registry=r),
            backlog=Gauge(f"{p}_backlog_batches",
                          "Batches waiting on train-batches behind the one being trained",
                          registry=r),
            lag=Gauge(f"{p}_lag_seconds", "Age of the batch being trained on (now minus "
                      "when the worker wrote it)", registry=r),
            shed_examples=Counter(f"{p}_shed_examples", "Examples not trained on directly "
                                  "while shedding load (they still enter the replay buffer)",
                                  registry=r),
            skipped_batches=Counter(f"{p}_skipped_batches", "Batches jumped over to reach the "
                                    "newest while far behind", registry=r),
            flagged_users=Gauge(f"{p}_flagged_users", "Users the fake-user detector has "
                                "flagged (their examples are not trained on)", registry=r),
            filtered_examples=Counter(f"{p}_filtered_examples", "Examples not trained on "
                                      "because their user is flagged", registry=r),
            held_examples=Gauge(f"{p}_held_examples", "Examples waiting: new users' until the "
                                "user can be scored, suspects' until a flag is confirmed or "
                                "cleared", registry=r),
            suspect_users=Gauge(f"{p}_suspect_users", "Users scored above the threshold whose "
                                "flag waits for the next detector round to confirm it",
                                registry=r),
            detector_rounds=Gauge(f"{p}_detector_rounds", "Training rounds of the fake-user "
                                  "detector (its version)", registry=r),
            detector_threshold=Gauge(f"{p}_detector_threshold", "P(fake) at and above which "
                                     "the detector flags a user", registry=r),
            detector_scores=Histogram(f"{p}_detector_score", "P(fake) of each user scored "
                                      "(as their clicks arrive and after each round)",
                                      buckets=SCORE_BUCKETS, registry=r),
            catalogue_items=Counter(f"{p}_catalogue_items", "Catalogue records read from the "
                                    "items topic, by outcome (encoded, unchanged: the same "
                                    "text as before, deleted, rejected: broke the contract)",
                                    ["outcome"], registry=r),
            content_items=Gauge(f"{p}_content_items", "Items with a content vector (text "
                                "embedding) in the model", registry=r),
            content_cold_rows=Gauge(f"{p}_content_cold_rows", "Items ranked from their "
                                    "content alone (in the catalogue, no click yet)",
                                    registry=r),
            encode_seconds=Histogram(f"{p}_encode_seconds", "Time to encode one chunk of "
                                     "catalogue texts", registry=r),
        )
        # Outcomes start at 0: increase() misses a series whose first sample is 1.
        for outcome in EXPORT_OUTCOMES:
            m.exports.labels(outcome=outcome)
        for outcome in CATALOGUE_OUTCOMES:
            m.catalogue_items.labels(outcome=outcome)
        for kind in ("full", "delta"):
            m.bundle_bytes_published.labels(kind=kind)
        return m
