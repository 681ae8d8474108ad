"""The sidecar trainer against the real broker: crash-safe resume, no half bundle, freshness."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from advrec.bundle import list_versions, load_bundle, read_current
from advrec.contract import ClickEvent, TrainingExample, encode_batch, encode_event, encode_key
from advrec.synthetic import SyntheticConfig, synthetic_events
from advrec.topics import TopicSpec, ensure_topics
from tests.integration.conftest import (
    Names,
    TrainerProcess,
    Worker,
    send,
    wait_for,
)
from trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.kafka


def synthetic_batches(n_batches: int, size: int = 64, seed: int = 0) -> list[bytes]:
    """Turn a synthetic click stream into train-batches messages, as the batcher would."""
    history: dict[str, list[str]] = {}
    examples: list[TrainingExample] = []
    for e in synthetic_events(SyntheticConfig(n_users=300, n_items=600, seed=seed),
                              n_batches * size):
        h = history.setdefault(e.user, [])
        examples.append(TrainingExample(e.user, tuple(h[-50:]), e.item, e.ts))
        h.append(e.item)
    return [encode_batch(examples[i:i + size]) for i in range(0, len(examples), size)]


def assert_every_bundle_loads(bundles: Path) -> None:
    current = read_current(bundles)
    assert current is not None
    for version in list_versions(bundles):
        load_bundle(bundles, version)  # raises on anything half-written


def test_kill_9_resumes_from_checkpoint_and_never_leaves_a_half_bundle(
        kafka: str, names: Names, tmp_path: Path) -> None:
    asyncio.run(ensure_topics(kafka, [TopicSpec(names.train, 1)]))
    payloads = synthetic_batches(80)
    send(names.train, [(b"batch", p) for p in payloads])
    bundles = tmp_path / "bundles"
    env = {"ADVREC_CHECKPOINT_EVERY_BATCHES": "5", "ADVREC_EXPORT_EVERY_BATCHES": "1",
           "ADVREC_QUALITY_MIN_EXAMPLES": "1000000", "ADVREC_TRAINER_DIM": "32",
           "ADVREC_TRAINER_LAYERS": "1"}
    ckpt_dir = tmp_path / "checkpoints"
    killed_mid_export = False
    saved_offset: int | None = None
    resumes = 0
    for attempt in range(6):
        trainer = TrainerProcess(names, tmp_path, bundle_dir=bundles, checkpoint_dir=ckpt_dir,
                                 extra_env=env).start()
        try:
            wait_for(lambda t=trainer: t.metric("advrec_trainer_batches_total") >= 7
                     and read_current(bundles) is not None, 120,
                     "some batches trained and a bundle published")
            if saved_offset is not None:  # resumed right after the checkpointed offset
                assert trainer.metric("advrec_trainer_resumed_offset") == saved_offset
                resumes += 1
            # exports run after every batch: wait until one is in flight, then kill
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not list(bundles.glob(".tmp-*")):
                time.sleep(0.002)
            trainer.kill9()
        finally:
            trainer.stop()
        killed_mid_export |= bool(list(bundles.glob(".tmp-*")))
        saved_offset = load_checkpoint(ckpt_dir / "trainer.ckpt")[1]["next_offset"]
        assert_every_bundle_loads(bundles)
        if killed_mid_export and attempt >= 1:
            break
    assert killed_mid_export, "never caught an export in flight"
    assert resumes >= 1
    final = TrainerProcess(names, tmp_path, bundle_dir=bundles, checkpoint_dir=ckpt_dir,
                           extra_env=env).start()
    try:
        assert_resumed = lambda: final.metric("advrec_trainer_resumed_offset") == saved_offset  # noqa: E731
        wait_for(assert_resumed, 60, "the final trainer resumed at the checkpoint")
        wait_for(lambda: final.metric("advrec_trainer_consumed_offset") >= len(payloads),
                 180, "the rest of the stream trained")
        assert final.metric("advrec_trainer_consumed_offset") == len(payloads)
        assert "resuming at offset" in final.log_text()
    finally:
        final.stop()
    assert_every_bundle_loads(bundles)
    # The model on disk has trained on each of the 80 batches exactly once: batches trained
    # after a checkpoint died with the process and were trained again from that checkpoint.
    learner, extra = load_checkpoint(ckpt_dir / "trainer.ckpt")
    assert learner.batches_seen == len(payloads) and extra["next_offset"] == len(payloads)


def test_a_new_item_is_served_after_the_next_export(kafka: str, names: Names,
                                                    tmp_path: Path, workers) -> None:
    bundles = tmp_path / "trainer-bundles"  # the trainer's own copy of what it publishes
    worker = Worker(names, tmp_path,
                    extra_env={"ADVREC_TRAIN_BATCH_S": "1.0", "ADVREC_TRAIN_BATCH_SIZE": "128"})
    workers.append(worker)
    worker.start().wait_ready()
    trainer = TrainerProcess(names, tmp_path, bundle_dir=bundles,
                             extra_env={"ADVREC_EXPORT_EVERY_S": "3"})
    trainer.start()
    try:
        # background traffic so the model has a world to live in
        now = int(time.time() * 1000)
        cfg = SyntheticConfig(n_users=200, n_items=400, seed=5, start_ms=now - 3_600_000)
        background = [(encode_key(e.user), encode_event(e)) for e in synthetic_events(cfg, 4000)]
        send(names.clicks, background)
        wait_for(lambda: read_current(bundles) is not None, 120, "a first bundle")
        # a brand-new item: 150 users click the anchor, then the new item, twice over
        pattern = []
        for rep in range(2):
            for n in range(150):
                user = f"fan{n}"
                base = now + rep * 1000 + n
                pattern.append((encode_key(user), encode_event(
                    ClickEvent(user, "anchor-item", base, id=f"{user}-a{rep}"))))
                pattern.append((encode_key(user), encode_event(
                    ClickEvent(user, "brand-new-item", base + 1, id=f"{user}-b{rep}"))))
        send(names.clicks, [(encode_key("probe"), encode_event(
            ClickEvent("probe", "anchor-item", now - 10, id="probe-1")))])
        produced_at = time.monotonic()
        send(names.clicks, pattern)

        def served() -> bool:
            r = httpx.get(f"{worker.url}/recommendations/probe", params={"k": 20}, timeout=5)
            body = r.json()
            return not body["fallback"] and "brand-new-item" in body["items"]

        wait_for(served, 120, "the new item recommended to the probe user", interval=1)
        freshness = time.monotonic() - produced_at
        assert freshness < 120
        meta = load_bundle(bundles, read_current(bundles)).vocab
        assert "brand-new-item" in meta
    finally:
        trainer.stop()


def test_trainer_exports_through_a_live_stream(kafka: str, names: Names, tmp_path: Path,
                                               workers) -> None:
    """Events on `clicks` reach the trainer through the batcher and come back as bundles."""
    bundles = tmp_path / "trainer-bundles"
    worker = Worker(names, tmp_path)
    workers.append(worker)
    worker.start().wait_ready()
    trainer = TrainerProcess(names, tmp_path, bundle_dir=bundles,
                             extra_env={"ADVREC_EXPORT_EVERY_S": "2"})
    trainer.start()
    stop = threading.Event()
    try:
        cfg = SyntheticConfig(n_users=300, n_items=500, seed=9)
        started_ms = time.time() * 1000
        send(names.clicks, [(encode_key(e.user), encode_event(e))
                            for e in synthetic_events(cfg, 3000)])
        wait_for(lambda: worker.metric("advrec_model_swaps_total") >= 1, 120, "a swap")
        assert trainer.metric("advrec_trainer_examples_total") > 0
        batches_sent = worker.metric("advrec_train_batches_sent_total")
        assert batches_sent >= 1
        live = httpx.get(f"{worker.url}/readyz").json()["model_version"]
        assert live in list_versions(bundles)
        # the age counts from when the batch was cut, not from the synthetic event times
        through = load_bundle(bundles, live).meta["trained_through_ms"]
        assert started_ms - 5_000 <= through <= time.time() * 1000
        assert worker.metric("advrec_model_age_seconds") < 120
    finally:
        stop.set()
        trainer.stop()


def test_advrec_export_publish_puts_a_checkpoints_model_on_the_bundle_topic(
        kafka: str, names: Names, tmp_path: Path) -> None:
    """An operator seeds a fleet from a checkpoint: the bundle goes to the topic as current
    and rebuilds there byte for byte; older versions beyond --keep are tombstoned."""
    from advrec.bundle import bundle_files
    from advrec.channel import Assembled, Assembler
    from advrec.channel_io import follow_topic, read_view
    from advrec.topics import channel_topics, ensure_topics
    from tests.unit.trainer.planted import SMALL, planted_stream
    from trainer.checkpoint import save_checkpoint
    from trainer.export import main as export_main
    from trainer.learner import OnlineLearner

    asyncio.run(ensure_topics(kafka, channel_topics(train=names.train, bundles=names.bundles,
                                                    checkpoints=None)))
    learner = OnlineLearner(SMALL)
    for batch in planted_stream(3, 32):
        learner.train_batch(batch)
    save_checkpoint(tmp_path / "ckpt.pt", learner)
    versions = []
    for _ in range(3):
        assert export_main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--bundle-dir",
                            str(tmp_path / "out"), "--keep", "2", "--publish", "--broker",
                            f"kafka://{kafka}", "--topic", names.bundles]) == 0
        versions.append(read_current(tmp_path / "out"))
    view = asyncio.run(read_view(kafka, names.bundles))
    assert view.pointer is not None and view.pointer.version == versions[-1]
    assert view.versions() == versions[-2:]  # the oldest was tombstoned
    rebuilt: list[Assembled] = []
    assembler = Assembler(tmp_path / "rebuilt")

    def handle(record) -> None:
        from advrec.channel import decode_record
        rebuilt.extend(e for e in assembler.feed(decode_record(record.key, record.value))
                       if isinstance(e, Assembled))

    asyncio.run(follow_topic(kafka, names.bundles, handle, stop=asyncio.Event(),
                             until_caught_up=True))
    last = rebuilt[-1]
    assert last.version == versions[-1]
    assert bundle_files(tmp_path / "rebuilt", last.version) == bundle_files(tmp_path / "out",
                                                                           last.version)
    load_bundle(tmp_path / "rebuilt", last.version)  # verifies its own checksums too
