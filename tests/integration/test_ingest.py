"""Ingestion against the real broker: state equals a plain-Python reference, DLQ is exact."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from advrec.contract import decode_dead_letter, encode_event, encode_key
from tests.datasets import MOVIELENS_SLICE
from tests.integration.conftest import (
    Names,
    Worker,
    consume_all,
    send,
    wait_for,
)
from tests.integration.reference import Stream, assert_states_match, fetch_states, states_match

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def ingested(kafka: str, tmp_path_factory: pytest.TempPathFactory):
    names = Names()
    tmp = tmp_path_factory.mktemp("ingest")
    worker = Worker(names, tmp).start()
    try:
        worker.wait_ready()
        stream = Stream()
        send(names.clicks, stream.payloads)
        wait_for(lambda: worker.metric("advrec_events_consumed_total") >= len(stream.payloads),
                 timeout=300, what="all events consumed")
        yield worker, names, stream
    finally:
        worker.stop()


def test_user_state_equals_reference_of_valid_events(ingested) -> None:
    worker, _names, stream = ingested
    assert worker.metric("advrec_events_consumed_total") == len(stream.payloads)
    assert_states_match(worker, stream.reference)
    r = httpx.get(f"{worker.url}/users/nobody-here", timeout=5)
    assert r.status_code == 404


def test_dead_letter_topic_holds_exactly_the_malformed_events(ingested) -> None:
    worker, names, stream = ingested
    letters = [decode_dead_letter(m.value) for m in consume_all(names.dlq, len(stream.bad))]
    assert len(letters) == len(stream.bad)
    assert Counter((d["original"], d["reason"]) for d in letters) == Counter(stream.bad)
    by_reason = Counter(reason for _raw, reason in stream.bad)
    for reason, n in by_reason.items():
        assert worker.metric("advrec_events_invalid_total", f'reason="{reason}"') == n
    assert worker.metric("advrec_dlq_writes_total") == len(stream.bad)


def test_redelivered_events_change_no_state(ingested) -> None:
    worker, names, stream = ingested
    before = worker.metric("advrec_events_consumed_total")
    again = random.Random(1).sample(stream.valid, 1000)
    send(names.clicks, [(encode_key(e.user), encode_event(e)) for e in again])
    wait_for(lambda: worker.metric("advrec_events_consumed_total") >= before + 1000,
             timeout=120, what="redelivered events consumed")
    assert worker.metric("advrec_events_duplicate_total") == 1000
    assert_states_match(worker, stream.reference)


def restart_and_match(second: Worker, workers: list, producer: threading.Thread,
                      stream: Stream, when: str) -> None:
    """Start the worker that replaces a killed one, let the producer finish, and wait until
    its state equals the reference of the stream's valid events."""
    workers.append(second)
    second.start().wait_ready()
    producer.join()
    wait_for(lambda: states_match(second, stream.reference), timeout=300,
             what=f"state equal to the reference {when}", interval=3)
    assert_states_match(second, stream.reference)


def test_kill_9_mid_stream_recovers_state_from_changelog(kafka: str, names: Names,
                                                          tmp_path: Path, workers) -> None:
    stream = Stream(n=20_000, bad_fraction=0.0, seed=11)
    first = Worker(names, tmp_path)
    workers.append(first)
    first.start().wait_ready()
    producer = threading.Thread(target=send, args=(names.clicks, stream.payloads, 2500.0))
    producer.start()
    wait_for(lambda: first.metric("advrec_events_consumed_total") >= 5000, timeout=120,
             what="5000 events consumed before the kill")
    first.kill9()
    # a fresh table directory: the restarted worker can only get state from the changelog
    second = Worker(names, tmp_path, port=first.port, data_dir=tmp_path / "fresh-tables")
    restart_and_match(second, workers, producer, stream, "after recovery")


def test_two_workers_answer_every_user_from_its_owner(kafka: str, names: Names,
                                                       tmp_path: Path, workers) -> None:
    a = Worker(names, tmp_path, partitions=4)
    b = Worker(names, tmp_path, partitions=4)
    workers.extend([a, b])
    a.start().wait_ready()
    b.start().wait_ready()
    stream = Stream(n=5000, bad_fraction=0.0, seed=3)
    send(names.clicks, stream.payloads)
    wait_for(lambda: a.metric("advrec_events_consumed_total")
             + b.metric("advrec_events_consumed_total") >= len(stream.payloads),
             timeout=180, what="both workers consumed the stream")
    assert a.metric("advrec_events_consumed_total") > 0
    assert b.metric("advrec_events_consumed_total") > 0
    users = sorted(stream.reference)
    via_a, via_b = fetch_states(a, users), fetch_states(b, users)
    owners = Counter()
    for user in users:
        assert via_a[user] == via_b[user], user  # same answer whoever is asked
        owners[via_a[user]["served_by"]["port"]] += 1
        ref = stream.reference[user]
        assert via_a[user]["history"] == ref["history"] and via_a[user]["count"] == ref["count"]
    assert set(owners) == {a.port, b.port}, owners  # both own some partitions


def test_replay_of_movielens_is_consumed_in_full(kafka: str, names: Names, tmp_path: Path,
                                                  workers) -> None:
    import subprocess
    import sys

    from advrec.datasets import count_events

    ratings = MOVIELENS_SLICE  # real ratings shipped with the tests (tests/data/README.md)
    expected = count_events("movielens", ratings)
    with open(ratings) as fh:
        assert expected == sum(1 for _ in fh) - 1  # one event per data row
    worker = Worker(names, tmp_path)
    workers.append(worker)
    worker.start().wait_ready()
    res = subprocess.run([sys.executable, "-m", "advrec.cli", "replay", "movielens",
                          str(ratings), "--topic", names.clicks, "--no-progress",
                          "--bootstrap", kafka], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"sent {expected} events" in res.stdout
    wait_for(lambda: worker.metric("advrec_events_consumed_total") >= expected, timeout=400,
             what="all ratings consumed", interval=2)
    assert worker.metric("advrec_events_consumed_total") == expected
    assert worker.metric("advrec_events_invalid_total") == 0


def test_kill_9_between_flushes_restarting_on_its_own_tables_applies_each_event_once(
        kafka: str, names: Names, tmp_path: Path, workers) -> None:
    """Write-behind: the states changed since the last flush die with the process, and so
    do the acks of their events; the restarted worker (same RocksDB directory) reads those
    events again from the last commit and applies each once."""
    stream = Stream(n=20_000, bad_fraction=0.0, seed=13)
    env = {"ADVREC_STATE_FLUSH_S": "3"}  # wide enough to kill between two flushes
    first = Worker(names, tmp_path, extra_env=env)
    workers.append(first)
    first.start().wait_ready()
    producer = threading.Thread(target=send, args=(names.clicks, stream.payloads, 2000.0))
    producer.start()
    wait_for(lambda: first.metric("advrec_state_flushed_users_total") > 0
             and first.metric("advrec_events_consumed_total") >= 6000, timeout=120,
             what="a flush behind, events ahead of the next")
    first.kill9()
    second = Worker(names, tmp_path, port=first.port, data_dir=first.data_dir, extra_env=env)
    restart_and_match(second, workers, producer, stream, "after the restart")


def test_a_small_state_budget_evicts_and_state_stays_exact(kafka: str, names: Names,
                                                           tmp_path: Path, workers) -> None:
    worker = Worker(names, tmp_path, extra_env={"ADVREC_STATE_CACHE_MB": "1",
                                                "ADVREC_STATE_FLUSH_S": "0.5"})
    workers.append(worker)
    worker.start().wait_ready()
    stream = Stream(n=30_000, bad_fraction=0.0, seed=17)
    send(names.clicks, stream.payloads)
    wait_for(lambda: worker.metric("advrec_events_consumed_total") >= len(stream.payloads),
             timeout=300, what="all events consumed")
    wait_for(lambda: worker.metric("advrec_state_cache_bytes") > 0, 30, "a flush reported")
    # 1,000 users at ~1.7 KB each estimated do not fit in 1 MiB: some left and came back
    assert worker.metric("advrec_state_cached_users") < len(stream.reference)
    assert worker.metric("advrec_state_cache_bytes") <= 1024 * 1024
    assert_states_match(worker, stream.reference)


def test_envelopes_apply_their_good_events_and_dead_letter_their_bad_ones(
        kafka: str, names: Names, tmp_path: Path, workers) -> None:
    import msgpack

    from advrec.contract import ClickEvent
    from advrec.replay import as_envelopes
    from tests.integration.reference import reference_state

    worker = Worker(names, tmp_path)
    workers.append(worker)
    worker.start().wait_ready()
    stream = Stream(n=6000, bad_fraction=0.0, seed=19)
    payloads, spoiled, kept = [], set(), []
    for n, ((key, value), _) in enumerate(as_envelopes(stream.valid, size=7, window=300)):
        obj = msgpack.unpackb(value, raw=False)
        if n % 10 == 3:  # one event of every tenth envelope loses its ts
            del obj["events"][0]["ts"]
            spoiled.add((key, msgpack.packb({**obj["events"][0], "user": key.decode()})))
        kept += [ClickEvent(key.decode(), e["item"], e["ts"], type=e.get("type", "click"),
                            session=e.get("session"), id=e.get("id"))
                 for e in obj["events"] if "ts" in e]
        payloads.append((key, msgpack.packb(obj)))
    send(names.clicks, payloads)
    total = len(stream.valid)
    wait_for(lambda: worker.metric("advrec_events_consumed_total") >= total, 120,
             "every event of every envelope consumed")
    assert worker.metric("advrec_events_consumed_total") == total
    assert worker.metric("advrec_events_invalid_total", 'reason="missing_field"') == len(spoiled)
    letters = [decode_dead_letter(m.value) for m in consume_all(names.dlq, len(spoiled))]
    assert {(d["key"], d["original"]) for d in letters} == spoiled
    assert all(d["index"] == 0 and d["reason"] == "missing_field" for d in letters)
    assert_states_match(worker, reference_state(kept))
