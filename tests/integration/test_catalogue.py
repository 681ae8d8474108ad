"""Catalogue records against the real broker: the worker dead-letters exactly the bad ones,
with their reason and original bytes, and counts every record."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from advrec.catalogue import CatalogueItem, encode_item, item_key
from advrec.contract import decode_dead_letter
from tests.integration.conftest import Names, Worker, consume_all, send, wait_for

pytestmark = pytest.mark.kafka


def test_bad_catalogue_records_go_to_items_dlq_with_their_reason_and_all_are_counted(
        kafka: str, names: Names, tmp_path: Path, workers: list[Worker]) -> None:
    worker = Worker(names, tmp_path)
    workers.append(worker)
    worker.start().wait_ready()
    now = int(time.time() * 1000)
    good = [CatalogueItem("1", "Toy Story (1995)", categories=("Animation", "Comedy")),
            CatalogueItem("sku-7", "Red shoe", text="Leather.", created=now - 60_000)]
    bad = [  # (reason, key, value)
        ("missing_field", b"2", msgpack.packb({"item": "2", "text": "no title"})),
        ("bad_type", b"3", msgpack.packb({"item": "3", "title": "t", "categories": "a|b"})),
        ("bad_title", b"4", msgpack.packb({"item": "4", "title": "   "})),
        ("bad_created", b"5", msgpack.packb({"item": "5", "title": "t",
                                             "created": now + 3 * 24 * 3600 * 1000})),
        ("key_mismatch", b'"6"', encode_item(CatalogueItem("6", "JSON key"))),
        ("not_msgpack", b"7", b"\xc1 not msgpack"),
    ]
    records = [(item_key(i.item), encode_item(i)) for i in good]
    records += [(key, value) for _, key, value in bad]
    records.append((item_key("8"), None))  # a tombstone: item 8 leaves the catalogue
    send(names.items, records)  # type: ignore[arg-type]  # a tombstone's value is None

    wait_for(lambda: worker.metric("advrec_catalogue_items_total") >= len(records), timeout=60,
             what="every catalogue record checked")
    letters = [decode_dead_letter(m.value) for m in consume_all(names.items_dlq, len(bad))]
    assert Counter((d["reason"], d["key"], d["original"]) for d in letters) == Counter(bad)
    assert all(d["topic"] == names.items and d["detail"] for d in letters)
    assert worker.metric("advrec_catalogue_items_total", 'outcome="ok"') == len(good)
    assert worker.metric("advrec_catalogue_items_total", 'outcome="dead_letter"') == len(bad)
    assert worker.metric("advrec_catalogue_items_total", 'outcome="deleted"') == 1
    for reason, n in Counter(reason for reason, _, _ in bad).items():
        assert worker.metric("advrec_catalogue_items_invalid_total", f'reason="{reason}"') == n
    assert "dead-lettered: missing_field" in worker.log_text()
    assert worker.metric("advrec_events_invalid_total") == 0  # clicks untouched
