"""``advrec replay`` without a broker: how a catalogue merges into the click stream, and that
a replay without one sends what it always sent."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import msgpack
import pytest

from advrec import replay
from advrec.catalogue import CatalogueItem, decode_item, encode_item, item_key
from advrec.contract import ClickEvent, decode_message
from advrec.datasets import read_movielens
from advrec.replay import (
    Record,
    ReplayStats,
    as_envelopes,
    as_payloads,
    as_records,
    interleave,
)
from advrec.synthetic import SyntheticConfig, synthetic_events
from tests.datasets import MOVIELENS_MOVIES_SLICE, MOVIELENS_SLICE

T0 = 1_700_000_000_000


def clicks(*times: int) -> list[ClickEvent]:
    return [ClickEvent(f"u{n % 2}", f"i{n}", T0 + ts) for n, ts in enumerate(times)]


def names(stream: Iterable[CatalogueItem | ClickEvent]) -> list[str]:
    return [x.item if isinstance(x, CatalogueItem) else f"@{x.ts - T0}" for x in stream]


def test_interleave_puts_each_item_before_the_first_click_at_or_after_its_creation() -> None:
    items = [CatalogueItem("late", "t", created=T0 + 25),
             CatalogueItem("old", "t"),
             CatalogueItem("tie", "t", created=T0 + 20),
             CatalogueItem("first", "t", created=T0 - 5),
             CatalogueItem("after", "t", created=T0 + 99),
             CatalogueItem("also-old", "t")]
    out = names(interleave(items, clicks(0, 10, 20, 20, 30)))
    assert out == ["old", "also-old", "first", "@0", "@10", "tie", "@20", "@20", "late", "@30",
                   "after"]


def test_interleave_keeps_catalogue_order_among_equal_times_and_every_entry_once() -> None:
    items = [CatalogueItem(f"c{k}", "t", created=T0 + 10) for k in range(3)]
    events = clicks(0, 10)
    out = list(interleave(items, events))
    assert names(out) == ["@0", "c0", "c1", "c2", "@10"]
    assert list(interleave([], events)) == events
    assert names(interleave(items, [])) == ["c0", "c1", "c2"]


def topics_in_order(records: Iterable[tuple[Record, int]]) -> list[str]:
    out = []
    for (topic, key, value), _ in records:
        if topic == "items":
            out.append(decode_item(value, key).item)
        else:
            out += [f"@{e.ts - T0}" for e in decode_message(value, key, now_ms=T0)]
    return out


def test_as_records_sends_items_to_their_topic_keyed_by_item_id_in_stream_order() -> None:
    toy = CatalogueItem("1", "Toy Story (1995)", created=T0 + 5)
    stream = list(interleave([toy, CatalogueItem("2", "Jumanji")], clicks(0, 10)))
    records = list(as_records(stream, clicks_topic="clicks", items_topic="items"))
    assert [(topic, n) for (topic, _, _), n in records] == [
        ("items", 0), ("clicks", 1), ("items", 0), ("clicks", 1)]
    (_, key, value), _ = records[2]
    assert key == item_key("1") and value == encode_item(toy)
    assert topics_in_order(records) == ["2", "@0", "1", "@10"]


def test_as_records_sends_an_item_before_every_envelope_holding_a_later_click() -> None:
    events = clicks(*range(0, 100, 10))  # two users, alternating
    items = [CatalogueItem(f"c{k}", "t", created=T0 + k * 10 + 5) for k in range(10)]
    records = list(as_records(interleave(items, events), clicks_topic="clicks",
                              items_topic="items", envelope=3))
    assert sum(n for _, n in records) == len(events)
    assert sum(topic == "items" for (topic, _, _), _ in records) == len(items)
    order = topics_in_order(records)
    for k in range(10):  # c_k precedes every click after it in the stream (ts > 10k + 5)
        assert all(order.index(f"c{k}") < order.index(f"@{ts}")
                   for ts in range(0, 100, 10) if ts > k * 10 + 5)


def test_as_records_without_items_sends_what_as_payloads_and_as_envelopes_send() -> None:
    events = list(synthetic_events(SyntheticConfig(n_users=20, n_items=50, seed=1), 300))
    plain = [(("clicks", k, v), 1) for k, v in as_payloads(events)]
    assert list(as_records(events, clicks_topic="clicks", items_topic="items")) == plain
    packed = [(("clicks", k, v), n) for (k, v), n in as_envelopes(events, 7)]
    assert list(as_records(events, clicks_topic="clicks", items_topic="items",
                           envelope=7)) == packed


class Sent:
    """Stands in for the Kafka producer of ``run``: keeps what it was given, sends nothing."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.options: dict[str, object] = {}

    async def __call__(self, bootstrap: str, records: Iterable[Record],
                       **options: object) -> ReplayStats:
        self.records = list(records)
        self.options = options
        stats = ReplayStats(sent=len(self.records), seconds=1.0)
        stats.sent_to.update(topic for topic, _, _ in self.records)
        return stats


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    for name in list(os.environ):
        if name.startswith("ADVREC_"):
            monkeypatch.delenv(name)
    fake = Sent()
    monkeypatch.setattr(replay, "produce_records", fake)
    return fake


def test_replay_without_a_catalogue_sends_the_clicks_it_always_sent(
        sent: Sent, capsys: pytest.CaptureFixture[str]) -> None:
    assert replay.main(["movielens", str(MOVIELENS_SLICE), "--limit", "200",
                        "--no-progress"]) == 0
    events = read_movielens(MOVIELENS_SLICE)[:200]
    assert sent.records == [("clicks", k, v) for k, v in as_payloads(events)]
    assert sent.options["total"] == 200 and sent.options["desc"] == "replay -> clicks"
    out = capsys.readouterr().out
    assert out == ("sent 200 events to clicks on 127.0.0.1:9092 in 1.0 s (200/s); "
                   "failed 0\n")


def test_replay_with_movies_publishes_the_catalogue_first_and_says_how_many(
        sent: Sent, capsys: pytest.CaptureFixture[str]) -> None:
    assert replay.main(["synthetic", "--limit", "50", "--no-progress",
                        "--catalogue", str(MOVIELENS_MOVIES_SLICE)]) == 0
    topics = [topic for topic, _, _ in sent.records]
    assert topics == ["items"] * 546 + ["clicks"] * 50  # no created times: all first
    assert sent.options["paced"] == "clicks" and sent.options["total"] == 596
    out = capsys.readouterr().out
    assert "sent 50 events to clicks" in out and "published 546 catalogue items to items" in out


def test_replay_catalogue_only_sends_no_clicks(sent: Sent, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shop.csv"
    path.write_text("sku,name,added\na1,Red shoe,1700000000\na2,Blue hat,\n")
    assert replay.main(["--catalogue", str(path), "--catalogue-only", "--catalogue-id", "sku",
                        "--catalogue-title", "name", "--catalogue-created", "added",
                        "--items-topic", "shop-items", "--no-progress"]) == 0
    assert [(t, k) for t, k, _ in sent.records] == [("shop-items", b"a2"), ("shop-items", b"a1")]
    assert msgpack.unpackb(sent.records[1][2])["created"] == 1_700_000_000_000
    assert capsys.readouterr().out.startswith("published 2 catalogue items to shop-items")


@pytest.mark.parametrize("argv", [
    [],
    ["--catalogue-only"],
    ["synthetic", "--catalogue", "shop.csv"],  # csv without id and title columns
    ["synthetic", "--catalogue", "movies.csv", "--catalogue-only"],
])
def test_replay_refuses_incomplete_source_flags(sent: Sent, argv: list[str]) -> None:
    assert replay.main(argv) == 2
    assert sent.records == []
