"""Ingestion against the real broker: state equals a plain-Python reference, DLQ is exact."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from advrec.contract import decode_dead_letter, encode_event, encode_key
from tests.integration.conftest import (
    SHARED_DATA,
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
    workers.append(second)
    second.start().wait_ready()
    producer.join()
    wait_for(lambda: states_match(second, stream.reference), timeout=300,
             what="state equal to the reference after recovery", interval=3)
    assert_states_match(second, stream.reference)


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

    ratings = SHARED_DATA / "ml-latest-small" / "ratings.csv"
    if not ratings.exists():
        pytest.skip(f"{ratings} is not present on this machine")
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
