"""The channel format: records in order rebuild a version; anything else is refused by reason."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import pytest

from advrec.channel import (
    REJECT_REASONS,
    Assembled,
    Assembler,
    ChannelError,
    Manifest,
    Pin,
    Pointer,
    Record,
    Rejected,
    TopicView,
    decode_record,
    pin_record,
    pointer_record,
    split_version,
    tombstones,
)
from tests.bundles import count_fsyncs

FILES = [("model.onnx", bytes(range(256)) * 40), ("vocab.json", b'["a", "b"]'),
         ("meta.json", b"{}")]


def records_of(version: str, files: list[tuple[str, bytes]] = FILES, *,
               chunk_bytes: int = 1000) -> tuple[list[Record], Manifest]:
    chunks, manifest = split_version(version, files, chunk_bytes=chunk_bytes, meta={"n": 1})
    return chunks, manifest


def feed_all(root: Path, records: list[Record]) -> tuple[list, TopicView]:
    """Apply records in order through a view and an assembler, as a reader does."""
    view, assembler, events = TopicView(), Assembler(root), []
    for offset, (key, value) in enumerate(records):
        try:
            rec = view.apply(key, value, offset)
        except ChannelError as exc:
            events.append(Rejected(getattr(exc, "version", None), exc.reason, exc.detail))
            continue
        events.extend(assembler.feed(rec))
    return events, view


def reasons(events: list) -> list[str]:
    return [e.reason for e in events if isinstance(e, Rejected)]


def test_a_version_in_order_is_rebuilt_byte_for_byte(tmp_path: Path) -> None:
    chunks, manifest = records_of("0001")
    assert len(chunks) == 11 + 1 + 1 == manifest.chunks  # 10,240 bytes in 1,000-byte chunks
    events, view = feed_all(tmp_path, [*chunks, (b"manifest/0001", manifest.value()),
                                       pointer_record("0001")])
    (done,) = events
    assert isinstance(done, Assembled) and done.path == tmp_path / "0001"
    for name, data in FILES:
        assert (done.path / name).read_bytes() == data
    assert view.versions() == ["0001"] and view.target == "0001"
    assert done.manifest.meta == {"n": 1} and done.manifest.size == sum(len(d) for _, d in FILES)
    assert not list(tmp_path.glob(".incoming-*"))


@pytest.mark.parametrize("sync", [True, False])
def test_a_reader_fsyncs_what_it_rebuilds_unless_it_keeps_a_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool) -> None:
    synced = count_fsyncs(monkeypatch)
    chunks, manifest = records_of("0001")
    view, assembler = TopicView(), Assembler(tmp_path, sync=sync)
    events = []
    for offset, (key, value) in enumerate([*chunks, (b"manifest/0001", manifest.value())]):
        events.extend(assembler.feed(view.apply(key, value, offset)))
    (done,) = events
    assert isinstance(done, Assembled)
    assert [(name, (done.path / name).read_bytes()) for name, _ in FILES] == FILES
    # each file, the version's directory and the root when durable; nothing for a cache
    assert len(synced) == (len(FILES) + 2 if sync else 0)


def test_an_empty_file_travels_as_one_empty_chunk(tmp_path: Path) -> None:
    chunks, manifest = records_of("e1", [("empty", b""), ("x", b"x")])
    assert manifest.chunks == 2
    (done,) = feed_all(tmp_path, [*chunks, (b"manifest/e1", manifest.value())])[0]
    assert (done.path / "empty").read_bytes() == b""


def test_a_corrupt_chunk_rejects_the_version(tmp_path: Path) -> None:
    chunks, manifest = records_of("0002")
    key, value = chunks[3]
    obj = msgpack.unpackb(value, raw=False)
    obj["data"] = b"X" + obj["data"][1:]  # one byte flipped in transit or on disk
    chunks[3] = (key, msgpack.packb(obj, use_bin_type=True))
    events, _ = feed_all(tmp_path, [*chunks, (b"manifest/0002", manifest.value())])
    assert reasons(events)[0] == "corrupt_chunk"
    assert not any(isinstance(e, Assembled) for e in events)
    assert not (tmp_path / "0002").exists()


def test_an_undecodable_chunk_is_corrupt(tmp_path: Path) -> None:
    chunks, manifest = records_of("0003")
    chunks[0] = (chunks[0][0], b"\xc1not msgpack")
    events, _ = feed_all(tmp_path, [*chunks, (b"manifest/0003", manifest.value())])
    assert reasons(events)[0] == "corrupt_chunk" and events[0].version == "0003"
    assert not (tmp_path / "0003").exists()


def test_a_missing_chunk_is_a_gap(tmp_path: Path) -> None:
    chunks, manifest = records_of("0004")
    del chunks[5]
    events, _ = feed_all(tmp_path, [*chunks, (b"manifest/0004", manifest.value())])
    assert reasons(events) == ["chunk_gap"]
    assert not (tmp_path / "0004").exists()


def test_reordered_chunks_are_a_gap(tmp_path: Path) -> None:
    chunks, manifest = records_of("0005")
    chunks[2], chunks[3] = chunks[3], chunks[2]
    events, _ = feed_all(tmp_path, [*chunks, (b"manifest/0005", manifest.value())])
    assert reasons(events) == ["chunk_gap"]


def test_an_identical_duplicate_is_dropped_and_a_different_one_rejects(tmp_path: Path) -> None:
    chunks, manifest = records_of("0006")
    retried = [*chunks[:4], chunks[3], *chunks[4:], (b"manifest/0006", manifest.value())]
    events, _ = feed_all(tmp_path / "a", retried)
    assert [(type(e).__name__, getattr(e, "fatal", None)) for e in events] == [
        ("Rejected", False), ("Assembled", None)]  # counted, and the version is whole

    other, _ = records_of("0006", [("model.onnx", b"Y" * 10240), *FILES[1:]])
    conflicting = [*chunks[:4], other[3], *chunks[4:], (b"manifest/0006", manifest.value())]
    events, _ = feed_all(tmp_path / "b", conflicting)
    assert reasons(events) == ["duplicate_chunk"] and events[0].fatal


def test_a_manifest_whose_chunks_never_came_is_rejected(tmp_path: Path) -> None:
    _, manifest = records_of("0007")
    events, _view = feed_all(tmp_path, [(b"manifest/0007", manifest.value())])
    assert reasons(events) == ["missing_chunks"]
    chunks, manifest = records_of("0008")
    events, _ = feed_all(tmp_path, [*chunks[:-2], (b"manifest/0008", manifest.value())])
    assert reasons(events) == ["missing_chunks"]


def test_a_wrong_checksum_in_the_manifest_is_a_checksum_mismatch(tmp_path: Path) -> None:
    chunks, manifest = records_of("0009")
    wrong = Manifest(manifest.version, (manifest.files[0].__class__(
        "model.onnx", manifest.files[0].size, hashlib.sha256(b"other").hexdigest(),
        manifest.files[0].chunks), *manifest.files[1:]), manifest.chunks)
    events, _ = feed_all(tmp_path, [*chunks, (b"manifest/0009", wrong.value())])
    assert reasons(events) == ["checksum_mismatch"]
    assert not (tmp_path / "0009").exists() and not list(tmp_path.glob(".incoming-*"))


def test_chunks_left_without_their_manifest_are_abandoned(tmp_path: Path) -> None:
    half, _ = records_of("0010")
    chunks, manifest = records_of("0011")
    events, view = feed_all(tmp_path, [*half[:4], *chunks, (b"manifest/0011", manifest.value())])
    assert [type(e).__name__ for e in events] == ["Rejected", "Assembled"]
    assert events[0].reason == "abandoned" and events[0].version == "0010"
    assert view.stale(5) == [("0010", 4)]  # the publisher can tombstone the leftovers


def test_a_version_too_large_for_the_reader_is_refused(tmp_path: Path) -> None:
    chunks, _manifest = records_of("0012")
    assembler = Assembler(tmp_path, max_bytes=5000)
    events = [e for key, value in chunks for e in assembler.feed(decode_record(key, value))]
    assert [e.reason for e in events] == ["too_large"]


def test_foreign_records_are_bad_records() -> None:
    for key, value in [(b"hello", b"x"), (b"chunk/../../etc/000001", b"x"),
                       (b"\xff\xfe", b"x"), (b"current", msgpack.packb({"v": 9}))]:
        with pytest.raises(ChannelError) as caught:
            decode_record(key, value)
        assert caught.value.reason in REJECT_REASONS


def test_the_view_follows_pointer_pin_and_tombstones() -> None:
    view = TopicView()
    versions = []
    for n in range(4):
        version = f"v{n}"
        chunks, manifest = records_of(version)
        for key, value in [*chunks, (f"manifest/{version}".encode(), manifest.value()),
                           pointer_record(version)]:
            view.apply(key, value)
        versions.append((version, manifest.chunks))
    assert view.versions() == ["v0", "v1", "v2", "v3"] and view.target == "v3"
    view.apply(*pin_record("v1", by="ops", reason="bad release"))
    assert isinstance(view.pin, Pin) and view.target == "v1"
    # keep 2: v0 goes; v1 is pinned, v3 is current: they stay
    assert view.stale(2) == [("v0", versions[0][1])]
    for key, value in tombstones("v0", versions[0][1]):
        view.apply(key, value)
    assert view.versions() == ["v1", "v2", "v3"]
    view.apply(*pin_record(None, by="ops"))
    assert view.pin is None and view.target == "v3"
    assert isinstance(decode_record(*pointer_record("v3")), Pointer)


def test_a_tombstone_drops_a_version_in_progress(tmp_path: Path) -> None:
    chunks, _ = records_of("0013")
    events, view = feed_all(tmp_path, [*chunks[:3], *tombstones("0013", len(chunks))])
    assert events == [] and view.stale(1) == []
    assert not list(tmp_path.glob(".incoming-*"))


def test_a_republished_version_replaces_the_cached_copy(tmp_path: Path) -> None:
    (tmp_path / "0014").mkdir()
    (tmp_path / "0014" / "model.onnx").write_bytes(b"stale")
    chunks, manifest = records_of("0014")
    (done,) = feed_all(tmp_path, [*chunks, (b"manifest/0014", manifest.value())])[0]
    assert (done.path / "model.onnx").read_bytes() == FILES[0][1]


def test_no_link_of_a_kept_deltas_chain_is_tombstoned() -> None:
    view = TopicView()
    bases = {"v1": None, "v2": "v1", "v3": "v2", "v4": None, "v5": "v4"}
    for version, base in bases.items():
        chunks, manifest = split_version(version, FILES, chunk_bytes=1000,
                                         meta={"base": base} if base else {})
        for key, value in [*chunks, (f"manifest/{version}".encode(), manifest.value())]:
            view.apply(key, value)
    view.apply(*pointer_record("v3"))
    # keep 1 (v5, a delta of v4): v3 stays as the pointer, and with it v2 and v1
    assert [v for v, _ in view.stale(1)] == []
    assert [v for v, _ in view.stale(1, keep_pointer=False)] == ["v1", "v2", "v3"]
    # v6 about to go out as a delta of v5: v5 and v4 stay
    assert [v for v, _ in view.stale(1, adding="v6", base="v5", keep_pointer=False)] == [
        "v1", "v2", "v3"]
    assert [v for v, _ in view.stale(1, adding="v6", keep_pointer=False)] == [
        "v1", "v2", "v3", "v4", "v5"]
