"""A fleet on one broker: workers and trainers that share nothing but Kafka.

Four workers (each its own table and bundle directory) and two trainers (each its own
checkpoint and bundle directory) run as separate processes; a synthetic stream flows for the
whole module. The tests run in file order: every worker serves what the active trainer
publishes; a late worker starts ready with it; events on the wrong partition are
dead-lettered; a rollback on one worker pins them all; bad records on the bundle topic are
refused by every worker while the old model answers; the pin's release lets the next bundle
through; and a kill -9 of the active trainer hands over to the standby at its checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgpack
import pytest
from aiokafka import AIOKafkaProducer

from advrec.bundle import bundle_files, list_versions, write_bundle
from advrec.channel import Record, pointer_record, split_version
from advrec.contract import ClickEvent, decode_dead_letter, encode_event, encode_key
from advrec.replay import produce
from advrec.synthetic import SyntheticConfig, synthetic_events
from tests.bundles import toy_model
from tests.integration.conftest import (
    BOOTSTRAP,
    Names,
    TrainerProcess,
    Worker,
    consume_all,
    send,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TOKEN = "fleet-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PARTITIONS = 4
WORKER_ENV = {"ADVREC_ADMIN_TOKEN": TOKEN, "ADVREC_READY_WITHOUT_MODEL": "0",
              "ADVREC_TRAIN_BATCH_SIZE": "64", "ADVREC_TRAIN_BATCH_S": "0.5",
              "ADVREC_SESSION_TIMEOUT_S": "10"}
TRAINER_ENV = {"ADVREC_TRAINER_MODE": "none", "ADVREC_TRAINER_DIM": "16",
               "ADVREC_TRAINER_LAYERS": "1", "ADVREC_TRAINER_STEPS_PER_BATCH": "2",
               "ADVREC_EXPORT_EVERY_S": "2", "ADVREC_CHECKPOINT_EVERY_BATCHES": "4",
               "ADVREC_CHECKPOINT_MIN_INTERVAL_S": "0", "ADVREC_QUALITY_DELTA": "1",
               "ADVREC_TRAINER_SESSION_TIMEOUT_S": "8"}


class Clicks:
    """A live synthetic stream (event time = now) at ``rate`` events/s until stopped."""

    def __init__(self, topic: str, rate: float = 80.0) -> None:
        self.topic, self.rate = topic, rate
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _events(self) -> Iterator[tuple[bytes, bytes]]:
        cfg = SyntheticConfig(n_users=200, n_items=300, seed=11)
        for n, e in enumerate(synthetic_events(cfg, 10**7)):
            if self.stop.is_set():
                return
            self.sent = n + 1
            live = ClickEvent(e.user, e.item, int(time.time() * 1000), id=f"c{n}")
            yield encode_key(live.user), encode_event(live)

    def _run(self) -> None:
        asyncio.run(produce(BOOTSTRAP, self.topic, self._events(), rate=self.rate,
                            progress=False))


@dataclass
class Fleet:
    names: Names
    tmp: Path
    workers: list[Worker]
    trainers: list[TrainerProcess]
    clicks: Clicks
    state: dict = field(default_factory=dict)  # what one test leaves for the next


def readyz(worker: Worker) -> dict:
    return httpx.get(f"{worker.url}/readyz", timeout=5).json()


def live(worker: Worker) -> str | None:
    return readyz(worker)["model_version"]


def live_meta(worker: Worker) -> dict:
    status = httpx.get(f"{worker.url}/admin/model", headers=AUTH, timeout=5).json()
    return status["live"]["meta"]


def start_trainer(names: Names, tmp: Path, name: str) -> TrainerProcess:
    return TrainerProcess(names, tmp, bundle_dir=tmp / f"bundles-{name}",
                          checkpoint_dir=tmp / f"checkpoints-{name}",
                          extra_env={**TRAINER_ENV, "ADVREC_TRAINER_ID": name}).start()


@pytest.fixture(scope="module")
def fleet(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    names = Names()
    workers = [Worker(names, tmp, partitions=PARTITIONS, extra_env=WORKER_ENV)
               for _ in range(3)]
    trainers: list[TrainerProcess] = []
    clicks = Clicks(names.clicks)
    try:
        workers[0].start()
        wait_for(lambda: workers[0].log_text().count("created topics") > 0
                 or "bundle topic read" in workers[0].log_text(), 60, "topics created")
        for w in workers[1:]:
            w.start()
        trainers += [start_trainer(names, tmp, "trainer-a"),
                     start_trainer(names, tmp, "trainer-b")]
        clicks.thread.start()
        for w in workers:
            w.wait_ready(180)  # ready once a first bundle is live on it
        yield Fleet(names, tmp, workers, trainers, clicks)
    finally:
        clicks.stop.set()
        for t in trainers:
            t.stop()
        for w in workers:
            w.stop()


def active_trainer(fleet: Fleet) -> tuple[TrainerProcess, TrainerProcess]:
    """(the active trainer, the standby), from one reading of both gauges.

    A rebalance (a trainer joining) revokes the partition and hands it back: the active
    trainer's gauge reads 0 for a moment, so the gauges must be read once, together, and
    the roles taken from that reading rather than from a second one.
    """
    a, b = fleet.trainers
    reading: list[float] = []

    def exactly_one() -> bool:
        reading[:] = [a.metric("advrec_trainer_active"), b.metric("advrec_trainer_active")]
        return sorted(reading) == [0, 1]

    wait_for(exactly_one, 60, "exactly one active trainer")
    return (a, b) if reading[0] == 1 else (b, a)


def wait_all_serve_at_least(workers: list[Worker], version: str, timeout: float) -> float:
    """Wait until every worker serves ``version`` or newer; return how long it took."""
    started = time.monotonic()
    wait_for(lambda: all((live(w) or "") >= version for w in workers), timeout,
             f"every worker serving {version} or newer", interval=0.1)
    return time.monotonic() - started


def test_every_worker_serves_what_the_trainer_publishes_within_10s(fleet: Fleet) -> None:
    active, standby = active_trainer(fleet)
    assert standby.metric("advrec_trainer_batches_total") == 0  # standbys do not train
    published = active.metric("advrec_trainer_exports_total", 'outcome="published"')
    wait_for(lambda: active.metric("advrec_trainer_exports_total", 'outcome="published"')
             > published, 60, "a new publish")
    pointer = readyz(fleet.workers[0])["published_version"]
    took = wait_all_serve_at_least(fleet.workers, pointer, 10)
    assert took <= 10
    assert len({live(w) for w in fleet.workers}) == 1 or took < 10  # all on one version
    # a user's recommendation through any worker comes from the model, not the fallback
    users = sorted({f"u{n}" for n in range(200)})
    known = [u for u in users
             if httpx.get(f"{fleet.workers[0].url}/users/{u}", timeout=5).status_code == 200]
    assert len(known) >= 20
    for user in known[:20]:
        for w in fleet.workers:
            body = httpx.get(f"{w.url}/recommendations/{user}", timeout=10).json()
            assert body["fallback"] is False and body["model_version"] and body["items"]
    # the workers never saw the trainer's directories: each rebuilt the bundles itself
    for w in fleet.workers:
        assert live(w) in list_versions(w.bundle_dir)
        assert w.metric("advrec_bundles_assembled_total") >= 1


def test_a_worker_started_later_is_ready_with_the_current_version(fleet: Fleet) -> None:
    wait_for(lambda: len({readyz(w)["published_version"] for w in fleet.workers}) == 1, 30,
             "the workers agree on the pointer")
    current = readyz(fleet.workers[0])["published_version"]
    late = Worker(fleet.names, fleet.tmp, partitions=PARTITIONS, extra_env=WORKER_ENV)
    fleet.workers.append(late)
    started = time.monotonic()
    late.start()
    first_ready = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{late.url}/readyz", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if r.status_code == 200:
            first_ready = r.json()
            break
        body = r.json()
        assert body["model_version"] is None or body["bundle_topic_read"], body
        time.sleep(0.2)
    assert first_ready is not None, late.log_tail()
    # its first 200 already serves the version that was current when it started, or newer
    assert first_ready["model_version"] >= current and first_ready["bundle_topic_read"]
    fleet.state["late_ready_s"] = time.monotonic() - started


def _crc32_partition(key: bytes) -> int:
    """librdkafka's default (consistent_random) for a keyed message: CRC32 of the key."""
    return zlib.crc32(key) % PARTITIONS


def test_events_on_the_wrong_partition_are_dead_lettered_as_such(fleet: Fleet) -> None:
    from advrec.contract import partition_for

    now = int(time.time() * 1000)
    users = [f"crc-user-{n}" for n in range(40)]
    wrong = [u for u in users if _crc32_partition(u.encode()) != partition_for(u.encode(),
                                                                               PARTITIONS)]
    assert len(wrong) >= 10
    w = fleet.workers[0]
    before = sum(x.metric("advrec_events_invalid_total", 'reason="wrong_partition"')
                 for x in fleet.workers)

    async def send_like_librdkafka() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
        await producer.start()
        try:
            for n, user in enumerate(users):
                event = ClickEvent(user, "i1", now + n, id=f"crc-{n}")
                await producer.send_and_wait(fleet.names.clicks, encode_event(event),
                                             key=encode_key(user),
                                             partition=_crc32_partition(user.encode()))
        finally:
            await producer.stop()

    asyncio.run(send_like_librdkafka())
    wait_for(lambda: sum(x.metric("advrec_events_invalid_total", 'reason="wrong_partition"')
                         for x in fleet.workers) - before >= len(wrong), 60,
             "the misplaced events dead-lettered")
    # dead letters are at-least-once: a rebalance (the late worker of the test before may
    # still be joining) redelivers what was not committed, and its letters come again with
    # the same source partition and offset, by which they are told apart
    letters: dict[tuple[int, int], dict] = {}

    def every_misplaced_event_dead_lettered() -> bool:
        for m in consume_all(fleet.names.dlq, len(wrong), timeout=10):
            d = decode_dead_letter(m.value)
            if d["reason"] == "wrong_partition":
                letters[(d["partition"], d["offset"])] = d
        return len(letters) >= len(wrong)

    wait_for(every_misplaced_event_dead_lettered, 60, "one dead letter per misplaced event")
    misplaced = list(letters.values())
    assert sorted(d["key"].decode() for d in misplaced) == sorted(wrong)
    assert all("murmur2" in d["detail"] for d in misplaced)
    dead_lettered = sum(x.metric("advrec_events_invalid_total", 'reason="wrong_partition"')
                        for x in fleet.workers)
    right = [u for u in users if u not in wrong]
    # the ones librdkafka happened to place right are applied: their partitions need not be
    # as far along as the ones whose letters came back (a rebalance may still be settling)
    wait_for(lambda: all(httpx.get(f"{w.url}/users/{user}", timeout=5).status_code == 200
                         for user in right), 60, "the rightly placed events applied")
    for user in wrong:  # ... and the misplaced ones were not, anywhere
        assert httpx.get(f"{w.url}/users/{user}", timeout=5).status_code == 404
    # murmur2 (aiokafka's default, the Java client's) puts none in the dead-letter topic
    send(fleet.names.clicks, [(encode_key(u), encode_event(ClickEvent(u, "i2", now + 99,
                                                                      id=f"m-{u}")))
                              for u in wrong])
    wait_for(lambda: all(httpx.get(f"{w.url}/users/{u}", timeout=5).status_code == 200
                         for u in wrong), 60, "the same users, sent with murmur2, applied")
    assert sum(x.metric("advrec_events_invalid_total", 'reason="wrong_partition"')
               for x in fleet.workers) == dead_lettered


def test_a_rollback_on_one_worker_pins_every_worker(fleet: Fleet) -> None:
    a, *others = fleet.workers
    active, _ = active_trainer(fleet)
    wait_for(lambda: len(httpx.get(f"{a.url}/admin/model", headers=AUTH, timeout=5)
                         .json()["versions"]) >= 3, 60, "a few versions to roll back to")
    r = httpx.post(f"{a.url}/admin/rollback", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    pinned = r.json()["pinned"]
    assert live(a) == pinned
    wait_for(lambda: all(live(w) == pinned for w in others), 10, "every worker on the pin",
             interval=0.2)
    for w in fleet.workers:
        assert readyz(w)["pinned_version"] == pinned
        assert w.metric("advrec_model_pinned") == 1
    pin = httpx.get(f"{others[0].url}/admin/model", headers=AUTH, timeout=5).json()["pin"]
    assert pin["version"] == pinned and a.url.rsplit(":", 1)[1] in pin["by"]
    # the trainer trains on, but publishes nothing live while the pin holds
    wait_for(lambda: active.metric("advrec_trainer_pinned") == 1, 10, "the trainer sees it")
    pointer = readyz(a)["published_version"]
    batches = active.metric("advrec_trainer_batches_total")
    held = active.metric("advrec_trainer_exports_total", 'outcome="pinned"')
    time.sleep(6)  # three export intervals
    assert active.metric("advrec_trainer_batches_total") > batches
    assert active.metric("advrec_trainer_exports_total", 'outcome="pinned"') > held
    assert all(readyz(w)["published_version"] == pointer for w in fleet.workers)
    assert all(live(w) == pinned for w in fleet.workers)
    fleet.state.update(pinned=pinned, pointer=pointer)


def _raw_send(topic: str, records: list[Record]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(topic, value, key=key, partition=0)
        finally:
            await producer.stop()

    asyncio.run(run())


def _bad_versions(scratch: Path) -> dict[str, tuple[str, list[Record]]]:
    """Four versions, each broken on the bundle topic in one way: version -> (reason,
    records). Each is a real bundle whose records were damaged on the way."""
    vocab = [f"i{n}" for n in range(300)]
    out = {}
    for n, reason in enumerate(("corrupt_chunk", "checksum_mismatch", "chunk_gap",
                                "missing_chunks")):
        version = f"9999999999{n:03d}"
        write_bundle(scratch, toy_model(len(vocab), seed=n), vocab,
                     {"max_len": 20, "version": version}, keep=100)
        chunks, manifest = split_version(version, bundle_files(scratch, version),
                                         chunk_bytes=4096)
        if reason == "corrupt_chunk":
            obj = msgpack.unpackb(chunks[2][1], raw=False)
            obj["data"] = bytes(len(obj["data"]))  # zeroed in transit, sha256 left as it was
            chunks[2] = (chunks[2][0], msgpack.packb(obj, use_bin_type=True))
        elif reason == "checksum_mismatch":
            manifest = type(manifest)(version, (
                type(manifest.files[0])(manifest.files[0].name, manifest.files[0].size,
                                        "0" * 64, manifest.files[0].chunks),
                *manifest.files[1:]), manifest.chunks)
        elif reason == "chunk_gap":
            del chunks[1]
        else:
            chunks = []
        out[version] = (reason, [*chunks, (f"manifest/{version}".encode(), manifest.value())])
    return out


def test_bad_records_on_the_bundle_topic_are_refused_by_every_worker(fleet: Fleet) -> None:
    pinned = fleet.state["pinned"]  # the trainer publishes nothing meanwhile: no interleaving
    bad = _bad_versions(fleet.tmp / "bad-scratch")
    counts = {reason: [w.metric("advrec_bundle_chunks_rejected_total", f'reason="{reason}"')
                       for w in fleet.workers] for reason, _ in bad.values()}
    last = list(bad)[-1]
    records = [r for _, recs in bad.values() for r in recs] + [pointer_record(last)]
    _raw_send(fleet.names.bundles, records)
    for reason, before in counts.items():
        wait_for(lambda reason=reason, before=before: all(
            w.metric("advrec_bundle_chunks_rejected_total", f'reason="{reason}"') > b
            for w, b in zip(fleet.workers, before, strict=True)), 20,
            f"{reason} refused on every worker")
    for w in fleet.workers:
        body = readyz(w)
        assert {v: body["rejected"].get(v) for v in bad} == {v: r for v, (r, _) in bad.items()}
        assert body["model_version"] == pinned and body["published_version"] == last
        assert not any(v in list_versions(w.bundle_dir) for v in bad)
        answer = httpx.get(f"{w.url}/recommendations/u1", timeout=10).json()
        assert answer["model_version"] == pinned and not answer["fallback"]


def test_releasing_the_pin_lets_the_next_bundle_go_live_everywhere(fleet: Fleet) -> None:
    pinned = fleet.state["pinned"]
    b = fleet.workers[1]
    r = httpx.delete(f"{b.url}/admin/pin", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["released"] is True, r.text
    # the pointer names a refused version now: every worker keeps its model meanwhile
    for w in fleet.workers:
        assert readyz(w)["pinned_version"] is None
        assert httpx.get(f"{w.url}/recommendations/u1", timeout=10).json()["fallback"] is False
    released = time.monotonic()
    wait_for(lambda: all((live(w) or "") > pinned and not live(w).startswith("9999999999")
                         for w in fleet.workers), 30, "a newer bundle live everywhere")
    fleet.state["unpin_to_live_s"] = time.monotonic() - released
    assert len({live(w) for w in fleet.workers}) <= 2  # one version, or mid-swap to the next


def test_kill_9_of_the_active_trainer_hands_over_to_the_standby(fleet: Fleet) -> None:
    active, standby = active_trainer(fleet)
    idle = standby.metric("advrec_trainer_batches_total")
    wait_for(lambda: active.metric("advrec_trainer_checkpoint_bytes") > 0, 30, "a checkpoint")
    assert standby.metric("advrec_trainer_batches_total") == idle  # a standby does not train
    own = active.env["ADVREC_TRAINER_ID"]
    wait_for(lambda: live_meta(fleet.workers[0]).get("trainer") == own, 30,
             "a bundle of the active trainer live")
    killed_at = time.monotonic()
    active.kill9()
    bundles_a = Path(active.env["ADVREC_BUNDLE_DIR"])
    last = json.loads((bundles_a / list_versions(bundles_a)[-1] / "meta.json").read_text())
    wait_for(lambda: standby.metric("advrec_trainer_active") == 1, 60, "the standby active")
    assert standby.metric("advrec_trainer_takeovers_total") == 1
    resumed = standby.metric("advrec_trainer_resumed_offset")
    assert resumed > 0  # not from the start of train-batches ...
    bundles_b = Path(standby.env["ADVREC_BUNDLE_DIR"])
    wait_for(lambda: bool(list_versions(bundles_b)), 60, "the standby's first bundle")
    took = time.monotonic() - killed_at
    first = json.loads((bundles_b / list_versions(bundles_b)[0] / "meta.json").read_text())
    # ... nor from an empty model: it had seen what the checkpoint had
    assert first["examples_seen"] >= 0.5 * last["examples_seen"] > 0
    hr_last = last["metrics"]["window_hr_at_10"]
    hr_first = first["metrics"]["window_hr_at_10"]
    assert hr_first >= hr_last - 0.15, (hr_first, hr_last)  # within noise of the last one
    wait_all_serve_at_least(fleet.workers, list_versions(bundles_b)[0], 30)
    assert all(live_meta(w).get("trainer") == standby.env["ADVREC_TRAINER_ID"]
               for w in fleet.workers)
    fleet.state["takeover_s"] = took
    print(f"\nfleet: late worker ready in {fleet.state.get('late_ready_s', 0):.1f}s, unpin -> "
          f"live {fleet.state.get('unpin_to_live_s', 0):.1f}s, kill -9 -> standby's first "
          f"bundle {took:.1f}s (HR@10 {hr_last:.3f} -> {hr_first:.3f})")
