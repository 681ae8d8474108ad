"""The model-bundle format: one directory per version, published atomically.

Layout under a bundle root::

    <root>/CURRENT              text file naming the live version (replaced by rename)
    <root>/<version>/model.onnx self-contained ONNX generator: history[B, L] -> scores[B, V+1]
    <root>/<version>/vocab.json JSON list of external item ids; id at position i is row i+1
                                (null: a row a bounded vocabulary freed, never served)
    <root>/<version>/meta.json  version, created, last_event_ms, trained_through_ms, metrics,
                                model_sha256, vocab_sha256, vocab_size, max_len, ...
    <root>/<version>/detector.onnx  optional: the fake-user detector over the same rows,
                                items[B, L] + behaviour[B, F_b] -> p_fake[B], terms[B, F];
                                meta["detector"] holds its sha256, features and threshold
    <root>/<version>/user.onnx, rescore.onnx, items.npy  optional: the two-stage parts
                                (trainer/twostage.py) for large catalogues: history ->
                                user vector [B, D'] and candidate rows; the item table
                                [V+1, D'] whose inner product with it is G's score; the full
                                scorer at candidate rows. meta["two_stage"] holds their sha256

A bundle is written under a temporary name, every file fsynced, then renamed into place;
``CURRENT`` is replaced the same way, so a reader sees either the old or the new bundle,
never half of one. Readers verify checksums and the vocabulary before trusting a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advrec.types import ItemId

__all__ = [
    "DETECTOR_FILE",
    "DETECTOR_INPUTS",
    "DETECTOR_OUTPUTS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "REJECT_REASONS",
    "TWO_STAGE_FILES",
    "TWO_STAGE_ITEMS",
    "TWO_STAGE_RESCORE",
    "TWO_STAGE_RESCORE_INPUTS",
    "TWO_STAGE_RESCORE_OUTPUT",
    "TWO_STAGE_USER",
    "TWO_STAGE_USER_INPUT",
    "TWO_STAGE_USER_OUTPUTS",
    "TWO_STAGE_USER_VECTORS",
    "Bundle",
    "BundleError",
    "bundle_files",
    "list_versions",
    "load_bundle",
    "read_current",
    "set_current",
    "write_bundle",
]

FORMAT_VERSION = 1
INPUT_NAME = "history"  # int64 [B, L], item rows, left-padded with 0
OUTPUT_NAME = "scores"  # float32 [B, V+1], column 0 is padding and never recommended
DETECTOR_INPUTS = ("items", "behaviour")  # int64 [B, L] rows; float32 [B, F_b] counters
DETECTOR_OUTPUTS = ("p_fake", "terms")  # float32 [B] P(fake); [B, F] each feature's term
# two-stage parts (trainer/twostage.py): user.onnx history[B, L] (and, with a tied item
# table, history_vectors[B, L, D']: the history's rows of items.npy) -> user[B, D'],
# linked[B, R*K], cold[B, M] (candidate rows; 0 = none); rescore.onnx history[B, L],
# user[B, D'], rows[B, C], vectors[B, C, D'] -> scores[B, C]; items.npy [V+1, D'], float16
# (G's tables rounded to it: trainer/export.py ``compact_item_tables``) or float32
TWO_STAGE_USER_INPUT = "history"
TWO_STAGE_USER_VECTORS = "history_vectors"
TWO_STAGE_USER_OUTPUTS = ("user", "linked", "cold")
TWO_STAGE_RESCORE_INPUTS = ("history", "user", "rows", "vectors")
TWO_STAGE_RESCORE_OUTPUT = "scores"
CURRENT = "CURRENT"
MODEL_FILE = "model.onnx"
DETECTOR_FILE = "detector.onnx"
VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"
TWO_STAGE_USER = "user.onnx"
TWO_STAGE_RESCORE = "rescore.onnx"
TWO_STAGE_ITEMS = "items.npy"
TWO_STAGE_FILES = (TWO_STAGE_USER, TWO_STAGE_RESCORE, TWO_STAGE_ITEMS)
# names this process's temporary files: a PID alone is not unique (every container's first
# process is PID 1, and two containers may share a volume)
WRITER_TOKEN = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

REJECT_REASONS = (
    "missing",  # the version directory does not exist
    "missing_meta",  # no meta.json
    "bad_meta",  # meta.json unreadable or lacking required keys
    "missing_model",  # no model.onnx
    "checksum_mismatch",  # model or vocab bytes do not match meta's sha256
    "vocab_mismatch",  # vocabulary size or contents disagree with meta / the model output
    "load_error",  # onnxruntime could not build a session
    "bad_signature",  # model inputs/outputs are not history[B, L] -> scores[B, V+1]
    "nan_output",  # warm-up produced NaN or infinite scores
    "bad_detector",  # detector.onnx does not load, or gives no finite P(fake) per user
    "bad_index",  # the two-stage parts do not load, or no nearest-neighbour index is built
    "pruned",  # the version left the directory while it was being loaded (not remembered)
)
_META_REQUIRED = ("version", "model_sha256", "vocab_sha256", "vocab_size", "max_len")


class BundleError(Exception):
    """A bundle cannot be used; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    version: str
    meta: dict[str, Any]
    vocab: tuple[ItemId | None, ...]  # None: a row a bounded vocabulary freed
    model_bytes: bytes
    detector_bytes: bytes | None = None  # the fake-user detector, when the bundle has one
    # the two-stage parts (TWO_STAGE_FILES: name -> bytes), when the bundle has them
    two_stage: dict[str, bytes] | None = None

    @property
    def max_len(self) -> int:
        return int(self.meta["max_len"])


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of ``data`` (what meta.json and channel manifests record)."""
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_versions(root: Path | str) -> list[str]:
    """Return the published versions under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _next_version(root: Path) -> str:
    # Millisecond timestamps sort as strings (13 digits until the year 2286) and tell a
    # person when the bundle was made; bump past an existing one made in the same ms.
    candidate = int(time.time() * 1000)
    existing = list_versions(root)
    if existing and existing[-1].isdigit():
        candidate = max(candidate, int(existing[-1]) + 1)
    return f"{candidate:013d}"


def write_bundle(root: Path | str, model_bytes: bytes, vocab: Sequence[ItemId | None],
                 meta: dict[str, Any], *, keep: int = 5, make_current: bool = True,
                 detector_bytes: bytes | None = None,
                 two_stage: dict[str, bytes] | None = None) -> str:
    """Publish a new bundle atomically and return its version.

    ``meta`` must hold ``max_len``; version, created time, checksums and the vocabulary
    size are filled in here. The oldest versions beyond ``keep`` are removed (never the
    current one). ``detector_bytes``: the fake-user detector (``meta["detector"]`` then
    describes it; its sha256 is filled in here). ``two_stage``: the two-stage parts, every
    one of ``TWO_STAGE_FILES`` (``meta["two_stage"]`` then holds their sha256).
    """
    assert keep >= 1, "keep at least the bundle being written"
    assert "max_len" in meta, "meta needs max_len (the history length the model takes)"
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    version = str(meta.get("version") or _next_version(root))
    vocab_bytes = json.dumps(list(vocab), ensure_ascii=False).encode("utf-8")
    full_meta = dict(meta)
    full_meta.update(
        format=FORMAT_VERSION, version=version, created=time.time(),
        model_sha256=sha256_hex(model_bytes), vocab_sha256=sha256_hex(vocab_bytes),
        vocab_size=len(vocab), input=INPUT_NAME, output=OUTPUT_NAME,
    )
    if detector_bytes is not None:
        full_meta["detector"] = {**dict(meta.get("detector") or {}),
                                 "sha256": sha256_hex(detector_bytes),
                                 "inputs": list(DETECTOR_INPUTS),
                                 "outputs": list(DETECTOR_OUTPUTS)}
    if two_stage is not None:
        assert sorted(two_stage) == sorted(TWO_STAGE_FILES), sorted(two_stage)
        full_meta["two_stage"] = {**dict(meta.get("two_stage") or {}), "sha256": {
            name: sha256_hex(data) for name, data in two_stage.items()}}
    tmp = root / f".tmp-{version}-{WRITER_TOKEN}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_synced(tmp / MODEL_FILE, model_bytes)
    _write_synced(tmp / VOCAB_FILE, vocab_bytes)
    if detector_bytes is not None:
        _write_synced(tmp / DETECTOR_FILE, detector_bytes)
    for name, data in (two_stage or {}).items():
        _write_synced(tmp / name, data)
    # meta.json last: a directory without it is never a bundle
    _write_synced(tmp / META_FILE, json.dumps(full_meta, indent=2, sort_keys=True).encode())
    fsync_dir(tmp)
    os.rename(tmp, root / version)
    fsync_dir(root)
    if make_current:
        set_current(root, version)
    _prune(root, keep)
    return version


def set_current(root: Path | str, version: str) -> None:
    """Point ``CURRENT`` at ``version`` (which must exist) by an atomic rename."""
    root = Path(root)
    if not (root / version / META_FILE).is_file():
        raise BundleError("missing", f"no bundle {version!r} under {root}")
    tmp = root / f".{CURRENT}.tmp-{WRITER_TOKEN}-{uuid.uuid4().hex[:8]}"
    _write_synced(tmp, version.encode() + b"\n")
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def read_current(root: Path | str) -> str | None:
    """Return the live version named by ``CURRENT``, or None if nothing is published."""
    try:
        text = (Path(root) / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def _prune(root: Path, keep: int) -> None:
    current = read_current(root)
    versions = list_versions(root)
    for old in versions[: max(0, len(versions) - keep)]:
        if old != current:
            shutil.rmtree(root / old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a writer killed mid-export
        if not stale.name.endswith(f"-{WRITER_TOKEN}"):
            shutil.rmtree(stale, ignore_errors=True)


def bundle_files(root: Path | str, version: str) -> list[tuple[str, bytes]]:
    """Return a written bundle's files as (name, bytes), ``meta.json`` last: what travels on
    the bundle topic (``advrec.channel``) and is rebuilt into a directory by each worker."""
    path = Path(root) / version
    names = (MODEL_FILE, VOCAB_FILE, DETECTOR_FILE, *TWO_STAGE_FILES, META_FILE)
    optional = (DETECTOR_FILE, *TWO_STAGE_FILES)
    return [(name, (path / name).read_bytes()) for name in names
            if name not in optional or (path / name).is_file()]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(root: Path | str, version: str, *, model: bool = True) -> Bundle:
    """Read and verify one bundle; raise ``BundleError`` naming what is wrong.

    ``model`` False: model.onnx is verified against its checksum but not kept
    (``model_bytes`` is empty): a worker that ranks in two stages never loads it, and at 1M
    items it is 256 MB.
    """
    path = Path(root) / version
    if not path.is_dir():
        raise BundleError("missing", f"no bundle directory {path}")
    try:
        meta_text = (path / META_FILE).read_text()
    except FileNotFoundError:
        raise BundleError("missing_meta", f"{path / META_FILE} does not exist") from None
    try:
        meta = json.loads(meta_text)
    except ValueError as exc:
        raise BundleError("bad_meta", f"{path / META_FILE}: {exc}") from None
    if not isinstance(meta, dict) or any(k not in meta for k in _META_REQUIRED):
        raise BundleError("bad_meta", f"meta.json must hold {_META_REQUIRED}")
    try:
        model_bytes = (path / MODEL_FILE).read_bytes() if model else b""
        model_sha = sha256_hex(model_bytes) if model else _file_sha256(path / MODEL_FILE)
    except FileNotFoundError:
        raise BundleError("missing_model", f"{path / MODEL_FILE} does not exist") from None
    if model_sha != meta["model_sha256"]:
        raise BundleError("checksum_mismatch", f"model.onnx sha256 differs from meta ({version})")
    try:
        vocab_bytes = (path / VOCAB_FILE).read_bytes()
    except FileNotFoundError:
        raise BundleError("vocab_mismatch", f"{path / VOCAB_FILE} does not exist") from None
    if sha256_hex(vocab_bytes) != meta["vocab_sha256"]:
        raise BundleError("checksum_mismatch", f"vocab.json sha256 differs from meta ({version})")
    try:
        vocab = json.loads(vocab_bytes)
    except ValueError as exc:
        raise BundleError("vocab_mismatch", f"vocab.json unreadable: {exc}") from None
    ids = [v for v in vocab if v is not None] if isinstance(vocab, list) else None
    if (ids is None or not all(isinstance(v, str) for v in ids)
            or len(vocab) != meta["vocab_size"] or len(set(ids)) != len(ids)):
        raise BundleError("vocab_mismatch",
                          f"vocab.json must be {meta['vocab_size']} distinct item ids "
                          "(or null: a freed row)")
    detector_bytes = None
    if meta.get("detector"):
        want = meta["detector"].get("sha256") if isinstance(meta["detector"], dict) else None
        try:
            detector_bytes = (path / DETECTOR_FILE).read_bytes()
        except FileNotFoundError:
            raise BundleError("missing_model", f"{path / DETECTOR_FILE} does not exist, "
                                               "meta.json names a detector") from None
        if sha256_hex(detector_bytes) != want:
            raise BundleError("checksum_mismatch",
                              f"detector.onnx sha256 differs from meta ({version})")
    two_stage = None
    if meta.get("two_stage"):
        sums = meta["two_stage"].get("sha256") if isinstance(meta["two_stage"], dict) else None
        if not isinstance(sums, dict) or sorted(sums) != sorted(TWO_STAGE_FILES):
            raise BundleError("bad_meta", f"meta.json two_stage must name {TWO_STAGE_FILES}")
        two_stage = {}
        for name in TWO_STAGE_FILES:
            try:
                two_stage[name] = (path / name).read_bytes()
            except FileNotFoundError:
                raise BundleError("missing_model", f"{path / name} does not exist, meta.json "
                                                   "names the two-stage parts") from None
            if sha256_hex(two_stage[name]) != sums[name]:
                raise BundleError("checksum_mismatch",
                                  f"{name} sha256 differs from meta ({version})")
    return Bundle(path=path, version=str(meta["version"]), meta=meta, vocab=tuple(vocab),
                  model_bytes=model_bytes, detector_bytes=detector_bytes, two_stage=two_stage)
