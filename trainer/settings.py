"""Settings of the sidecar trainer: one frozen dataclass filled once from ``ADVREC_*``."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from advrec.config import ConfigError, bootstrap_servers, from_env
from advrec.exclusion import ExclusionRule
from trainer.detector import DetectorConfig
from trainer.prior import PriorConfig

__all__ = ["ENV_PREFIX", "TrainerSettings", "load_trainer_settings"]

ENV_PREFIX = "ADVREC_"


@dataclass(frozen=True)
class TrainerSettings:
    """What the trainer process can be told; env name = ADVREC_ + field name in capitals."""

    broker: str = "kafka://127.0.0.1:9092"
    topic_train: str = "train-batches"
    topic_bundles: str = "model-bundles"  # where bundles go, for every worker (advrec.channel)
    topic_checkpoints: str = "trainer-checkpoints"  # where a standby finds the active's state
    topic_flags: str = "user-flags"  # users the detector flagged, and re-admissions (advrec.flags)
    topic_items: str = "items"  # the item catalogue (advrec.catalogue), compacted by item id
    trainer_group: str = "advrec-trainer"  # one active trainer: owner of the one partition
    trainer_id: str = ""  # names this trainer on the topics; empty: host name and process id
    # a dead active trainer's partition moves to a standby after this long
    trainer_session_timeout_s: float = 30.0
    bundle_dir: str = "var/bundles"  # this trainer's own copy of what it publishes
    checkpoint_dir: str = "var/checkpoints"  # this trainer's cache of checkpoints
    trainer_metrics_bind: str = "127.0.0.1"  # 0.0.0.0 in containers
    trainer_metrics_port: int = 9108
    trainer_mode: str = "apr"  # none | irgan | apr | irgan+apr; best measured: docs/results.md
    # the model and optimisation defaults below equal TrainConfig / ModelConfig's (a unit test
    # checks), which `advrec evaluate` measured: docs/results.md
    trainer_lr: float = 3e-3
    trainer_steps_per_batch: int = 4  # G updates per arriving batch (training cost scales)
    trainer_seed: int = 0
    # torch threads: 1 when sharing 2 cores with the stream app (2 threads on a busy 2-core
    # machine fell from ~1.2k to ~0.2k examples/s); 0 leaves torch's default
    trainer_threads: int = 1
    trainer_max_len: int = 20  # history length the model reads (the stream may keep more)
    trainer_dim: int = 64
    trainer_layers: int = 2
    trainer_dropout: float = 0.1
    trainer_replay_size: int = 20_000
    trainer_replay_ratio: float = 1.0
    # reservoir: uniform over the whole past; fifo: the most recent examples, which on a
    # stream whose tastes drift for years (ml-latest-small) gave +6 % HR@10 (docs/results.md)
    trainer_replay_policy: str = "reservoir"
    # history items (but the target) leave the training softmax: on for streams without
    # re-clicks (ml-latest-small), off for session streams with many (yoochoose), where it
    # cost 2 % HR@10 (docs/results.md)
    trainer_mask_history: bool = True
    # the training loss (trainer/adversarial.py): auto trains with the full softmax up to
    # trainer_sampled_above items and with the sampled softmax (popularity negatives, log Q
    # correction, only the touched rows stepped) above: the full one is a [B, V] logit
    # matrix and a step of every row, which at 1M items is ~1 GB and most of a step's time
    trainer_loss: str = "auto"
    trainer_sampled_above: int = 100_000
    trainer_negatives: int = 1024  # negatives a sampled batch shares (trainer/adversarial.py)
    # which past items the served list leaves out (the worker's ADVREC_EXCLUDE: seen | none |
    # event types, advrec/exclusion.py): the generator is trained for it (the history mask
    # holds only under "seen") and the quality gate ranks as the list does (variant A under
    # "seen", B otherwise)
    exclude: str = "seen"
    # the hybrid: G's logits + weight * log(1 + item co-occurrence prior), exported in the
    # bundle's ONNX graph (trainer/prior.py); 0 serves G alone. Chosen on the validation
    # prefix of both shared streams (docs/results.md)
    trainer_prior_weight: float = PriorConfig.weight
    trainer_prior_top_k: int = PriorConfig.top_k  # links per item the bundle carries
    # the fake-user detector and training filter (trainer/detector.py): flagged users'
    # examples are not trained on; the detector travels in the bundle as detector.onnx.
    # Off by default: on a clean stream it costs up to 0.4 % of HR@10 and 1.13x the training
    # time (docs/results.md, "Poisoning"); on where fake accounts are a risk
    trainer_detector: bool = False
    trainer_detector_threshold: float = DetectorConfig.threshold  # flag at P(fake) >= this
    trainer_detector_min_clicks: int = DetectorConfig.min_clicks  # users scored from here on
    # flag only when this many detector rounds in a row score the user above the threshold
    trainer_detector_confirm_rounds: int = DetectorConfig.confirm_rounds
    # catalogue content (trainer/content.py): every item on the items topic gets a text
    # embedding and a row at once, so the next bundle ranks it before its first click
    trainer_content: bool = True
    # 0: a new item's row is its mapped content until its first click, then it learns; k > 0:
    # rows of items with n clicks are pulled k / (n + k) back to the content after each batch
    trainer_content_blend: float = 0.0
    trainer_content_chunk: int = 256  # catalogue texts encoded between two training steps
    # a bounded vocabulary: an item with no click and no catalogue refresh for this many
    # seconds of event time leaves the model and the next bundle, and a new item reuses its
    # row (trainer/learner.py ``expire``); 0 keeps every item ever seen. The deployment's
    # value holds over a checkpoint's
    trainer_item_ttl_s: float = 0.0
    # publish a bundle at most this often... (3 s: at 1M items 9.35 and 9.51 s freshness
    # against 10.22-10.45 at 4 s, 17.9-18.0 MB/min on the bundle topic against 16.5; at
    # 10k items 8.07 s against 9.04, 16.8 MB/min against 12.6; bench/freshness.py)
    export_every_s: float = 3.0
    export_every_batches: int = 50  # ...or after this many batches, whichever first
    quality_delta: float = 0.02  # reject if window HR@10 < live's HR@10 - delta (absolute)
    quality_min_examples: int = 200  # smaller windows are too noisy to block a publish
    bundles_keep: int = 5  # versions kept on the bundle topic (and on disk) for rollback
    # bundles of this many items or more carry the two-stage parts (user encoder, item table,
    # rescorer: trainer/twostage.py) that a worker ranks a large catalogue with; half the
    # worker's ADVREC_TWO_STAGE_ITEMS default (trainer/export.py TWO_STAGE_FROM_ITEMS)
    trainer_two_stage_items: int = 100_000
    # bundles of this many items or more carry the two-stage parts only, no exact graph
    # (trainer/export.py EXACT_BELOW_ITEMS): workers rank them in two stages whatever their
    # switch says, and a full bundle at 1M items is 768 MB lighter
    trainer_exact_below_items: int = 400_000
    # between full bundles, a two-stage bundle goes out as a delta (advrec/bundle.py): the
    # item rows and vocabulary rows changed since the last full one. A full one every
    # bundle_full_every_s (0: never a delta), or when a delta would change more than
    # bundle_delta_max_share of the rows. 15 minutes: at 1M items a full bundle is ~90 MB,
    # and one every 10 minutes put the bundle topic at 20.4 MB/min (bench/freshness.py)
    bundle_full_every_s: float = 900.0
    bundle_delta_max_share: float = 0.25
    bundle_chunk_kb: int = 512  # chunk size on the topics (Kafka's default limit is 1 MiB)
    # a checkpoint (model, optimizers, replay: ~30 MB at 10k items) goes to the checkpoint
    # topic after this many batches, but not more often than every min interval; offsets are
    # committed right after. A standby that takes over redoes the batches since the last one.
    checkpoint_every_batches: int = 20
    checkpoint_min_interval_s: float = 30.0
    # ...and no more often than keeps checkpointing (save and publish, as the last one took)
    # within this share of the trainer's time: at 1M items a checkpoint is ~0.9 GB and ~25 s
    checkpoint_max_share: float = 0.1
    # load shedding (trainer/shedding.py): keep the batches trained on younger than this
    # by training on a sample of each batch, down to a minimum share; beyond shed_skip_lag_s
    # jump to the newest batches (0: never); score at least shed_eval_min examples of a
    # shed batch for the prequential metrics
    shed_target_lag_s: float = 3.0  # a batch the trainer keeps up with waits ~1 s
    shed_min_fraction: float = 0.05
    shed_skip_lag_s: float = 300.0
    shed_eval_min: int = 64
    # the test-then-train scoring ranks every example against the whole catalogue, twice
    # (the candidate and the live model): at most this many scores per batch and model, so
    # a batch scores at most eval_max_scores / (V+1) examples (a random sample; 20 at 1M
    # items, every example of a batch below ~50k): the quality gate and the prequential
    # gauges then rest on the sample
    eval_max_scores: int = 20_000_000
    log_every_s: float = 5.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        from trainer.adversarial import MODES

        if self.trainer_mode not in MODES:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_MODE={self.trainer_mode!r} is not "
                              f"one of {sorted(MODES)}")
        for name in ("export_every_batches", "checkpoint_every_batches", "bundles_keep",
                     "trainer_max_len", "trainer_dim", "trainer_layers",
                     "trainer_steps_per_batch", "bundle_chunk_kb", "shed_eval_min",
                     "eval_max_scores",
                     "trainer_two_stage_items", "trainer_exact_below_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting {ENV_PREFIX}{name.upper()}={getattr(self, name)!r}"
                                  " must be >= 1")
        from trainer.adversarial import LOSSES

        if self.trainer_loss not in LOSSES or self.trainer_negatives < 1:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_LOSS={self.trainer_loss!r} must be "
                              f"one of {list(LOSSES)} and {ENV_PREFIX}TRAINER_NEGATIVES >= 1")
        if self.trainer_sampled_above < 0:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_SAMPLED_ABOVE must be >= 0")
        try:
            ExclusionRule.parse(self.exclude)
        except ValueError as exc:
            raise ConfigError(f"setting {ENV_PREFIX}EXCLUDE: {exc}") from None
        if not 0.0 < self.trainer_detector_threshold < 1.0 or self.trainer_detector_min_clicks < 2:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_DETECTOR_THRESHOLD must be in (0, 1) "
                              f"and {ENV_PREFIX}TRAINER_DETECTOR_MIN_CLICKS >= 2")
        if self.trainer_detector_confirm_rounds < 1:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_DETECTOR_CONFIRM_ROUNDS must be >= 1")
        if self.trainer_item_ttl_s < 0:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_ITEM_TTL_S must be >= 0 (0: never)")
        if self.trainer_content_blend < 0 or self.trainer_content_chunk < 1:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_CONTENT_BLEND must be >= 0 and "
                              f"{ENV_PREFIX}TRAINER_CONTENT_CHUNK >= 1")
        if self.trainer_prior_weight < 0 or self.trainer_prior_top_k < 1:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_PRIOR_WEIGHT must be >= 0 and "
                              f"{ENV_PREFIX}TRAINER_PRIOR_TOP_K >= 1")
        if self.trainer_replay_policy not in ("reservoir", "fifo"):
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_REPLAY_POLICY="
                              f"{self.trainer_replay_policy!r} is not reservoir or fifo")
        if not 0.0 <= self.trainer_dropout < 1.0:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_DROPOUT={self.trainer_dropout!r} "
                              "must be in [0, 1)")
        if self.bundle_full_every_s < 0 or not 0.0 < self.bundle_delta_max_share <= 1.0:
            raise ConfigError(f"setting {ENV_PREFIX}BUNDLE_FULL_EVERY_S must be >= 0 and "
                              f"{ENV_PREFIX}BUNDLE_DELTA_MAX_SHARE in (0, 1]")
        if self.export_every_s <= 0 or self.quality_delta < 0:
            raise ConfigError(f"setting {ENV_PREFIX}EXPORT_EVERY_S / QUALITY_DELTA out of range")
        if not 0.0 < self.shed_min_fraction <= 1.0:
            raise ConfigError(f"setting {ENV_PREFIX}SHED_MIN_FRACTION="
                              f"{self.shed_min_fraction!r} must be in (0, 1]")
        if self.shed_target_lag_s <= 0:
            raise ConfigError(f"setting {ENV_PREFIX}SHED_TARGET_LAG_S="
                              f"{self.shed_target_lag_s!r} must be > 0")
        if self.shed_skip_lag_s and self.shed_skip_lag_s <= self.shed_target_lag_s:
            raise ConfigError(f"setting {ENV_PREFIX}SHED_SKIP_LAG_S={self.shed_skip_lag_s!r}"
                              " must be 0 or above SHED_TARGET_LAG_S")
        if not 6.0 <= self.trainer_session_timeout_s <= 300.0:
            raise ConfigError(f"setting {ENV_PREFIX}TRAINER_SESSION_TIMEOUT_S="
                              f"{self.trainer_session_timeout_s!r} must be in [6, 300]")
        if not 0.0 < self.checkpoint_max_share <= 1.0:
            raise ConfigError(f"setting {ENV_PREFIX}CHECKPOINT_MAX_SHARE="
                              f"{self.checkpoint_max_share!r} must be in (0, 1]")
        if self.checkpoint_min_interval_s < 0:
            raise ConfigError(f"setting {ENV_PREFIX}CHECKPOINT_MIN_INTERVAL_S="
                              f"{self.checkpoint_min_interval_s!r} must be >= 0")

    @property
    def exclusion(self) -> ExclusionRule:
        return ExclusionRule.parse(self.exclude)

    @property
    def bootstrap(self) -> str:
        return bootstrap_servers(self.broker)

    @property
    def identity(self) -> str:
        """The name this trainer writes on the topics (who published a bundle, a checkpoint)."""
        return self.trainer_id or f"{socket.gethostname()}-{os.getpid()}"


def load_trainer_settings(environ: dict[str, str] | None = None,
                          **overrides: object) -> TrainerSettings:
    """Return trainer settings from the environment, with flag overrides (None = not given)."""
    return from_env(TrainerSettings, ENV_PREFIX, environ, **overrides)
