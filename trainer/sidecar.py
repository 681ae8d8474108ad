"""``advrec trainer``: the sidecar that learns from ``train-batches`` and publishes bundles.

Per batch, in this order: evaluate the current generator on it (prequential: the batch is
not yet trained on), evaluate the live (last published) generator on it for the quality
gate, then train on it mixed with replay. Every ``export_every_s`` seconds or
``export_every_batches`` batches, export, check ONNX parity and the quality gate, publish.
Every ``checkpoint_every_batches`` batches, checkpoint atomically, *then* commit the offset:
a restarted trainer resumes from the checkpoint's offset, so each batch shapes the model
exactly once (batches after the checkpoint are trained again from the checkpointed state).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from advrec.bundle import read_current, write_bundle
from advrec.config import ConfigError, settings_as_dict
from advrec.contract import decode_batch
from trainer.settings import TrainerSettings, load_trainer_settings
from trainer.telemetry import TrainerMetrics

__all__ = ["Sidecar", "main"]

log = logging.getLogger("advrec.trainer")

CHECKPOINT_FILE = "trainer.ckpt"
PARITY_TOLERANCE = 1e-3  # torch vs onnxruntime max abs score difference allowed at export
# train_batch stats -> `kind` label of advrec_trainer_loss (pg and apr are G's extra terms)
LOSS_KINDS = {"loss_ml": "ml", "loss_g": "g", "loss_d": "d", "pg_term": "pg", "apr_loss": "apr"}


class Sidecar:
    """The trainer's state and its blocking steps (run in a worker thread by ``run``)."""

    def __init__(self, settings: TrainerSettings, metrics: TrainerMetrics | None = None) -> None:
        self.s = settings
        self.m = metrics or TrainerMetrics.create()
        self.learner: Any = None
        self.live: Any = None  # frozen copy of the learner as last published (quality gate)
        self.live_version: str | None = read_current(settings.bundle_dir)
        self.next_offset: int | None = None  # next train-batches offset to train on
        self.resumed_at: int | None = None
        self.window = {"cand_hits": 0.0, "live_hits": 0.0, "n": 0}
        self.batches_since_export = 0
        self.batches_since_checkpoint = 0
        self.last_export = time.monotonic()
        self.recent: dict[str, float] = {}
        # All torch work on one thread: serial anyway, and one malloc arena instead of one
        # per pool thread (a pool of several let the trainer's RSS creep up by hundreds of MB).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")

    # ------------------------------------------------------------------ set-up

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.s.checkpoint_dir) / CHECKPOINT_FILE

    def build(self) -> None:
        """Resume from the checkpoint if there is one, else start a fresh learner."""
        from trainer.adversarial import AdversarialConfig
        from trainer.checkpoint import load_checkpoint
        from trainer.learner import OnlineLearner, TrainConfig
        from trainer.model import ModelConfig

        if self.checkpoint_path.exists():
            self.learner, extra = load_checkpoint(self.checkpoint_path)
            self.next_offset = self.resumed_at = extra.get("next_offset")
            log.info("resumed from %s: %d examples seen, next offset %s", self.checkpoint_path,
                     self.learner.examples_seen, self.next_offset)
        else:
            s = self.s
            self.learner = OnlineLearner(
                ModelConfig(max_len=s.trainer_max_len, d_model=s.trainer_dim,
                            n_layers=s.trainer_layers, dropout=s.trainer_dropout),
                TrainConfig(mode=s.trainer_mode, lr=s.trainer_lr, seed=s.trainer_seed,
                            steps_per_batch=s.trainer_steps_per_batch,
                            replay_size=s.trainer_replay_size,
                            replay_ratio=s.trainer_replay_ratio,
                            replay_policy=s.trainer_replay_policy,
                            num_threads=s.trainer_threads),
                AdversarialConfig(mask_history=s.trainer_mask_history))
            log.info("starting a fresh %s learner", s.trainer_mode)
        self.live = copy.deepcopy(self.learner) if self.live_version else None
        self.m.resumed_offset.set(-1 if self.resumed_at is None else self.resumed_at)

    # ------------------------------------------------------------------ per batch

    def step(self, payload: bytes, offset: int) -> dict[str, float]:
        """Evaluate, then train on one ``train-batches`` message (blocking)."""
        started = time.perf_counter()
        try:
            batch = decode_batch(payload)
        except Exception as exc:  # a foreign message must not stop training
            log.error("skipping undecodable train-batches message at offset %d: %s",
                      offset, exc)
            self.next_offset = offset + 1
            return {}
        learner = self.learner
        pre = learner.evaluate_batch(batch)
        n_total = pre["n_eval"] + pre["n_unknown_target"]
        cand_hits = pre.get("hr@10", 0.0) * pre["n_eval"]
        live_hits = cand_hits
        if self.live is not None:
            live = self.live.evaluate_batch(batch, ks=(10,))
            live_hits = live.get("hr@10", 0.0) * live["n_eval"]
        self.window["cand_hits"] += cand_hits
        self.window["live_hits"] += live_hits
        self.window["n"] += int(n_total)
        stats = learner.train_batch(batch)
        self.next_offset = offset + 1
        self.batches_since_export += 1
        self.batches_since_checkpoint += 1
        self._report(pre, stats, n_total, time.perf_counter() - started)
        return {**pre, **stats}

    def _report(self, pre: dict[str, float], stats: dict[str, float], n_total: float,
                seconds: float) -> None:
        m = self.m
        m.batches.inc()
        m.examples.inc(stats.get("examples", 0.0))
        m.step_seconds.observe(seconds)
        if n_total:
            for key in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20"):
                if key in pre:
                    # over all examples: a target the model cannot know yet counts as a miss
                    m.prequential.labels(metric=key.replace("@", "_at_")).set(
                        pre[key] * pre["n_eval"] / n_total)
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
        m.vocab_size.set(len(self.learner.vocab))
        if self.next_offset is not None:
            m.consumed_offset.set(self.next_offset)
        self.recent = {**pre, **stats, "n_total": n_total}

    # ------------------------------------------------------------------ export and gate

    def export_due(self) -> bool:
        if self.batches_since_export == 0:
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

    def export(self) -> str | None:
        """Export, check parity and quality, publish atomically; return the new version."""
        from trainer.export import check_parity, export_onnx

        started = time.perf_counter()
        self.last_export = time.monotonic()
        self.batches_since_export = 0
        ok, cand, live = self.gate()
        window = self.window
        self.window = {"cand_hits": 0.0, "live_hits": 0.0, "n": 0}
        if not ok:
            self.m.exports.labels(outcome="rejected_quality").inc()
            log.warning("quality gate: candidate HR@10 %.4f < live %.4f - %.3f over %d "
                        "examples; not publishing", cand, live, self.s.quality_delta,
                        window["n"])
            return None
        learner = self.learner
        try:
            model_bytes = export_onnx(learner.generator, learner.model_cfg.max_len)
            diff = check_parity(learner.generator, model_bytes, self._probe_histories())
        except Exception:
            self.m.exports.labels(outcome="failed").inc()
            log.exception("export failed; the live bundle keeps serving")
            return None
        if not diff <= PARITY_TOLERANCE:
            self.m.exports.labels(outcome="rejected_parity").inc()
            log.error("ONNX parity %.2e > %.0e; not publishing", diff, PARITY_TOLERANCE)
            return None
        meta = {
            "max_len": learner.model_cfg.max_len,
            "mode": learner.train_cfg.mode,
            "examples_seen": learner.examples_seen,
            "batches_seen": learner.batches_seen,
            "last_event_ms": learner.last_event_ms,
            "metrics": {"window_hr_at_10": cand, "live_window_hr_at_10": live,
                        "window_examples": window["n"], "parity_max_abs": diff},
            "model": dataclasses.asdict(learner.model_cfg),
            "train": dataclasses.asdict(learner.train_cfg),
            "settings": settings_as_dict(self.s),
        }
        version = write_bundle(self.s.bundle_dir, model_bytes, learner.vocab.items(), meta,
                               keep=self.s.bundles_keep)
        self.live = copy.deepcopy(learner)
        self.live_version = version
        self.m.exports.labels(outcome="published").inc()
        self.m.export_seconds.observe(time.perf_counter() - started)
        self.m.model_info.info({"version": version, "mode": learner.train_cfg.mode,
                                "vocab_size": str(len(learner.vocab))})
        log.info("published bundle %s (vocabulary %d, window HR@10 %.4f vs live %.4f)",
                 version, len(learner.vocab), cand, live)
        return version

    def _probe_histories(self) -> np.ndarray:
        """Return histories [3, L] for the parity check: empty, short, full."""
        vocab, max_len = self.learner.vocab, self.learner.model_cfg.max_len
        items = vocab.items()
        probes = [[], items[:3], items[-max_len:]]
        return np.array([vocab.encode_history(h, max_len) for h in probes], dtype=np.int64)

    # ------------------------------------------------------------------ checkpoint

    def checkpoint(self) -> None:
        from trainer.checkpoint import save_checkpoint

        started = time.perf_counter()
        save_checkpoint(self.checkpoint_path, self.learner,
                        {"next_offset": self.next_offset, "topic": self.s.topic_train,
                         "saved_at": time.time()})
        self.batches_since_checkpoint = 0
        self.m.checkpoint_seconds.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event, *, max_batches: int | None = None) -> None:
        """Consume and train until ``stop`` is set (or ``max_batches`` were trained)."""
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
        from aiokafka.errors import KafkaError

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.torch_thread, self.build)
        tp = TopicPartition(self.s.topic_train, 0)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.s.bootstrap, group_id=self.s.trainer_group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=8, session_timeout_ms=30_000, max_poll_interval_ms=600_000)
        sidecar = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                sidecar.m.active.set(0)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                if tp in assigned:
                    sidecar.m.active.set(1)
                    if sidecar.next_offset is not None:
                        consumer.seek(tp, sidecar.next_offset)
                    log.info("active trainer: owns %s, resuming at offset %s", tp,
                             sidecar.next_offset if sidecar.next_offset is not None
                             else "the committed offset")

        await _start_with_retry(consumer, stop)
        consumer.subscribe([self.s.topic_train], listener=Listener())
        trained = 0
        last_log = time.monotonic()
        examples_at_log = 0.0
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
                for msgs in records.values():
                    for msg in msgs:
                        await loop.run_in_executor(self.torch_thread, self.step, msg.value,
                                                   msg.offset)
                        trained += 1
                        if self.batches_since_checkpoint >= self.s.checkpoint_every_batches:
                            await self._checkpoint_and_commit(consumer, tp)
                        if max_batches is not None and trained >= max_batches:
                            stop.set()
                            break
                if self.export_due():
                    await loop.run_in_executor(self.torch_thread, self.export)
                now = time.monotonic()
                if now - last_log >= self.s.log_every_s:
                    total = self.m.registry.get_sample_value("advrec_trainer_examples_total")
                    rate = ((total or 0.0) - examples_at_log) / (now - last_log)
                    examples_at_log, last_log = total or 0.0, now
                    r = self.recent
                    losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in sorted(r.items())
                                      if k.startswith("loss_"))
                    extra = "".join(f" {k}={r[k]:.3f}" for k in ("d_acc_real", "d_acc_fake",
                                                                 "g_reward") if k in r)
                    log.info("batches %d | %.0f examples/s | live %s | prequential HR@10 "
                             "%.3f NDCG@10 %.3f | vocabulary %d | %s%s",
                             self.learner.batches_seen, rate, self.live_version,
                             r.get("hr@10", 0.0), r.get("ndcg@10", 0.0),
                             len(self.learner.vocab), losses, extra)
            if self.batches_since_checkpoint:
                await self._checkpoint_and_commit(consumer, tp)
        finally:
            await consumer.stop()

    async def _checkpoint_and_commit(self, consumer: Any, tp: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self.torch_thread, self.checkpoint)
        if self.next_offset is not None:
            try:
                await consumer.commit({tp: self.next_offset})
            except Exception:  # the checkpoint is the truth; the commit only speeds up standbys
                log.warning("offset commit failed after checkpoint", exc_info=True)


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
            broker=args.broker, trainer_mode=args.mode, bundle_dir=args.bundle_dir,
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
