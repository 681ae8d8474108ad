"""Bundles and checkpoints over Kafka: chunks, a manifest, a pointer and a pin on one topic.

Kafka is the one thing every pod shares, so a *version* (a model bundle, or a trainer
checkpoint: a few files) travels as records on a compacted topic with one partition, in
this order::

    chunk/<version>/<seq>  {kind: chunk, version, seq, file, sha256, data}     seq = 0..n-1
    manifest/<version>     {kind: manifest, version, files: [[name, size, sha256, chunks]],
                            chunks, first_offset, meta, producer, at}
    (tombstones: the chunk and manifest keys of versions older than the last few)
    current                {kind: current, version, first_offset, manifest_offset, ...}
    pin                    {kind: pin, version or None, by, reason, at}   (bundles only)

One partition keeps the records in the order they were written, and a publisher writes a
version's chunks in sequence before its manifest. So a reader decides, when the manifest
arrives, whether the version is whole: every chunk came, once, in order, each matching its
own sha256, and every file matches the manifest's. Anything else is rejected with one of
``REJECT_REASONS``. Compaction keeps the newest record per key; tombstones (null values)
for old versions let it drop their chunks, so a reader that starts from the beginning reads
the last few versions, not the whole history. The pointer is written last, so the last
record of the topic is usually the newest pointer: ``first_offset`` there lets a reader that
wants only the newest version (a trainer taking over) seek straight to its chunks.

This module is pure (no Kafka): ``split_version`` and friends make records,
``TopicView`` follows what a topic says, ``Assembler`` rebuilds versions into files.
``advrec.channel_io`` moves the records through Kafka.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from advrec.bundle import fsync_dir, sha256_hex

__all__ = [
    "CHUNK_BYTES",
    "REJECT_REASONS",
    "Assembled",
    "Assembler",
    "ChannelError",
    "FileEntry",
    "Manifest",
    "Pin",
    "Pointer",
    "Record",
    "Rejected",
    "TopicView",
    "decode_record",
    "pin_record",
    "pointer_record",
    "split_version",
    "tombstones",
]

FORMAT = 1
# Kafka's default message limit is 1 MiB (message.max.bytes, and aiokafka's max_request_size):
# half of it leaves room for the record's header whatever the broker's settings.
CHUNK_BYTES = 512 * 1024
CURRENT_KEY = b"current"
PIN_KEY = b"pin"
_VERSION = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z._-]{0,63}$")  # a safe directory name

Record = tuple[bytes, bytes | None]  # (key, value); a None value is a tombstone

REJECT_REASONS = (
    "bad_record",  # a record that is not of this format (its key or its value)
    "corrupt_chunk",  # a chunk whose data do not match its own sha256
    "duplicate_chunk",  # a chunk seen twice with different data (an identical copy is dropped)
    "chunk_gap",  # a chunk came before one that precedes it (lost, or reordered)
    "missing_chunks",  # the manifest came before all of its chunks
    "bad_manifest",  # a manifest that cannot be read or disagrees with its chunks
    "checksum_mismatch",  # a file's bytes do not match the manifest's sha256
    "too_large",  # a version bigger than the reader's bound
    "abandoned",  # chunks whose manifest never came: a later version was completed first
)


class ChannelError(ValueError):
    """A record or a version on a channel topic cannot be used."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pack(value: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": FORMAT, **value}, use_bin_type=True)


def check_version(version: Any) -> str:
    """Return ``version`` if it is a safe version name, else raise ``ChannelError``."""
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ChannelError("bad_record", f"version {str(version)[:80]!r} is not a safe name")
    return version


def chunk_key(version: str, seq: int) -> bytes:
    return f"chunk/{version}/{seq:06d}".encode()


def manifest_key(version: str) -> bytes:
    return f"manifest/{version}".encode()


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its name, size, sha256 and how many chunks carry it."""

    name: str
    size: int
    sha256: str
    chunks: int


@dataclass(frozen=True)
class Manifest:
    """What a version holds; written after its chunks."""

    version: str
    files: tuple[FileEntry, ...]
    chunks: int
    meta: dict[str, Any] = field(default_factory=dict)
    first_offset: int | None = None  # offset of chunk 0 on the topic
    producer: str = ""
    at: int = 0  # ms
    offset: int = -1  # where this manifest sits on the topic (set by the reader)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def value(self) -> bytes:
        return _pack({"kind": "manifest", "version": self.version,
                      "files": [[f.name, f.size, f.sha256, f.chunks] for f in self.files],
                      "chunks": self.chunks, "first_offset": self.first_offset,
                      "meta": self.meta, "producer": self.producer, "at": self.at})


@dataclass(frozen=True)
class Pointer:
    """The version a topic names as current."""

    version: str
    first_offset: int | None = None
    manifest_offset: int | None = None
    producer: str = ""
    at: int = 0


@dataclass(frozen=True)
class Pin:
    """An operator's pin: every reader serves ``version`` until a pin record with None."""

    version: str | None
    by: str = ""
    reason: str = ""
    at: int = 0


@dataclass(frozen=True)
class Chunk:
    version: str
    seq: int
    file: str
    sha256: str
    data: bytes


def split_version(version: str, files: Sequence[tuple[str, bytes]], *,
                  chunk_bytes: int = CHUNK_BYTES, meta: dict[str, Any] | None = None,
                  producer: str = "") -> tuple[list[Record], Manifest]:
    """Return the chunk records of a version, in order, and its manifest (not yet placed).

    Every file gets at least one chunk (an empty file one empty chunk), so the manifest's
    chunk count always equals the records written.
    """
    check_version(version)
    assert chunk_bytes >= 1, "chunks must hold at least one byte"
    names = [name for name, _ in files]
    assert len(set(names)) == len(names) and all(
        n and "/" not in n and not n.startswith(".") for n in names), f"file names {names}"
    records: list[Record] = []
    entries = []
    for name, data in files:
        parts = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
        for part in parts:
            seq = len(records)
            records.append((chunk_key(version, seq), _pack({
                "kind": "chunk", "version": version, "seq": seq, "file": name,
                "sha256": sha256_hex(part), "data": part})))
        entries.append(FileEntry(name, len(data), sha256_hex(data), len(parts)))
    manifest = Manifest(version=version, files=tuple(entries), chunks=len(records),
                        meta=dict(meta or {}), producer=producer, at=_now_ms())
    return records, manifest


def pointer_record(version: str, *, first_offset: int | None = None,
                   manifest_offset: int | None = None, producer: str = "") -> Record:
    check_version(version)
    return CURRENT_KEY, _pack({"kind": "current", "version": version,
                               "first_offset": first_offset, "manifest_offset": manifest_offset,
                               "producer": producer, "at": _now_ms()})


def pin_record(version: str | None, *, by: str = "", reason: str = "") -> Record:
    """A pin on ``version``, or with None the release of any pin."""
    if version is not None:
        check_version(version)
    return PIN_KEY, _pack({"kind": "pin", "version": version, "by": by[:200],
                           "reason": reason[:500], "at": _now_ms()})


def tombstones(version: str, n_chunks: int) -> list[Record]:
    """The records that let compaction drop a version: its manifest first, then its chunks."""
    check_version(version)
    return [(manifest_key(version), None)] + [(chunk_key(version, s), None)
                                              for s in range(n_chunks)]


# ---------------------------------------------------------------------------- reading

Decoded = Chunk | Manifest | Pointer | Pin | tuple[str, str]  # ("tombstone", version)


def decode_record(key: bytes | None, value: bytes | None, offset: int = -1) -> Decoded | None:
    """Decode one record: a chunk, manifest, pointer, pin, a ``("tombstone", version)`` of a
    manifest key, or None for what needs no action (a chunk tombstone, a pointer deleted).

    Raises ``ChannelError`` (``bad_record``, ``corrupt_chunk``, ``bad_manifest``) with
    ``version`` set on the exception where the key names one.
    """
    try:
        text = bytes(key or b"").decode("ascii")
    except UnicodeDecodeError:
        raise ChannelError("bad_record", f"key {bytes(key or b'')[:40]!r} is not ASCII") from None
    kind, _, rest = text.partition("/")
    if kind not in ("chunk", "manifest") and text not in ("current", "pin"):
        raise ChannelError("bad_record", f"unknown key {text[:60]!r}")
    version = rest.split("/", 1)[0] if rest else None
    try:
        if version is not None:
            check_version(version)
        if value is None:
            return ("tombstone", version) if kind == "manifest" and version else None
        try:
            obj = msgpack.unpackb(value, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            reason = "corrupt_chunk" if kind == "chunk" else (
                "bad_manifest" if kind == "manifest" else "bad_record")
            raise ChannelError(reason, f"{text[:60]}: not msgpack ({type(exc).__name__})") from None
        if not isinstance(obj, dict) or obj.get("v") != FORMAT:
            raise ChannelError("bad_record", f"{text[:60]}: not a format-{FORMAT} record")
        if kind == "chunk":
            return _decode_chunk(obj, version, text)
        if kind == "manifest":
            return _decode_manifest(obj, version, offset)
        if text == "current":
            return Pointer(version=check_version(obj.get("version")),
                           first_offset=_opt_int(obj.get("first_offset")),
                           manifest_offset=_opt_int(obj.get("manifest_offset")),
                           producer=str(obj.get("producer", "")), at=int(obj.get("at") or 0))
        pinned = obj.get("version")
        return Pin(version=None if pinned is None else check_version(pinned),
                   by=str(obj.get("by", "")), reason=str(obj.get("reason", "")),
                   at=int(obj.get("at") or 0))
    except ChannelError as exc:
        exc.version = version  # type: ignore[attr-defined]
        raise
    except (TypeError, ValueError, KeyError) as exc:
        reason = "corrupt_chunk" if kind == "chunk" else (
            "bad_manifest" if kind == "manifest" else "bad_record")
        err = ChannelError(reason, f"{text[:60]}: {type(exc).__name__}: {exc}"[:300])
        err.version = version  # type: ignore[attr-defined]
        raise err from None


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _decode_chunk(obj: dict[str, Any], version: str | None, text: str) -> Chunk:
    seq, data, name, sha = obj.get("seq"), obj.get("data"), obj.get("file"), obj.get("sha256")
    if (obj.get("kind") != "chunk" or obj.get("version") != version
            or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0
            or f"chunk/{version}/{seq:06d}" != text or not isinstance(data, bytes)
            or not isinstance(name, str) or not isinstance(sha, str)):
        raise ChannelError("corrupt_chunk", f"{text[:60]}: fields disagree with the key")
    if sha256_hex(data) != sha:
        raise ChannelError("corrupt_chunk", f"{text[:60]}: data do not match their sha256")
    assert version is not None
    return Chunk(version, seq, name, sha, data)


def _decode_manifest(obj: dict[str, Any], version: str | None, offset: int) -> Manifest:
    if obj.get("kind") != "manifest" or obj.get("version") != version:
        raise ChannelError("bad_manifest", f"manifest/{version}: fields disagree with the key")
    files = []
    for name, size, sha, chunks in obj["files"]:
        if not (isinstance(name, str) and name and "/" not in name and not name.startswith(".")
                and isinstance(size, int) and size >= 0 and isinstance(sha, str)
                and isinstance(chunks, int) and chunks >= 1):
            raise ChannelError("bad_manifest", f"manifest/{version}: bad file entry {name!r}")
        files.append(FileEntry(name, size, sha, chunks))
    chunks = obj["chunks"]
    if (not isinstance(chunks, int) or chunks != sum(f.chunks for f in files)
            or len({f.name for f in files}) != len(files)):
        raise ChannelError("bad_manifest", f"manifest/{version}: {chunks} chunks for files "
                                           f"holding {sum(f.chunks for f in files)}")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise ChannelError("bad_manifest", f"manifest/{version}: meta is not a map")
    assert version is not None
    return Manifest(version=version, files=tuple(files), chunks=chunks, meta=meta,
                    first_offset=_opt_int(obj.get("first_offset")),
                    producer=str(obj.get("producer", "")), at=int(obj.get("at") or 0),
                    offset=offset)


class TopicView:
    """What a channel topic says so far: whole versions' manifests, the pointer, the pin.

    Versions keep the order their manifests came in (publish order). Chunks of versions
    whose manifest has not come are remembered by count, so a publisher can tombstone
    what an interrupted publish left behind.
    """

    def __init__(self) -> None:
        self.manifests: dict[str, Manifest] = {}
        self.pending_chunks: dict[str, int] = {}  # version -> chunks seen, no manifest yet
        self.pointer: Pointer | None = None
        self.pin: Pin | None = None
        self.records = 0
        self.bytes = 0

    def apply(self, key: bytes | None, value: bytes | None, offset: int = -1) -> Decoded | None:
        """Follow one record; return it decoded. Raises ``ChannelError`` for a bad record
        (the view is unchanged then)."""
        self.records += 1
        self.bytes += len(key or b"") + len(value or b"")
        rec = decode_record(key, value, offset)
        if isinstance(rec, Chunk):
            self.pending_chunks[rec.version] = max(self.pending_chunks.get(rec.version, 0),
                                                   rec.seq + 1)
        elif isinstance(rec, Manifest):
            self.pending_chunks.pop(rec.version, None)
            self.manifests.pop(rec.version, None)  # a republished version moves to the end
            self.manifests[rec.version] = rec
        elif isinstance(rec, Pointer):
            self.pointer = rec
        elif isinstance(rec, Pin):
            self.pin = rec if rec.version is not None else None
        elif isinstance(rec, tuple):
            self.manifests.pop(rec[1], None)
            self.pending_chunks.pop(rec[1], None)
        elif rec is None and value is None and (key or b"").startswith(b"chunk/"):
            version = (key or b"").decode("ascii").split("/")[1]
            self.pending_chunks.pop(version, None)
        return rec

    @property
    def target(self) -> str | None:
        """The version readers should serve: the pinned one, else the pointer's."""
        if self.pin is not None:
            return self.pin.version
        return self.pointer.version if self.pointer else None

    def versions(self) -> list[str]:
        """Whole versions on the topic, oldest first."""
        return list(self.manifests)

    def stale(self, keep: int, *, adding: str | None = None, base: str | None = None,
              keep_pointer: bool = True) -> list[tuple[str, int]]:
        """Versions to tombstone, as (version, chunks): all but the newest ``keep`` (counting
        ``adding``, about to be published and made current), never the pinned one nor (with
        ``keep_pointer``) the pointer's, nor any version a delta kept is rebuilt from: its
        base (manifest meta ``base``; ``base`` for ``adding``), the base's base, and so on
        back to a full bundle; and the leftovers of publishes that never wrote their
        manifest."""
        assert keep >= 1
        order = [v for v in self.manifests if v != adding] + ([adding] if adding else [])
        protect = {self.pointer.version if self.pointer and keep_pointer else None,
                   self.pin.version if self.pin else None, adding, base}
        old = order[: max(0, len(order) - keep)]
        chain = [v for v in order if v not in old or v in protect] + ([base] if base else [])
        seen: set[str] = set()
        while chain:  # follow every kept delta back to its full bundle
            v = chain.pop()
            if v in seen:
                continue
            seen.add(v)
            b = self.manifests[v].meta.get("base") if v in self.manifests else None
            if isinstance(b, str):
                protect.add(b)
                chain.append(b)
        out = [(v, self.manifests[v].chunks) for v in old if v not in protect]
        out += [(v, n) for v, n in self.pending_chunks.items() if v != adding]
        return out

    def note_published(self, manifest: Manifest, tombstoned: Sequence[str] = (), *,
                       current: bool = True) -> None:
        """Record a publish of this process's own, before (or instead of) reading it back."""
        for version in tombstoned:
            self.manifests.pop(version, None)
            self.pending_chunks.pop(version, None)
        self.manifests.pop(manifest.version, None)
        self.manifests[manifest.version] = manifest
        if current:
            self.pointer = Pointer(manifest.version, manifest.first_offset, manifest.offset,
                                   manifest.producer, manifest.at)


# ---------------------------------------------------------------------------- assembling


@dataclass(frozen=True)
class Assembled:
    """A version rebuilt and verified under ``path`` (a directory of its files)."""

    version: str
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class Rejected:
    """Something on the topic was refused; ``fatal``: the version cannot be rebuilt."""

    version: str | None
    reason: str
    detail: str
    fatal: bool = True


@dataclass
class _Incoming:
    """A version being rebuilt: its chunks so far, the file being written, the files done."""

    version: str
    path: Path | None  # None: refused before anything was written
    next_seq: int = 0
    chunk_sha: list[str] = field(default_factory=list)  # by seq
    done: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (size, sha256)
    current: tuple[str, BinaryIO, Any] | None = None  # (name, file, running sha256)
    size: int = 0
    failed: str | None = None  # the reason, once rejected: later chunks are ignored

    def finish_file(self, sync: bool) -> None:
        """Close the file being written (durably, with ``sync``) and record its size and
        hash."""
        if self.current is not None:
            name, fh, hasher = self.current
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
            self.done[name] = (fh.tell(), hasher.hexdigest())
            fh.close()
            self.current = None

    def close(self) -> None:
        """Close what is open and remove the temporary directory."""
        if self.current is not None:
            self.current[1].close()
            self.current = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


class Assembler:
    """Rebuild versions from a channel's records into ``root/<version>/``, verifying as the
    chunks come; one chunk in memory at a time, the rest on disk.

    ``feed`` takes decoded records in topic order and returns what happened: ``Assembled``
    when a manifest completes a version, ``Rejected`` when a record or a version is refused.
    A version is published to ``root`` by renaming a finished temporary directory, so a
    directory named like a version is always whole.
    """

    def __init__(self, root: Path | str, *, max_bytes: int = 1 << 30,
                 sync: bool = True) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.sync = sync  # False: no fsyncs, for a cache of the topic (advrec/bundle.py)
        self._incoming: dict[str, _Incoming] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".incoming-*"):  # left by a reader that died mid-version
            shutil.rmtree(stale, ignore_errors=True)

    def feed(self, rec: Decoded | None) -> list[Assembled | Rejected]:
        if isinstance(rec, Chunk):
            return self._chunk(rec)
        if isinstance(rec, Manifest):
            return self._manifest(rec)
        if isinstance(rec, tuple):  # the version left the topic
            self.drop(rec[1])
        return []

    def drop(self, version: str) -> None:
        """Forget a version in progress (its temporary files go)."""
        inc = self._incoming.pop(version, None)
        if inc is not None:
            inc.close()

    def close(self) -> None:
        for version in list(self._incoming):
            self.drop(version)

    def _fail(self, inc: _Incoming, reason: str, detail: str) -> list[Assembled | Rejected]:
        inc.failed = reason
        inc.close()
        return [Rejected(inc.version, reason, detail)]

    def _chunk(self, c: Chunk) -> list[Assembled | Rejected]:
        inc = self._incoming.get(c.version)
        if inc is None:
            if c.seq != 0:  # the version's start is missing: nothing to build on
                inc = self._incoming[c.version] = _Incoming(c.version, None)
                inc.failed = "chunk_gap"
                return [Rejected(c.version, "chunk_gap",
                                 f"chunk {c.seq} of {c.version} came before chunk 0")]
            path = self.root / f".incoming-{c.version}-{uuid.uuid4().hex[:8]}"
            path.mkdir()
            inc = self._incoming[c.version] = _Incoming(c.version, path)
        if inc.failed is not None:
            return []
        if c.seq < inc.next_seq:
            if inc.chunk_sha[c.seq] == c.sha256:  # a producer's retry: the same bytes again
                return [Rejected(c.version, "duplicate_chunk",
                                 f"chunk {c.seq} of {c.version} came twice (same data, "
                                 "dropped)", fatal=False)]
            return self._fail(inc, "duplicate_chunk",
                              f"chunk {c.seq} of {c.version} came twice with different data")
        if c.seq > inc.next_seq:
            return self._fail(inc, "chunk_gap", f"chunk {c.seq} of {c.version} came while "
                                                f"chunk {inc.next_seq} was due")
        if inc.size + len(c.data) > self.max_bytes:
            return self._fail(inc, "too_large",
                              f"{c.version} exceeds {self.max_bytes} bytes")
        if inc.current is None or inc.current[0] != c.file:
            # chunks of one file come together, files one after the other
            if c.file in inc.done or "/" in c.file or c.file.startswith(".") or not c.file:
                return self._fail(inc, "chunk_gap", f"file {c.file!r} of {c.version} resumed "
                                                    "after another file")
            inc.finish_file(self.sync)
            inc.current = (c.file, open(inc.path / c.file, "wb"), hashlib.sha256())
        inc.current[1].write(c.data)
        inc.current[2].update(c.data)
        inc.chunk_sha.append(c.sha256)
        inc.next_seq += 1
        inc.size += len(c.data)
        return []

    def _manifest(self, m: Manifest) -> list[Assembled | Rejected]:
        out: list[Assembled | Rejected] = []
        # a publisher finishes one version before it starts the next: chunks of another
        # version still in progress belong to a publish that stopped half-way
        for version, other in list(self._incoming.items()):
            if version != m.version:
                if other.failed is None:
                    out.append(Rejected(version, "abandoned", f"the chunks of {version} were "
                                                              f"not followed by its manifest"))
                self.drop(version)
        inc = self._incoming.pop(m.version, None)
        if inc is None:
            return [*out, Rejected(m.version, "missing_chunks",
                                   f"manifest of {m.version} came with none of its "
                                   f"{m.chunks} chunks")]
        if inc.failed is not None:  # rejected already, and said so then
            return out
        try:
            if inc.next_seq != m.chunks:
                raise ChannelError("missing_chunks", f"{m.version}: {inc.next_seq} of "
                                                     f"{m.chunks} chunks came before its "
                                                     "manifest")
            inc.finish_file(self.sync)
            if [f.name for f in m.files] != list(inc.done):
                raise ChannelError("bad_manifest", f"{m.version}: files {list(inc.done)} came, "
                                                   f"the manifest lists "
                                                   f"{[f.name for f in m.files]}")
            for f in m.files:
                size, sha = inc.done[f.name]
                if size != f.size or sha != f.sha256:
                    raise ChannelError("checksum_mismatch",
                                       f"{m.version}/{f.name}: {size} bytes, sha256 "
                                       f"{sha[:12]}... vs the manifest's {f.size} bytes, "
                                       f"{f.sha256[:12]}...")
        except ChannelError as exc:
            inc.close()
            return [*out, Rejected(m.version, exc.reason, exc.detail)]
        assert inc.path is not None
        final = self.root / m.version
        if self.sync:
            fsync_dir(inc.path)
        if final.exists():  # a republished version, or one left by an earlier run
            trash = self.root / f".incoming-trash-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(inc.path, final)
        if self.sync:
            fsync_dir(self.root)
        return [*out, Assembled(m.version, final, m)]
