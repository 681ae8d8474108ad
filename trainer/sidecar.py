"""``advrec trainer``: the sidecar that learns from ``train-batches`` and publishes bundles.

One trainer of a fleet is active: the one the consumer group assigns the single partition of
`train-batches`. The others stand by and do not train. On becoming active a trainer resumes
from the newest checkpoint on the checkpoint topic, whoever wrote it, at that checkpoint's
offset (``take_over``); no volume is shared between pods.

Per batch, in this order: evaluate the current generator on it (prequential: the batch is
not yet trained on), evaluate the live (last published) generator on it for the quality
gate, then train on it mixed with replay: on a sample of it while the trainer is behind
(``trainer.shedding``). Every ``export_every_s`` seconds or ``export_every_batches``
batches, export, check ONNX parity and the quality gate, and publish the bundle to the
bundle topic (``advrec.channel``) for every worker, unless an operator's pin holds the
fleet on one version. After ``checkpoint_every_batches`` batches (at most every
``checkpoint_min_interval_s``), checkpoint to the checkpoint topic, *then* commit the
offset: a trainer that takes over resumes from the checkpoint's offset, so each batch shapes
the model once, but for the batches since the last checkpoint, which are trained again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advrec.bundle import bundle_files, vocab_json, write_bundle
from advrec.catalogue import CatalogueItem, InvalidItem, decode_item
from advrec.channel import (
    Assembled,
    Assembler,
    ChannelError,
    Pointer,
    TopicView,
    decode_record,
)
from advrec.channel_io import ChannelPublisher, follow_topic, last_record
from advrec.config import ConfigError, settings_as_dict
from advrec.contract import TrainingExample, decode_batch
from advrec.flags import FLAGGED, READMITTED, FlagBook, FlagError, FlagRecord, publish_flags
from advrec.links import PRIOR_FILES, SparseRows
from advrec.memory import release_freed_memory
from advrec.topics import ITEMS_CONFIG, TopicSpec, channel_topics, ensure_topics
from trainer.settings import TrainerSettings, load_trainer_settings
from trainer.shedding import LoadShedder
from trainer.telemetry import TrainerMetrics

__all__ = ["Sidecar", "main"]

log = logging.getLogger("advrec.trainer")

CHECKPOINT_FILE = "trainer.ckpt"
PARITY_TOLERANCE = 1e-3  # torch vs onnxruntime max abs score difference allowed at export
# train_batch stats -> `kind` label of advrec_trainer_loss (pg and apr are G's extra terms)
LOSS_KINDS = {"loss_ml": "ml", "loss_g": "g", "loss_d": "d", "pg_term": "pg", "apr_loss": "apr"}
BUNDLE_TOPIC_WAIT_S = 60.0  # how long to wait for the bundle topic's pointer and pin at start
SKIP_KEEP = 2  # batches a trainer far behind still trains on when it jumps to the newest
# trainer.metrics.rank_targets; the first is the gate's: A where the list leaves every seen
# item out (ADVREC_EXCLUDE=seen), B where it may show them (none, or only some event types)
GAUGE_VARIANTS = ("A", "B")
SHED_LOG_EVERY_S = 60.0  # while shedding, a change of its level is logged at most this often


@dataclass
class _Export:
    """A bundle exported and written locally, waiting to be published."""

    version: str
    files: list[tuple[str, bytes]]
    base: str | None  # a delta's base version; None: a full bundle
    two_stage: dict[str, bytes] | None  # the two-stage parts (a full one is the next base)
    items: np.ndarray | None  # their items.npy's array
    vocab: list[str | None]
    candidate: Any  # a frozen copy of the learner: the next quality gate's baseline
    cand_hr: float
    live_hr: float
    examples: int
    started: float


class Sidecar:
    """The trainer's state and steps: blocking torch work runs on one thread, Kafka on the
    loop."""

    def __init__(self, settings: TrainerSettings, metrics: TrainerMetrics | None = None) -> None:
        self.s = settings
        self.variants = GAUGE_VARIANTS if settings.exclusion.everything else GAUGE_VARIANTS[::-1]
        self.m = metrics or TrainerMetrics.create()
        self.identity = settings.identity
        self.learner: Any = None
        self.filter: Any = None  # the fake-user detector and training filter, when on
        self.filter_batches = 0
        # the flags topic: records read (appended on the loop, applied on the torch thread),
        # the book they make, and the flags raised here that are still to be published
        self.flags_in: collections.deque[FlagRecord] = collections.deque()
        self.flag_book = FlagBook()
        self.flags_out: list[FlagRecord] = []
        # the catalogue (items topic) as read: the latest record of every item, the items
        # deleted since, and what is still to be embedded (on the torch thread, a chunk
        # between two steps). A rebuilt learner (a take-over) is handed the whole catalogue
        # again; items whose text it already embedded are not encoded twice
        self.catalogue: dict[str, CatalogueItem] = {}
        self.catalogue_deleted: set[str] = set()
        self.dormant: set[str] = set()  # catalogue items the bounded vocabulary let go
        self.catalogue_in: collections.deque[tuple[str, CatalogueItem | None]] = (
            collections.deque())
        self.catalogue_changed = False  # since the last export: a bundle is due
        self.encoder: Any = None  # trainer.content.TextEncoder, loaded at the first item
        self.live: Any = None  # frozen copy of the learner as last published (quality gate)
        self.next_offset: int | None = None  # next train-batches offset to train on
        # when the newest batch trained on was written to train-batches (its Kafka timestamp,
        # set by the worker as it cut the batch): the served model's age is counted from it
        self.trained_through_ms: int | None = None
        self.resumed_at: int | None = None
        self.active = False
        self.assignments = 0  # times this trainer was given train-batches
        self.bundles = TopicView()  # the bundle topic as read back: versions, pointer, pin
        from trainer.export import DeltaPlanner, PackedTable

        # two-stage bundles between full ones go out as deltas (advrec/bundle.py)
        self.deltas = DeltaPlanner(settings.bundle_full_every_s, settings.bundle_delta_max_share)
        self.packed = PackedTable()  # their int8 item rows, packed again only where changed
        # the vocabulary last exported and its vocab.json, extended while items are only added
        self.vocab_json: tuple[list[str | None], bytes] | None = None
        self.checkpoints = TopicView()  # the checkpoint topic as last read and written
        self.window = {"cand_hits": 0.0, "live_hits": 0.0, "n": 0}
        self.batches_since_export = 0
        self.batches_since_checkpoint = 0
        self.last_export = time.monotonic()
        self.last_checkpoint = time.monotonic()
        self.checkpoint_cost_s = 0.0  # the last checkpoint's save and publish, seconds
        self.checkpoint_going_out: asyncio.Task | None = None  # its publish, while in flight
        self.recent: dict[str, float] = {}
        self.shedder = LoadShedder(target_lag_s=settings.shed_target_lag_s,
                                   min_fraction=settings.shed_min_fraction,
                                   skip_lag_s=settings.shed_skip_lag_s)
        self._rng = np.random.default_rng(settings.trainer_seed)
        self._pin_logged: str | None = None
        self._shed_level = 0
        self._shed_logged = 0.0
        chunk = settings.bundle_chunk_kb * 1024
        self.bundle_pub = ChannelPublisher(settings.bootstrap, settings.topic_bundles,
                                           producer_id=self.identity, chunk_bytes=chunk)
        self.checkpoint_pub = ChannelPublisher(settings.bootstrap, settings.topic_checkpoints,
                                               producer_id=self.identity, chunk_bytes=chunk)
        # All torch work on one thread: serial anyway, and one malloc arena instead of one
        # per pool thread (a pool of several let the trainer's RSS creep up by hundreds of MB).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")

    @property
    def live_version(self) -> str | None:
        """The version the bundle topic names as current (whoever published it)."""
        return self.bundles.pointer.version if self.bundles.pointer else None

    # ------------------------------------------------------------------ set-up

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.s.checkpoint_dir) / CHECKPOINT_FILE

    def build(self, checkpoint: Path | None = None) -> None:
        """Resume from ``checkpoint`` (or the local one) if there is one, else start fresh."""
        from trainer.checkpoint import load_checkpoint_with_detector

        path = checkpoint or (self.checkpoint_path if self.checkpoint_path.exists() else None)
        detector_state = None
        if path is not None:
            self.learner, extra, detector_state = load_checkpoint_with_detector(path)
            self.next_offset = self.resumed_at = extra.get("next_offset")
            # the deployment's bound on the vocabulary holds over the checkpoint's
            self.learner.train_cfg = dataclasses.replace(
                self.learner.train_cfg, item_ttl_s=self.s.trainer_item_ttl_s)
            log.info("resumed from %s: %d examples seen, next offset %s", path,
                     self.learner.examples_seen, self.next_offset)
        else:
            self.learner = self.fresh_learner()
            self.next_offset = self.resumed_at = None
            log.info("starting a fresh %s learner", self.s.trainer_mode)
        self.live = self.learner.frozen() if self.live_version else None
        self.m.resumed_offset.set(-1 if self.resumed_at is None else self.resumed_at)
        self.filter = None
        if self.s.trainer_detector:
            from trainer.detector import DetectorConfig, TrainingFilter

            self.filter = TrainingFilter(self.learner, DetectorConfig(
                threshold=self.s.trainer_detector_threshold,
                min_clicks=self.s.trainer_detector_min_clicks,
                confirm_rounds=self.s.trainer_detector_confirm_rounds, seed=self.s.trainer_seed))
            log.info("fake-user detector on: threshold P(fake) >= %.4g from the %d-th click, "
                     "confirmed by %d rounds in a row", self.s.trainer_detector_threshold,
                     self.s.trainer_detector_min_clicks, self.s.trainer_detector_confirm_rounds)
            if detector_state is not None:
                self.filter.load_state_dict(detector_state)
                log.info("detector resumed from the checkpoint: %d rounds, %d users flagged",
                         self.filter.detector.rounds, len(self.filter.flagged))
            for record in self.flag_book.records.values():  # the fleet's flags so far
                self._apply_flag(record)
        # the whole catalogue as read so far, for this learner (unchanged texts are skipped);
        # list() copies in one step, while the loop's thread may be adding records
        deleted, current = list(self.catalogue_deleted), list(self.catalogue.items())
        self.catalogue_in = collections.deque([*((i, None) for i in deleted), *current])

    def fresh_learner(self) -> Any:
        from trainer.adversarial import AdversarialConfig
        from trainer.content import ContentConfig
        from trainer.learner import OnlineLearner, TrainConfig
        from trainer.model import ModelConfig
        from trainer.prior import PriorConfig

        s = self.s
        return OnlineLearner(
            ModelConfig(max_len=s.trainer_max_len, d_model=s.trainer_dim,
                        n_layers=s.trainer_layers, dropout=s.trainer_dropout),
            TrainConfig(mode=s.trainer_mode, lr=s.trainer_lr, seed=s.trainer_seed,
                        steps_per_batch=s.trainer_steps_per_batch,
                        replay_size=s.trainer_replay_size, replay_ratio=s.trainer_replay_ratio,
                        replay_policy=s.trainer_replay_policy, num_threads=s.trainer_threads,
                        item_ttl_s=s.trainer_item_ttl_s),
            # the history mask only where the list leaves the history out (advrec.exclusion)
            AdversarialConfig(mask_history=s.trainer_mask_history
                              and s.exclusion.mask_history, loss=s.trainer_loss,
                              sampled_above=s.trainer_sampled_above,
                              n_negatives=s.trainer_negatives),
            PriorConfig(weight=s.trainer_prior_weight, top_k=s.trainer_prior_top_k),
            ContentConfig(blend_clicks=s.trainer_content_blend))

    def _local_offset(self) -> int | None:
        """The next offset of the local checkpoint (this pod's own, from before a restart)."""
        from trainer.checkpoint import read_extra

        if not self.checkpoint_path.exists():
            return None
        try:
            return read_extra(self.checkpoint_path).get("next_offset")
        except Exception:
            log.warning("the local checkpoint %s is unreadable; ignoring it",
                        self.checkpoint_path, exc_info=True)
            return None

    async def take_over(self, consumer: Any, tp: Any) -> None:
        """Become the active trainer: resume from the newest state (this process's own, the
        checkpoint topic's, or the local checkpoint's), then seek to its offset."""
        loop = asyncio.get_running_loop()
        self.active = False  # until the state is restored: the loop trains nothing meanwhile
        self.assignments += 1
        try:
            fetched = await self.fetch_checkpoint()
        except Exception:
            log.exception("could not read the checkpoint topic; resuming without it")
            fetched = None
        theirs = fetched.manifest.meta.get("next_offset") if fetched else None
        mine = self.next_offset if self.learner is not None else None
        local = await loop.run_in_executor(self.torch_thread, self._local_offset)
        best = max((x for x in (theirs, mine, local) if x is not None), default=None)
        if fetched is not None and theirs == best and (mine is None or theirs > mine):
            await loop.run_in_executor(self.torch_thread, self.build,
                                       fetched.path / CHECKPOINT_FILE)
            if fetched.manifest.producer != self.identity:
                self.m.takeovers.inc()
                log.warning("took over from trainer %s: its checkpoint %s (%s batches seen), "
                            "resuming at offset %s", fetched.manifest.producer,
                            fetched.version, fetched.manifest.meta.get("batches_seen"), theirs)
        elif self.learner is None or (local is not None and local == best
                                      and (mine is None or local > mine)):
            await loop.run_in_executor(self.torch_thread, self.build, None)
        self.batches_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        # another trainer may have published meanwhile: the first bundle goes out whole
        self.deltas.base = None
        if self.next_offset is not None:
            consumer.seek(tp, self.next_offset)
        self.active = True
        self.m.active.set(1)
        log.info("active trainer %s: owns %s, resuming at offset %s", self.identity, tp,
                 self.next_offset if self.next_offset is not None else "the committed offset")

    async def fetch_checkpoint(self) -> Assembled | None:
        """Read the newest checkpoint on the checkpoint topic into the local cache.

        The pointer is the last record a complete publish writes, so the topic's last record
        usually names the newest checkpoint and where its chunks start: only those are read.
        Otherwise (a publish cut short) the whole topic is.
        """
        s = self.s
        root = Path(s.checkpoint_dir) / "channel"
        # read once, to take over from, and read again from the topic at the next take-over:
        # a cache, written without fsyncs (~0.9 GB at 1M items)
        view, assembler = TopicView(), Assembler(root, max_bytes=16 << 30, sync=False)
        done: dict[str, Assembled] = {}

        def handle(record: Any) -> None:
            try:
                rec = view.apply(record.key, record.value, record.offset)
            except ChannelError as exc:
                log.warning("checkpoint topic, offset %d: %s", record.offset, exc)
                return
            for event in assembler.feed(rec):
                if isinstance(event, Assembled):
                    for old in done.values():
                        shutil.rmtree(old.path, ignore_errors=True)
                    done.clear()
                    done[event.version] = event
                else:
                    log.warning("checkpoint topic: %s (%s)", event.detail, event.reason)

        started = time.perf_counter()
        last, _ = await last_record(s.bootstrap, s.topic_checkpoints)
        start = None
        if last is not None:
            try:
                tail = decode_record(last.key, last.value, last.offset)
            except ChannelError:
                tail = None
            if isinstance(tail, Pointer) and tail.first_offset is not None:
                start = tail.first_offset
        try:
            await follow_topic(s.bootstrap, s.topic_checkpoints, handle, stop=asyncio.Event(),
                               start_offset=start, until_caught_up=True,
                               client_id=f"advrec-trainer-{self.identity}-ckpt")
        finally:
            assembler.close()
        self.checkpoints = view
        if not done:
            log.info("no checkpoint on %s", s.topic_checkpoints)
            return None
        found = next(iter(done.values()))
        log.info("read checkpoint %s from %s in %.1fs (%d records, %d bytes)", found.version,
                 s.topic_checkpoints, time.perf_counter() - started, view.records, view.bytes)
        return found

    # ------------------------------------------------------------------ per batch

    def step(self, payload: bytes | list[bytes], offset: int,
             fraction: float = 1.0) -> dict[str, float]:
        """Evaluate, then train on one ``train-batches`` message, or on several as one batch
        (while shedding); ``offset`` is the last one's (blocking)."""
        started = time.perf_counter()
        payloads = [payload] if isinstance(payload, bytes) else payload
        batch: list[TrainingExample] = []
        for n, raw in enumerate(payloads):
            try:
                batch.extend(decode_batch(raw))
            except Exception as exc:  # a foreign message must not stop training
                log.error("skipping undecodable train-batches message at offset %d: %s",
                          offset - len(payloads) + 1 + n, exc)
        self.batches_since_export += len(payloads)
        self.batches_since_checkpoint += len(payloads)
        if not batch:
            self.next_offset = offset + 1
            return {}
        learner = self.learner
        scored = self._sample(batch, fraction)
        # variant A (the served list: a re-click is a miss) is what the gate decides on and
        # the report headlines; B (re-clicks may hit) is reported beside it
        pre = learner.evaluate_batch(scored, variants=self.variants)
        n_total = pre["n_eval"] + pre["n_unknown_target"]
        cand_hits = pre.get("hr@10", 0.0) * pre["n_eval"]
        live_hits = cand_hits
        if self.live is not None:
            live = self.live.evaluate_batch(scored, ks=(10,), variants=self.variants[:1])
            live_hits = live.get("hr@10", 0.0) * live["n_eval"]
        self.window["cand_hits"] += cand_hits
        self.window["live_hits"] += live_hits
        self.window["n"] += int(n_total)
        train = batch
        self._take_flags()
        if self.filter is not None:
            before = (self.filter.filtered, len(self.filter.flagged))
            self.filter_batches += len(payloads)
            train = self.filter.admit(batch, self.filter_batches - 1, len(payloads))
            self._report_filter(*before)
            self._raise_flags()
        stats = learner.train_batch(train, fraction, messages=len(payloads))
        if learner.expired:
            self._forget_expired(learner.expired)
        if self.dormant:
            self._revive(train)
        self.next_offset = offset + 1
        self._report(pre, stats, n_total, time.perf_counter() - started, fraction, len(payloads))
        return {**pre, **stats}

    def _forget_expired(self, expired: list[tuple[int, str]]) -> None:
        """Items left the bounded vocabulary (torch thread): the detector forgets their rows'
        counts; those the catalogue lists wait, dormant, for a click to bring them back."""
        rows = np.array([row for row, _ in expired], dtype=np.int64)
        if self.filter is not None:
            self.filter.detector.stats.forget(rows)
        self.dormant.update(item for _, item in expired if item in self.catalogue)
        self.m.items_expired.inc(len(expired))
        log.info("vocabulary: %d items expired (no click for %.0f s); %d live, %d free rows",
                 len(expired), self.learner.train_cfg.item_ttl_s, self.learner.vocab.n_live,
                 len(self.learner.vocab.holes()))

    def _revive(self, batch: list[Any]) -> None:
        """A click brought a dormant catalogue item back: queue its record, so that its row
        gets its content vector again (trainer/content.py)."""
        for example in batch:
            item = self.catalogue.get(example.item) if example.item in self.dormant else None
            if item is not None:
                self.dormant.discard(example.item)
                self.catalogue_in.append((example.item, item))

    def _take_flags(self) -> None:
        """Apply the flag records read from the topic since the last step (torch thread)."""
        while self.flags_in:
            record = self.flags_in.popleft()
            self.flag_book.apply(record)
            self._apply_flag(record)

    def _on_item_record(self, record: Any) -> None:
        """A record of the items topic (on the loop): keep it, queue it for embedding."""
        if record.key is None:
            self.m.catalogue_items.labels(outcome="rejected").inc()
            return
        item_id = record.key.decode("utf-8", errors="replace")
        if record.value is None:  # a tombstone: the catalogue deleted the item
            self.catalogue.pop(item_id, None)
            self.catalogue_deleted.add(item_id)
            self.catalogue_in.append((item_id, None))
            return
        try:
            item = decode_item(record.value, record.key)
        except InvalidItem as exc:  # the workers dead-letter it with its reason
            self.m.catalogue_items.labels(outcome="rejected").inc()
            log.debug("items topic, offset %d: %s", record.offset, exc)
            return
        self.catalogue[item.item] = item
        self.catalogue_deleted.discard(item.item)
        self.catalogue_in.append((item.item, item))

    def _take_catalogue(self) -> None:
        """Embed up to a chunk of the catalogue records read since the last call and give
        the learner their rows (torch thread): the next bundle ranks them."""
        from trainer.content import TextEncoder, text_digest

        learner = self.learner
        latest: dict[str, CatalogueItem | None] = {}
        while self.catalogue_in and len(latest) < self.s.trainer_content_chunk:
            item_id, item = self.catalogue_in.popleft()
            latest[item_id] = item  # an item's last record wins
        deleted = [i for i, item in latest.items() if item is None]
        known = learner.content.digests if learner.content is not None else {}
        deleted = [i for i in deleted if i in known]
        todo = [(item, text_digest(item.content_text())) for item in latest.values()
                if item is not None]
        unchanged = sum(1 for item, d in todo if known.get(item.item) == d)
        # an unchanged record is a refresh all the same: it keeps its item in the vocabulary
        learner.touch([r for item, d in todo if known.get(item.item) == d
                       for r in [learner.vocab.index(item.item)] if r is not None],
                      learner.last_event_ms)
        todo = [(item, d) for item, d in todo if known.get(item.item) != d]
        self.m.catalogue_items.labels(outcome="unchanged").inc(unchanged)
        if deleted:
            learner.drop_catalogue(deleted)
            self.m.catalogue_items.labels(outcome="deleted").inc(len(deleted))
        if todo:
            if self.encoder is None:
                self.encoder = TextEncoder()
                log.info("loading the text encoder %s (%s %s)", self.encoder.meta["model"],
                         self.encoder.meta["package"], self.encoder.meta["version"])
            started = time.perf_counter()
            vectors = self.encoder.encode([item.content_text() for item, _ in todo])
            seconds = time.perf_counter() - started
            self.m.encode_seconds.observe(seconds)
            learner.add_catalogue([item.item for item, _ in todo], vectors,
                                  [d for _, d in todo])
            self.m.catalogue_items.labels(outcome="encoded").inc(len(todo))
            log.info("catalogue: embedded %d items in %.1fs (%.1f ms each); %d waiting", len(todo),
                     seconds, 1000 * seconds / len(todo), len(self.catalogue_in))
        n_content, n_cold = learner.content_rows()
        self.m.content_items.set(n_content)
        self.m.content_cold_rows.set(n_cold)
        self.m.vocab_size.set(learner.vocab.n_live)
        self.catalogue_changed |= bool(todo or deleted)

    def _apply_flag(self, record: FlagRecord) -> None:
        if self.filter is None:
            return
        if record.state == READMITTED and self.filter.readmit(record.user):
            log.info("user %s re-admitted by %s%s: their examples train again", record.user,
                     record.by, f" ({record.note})" if record.note else "")
        elif record.state == FLAGGED:
            self.filter.flag(record.user)

    def _raise_flags(self) -> None:
        """Turn the users the detector just flagged into records for the flags topic."""
        from trainer.detector import probability

        f = self.filter
        company = f.company([u for u in f.new_flags if u in f.records])
        for user in f.new_flags:
            rec = f.records.get(user)
            z = f.worst.get(user, 0.0)
            reasons = tuple(f.detector.explain(rec)) if rec is not None else ()
            if user in company:  # how many high scorers push an item with this user
                reasons += (("company", float(company[user])),)
            self.flags_out.append(FlagRecord(
                user=user, state=FLAGGED, by=self.identity, reasons=reasons,
                p_fake=float(probability(z)),
                rounds=f.detector.rounds))
        f.new_flags.clear()

    async def publish_flags(self, producer: Any) -> None:
        """Publish the flags raised since the last call (kept for the next on failure)."""
        out, self.flags_out = self.flags_out, []
        if not out or producer is None:
            self.flags_out = out + self.flags_out if producer is None else self.flags_out
            return
        try:
            await publish_flags(producer, self.s.topic_flags, out)
        except Exception:
            log.warning("could not publish %d flag(s); retrying after the next batch", len(out),
                        exc_info=True)
            self.flags_out = out + self.flags_out

    def _report_filter(self, filtered_before: int, flagged_before: int) -> None:
        from trainer.detector import probability

        f, m = self.filter, self.m
        m.filtered_examples.inc(f.filtered - filtered_before)
        m.flagged_users.set(len(f.flagged))
        m.held_examples.set(sum(len(v) for v in f.held.values()))
        m.suspect_users.set(len(f.streak))
        m.detector_rounds.set(f.detector.rounds)
        m.detector_threshold.set(f.detector.threshold)
        for z in f.scored:
            m.detector_scores.observe(float(probability(z)))
        f.scored.clear()
        if len(f.flagged) > flagged_before:
            new = len(f.flagged) - flagged_before
            log.warning("detector flagged %d more user(s) (%d flagged, %d examples filtered "
                        "so far)", new, len(f.flagged), f.filtered)

    def _sample(self, batch: list[TrainingExample], fraction: float) -> list[TrainingExample]:
        """The examples of ``batch`` to score: a random share while shedding (at least
        ``shed_eval_min``), and no more than ``eval_max_scores`` scores over the catalogue
        allow; all of them otherwise."""
        n = len(batch)
        if fraction < 1.0:
            n = min(n, max(self.s.shed_eval_min, round(fraction * n)))
        n = min(n, max(1, self.s.eval_max_scores // (len(self.learner.vocab) + 1)))
        if n >= len(batch):
            return batch
        pick = np.sort(self._rng.choice(len(batch), size=n, replace=False))
        return [batch[i] for i in pick]

    def _report(self, pre: dict[str, float], stats: dict[str, float], n_total: float,
                seconds: float, fraction: float, messages: int = 1) -> None:
        m = self.m
        m.batches.inc(messages)
        m.examples.inc(stats.get("examples", 0.0))
        m.shed_examples.inc(stats.get("shed", 0.0))
        m.train_fraction.set(fraction)
        m.step_seconds.observe(seconds)
        if n_total:
            for n, variant in enumerate(self.variants):
                prefix = "" if n == 0 else f"{variant}:"
                for key in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20"):
                    if prefix + key in pre:
                        # over all examples: a target the model cannot know yet is a miss
                        m.prequential.labels(metric=key.replace("@", "_at_"),
                                             variant=variant).set(
                            pre[prefix + key] * pre["n_eval"] / n_total)
        for key, kind in LOSS_KINDS.items():
            if key in stats:
                m.loss.labels(kind=kind).set(stats[key])
        for side in ("real", "fake"):
            if f"d_acc_{side}" in stats:
                m.d_accuracy.labels(side=side).set(stats[f"d_acc_{side}"])
        if "g_reward" in stats:
            m.g_reward.set(stats["g_reward"])
        replay = self.learner.replay
        m.replay_fill.set(len(replay) / max(1, self.learner.train_cfg.replay_size))
        m.vocab_size.set(self.learner.vocab.n_live)
        if self.next_offset is not None:
            m.consumed_offset.set(self.next_offset)
        self.recent = {**pre, **stats, "n_total": n_total}

    # ------------------------------------------------------------------ export and gate

    def export_due(self) -> bool:
        if self.batches_since_export == 0 and not self.catalogue_changed:
            return False
        return (self.batches_since_export >= self.s.export_every_batches
                or time.monotonic() - self.last_export >= self.s.export_every_s)

    def gate(self) -> tuple[bool, float, float]:
        """Return (publish?, candidate HR@10, live HR@10) over the window since last export."""
        n = self.window["n"]
        cand = self.window["cand_hits"] / n if n else 0.0
        live = self.window["live_hits"] / n if n else 0.0
        if self.live is None or n < self.s.quality_min_examples:
            return True, cand, live
        return cand >= live - self.s.quality_delta, cand, live

    def _next_window(self) -> dict[str, float]:
        self.last_export = time.monotonic()
        self.batches_since_export = 0
        self.catalogue_changed = False
        window, self.window = self.window, {"cand_hits": 0.0, "live_hits": 0.0, "n": 0}
        return window

    def prepare_export(self) -> _Export | None:
        """Gate, export, check parity and write the bundle locally (blocking); None if it
        must not be published."""
        from advrec.bundle import delta_rows
        from trainer.export import (
            check_parity,
            export_onnx,
            require_two_stage_parity,
            scoring_model,
        )
        from trainer.twostage import export_two_stage, parity_rows, scorer_parts

        started = time.perf_counter()
        ok, cand, live = self.gate()
        window = self._next_window()
        if not ok:
            self.m.exports.labels(outcome="rejected_quality").inc()
            log.warning("quality gate: candidate HR@10 %.4f < live %.4f - %.3f over %d "
                        "examples; not publishing", cand, live, self.s.quality_delta,
                        window["n"])
            return None
        learner = self.learner
        try:
            # G, plus the prior when its weight is > 0; with the two-stage parts, its item
            # tables rounded as their item table travels (int8 rows: advrec/bundle.py)
            big = len(learner.vocab) >= self.s.trainer_two_stage_items
            # G's int8 rows, packed again only where training changed them since
            packed = self.packed.update(learner.generator) if big else None
            scorer = scoring_model(learner, compact=False if packed is None else self.packed)
            generator = scorer_parts(scorer).generator  # the export's own copy of G
            two_stage, two_stage_diff, delta, items = None, 0.0, None, None
            vocab = learner.vocab.items()
            if packed is not None:
                # the worker ranks a large catalogue with these (stream_app/retrieval.py);
                # a part that disagrees with torch is an export failure like any other
                items = self.packed.held(generator)  # (V+1, D'+1): items.npy's array
                two_stage = export_two_stage(scorer, learner.model_cfg.max_len, stored=items)
                delta = self.deltas.plan(two_stage, vocab, items)
                # a delta's other rows are the bytes of the bundle it extends, checked then;
                # its sample of them differs from one export to the next
                two_stage_diff = require_two_stage_parity(
                    scorer, two_stage, self._probe_histories(), PARITY_TOLERANCE,
                    stored=items, rows=None if delta is None else parity_rows(
                        delta_rows(delta[1]), len(items), seed=learner.batches_seen))
            model_bytes: bytes | None = None
            diff = two_stage_diff
            if delta is None and (not big or len(vocab) < self.s.trainer_exact_below_items):
                # a full bundle of a catalogue small enough for the exact graph
                model_bytes = export_onnx(scorer, learner.model_cfg.max_len)
                diff = check_parity(scorer, model_bytes, self._probe_histories())
        except Exception:
            self.m.exports.labels(outcome="failed").inc()
            log.exception("export failed; the live bundle keeps serving")
            return None
        if not diff <= PARITY_TOLERANCE:
            self.m.exports.labels(outcome="rejected_parity").inc()
            log.error("ONNX parity %.2e > %.0e; not publishing", diff, PARITY_TOLERANCE)
            return None
        detector_bytes, detector_meta = self._export_detector()
        meta = {
            "max_len": learner.model_cfg.max_len,
            "mode": learner.train_cfg.mode,
            "examples_seen": learner.examples_seen,
            "batches_seen": learner.batches_seen,
            "last_event_ms": learner.last_event_ms,
            "trained_through_ms": self.trained_through_ms,
            "trainer": self.identity,
            "metrics": {"window_hr_at_10": cand, "live_window_hr_at_10": live,
                        "window_examples": window["n"], "parity_max_abs": diff},
            "model": dataclasses.asdict(learner.model_cfg),
            "train": dataclasses.asdict(learner.train_cfg),
            "prior": dataclasses.asdict(learner.prior_cfg),
            "settings": settings_as_dict(self.s),
        }
        if detector_meta is not None:
            meta["detector"] = detector_meta
        if two_stage is not None:
            meta["two_stage"] = {"parity_max_abs_diff": two_stage_diff}
        if delta is not None:
            meta["delta"] = {"rows": delta[2], "of_rows": len(vocab) + 1}
        if learner.content is not None:
            from trainer.content import TextEncoder

            n_content, n_cold = learner.content_rows()
            meta["content"] = {"encoder": (self.encoder or TextEncoder()).meta,
                               "items": n_content, "content_only_rows": n_cold,
                               "config": dataclasses.asdict(learner.content_cfg)}
        self.vocab_json = (vocab, vocab_json(vocab, self.vocab_json))
        # this trainer's own copy, which it reads back only to publish it: the topic is the
        # record, so the copy goes without fsyncs (advrec/bundle.py)
        version = write_bundle(self.s.bundle_dir, model_bytes, vocab, meta,
                               keep=self.s.bundles_keep, detector_bytes=detector_bytes,
                               two_stage=two_stage,
                               delta=None if delta is None else delta[:2],
                               vocab_bytes=self.vocab_json[1], sync=False)
        # the next gate's baseline ranks with the export's copy of G and the prior's links
        # as the bundle carries them: what the fleet serves
        same_device = learner.device.type == "cpu"
        links = (SparseRows.from_files(two_stage)
                 if two_stage is not None and PRIOR_FILES[0] in two_stage else None)
        return _Export(version, bundle_files(self.s.bundle_dir, version),
                       None if delta is None else delta[0], two_stage, items, vocab,
                       learner.frozen(generator if same_device else None, links), cand,
                       live, int(window["n"]), started)

    def _export_detector(self) -> tuple[bytes | None, dict[str, Any] | None]:
        """The trained detector as ONNX, parity-checked, and what the bundle's meta says of
        it; (None, None) while there is none (off, or no training round yet)."""
        f = self.filter
        if f is None or not f.detector.trained:
            return None, None
        from trainer.export import ExportError, export_filter_detector

        try:
            return export_filter_detector(f, PARITY_TOLERANCE)
        except ExportError as exc:
            log.error("%s; the bundle goes out without the detector", exc)
        except Exception:
            log.exception("detector export failed; the bundle goes out without it")
        return None, None

    async def export(self) -> str | None:
        """Export and publish a bundle to the bundle topic; return its version, or None."""
        if self.bundles.pin is not None:  # the fleet is held on one version: nothing goes live
            self._next_window()
            self.m.exports.labels(outcome="pinned").inc()
            return None
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self.torch_thread, self.prepare_export)
        if prepared is None:
            return None
        version = prepared.version
        try:
            base = prepared.base
            done = await self.bundle_pub.publish(
                version, prepared.files,
                meta={"trainer": self.identity, **({"base": base} if base else {})},
                stale=self.bundles.stale(self.s.bundles_keep, adding=version, base=base))
        except Exception:
            self.m.exports.labels(outcome="failed").inc()
            log.exception("could not publish bundle %s to %s; the fleet keeps serving %s",
                          version, self.s.topic_bundles, self.live_version)
            return None
        self.bundles.note_published(done.manifest, done.tombstoned)
        self.deltas.published(version, prepared.two_stage, prepared.vocab,
                              delta=prepared.base is not None, items=prepared.items)
        self.live = prepared.candidate
        self.m.exports.labels(outcome="published").inc()
        self.m.export_seconds.observe(time.perf_counter() - prepared.started)
        self.m.bundle_bytes.set(done.bytes)
        self.m.bundle_bytes_published.labels(
            kind="full" if prepared.base is None else "delta").inc(done.bytes)
        learner = self.learner
        self.m.model_info.info({"version": version, "mode": learner.train_cfg.mode,
                                "vocab_size": str(len(learner.vocab))})
        log.info("published bundle %s (vocabulary %d, window HR@10 %.4f vs live %.4f; "
                 "%d chunks, %.1f MB in %.2fs%s)", version, len(learner.vocab),
                 prepared.cand_hr, prepared.live_hr, done.chunks, done.bytes / 1e6,
                 done.seconds, "" if prepared.base is None
                 else f"; a delta against {prepared.base}")
        del prepared  # the bundle's bytes and the previous live copy: give them back
        release_freed_memory()
        return version

    def _probe_histories(self) -> np.ndarray:
        """Return histories [3, L] for the parity check: empty, short, full."""
        vocab, max_len = self.learner.vocab, self.learner.model_cfg.max_len
        items = vocab.items()
        probes = [[], items[:3], items[-max_len:]]
        return np.array([vocab.encode_history(h, max_len) for h in probes], dtype=np.int64)

    # ------------------------------------------------------------------ checkpoint

    def checkpoint_due(self) -> bool:
        if self.checkpoint_going_out is not None and not self.checkpoint_going_out.done():
            return False  # one at a time: the one before is still going out
        # at most a share of the trainer's time goes to checkpoints: at 1M items one is
        # ~0.4 GB, ~25 s to save and publish on 2 cores, and every 30 s took half the time
        spacing = max(self.s.checkpoint_min_interval_s,
                      self.checkpoint_cost_s / self.s.checkpoint_max_share)
        return (self.batches_since_checkpoint >= self.s.checkpoint_every_batches
                and time.monotonic() - self.last_checkpoint >= spacing)

    def save_checkpoint(self) -> tuple[bytes, dict[str, Any]]:
        """Write the local checkpoint (blocking); return its bytes and what it resumes at."""
        from trainer.checkpoint import save_checkpoint

        started = time.perf_counter()
        extra = {"next_offset": self.next_offset, "topic": self.s.topic_train,
                 "saved_at": time.time(), "trainer": self.identity,
                 "batches_seen": self.learner.batches_seen,
                 "examples_seen": self.learner.examples_seen}
        save_checkpoint(self.checkpoint_path, self.learner, extra,
                        None if self.filter is None else self.filter.state_dict())
        self.batches_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.m.checkpoint_seconds.observe(time.perf_counter() - started)
        return self.checkpoint_path.read_bytes(), extra

    async def checkpoint(self, consumer: Any, tp: Any, *, wait: bool = False) -> None:
        """Checkpoint locally, then publish it to the checkpoint topic and commit its offset
        in the background: training goes on while it goes out (at 1M items ~0.4 GB, the
        larger part of a checkpoint's ~25 s on 2 cores, which held every batch and bundle
        back). Only the save holds training: it needs the learner as it stands. ``wait``:
        return once it is published (when the trainer stops)."""
        await self.checkpoint_published()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        data, extra = await loop.run_in_executor(self.torch_thread, self.save_checkpoint)
        # the offset this checkpoint resumes at: training moves next_offset on meanwhile
        self.checkpoint_going_out = asyncio.create_task(
            self._publish_checkpoint(consumer, tp, data, extra, extra["next_offset"],
                                     started))
        if wait:
            await self.checkpoint_published()

    async def checkpoint_published(self) -> None:
        """Wait for the checkpoint going out, if one is (its failures are logged there)."""
        task, self.checkpoint_going_out = self.checkpoint_going_out, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _publish_checkpoint(self, consumer: Any, tp: Any, data: bytes,
                                  extra: dict[str, Any], offset: int | None,
                                  started: float) -> None:
        version = f"{int(time.time() * 1000):013d}"
        try:
            done = await self.checkpoint_pub.publish(
                version, [(CHECKPOINT_FILE, data)], meta=extra,
                stale=self.checkpoints.stale(1, adding=version, keep_pointer=False))
        except Exception:
            log.exception("could not publish checkpoint %s; the offset is not committed, so "
                          "a trainer that takes over redoes these batches", version)
            return
        self.checkpoints.note_published(done.manifest, done.tombstoned)
        self.checkpoint_cost_s = time.monotonic() - started
        self.m.checkpoint_publish_seconds.observe(done.seconds)
        self.m.checkpoint_bytes.set(done.bytes)
        log.debug("checkpoint %s published: %.1f MB in %.2fs", version, done.bytes / 1e6,
                  done.seconds)
        del data
        release_freed_memory()  # the serialized checkpoint was freed on other threads
        if offset is not None:
            try:
                await consumer.commit({tp: offset})
            except Exception:  # the checkpoint is the truth; the commit only helps standbys
                log.warning("offset commit failed after checkpoint", exc_info=True)

    # ------------------------------------------------------------------ the bundle topic

    def _on_bundle_record(self, record: Any) -> None:
        try:
            self.bundles.apply(record.key, record.value, record.offset)
        except ChannelError as exc:
            log.warning("bundle topic, offset %d: %s", record.offset, exc)
        pin = self.bundles.pin
        self.m.pinned.set(1 if pin else 0)
        label = pin.version if pin else None
        if label != self._pin_logged:
            if pin is not None:
                log.warning("the fleet is pinned to bundle %s (by %s); training goes on, "
                            "nothing is published until the pin is released", pin.version,
                            pin.by)
            else:
                log.info("the pin on bundle %s was released; the next bundle that passes the "
                         "quality gate goes live", self._pin_logged)
            self._pin_logged = label

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event, *, max_batches: int | None = None) -> None:
        """Consume and train until ``stop`` is set (or ``max_batches`` were trained)."""
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
        from aiokafka.coordinator.assignors.sticky.sticky_assignor import (
            StickyPartitionAssignor,
        )
        from aiokafka.errors import KafkaError

        s = self.s
        await _ensure_topics_with_retry(s, stop)
        # import the torch side now: a standby that takes over must not spend seconds on it
        await asyncio.get_running_loop().run_in_executor(self.torch_thread, _import_torch_side)
        bundles_read = asyncio.Event()
        follower = asyncio.create_task(follow_topic(
            s.bootstrap, s.topic_bundles, self._on_bundle_record, stop=stop,
            on_caught_up=bundles_read.set, client_id=f"advrec-trainer-{self.identity}"))
        try:  # the pointer and any pin must be known before anything is published
            await asyncio.wait_for(bundles_read.wait(), BUNDLE_TOPIC_WAIT_S)
        except TimeoutError:
            log.warning("the bundle topic was not read within %.0fs; going on",
                        BUNDLE_TOPIC_WAIT_S)
        flag_follower, flag_producer = await self._start_flags(stop)
        item_follower = None
        if s.trainer_content:
            item_follower = asyncio.create_task(follow_topic(
                s.bootstrap, s.topic_items, self._on_item_record, stop=stop,
                client_id=f"advrec-trainer-items-{self.identity}"))
        tp = TopicPartition(s.topic_train, 0)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap, group_id=s.trainer_group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            # sticky: a standby that joins must not take the partition from the active
            # trainer (round-robin hands it to the first member id, forcing a take-over)
            partition_assignment_strategy=(StickyPartitionAssignor,),
            max_poll_records=8, max_poll_interval_ms=600_000,
            session_timeout_ms=int(s.trainer_session_timeout_s * 1000),
            # a standby learns of a rebalance at its next heartbeat: Kafka's default 3 s
            heartbeat_interval_ms=int(min(3.0, s.trainer_session_timeout_s / 3) * 1000))
        sidecar = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                if tp in revoked:
                    sidecar.active = False
                    sidecar.m.active.set(0)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                if tp in assigned:
                    await sidecar.take_over(consumer, tp)

        await _start_with_retry(consumer, stop)
        consumer.subscribe([s.topic_train], listener=Listener())
        log.info("trainer %s waiting for %s (standby until assigned)", self.identity,
                 s.topic_train)
        trained = 0
        last_log = time.monotonic()
        examples_at_log = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                try:
                    records = await consumer.getmany(timeout_ms=500)
                except KafkaError as exc:
                    if not exc.retriable:
                        raise
                    log.warning("fetch failed (%s); retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                fetched_in = self.assignments
                msgs = records.get(tp, [])
                i = 0
                while i < len(msgs):
                    msg = msgs[i]
                    if fetched_in != self.assignments:
                        break  # a take-over since the fetch has seeked where to go on
                    if not self.active:
                        # fetched before this trainer took over (or after it lost the
                        # partition): put them back, never drop them
                        if tp in consumer.assignment():
                            consumer.seek(tp, msg.offset)
                        break
                    end = consumer.highwater(tp)
                    backlog = 0 if end is None else max(0, end - msg.offset - 1)
                    lag = max(0.0, time.time() - msg.timestamp / 1000)  # written by a worker
                    if self.shedder.should_skip(lag) and backlog > SKIP_KEEP:
                        await self._skip_ahead(consumer, tp, msg.offset, end, lag)
                        break
                    fraction = self.shedder.update(lag, time.monotonic())
                    self.m.backlog.set(backlog)
                    self.m.lag.set(lag)
                    self._log_shedding(lag)
                    # while shedding, the fetched batches go as one: the fixed cost of a
                    # step (scoring for the gate, the update steps) is paid once for them
                    group = msgs[i:] if fraction < 1.0 else [msg]
                    if max_batches is not None:
                        group = group[: max(1, max_batches - trained)]
                    await loop.run_in_executor(
                        self.torch_thread, self.step,
                        [m.value for m in group] if len(group) > 1 else msg.value,
                        group[-1].offset, fraction)
                    await self.publish_flags(flag_producer)
                    trained += len(group)
                    i += len(group)
                    self.trained_through_ms = max(group[-1].timestamp,
                                                  self.trained_through_ms or 0)
                    # the bundle before the checkpoint, when both are due: the clicks just
                    # trained reach the fleet without waiting for a save (~4 s at 1M items)
                    if self.active and self.export_due():
                        await self.export()
                    if self.checkpoint_due():
                        await self.checkpoint(consumer, tp)
                    if max_batches is not None and trained >= max_batches:
                        stop.set()
                        break
                # a stream that pauses must not leave what was trained unpublished: the
                # checks after each step run on an idle fetch too (a re-admission as well)
                if self.flags_in:
                    await loop.run_in_executor(self.torch_thread, self._take_flags)
                if self.catalogue_in and self.active and self.learner is not None:
                    await loop.run_in_executor(self.torch_thread, self._take_catalogue)
                if self.active and self.export_due():
                    await self.export()
                if self.active and self.checkpoint_due():
                    await self.checkpoint(consumer, tp)
                now = time.monotonic()
                if now - last_log >= s.log_every_s and self.learner is not None:
                    total = self.m.registry.get_sample_value("advrec_trainer_examples_total")
                    rate = ((total or 0.0) - examples_at_log) / (now - last_log)
                    examples_at_log, last_log = total or 0.0, now
                    self._log_progress(rate)
            if self.active and self.batches_since_checkpoint:
                await self.checkpoint(consumer, tp, wait=True)
        finally:
            await self.checkpoint_published()
            await consumer.stop()
            await self.bundle_pub.stop()
            await self.checkpoint_pub.stop()
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            if flag_producer is not None:
                await self.publish_flags(flag_producer)
                await flag_producer.stop()
            for task in (flag_follower, item_follower):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _start_flags(self, stop: asyncio.Event) -> tuple[Any, Any]:
        """With the detector on: follow the flags topic (re-admissions, and the flags of
        the trainer before) and start a producer for the flags raised here."""
        if not self.s.trainer_detector:
            return None, None
        from aiokafka import AIOKafkaProducer

        s = self.s
        read = asyncio.Event()

        def handle(record: Any) -> None:
            if record.value is None:  # a tombstone: nothing to act on
                return
            try:
                self.flags_in.append(FlagRecord.decode(record.key, record.value))
            except FlagError as exc:
                log.warning("skipping a record on %s at offset %d: %s", s.topic_flags,
                            record.offset, exc)

        follower = asyncio.create_task(follow_topic(
            s.bootstrap, s.topic_flags, handle, stop=stop, on_caught_up=read.set,
            client_id=f"advrec-trainer-flags-{self.identity}"))
        try:  # the fleet's flags must be known before this trainer trains
            await asyncio.wait_for(read.wait(), BUNDLE_TOPIC_WAIT_S)
        except TimeoutError:
            log.warning("the flags topic was not read within %.0fs; going on",
                        BUNDLE_TOPIC_WAIT_S)
        producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap, acks="all",
                                    client_id=f"advrec-trainer-flags-{self.identity}")
        await producer.start()
        return follower, producer

    async def _skip_ahead(self, consumer: Any, tp: Any, offset: int, end: int,
                          lag: float) -> None:
        """Jump over all but the newest batches (the trainer is too far behind to catch up)."""
        target = end - SKIP_KEEP
        skipped = target - offset
        self.m.skipped_batches.inc(skipped)
        log.warning("%.0fs behind: skipping %d batches to train on the newest (offset %d -> "
                    "%d)", lag, skipped, offset, target)
        self.next_offset = target
        consumer.seek(tp, target)

    def _log_shedding(self, lag: float) -> None:
        """Log when shedding starts and ends, and while it lasts when its level changed, at
        most once a minute (the fraction moves every second or so)."""
        level, now = self.shedder.level, time.monotonic()
        if level == self._shed_level:
            return
        if level and self._shed_level and now - self._shed_logged < SHED_LOG_EVERY_S:
            return
        self._shed_level, self._shed_logged = level, now
        if level == 0:
            log.info("caught up (batches %.1fs old): training on every example again", lag)
        else:
            log.warning("shedding load: training on %.0f%% of each batch (batches %.1fs old; "
                        "the rest goes to the replay buffer)", 100 * self.shedder.fraction,
                        lag)

    def _log_progress(self, rate: float) -> None:
        r = self.recent
        losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in sorted(r.items())
                          if k.startswith("loss_"))
        extra = "".join(f" {k}={r[k]:.3f}" for k in ("d_acc_real", "d_acc_fake", "g_reward")
                        if k in r)
        f = self.filter
        if f is not None:
            extra += (f" | detector: {f.detector.rounds} rounds, {len(f.flagged)} flagged, "
                      f"{f.filtered} examples filtered")
        content = self.learner.content
        if content is not None:
            n_content, n_cold = self.learner.content_rows()
            extra += (f" | catalogue: {n_content} items, {n_cold} ranked by content "
                      f"({content.scale.item():.2f} * cos {content.shift.item():+.2f})")
        log.info("batches %d | %.0f examples/s | live %s | prequential HR@10 %.3f NDCG@10 "
                 "%.3f | vocabulary %d | %s%s", self.learner.batches_seen, rate,
                 self.live_version, r.get("hr@10", 0.0), r.get("ndcg@10", 0.0),
                 len(self.learner.vocab), losses, extra)


def _import_torch_side() -> None:
    """Import what a take-over needs: 3 s of the first checkpoint load (measured on 2 cores)
    were torch importing its compiler, which an optimizer's load_state_dict pulls in."""
    import torch

    import trainer.checkpoint
    import trainer.export
    import trainer.learner  # noqa: F401

    warm = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    warm.load_state_dict(warm.state_dict())


async def _ensure_topics_with_retry(s: TrainerSettings, stop: asyncio.Event) -> None:
    specs = channel_topics(train=s.topic_train, bundles=s.topic_bundles,
                           checkpoints=s.topic_checkpoints, flags=s.topic_flags)
    if s.trainer_content:  # the catalogue it follows (the workers validate it)
        specs.append(TopicSpec(s.topic_items, 1, 1, dict(ITEMS_CONFIG)))
    while not stop.is_set():
        try:
            await ensure_topics(s.bootstrap, specs, timeout_s=10.0)
            return
        except ConnectionError as exc:
            log.warning("Kafka not reachable yet (%s); retrying", exc)
            await asyncio.sleep(2.0)


async def _start_with_retry(consumer: Any, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await consumer.start()
            return
        except Exception as exc:
            log.warning("Kafka not reachable yet (%s); retrying", exc)
            await asyncio.sleep(2.0)


def build_parser() -> argparse.ArgumentParser:
    d = TrainerSettings()
    p = argparse.ArgumentParser(
        prog="advrec trainer",
        description="Run the sidecar trainer: consume mini-batches from `train-batches`, "
                    "evaluate each one before training on it (prequential HR/NDCG/MRR@10), "
                    "train the generator with the chosen adversarial mode, checkpoint, and "
                    "publish ONNX bundles that the stream workers hot-swap. Flags override "
                    "the ADVREC_* environment variables shown in brackets.")
    p.add_argument("--broker", help=f"Kafka URL [ADVREC_BROKER] (default {d.broker})")
    p.add_argument("--mode", choices=["none", "irgan", "apr", "irgan+apr"],
                   help=f"adversarial mode [ADVREC_TRAINER_MODE] (default {d.trainer_mode})")
    p.add_argument("--detector", action=argparse.BooleanOptionalAction, default=None,
                   help="the fake-user detector and training filter: flagged users' examples "
                        "are not trained on [ADVREC_TRAINER_DETECTOR] "
                        f"(default {'on' if d.trainer_detector else 'off'})")
    p.add_argument("--bundle-dir", help=f"where bundles go [ADVREC_BUNDLE_DIR] ({d.bundle_dir})")
    p.add_argument("--checkpoint-dir",
                   help=f"checkpoints [ADVREC_CHECKPOINT_DIR] ({d.checkpoint_dir})")
    p.add_argument("--metrics-port", type=int,
                   help=f"Prometheus port [ADVREC_TRAINER_METRICS_PORT] "
                        f"({d.trainer_metrics_port})")
    p.add_argument("--export-every-s", type=float,
                   help=f"seconds between exports [ADVREC_EXPORT_EVERY_S] ({d.export_every_s})")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches (for tests and benchmarks)")
    p.add_argument("--log-level", help="debug, info, warning [ADVREC_LOG_LEVEL]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_trainer_settings(
            broker=args.broker, trainer_mode=args.mode, trainer_detector=args.detector,
            bundle_dir=args.bundle_dir,
            checkpoint_dir=args.checkpoint_dir, trainer_metrics_port=args.metrics_port,
            export_every_s=args.export_every_s, log_level=args.log_level)
    except ConfigError as exc:
        print(f"advrec trainer: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    log.info("settings: %s", settings_as_dict(settings))
    from prometheus_client import start_http_server

    metrics = TrainerMetrics.create()
    start_http_server(settings.trainer_metrics_port, addr=settings.trainer_metrics_bind,
                      registry=metrics.registry)
    sidecar = Sidecar(settings, metrics)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await sidecar.run(stop, max_batches=args.max_batches)

    asyncio.run(run())
    log.info("trainer stopped after %d batches", sidecar.learner.batches_seen
             if sidecar.learner else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
