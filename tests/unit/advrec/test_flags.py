"""The flags topic's record format and the book every reader keeps."""

from __future__ import annotations

import msgpack
import pytest

from advrec.flags import FLAGGED, READMITTED, FlagBook, FlagError, FlagRecord


def test_a_flag_record_round_trips_with_its_score_and_reasons() -> None:
    rec = FlagRecord(user="u1", state=FLAGGED, at_ms=5, by="trainer-a", p_fake=0.9995,
                     reasons=(("burst", 3.2), ("coherence", 1.1)), rounds=7)
    back = FlagRecord.decode(rec.key, rec.value)
    assert back == rec
    assert back.as_json()["reasons"][0] == {"feature": "burst", "term": 3.2}


@pytest.mark.parametrize(("key", "value", "why"), [
    (None, FlagRecord("u", FLAGGED).value, "without a key"),
    (b"u", b"\xc1", "undecodable"),
    (b"u", msgpack.packb({"v": 2, "state": FLAGGED, "at_ms": 1}), "not a version 1"),
    (b"u", msgpack.packb({"v": 1, "state": "maybe", "at_ms": 1}), "is not 'flagged'"),
    (b"u", msgpack.packb({"v": 1, "state": FLAGGED}), "bad flag record"),
])
def test_a_bad_record_is_refused_with_its_reason(key, value, why) -> None:
    with pytest.raises(FlagError, match=why):
        FlagRecord.decode(key, value)


def test_the_book_keeps_the_latest_record_per_user_and_counts_bad_ones() -> None:
    book = FlagBook()
    book.apply_raw(b"a", FlagRecord("a", FLAGGED, p_fake=0.99).value)
    book.apply_raw(b"b", FlagRecord("b", FLAGGED, p_fake=0.9999).value)
    book.apply_raw(b"c", FlagRecord("c", FLAGGED, p_fake=0.995).value)
    assert [r.user for r in book.flagged()] == ["b", "c", "a"]  # the highest score first
    assert book.n_flagged == 3
    book.apply_raw(b"b", FlagRecord("b", READMITTED, by="admin", note="a regular").value)
    assert [r.user for r in book.flagged()] == ["c", "a"]
    assert book.get("b").state == READMITTED and book.get("b").note == "a regular"
    assert book.n_flagged == 2
    book.apply_raw(b"c", None)  # a tombstone forgets the user
    assert book.get("c") is None and book.n_flagged == 1
    assert book.apply_raw(b"d", b"junk") is None and book.bad == 1
