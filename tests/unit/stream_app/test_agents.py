"""The agents' pieces one at a time, over a small stand-in for the stream app: cutting
training batches, reporting consumer lag, checking catalogue records."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from advrec.catalogue import CatalogueItem, encode_item, item_key
from advrec.contract import TrainingExample, decode_batch, decode_dead_letter
from stream_app.agents import StreamGauges, TrainBatcher, check_catalogue_batch
from stream_app.metrics import StreamMetrics
from stream_app.settings import load_settings


class Topic:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append((key, value))


def stand_in(**env: str) -> SimpleNamespace:
    return SimpleNamespace(settings=load_settings(env), metrics=StreamMetrics.create(),
                           train_batches=Topic())


def examples(n: int, start: int = 0) -> list[TrainingExample]:
    return [TrainingExample(f"u{i}", ("a",), f"i{i}", 1_000 + i) for i in range(start, start + n)]


async def test_full_batches_go_at_once_and_the_rest_waits() -> None:
    sa = stand_in(ADVREC_TRAIN_BATCH_SIZE="4", ADVREC_TRAIN_BATCH_S="60")
    batcher = TrainBatcher(sa)  # type: ignore[arg-type]
    await batcher.add(examples(10))
    sizes = [len(decode_batch(v)) for _, v in sa.train_batches.sent]
    assert sizes == [4, 4] and len(batcher.pending) == 2
    await batcher.flush_if_stale()  # not stale yet
    assert len(sa.train_batches.sent) == 2
    assert sa.metrics.registry.get_sample_value("advrec_train_examples_total") == 8


async def test_a_partial_batch_goes_once_its_oldest_example_waited_long_enough() -> None:
    sa = stand_in(ADVREC_TRAIN_BATCH_SIZE="100", ADVREC_TRAIN_BATCH_S="0.05")
    batcher = TrainBatcher(sa)  # type: ignore[arg-type]
    await batcher.add(examples(3))
    assert sa.train_batches.sent == []
    time.sleep(0.06)
    await batcher.flush_if_stale()
    (key, value), = sa.train_batches.sent
    assert key == b"batch" and [e.item for e in decode_batch(value)] == ["i0", "i1", "i2"]
    assert batcher.pending == []
    assert sa.metrics.registry.get_sample_value("advrec_train_batches_sent_total") == 1


async def test_examples_added_after_a_wait_go_with_the_stale_ones() -> None:
    sa = stand_in(ADVREC_TRAIN_BATCH_SIZE="100", ADVREC_TRAIN_BATCH_S="0.05")
    batcher = TrainBatcher(sa)  # type: ignore[arg-type]
    await batcher.add(examples(2))
    time.sleep(0.06)
    await batcher.add(examples(2, start=2))  # the oldest has waited: all four go
    assert [len(decode_batch(v)) for _, v in sa.train_batches.sent] == [4]


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


class Consumer:
    def __init__(self, assigned: dict[TP, tuple[int | None, int | None]]) -> None:
        self.assigned = assigned  # tp -> (highwater, last offset read)
        self._read_offset = {tp: read for tp, (_, read) in assigned.items() if read is not None}

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def highwater(self, tp: TP) -> int | None:
        return self.assigned[tp][0]


def lag(metrics: StreamMetrics, partition: int) -> Any:
    return metrics.registry.get_sample_value(
        "advrec_consumer_lag_messages", {"topic": "clicks", "partition": str(partition)})


def test_lag_is_reported_per_owned_clicks_partition_and_dropped_when_revoked() -> None:
    sa = SimpleNamespace(settings=load_settings({}), metrics=StreamMetrics.create())
    gauges = StreamGauges(sa, keys=None)  # type: ignore[arg-type]
    gauges.report_lag(Consumer({TP("clicks", 0): (100, 89), TP("clicks", 1): (50, None),
                                TP("clicks", 2): (None, None),
                                TP("train-batches", 0): (9, 1)}))
    assert lag(sa.metrics, 0) == 10 and lag(sa.metrics, 1) == 50
    assert lag(sa.metrics, 2) is None  # nothing fetched yet: no figure rather than a wrong one
    gauges.report_lag(Consumer({TP("clicks", 1): (60, 59)}))  # partition 0 moved away
    assert lag(sa.metrics, 0) is None and lag(sa.metrics, 1) == 0


def record(value: bytes | None, key: bytes, offset: int) -> SimpleNamespace:
    return SimpleNamespace(value=value, message=SimpleNamespace(
        key=key, topic="items", partition=0, offset=offset))


async def test_catalogue_records_are_counted_and_bad_ones_dead_lettered_with_reason() -> None:
    sa = SimpleNamespace(metrics=StreamMetrics.create(), items_dlq=Topic())
    good = encode_item(CatalogueItem("1", "Toy Story (1995)", categories=("Comedy",)))
    untitled = b"\x81\xa4item\xa12"  # {"item": "2"}
    await check_catalogue_batch(sa, [  # type: ignore[arg-type]
        record(good, item_key("1"), 0), record(untitled, b"2", 1),
        record(None, b"3", 2), record(good, b"not-1", 3)])
    letters = [decode_dead_letter(v) for _, v in sa.items_dlq.sent]
    assert [(d["reason"], d["original"], d["key"], d["topic"], d["offset"]) for d in letters] == [
        ("missing_field", untitled, b"2", "items", 1), ("key_mismatch", good, b"not-1", "items", 3)]
    assert [k for k, _ in sa.items_dlq.sent] == [b"2", b"not-1"]

    def count(name: str, **labels: str) -> float | None:
        return sa.metrics.registry.get_sample_value(name, labels)

    assert count("advrec_catalogue_items_total", outcome="ok") == 1
    assert count("advrec_catalogue_items_total", outcome="dead_letter") == 2
    assert count("advrec_catalogue_items_total", outcome="deleted") == 1
    assert count("advrec_catalogue_items_invalid_total", reason="missing_field") == 1
    assert count("advrec_catalogue_items_invalid_total", reason="bad_title") == 0
