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
    <root>/<version>/prior-indptr.npy, prior-cols.npy, prior-vals.npy  with the two-stage
                                parts of a scorer with the prior: its links as sparse rows
                                (advrec/links.py), which the worker gathers for the graphs
    <root>/<version>/delta-*.npy, delta-vocab.json  a *delta* bundle's alternative to
                                items.npy, vocab.json and the prior's files: the rows that
                                changed since a full bundle (meta["delta"]["base"]) and their
                                values (see "Deltas" below)

Deltas. At a million items a bundle is mostly its item table, and most rows do not change
between exports (the sampled softmax steps only the rows a batch touches). A delta bundle
carries the two-stage graphs whole, the rows of ``items.npy`` and ``vocab.json`` that differ
from its base (a full bundle), and no ``model.onnx`` (it is served in two stages only).
Its meta.json records the checksums of the *whole* items.npy and vocab.json it stands for:
a reader rebuilds them from its copy of the base (``apply_delta``) and checks them, so a
rebuilt delta is byte for byte the full bundle the trainer would have written. The trainer
writes those whole files locally too; only the delta's files travel (``bundle_files``).

A delta's files are coded to travel small (``DELTA_CODEC``, named in meta["delta"]): the
changed rows as the gaps between them, each row's values as its step from the base's row
(element-wise, modulo the width of the table's type: an int8 row that moved a few levels
is mostly small numbers), and every array zlib-compressed. At 1M items (bench/freshness.py)
a delta went from 1.89 MB to 0.92 MB on average, its two graphs' 0.23 MB included. A delta
whose meta names no codec is read as the arrays themselves (what earlier trainers wrote).

A bundle is written under a temporary name, every file fsynced, then renamed into place;
``CURRENT`` is replaced the same way, so a reader sees either the old or the new bundle,
never half of one. Readers verify checksums and the vocabulary before trusting a bundle.
A copy that is only a cache of the bundle topic (the trainer's own, a worker's) is written
without the fsyncs (``sync=False``): the rename still makes it whole at once for the
process that reads it, and no one reads it after a crash of the machine without
rebuilding it from the topic. At 1M items each delta writes ~90 MB of whole files, in the
trainer and again in every worker, and an fsync of 65 MB was measured at 0.1-1.7 s
(README, "Large catalogues: deltas").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advrec.links import PRIOR_FILES, SparseRows, npy_bytes
from advrec.types import ItemId

__all__ = [
    "DELTA_CODEC",
    "DELTA_FILES",
    "DELTA_PRIOR_FILES",
    "DELTA_VOCAB",
    "DETECTOR_FILE",
    "DETECTOR_INPUTS",
    "DETECTOR_OUTPUTS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PRIOR_FILES",
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
    "appended_items",
    "apply_delta",
    "bundle_files",
    "delta_base",
    "delta_files",
    "delta_rows",
    "encode_item_rows",
    "int8_rows",
    "item_rows",
    "item_rows_finite",
    "item_width",
    "list_versions",
    "load_bundle",
    "read_current",
    "set_current",
    "vocab_json",
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
# user[B, D'], rows[B, C], vectors[B, C, D'] -> scores[B, C]; items.npy: the table [V+1, D']
# as ``encode_item_rows`` stores it (``item_rows`` reads it back)
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
DELTA_ROWS = "delta-rows.npy"  # int64 [n]: rows of items.npy that differ from the base's
DELTA_ITEMS = "delta-items.npy"  # [n, D'] their values: steps from the base's (the codec)
DELTA_VOCAB = "delta-vocab.json"  # {"size": V, "rows": [[row, id or null], ...]}
DELTA_FILES = (DELTA_ROWS, DELTA_ITEMS, DELTA_VOCAB)
# how delta_files codes its arrays (see "Deltas" above): rows as gaps, values as steps from
# the base's rows, each .npy zlib-compressed at this level (the default: 6 was ~16 % smaller
# than 1 on int8 steps, at ~0.1 s a delta)
DELTA_CODEC = "steps+zlib"
DELTA_ZLIB_LEVEL = 6
# with the prior: the rows whose links changed, as sparse rows (advrec/links.py)
DELTA_PRIOR_FILES = ("delta-prior-rows.npy", "delta-prior-indptr.npy", "delta-prior-cols.npy",
                     "delta-prior-vals.npy")
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
    "bad_delta",  # a delta whose base is not here, or whose rebuilt files do not match meta
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

    @property
    def exact(self) -> bool:
        """Whether the bundle has the exact graph (model.onnx): a delta has not."""
        return self.meta.get("model_sha256") is not None


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of ``data`` (what meta.json and channel manifests record)."""
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes, sync: bool = True) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        if sync:
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


def write_bundle(root: Path | str, model_bytes: bytes | None, vocab: Sequence[ItemId | None],
                 meta: dict[str, Any], *, keep: int = 5, make_current: bool = True,
                 detector_bytes: bytes | None = None,
                 two_stage: dict[str, bytes] | None = None,
                 delta: tuple[str, dict[str, bytes]] | None = None,
                 vocab_bytes: bytes | None = None, sync: bool = True) -> str:
    """Publish a new bundle atomically and return its version.

    ``meta`` must hold ``max_len``; version, created time, checksums and the vocabulary
    size are filled in here. The oldest versions beyond ``keep`` are removed (never the
    current one). ``detector_bytes``: the fake-user detector (``meta["detector"]`` then
    describes it; its sha256 is filled in here). ``two_stage``: the two-stage parts, every
    one of ``TWO_STAGE_FILES`` (``meta["two_stage"]`` then holds their sha256).
    ``model_bytes`` None: no exact graph (the bundle is ranked in two stages only).
    ``delta``: (base version, ``delta_files``): the bundle is also a delta against that
    base (``meta["delta"]``); it still writes its whole files here. ``vocab_bytes``:
    ``vocab_json(vocab)``, when the caller has it. ``sync`` False: nothing is fsynced (a
    cache of the bundle topic; module docstring).
    """
    assert keep >= 1, "keep at least the bundle being written"
    assert "max_len" in meta, "meta needs max_len (the history length the model takes)"
    assert model_bytes is not None or two_stage is not None, "a bundle needs a ranking graph"
    assert delta is None or (two_stage is not None and model_bytes is None), \
        "a delta carries the two-stage parts and no exact graph"
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    version = str(meta.get("version") or _next_version(root))
    if vocab_bytes is None:
        vocab_bytes = vocab_json(vocab)
    full_meta = dict(meta)
    full_meta.update(
        format=FORMAT_VERSION, version=version, created=time.time(),
        model_sha256=None if model_bytes is None else sha256_hex(model_bytes),
        vocab_sha256=sha256_hex(vocab_bytes),
        vocab_size=len(vocab), input=INPUT_NAME, output=OUTPUT_NAME,
    )
    if detector_bytes is not None:
        full_meta["detector"] = {**dict(meta.get("detector") or {}),
                                 "sha256": sha256_hex(detector_bytes),
                                 "inputs": list(DETECTOR_INPUTS),
                                 "outputs": list(DETECTOR_OUTPUTS)}
    if two_stage is not None:
        assert sorted(two_stage) in (sorted(TWO_STAGE_FILES),
                                     sorted(TWO_STAGE_FILES + PRIOR_FILES)), sorted(two_stage)
        full_meta["two_stage"] = {**dict(meta.get("two_stage") or {}), "sha256": {
            name: sha256_hex(data) for name, data in two_stage.items()}}
    if delta is not None:
        base, files = delta
        assert sorted(files) == sorted(DELTA_FILES + (DELTA_PRIOR_FILES if PRIOR_FILES[0]
                                                      in two_stage else ())), sorted(files)
        full_meta["delta"] = {**dict(meta.get("delta") or {}), "base": base,
                              "codec": DELTA_CODEC, "sha256": {
                                  name: sha256_hex(data) for name, data in files.items()}}
    tmp = root / f".tmp-{version}-{WRITER_TOKEN}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if model_bytes is not None:
        _write_synced(tmp / MODEL_FILE, model_bytes, sync)
    _write_synced(tmp / VOCAB_FILE, vocab_bytes, sync)
    if detector_bytes is not None:
        _write_synced(tmp / DETECTOR_FILE, detector_bytes, sync)
    for name, data in [*(two_stage or {}).items(), *(delta[1] if delta else {}).items()]:
        _write_synced(tmp / name, data, sync)
    # meta.json last: a directory without it is never a bundle
    _write_synced(tmp / META_FILE, json.dumps(full_meta, indent=2, sort_keys=True).encode(),
                  sync)
    if sync:
        fsync_dir(tmp)
    os.rename(tmp, root / version)
    if sync:
        fsync_dir(root)
    if make_current:
        set_current(root, version, sync=sync)
    _prune(root, keep)
    return version


def vocab_json(vocab: Sequence[ItemId | None],
               previous: tuple[Sequence[ItemId | None], bytes] | None = None) -> bytes:
    """vocab.json's bytes: the JSON list of ``vocab``. ``previous``: an earlier vocabulary
    and its bytes, extended when ``vocab`` only adds items after it (at 1M ids, encoding
    the whole list took ~0.13 s of every export)."""
    if previous is not None:
        old, data = previous
        n = len(old)
        if len(vocab) >= n and list(vocab[:n]) == list(old):
            added = [(row, vocab[row - 1]) for row in range(n + 1, len(vocab) + 1)]
            if appended_items(n, len(vocab), added) is not None:
                return _patched_vocab(data, n, len(vocab), added)
    return json.dumps(list(vocab), ensure_ascii=False).encode("utf-8")


def set_current(root: Path | str, version: str, *, sync: bool = True) -> None:
    """Point ``CURRENT`` at ``version`` (which must exist) by an atomic rename (``sync``
    False: without the fsyncs, in a cache)."""
    root = Path(root)
    if not (root / version / META_FILE).is_file():
        raise BundleError("missing", f"no bundle {version!r} under {root}")
    tmp = root / f".{CURRENT}.tmp-{WRITER_TOKEN}-{uuid.uuid4().hex[:8]}"
    _write_synced(tmp, version.encode() + b"\n", sync)
    os.replace(tmp, root / CURRENT)
    if sync:
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
    the bundle topic (``advrec.channel``) and is rebuilt into a directory by each worker.
    A delta travels without its whole item table and vocabulary (``apply_delta``)."""
    path = Path(root) / version
    meta_bytes = (path / META_FILE).read_bytes()
    names: tuple[str, ...] = (MODEL_FILE, VOCAB_FILE, DETECTOR_FILE, *TWO_STAGE_FILES,
                              *PRIOR_FILES)
    if json.loads(meta_bytes).get("delta"):
        names = (DETECTOR_FILE, TWO_STAGE_USER, TWO_STAGE_RESCORE, *DELTA_FILES,
                 *DELTA_PRIOR_FILES)
    optional = (MODEL_FILE, DETECTOR_FILE, *TWO_STAGE_FILES, *PRIOR_FILES, *DELTA_PRIOR_FILES)
    return [*((name, (path / name).read_bytes()) for name in names
              if name not in optional or (path / name).is_file()), (META_FILE, meta_bytes)]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(root: Path | str, version: str, *, model: bool = True,
                vocab: tuple[ItemId | None, ...] | None = None) -> Bundle:
    """Read and verify one bundle; raise ``BundleError`` naming what is wrong.

    ``model`` False: model.onnx is verified against its checksum but not kept
    (``model_bytes`` is empty): a worker that ranks in two stages never loads it, and at 1M
    items it is 256 MB. ``vocab``: the vocabulary, known already (a delta that only adds
    items to the live one's): vocab.json is checked against its checksum and size but not
    decoded again.
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
    model_bytes = b""
    if meta["model_sha256"] is None:  # ranked in two stages only (a delta)
        if not meta.get("two_stage"):
            raise BundleError("bad_meta", "meta.json names neither model.onnx nor the "
                                          "two-stage parts")
    else:
        try:
            model_bytes = (path / MODEL_FILE).read_bytes() if model else b""
            model_sha = sha256_hex(model_bytes) if model else _file_sha256(path / MODEL_FILE)
        except FileNotFoundError:
            raise BundleError("missing_model", f"{path / MODEL_FILE} does not exist") from None
        if model_sha != meta["model_sha256"]:
            raise BundleError("checksum_mismatch",
                              f"model.onnx sha256 differs from meta ({version})")
    try:
        vocab_bytes = b"" if vocab is not None else (path / VOCAB_FILE).read_bytes()
        vocab_sha = (_file_sha256(path / VOCAB_FILE) if vocab is not None
                     else sha256_hex(vocab_bytes))
    except FileNotFoundError:
        raise BundleError("vocab_mismatch", f"{path / VOCAB_FILE} does not exist") from None
    if vocab_sha != meta["vocab_sha256"]:
        raise BundleError("checksum_mismatch", f"vocab.json sha256 differs from meta ({version})")
    if vocab is not None:
        if len(vocab) != meta["vocab_size"]:
            raise BundleError("vocab_mismatch", f"the vocabulary has {len(vocab)} rows, "
                                                f"meta.json says {meta['vocab_size']}")
    else:
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
        if not isinstance(sums, dict) or sorted(sums) not in (
                sorted(TWO_STAGE_FILES), sorted(TWO_STAGE_FILES + PRIOR_FILES)):
            raise BundleError("bad_meta", f"meta.json two_stage must name {TWO_STAGE_FILES}"
                                          f" (and, with the prior, {PRIOR_FILES})")
        two_stage = {}
        for name in sums:
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


# ---------------------------------------------------------------------------- item rows
# items.npy holds the two-stage item table [V+1, D'] in the smallest of three forms that keeps
# its float32 values exactly (``encode_item_rows``):
#   int8 [V+1, D'+1]: row r is q[r, :D'] * 2**q[r, D'] (a power-of-two scale per row, so the
#       values are exact float32 and rounding them again changes nothing); G's scoring rows
#       are put on that grid by the trainer (trainer/export.py ``compact_item_tables``)
#   float16 [V+1, D'], float32 [V+1, D']: the values themselves
# At 1M items x 64 that is 65 MB instead of 128 (float16) or 256 (float32) on the topic.
INT8_LEVELS = 127  # |q| <= 127: a row's largest value keeps 7 bits (64..127 of the scale)


def int8_rows(table: np.ndarray) -> np.ndarray:
    """Round float32 rows [N, D] to int8 levels with a power-of-two scale each, packed as
    items.npy stores them: [N, D+1] int8, row r = q[r, :D] * 2**q[r, D]. The exponent is
    the smallest with |x| <= 127 * 2**e over the row (0 for a zero row). ``ValueError`` on
    values that are not finite."""
    x = np.asarray(table, dtype=np.float32)  # (N, D)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"int8 rows need a finite 2-d table, not {x.shape} {x.dtype}")
    peak = np.abs(x).max(axis=1, initial=0.0)  # (N,)
    _, exp = np.frexp(peak / INT8_LEVELS)  # peak/127 = m * 2**exp, 0.5 <= m < 1
    exp = np.where(peak > 0, exp, 0)
    # frexp's exponent is the smallest with peak/127 < 2**exp; one lower still fits when
    # peak/127 is a power of two
    lower = (peak > 0) & (peak <= np.ldexp(np.float32(INT8_LEVELS), exp - 1))
    exp = np.clip(np.where(lower, exp - 1, exp), -126, 127).astype(np.int32)  # (N,)
    levels = x * _powers_of_two(-exp)[:, None]  # (N, D) float32, exact: a power of two
    np.rint(levels, out=levels)
    np.clip(levels, -INT8_LEVELS, INT8_LEVELS, out=levels)
    out = np.empty((len(x), x.shape[1] + 1), dtype=np.int8)  # (N, D+1)
    out[:, :-1] = levels
    out[:, -1] = exp
    return out


def _powers_of_two(exp: np.ndarray) -> np.ndarray:
    """2**exp as float32 [N], exactly, for exponents -149..127 (below -126 subnormal)."""
    return np.ldexp(np.ones(len(exp), dtype=np.float32), exp.astype(np.int32))


def encode_item_rows(table: np.ndarray) -> np.ndarray:
    """The array items.npy stores for a float32 table [N, D']: int8 levels with their
    exponent as a last column when they hold it exactly, else float16 if that does, else
    the float32 table (see "item rows" above)."""
    table = np.ascontiguousarray(table, dtype=np.float32)  # (N, D')
    packed = int8_rows(table)  # (N, D'+1)
    if np.array_equal(item_rows(packed), table):
        return packed
    half = table.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), table) else table


def item_rows(stored: np.ndarray, columns: slice = slice(None),
              out: np.ndarray | None = None) -> np.ndarray:
    """The float32 table [N, D'] that items.npy's array stands for (``encode_item_rows``),
    or only its ``columns`` (a contiguous copy); ``ValueError`` for any other dtype or
    shape. ``out``: a float32 array of that shape to write it into (and return), instead
    of a new one (or, for a whole float32 table, a view of it)."""
    if stored.ndim != 2:
        raise ValueError(f"an item table is 2-d, not {stored.shape}")
    if stored.dtype == np.int8:
        if stored.shape[1] < 2:
            raise ValueError(f"int8 item rows need levels and an exponent, not {stored.shape}")
        # (N, D') float32 in one pass, widened and scaled: exact, as the scale is a power
        # of two (at 1M items 0.088 s, against 0.105 s widening a copy and then scaling it)
        scale = _powers_of_two(stored[:, -1])[:, None]  # (N, 1)
        with np.errstate(over="ignore"):  # a damaged exponent: ``item_rows_finite`` says so
            return np.multiply(stored[:, :-1][:, columns], scale, out=out, dtype=np.float32)
    if stored.dtype in (np.float16, np.float32):
        values = stored[:, columns]  # (N, D'), or its columns: a view
        if out is not None:
            np.copyto(out, values)
            return out
        return (np.asarray(values, dtype=np.float32) if columns == slice(None)
                else np.array(values, dtype=np.float32))
    raise ValueError(f"item rows are int8, float16 or float32, not {stored.dtype}")


def item_width(stored: np.ndarray) -> int:
    """D', the width of the float32 rows items.npy's array stands for (``ValueError`` as
    ``item_rows``)."""
    return int(item_rows(stored[:0]).shape[1])


def item_rows_finite(stored: np.ndarray, rows: np.ndarray | None = None) -> bool:
    """Whether the float32 table [N, D'] that items.npy's array ``stored`` stands for
    (``item_rows(stored)``; ``rows``, when the caller has widened it) is finite, checked
    where it can be infinite: int8 rows only where their exponent lets a level overflow
    (|level| <= 128 = 2**7, so an exponent up to 120 stays below float32's 2**128 and a
    product of an integer and a power of two is never NaN); float16 rows in their own,
    half-size form. At 1M items a pass over the whole float32 table took ~0.1 s of every
    load."""
    if stored.dtype == np.int8:
        hot = np.flatnonzero(stored[:, -1] > 120)  # (n,): rows that may overflow
        return bool(np.isfinite(item_rows(stored[hot]) if rows is None else rows[hot]).all())
    if stored.dtype == np.float16:
        return bool(np.isfinite(stored).all())  # widening keeps inf and NaN as they are
    return bool(np.isfinite(stored if rows is None else rows).all())


def delta_files(base_items: np.ndarray, base_vocab: Sequence[ItemId | None],
                items: np.ndarray, vocab: Sequence[ItemId | None],
                base_links: SparseRows | None = None,
                links: SparseRows | None = None) -> dict[str, bytes]:
    """The files of a delta from a base's item table [V0+1, D'] and vocabulary to a new
    bundle's [V+1, D']: every row whose bytes differ, every row past the base's end, and
    every vocabulary row whose id differs; with the prior's links of both, the rows whose
    links differ. ``ValueError`` if the tables' dtype or width differ, or one of the two
    has links and the other not (then only a full bundle will do)."""
    if (base_links is None) != (links is None):
        raise ValueError("the prior is on in one bundle and off in the other")
    if base_items.dtype != items.dtype or base_items.shape[1:] != items.shape[1:]:
        raise ValueError(f"item tables differ in kind: {base_items.dtype}{base_items.shape} "
                         f"vs {items.dtype}{items.shape}")
    n = min(len(base_items), len(items))
    width = items.dtype.itemsize * int(np.prod(items.shape[1:]))
    old = np.ascontiguousarray(base_items[:n]).view(np.uint8).reshape(n, width)
    new = np.ascontiguousarray(items[:n]).view(np.uint8).reshape(n, width)
    rows = np.concatenate([np.flatnonzero((old != new).any(axis=1)),
                           np.arange(n, len(items))]).astype(np.int64)  # (n_changed,)
    base_rows = np.zeros((len(rows), *items.shape[1:]), dtype=items.dtype)  # (n, D')
    inside = rows < n
    base_rows[inside] = base_items[rows[inside]]  # past the base's end: steps from zero
    n_old = min(len(base_vocab), len(vocab))
    changes = [] if tuple(base_vocab[:n_old]) == tuple(vocab[:n_old]) else [
        [row, item] for row, item in enumerate(vocab[:n_old], start=1)
        if base_vocab[row - 1] != item]  # mostly none: items are only added
    changes += [[row, vocab[row - 1]] for row in range(n_old + 1, len(vocab) + 1)]
    files = {DELTA_ROWS: _coded(np.diff(rows, prepend=0)),  # gaps: (n,)
             DELTA_ITEMS: _coded(_units(items[rows]) - _units(base_rows)),  # steps: (n, D')
             DELTA_VOCAB: json.dumps({"size": len(vocab), "rows": changes},
                                     ensure_ascii=False).encode("utf-8")}
    if links is not None and base_links is not None:
        part = links.restricted(links.changed_rows(base_links))
        assert part.rows is not None
        files.update(zip(DELTA_PRIOR_FILES, map(_coded, (part.rows, part.indptr,
                                                          part.cols, part.vals)),
                         strict=True))
    return files


def _coded(array: np.ndarray) -> bytes:
    return zlib.compress(npy_bytes(np.ascontiguousarray(array)), DELTA_ZLIB_LEVEL)


def _decoded(data: bytes, codec: str | None) -> np.ndarray:
    """A delta file's array: zlib-compressed .npy under ``DELTA_CODEC``, plain without."""
    if codec is not None:
        if codec != DELTA_CODEC:
            raise ValueError(f"unknown delta codec {codec!r}")
        data = zlib.decompress(data)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _units(values: np.ndarray) -> np.ndarray:
    """``values`` [...] viewed as unsigned integers of their width: a step between two rows
    is their difference in these, which wraps around and back exactly."""
    values = np.ascontiguousarray(values)
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


def delta_rows(files: dict[str, bytes], codec: str | None = DELTA_CODEC) -> np.ndarray:
    """The rows [n] int64 of items.npy that a delta's files (``delta_files``) change."""
    gaps = _decoded(files[DELTA_ROWS], codec)
    if codec is None:  # plain: the rows themselves
        return gaps
    if gaps.ndim != 1 or gaps.dtype != np.int64 or (len(gaps) and (
            gaps[0] < 0 or (gaps[1:] <= 0).any())):
        raise ValueError("a delta's row gaps must be int64, the first >= 0, the rest > 0")
    return np.cumsum(gaps)


def appended_items(n_base: int, size: int,
                   changes: Sequence[tuple[int, ItemId | None]]) -> list[ItemId] | None:
    """The items a delta's vocabulary adds after a base of ``n_base`` rows, if that is all it
    does (rows n_base+1..size, in order, none freed): else None."""
    if len(changes) != size - n_base or any(
            row != n_base + n or not isinstance(item, str)
            for n, (row, item) in enumerate(changes, start=1)):
        return None
    return [item for _, item in changes]  # type: ignore[misc]


def _patched_vocab(base_bytes: bytes, n_base: int, size: int,
                   changes: Sequence[tuple[int, ItemId | None]]) -> bytes:
    """vocab.json's bytes after a delta's changes. When it only adds items, the base's bytes
    are extended as ``json.dumps`` would write the whole list, without reading them (at 1M
    ids, decoding and encoding the list held the GIL for ~0.3 s in a serving worker)."""
    added = appended_items(n_base, size, changes)
    if added is not None:
        if not added:
            return base_bytes
        tail = json.dumps(added, ensure_ascii=False).encode("utf-8")  # ["a", "b"]
        return tail if n_base == 0 else base_bytes[:-1] + b", " + tail[1:]
    vocab = json.loads(base_bytes)
    if not isinstance(vocab, list):
        raise ValueError("the base's vocab.json is not a list")
    vocab = vocab[:size] + [None] * max(0, size - len(vocab))
    for row, item in changes:
        vocab[row - 1] = item
    return json.dumps(vocab, ensure_ascii=False).encode("utf-8")


def delta_base(delta: dict[str, Any]) -> str:
    """The version a delta (meta.json's ``delta``) is rebuilt from: a version beside it in
    the same root, never a path (``ValueError``)."""
    base = str(delta["base"])
    if not base or "/" in base or base.startswith("."):
        raise ValueError(f"base {base[:80]!r} is not a version name")
    return base


def apply_delta(root: Path | str, version: str, *, sync: bool = True) -> bool:
    """Rebuild a delta bundle's whole items.npy and vocab.json from its base under the same
    ``root``; True if it did, False if ``version`` is not a delta or is whole already (its
    writer's own copy). Raise ``BundleError`` (``bad_delta``) when the base is not here or
    the rebuilt files do not match the checksums meta.json records for them. ``sync``
    False: the rebuilt files are not fsynced (a cache of the bundle topic)."""
    root = Path(root)
    path = root / version
    try:
        meta = json.loads((path / META_FILE).read_text())
        delta = meta.get("delta")
        if not delta:
            return False
        base, sums = delta_base(delta), dict(delta["sha256"])
        codec = delta.get("codec")
        whole_sums = dict(meta["two_stage"]["sha256"])
        items_sha = whole_sums[TWO_STAGE_ITEMS]
        vocab_sha = meta["vocab_sha256"]
        prior = PRIOR_FILES[0] in whole_sums  # the links are rebuilt too
    except FileNotFoundError:
        raise BundleError("missing_meta", f"{path / META_FILE} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError("bad_meta", f"{version}: meta.json: {exc!r}"[:300]) from None
    if (path / TWO_STAGE_ITEMS).is_file() and (path / VOCAB_FILE).is_file():
        return False
    data: dict[str, bytes] = {}
    for name in DELTA_FILES + (DELTA_PRIOR_FILES if prior else ()):
        try:
            data[name] = (path / name).read_bytes()
        except FileNotFoundError:
            raise BundleError("bad_delta", f"{version}: {name} does not exist") from None
        if sha256_hex(data[name]) != sums.get(name):
            raise BundleError("checksum_mismatch", f"{name} sha256 differs from meta ({version})")
    base_path = root / base
    try:
        base_items = np.load(base_path / TWO_STAGE_ITEMS, mmap_mode="r", allow_pickle=False)
        base_vocab_bytes = (base_path / VOCAB_FILE).read_bytes()
        n_base = int(json.loads((base_path / META_FILE).read_text())["vocab_size"])
        rows = delta_rows(data, codec)  # (n,)
        values = _decoded(data[DELTA_ITEMS], codec)  # (n, D'): steps, or plain values
        spec = json.loads(data[DELTA_VOCAB])
        size = int(spec["size"])
        changes = [(int(row), item) for row, item in spec["rows"]]
        links = None
        if prior:
            base_links = SparseRows.from_files({name: (base_path / name).read_bytes()
                                                for name in PRIOR_FILES})
            rows_, indptr, cols, vals = (_decoded(data[name], codec)
                                         for name in DELTA_PRIOR_FILES)
            links = base_links.merge(SparseRows(indptr, cols, vals, rows_), size + 1)
    except FileNotFoundError:
        raise BundleError("bad_delta", f"{version}: its base {base} is not in {root} (a "
                                       "delta is rebuilt from a copy of its base)") from None
    except (OSError, ValueError, KeyError, TypeError, zlib.error) as exc:
        raise BundleError("bad_delta", f"{version}: {exc!r}"[:300]) from None
    want = base_items.dtype if codec is None else _units(base_items[:0]).dtype
    if (rows.ndim != 1 or rows.dtype != np.int64 or values.shape != (len(rows),
                                                                      *base_items.shape[1:])
            or values.dtype != want
            or (len(rows) and not (0 <= rows.min() and rows.max() <= size))
            or not all(1 <= row <= size for row, _ in changes)):
        raise BundleError("bad_delta", f"{version}: its rows do not fit its base {base}")
    table = np.zeros((size + 1, *base_items.shape[1:]), dtype=base_items.dtype)  # (V+1, D')
    n = min(len(base_items), size + 1)
    table[:n] = base_items[:n]
    if codec is None:
        table[rows] = values
    else:  # each row: its base row (zero past the base's end) plus its step, wrapping
        units = _units(table)
        units[rows] += values
    try:
        vocab_bytes = _patched_vocab(base_vocab_bytes, n_base, size, changes)
    except (ValueError, TypeError, IndexError) as exc:
        raise BundleError("bad_delta", f"{version}: {exc!r}"[:300]) from None
    if sha256_hex(vocab_bytes) != vocab_sha:
        raise BundleError("bad_delta", f"{version}: the vocabulary rebuilt from {base} does "
                                       "not match meta's sha256")
    tmp_items = path / f".{TWO_STAGE_ITEMS}.tmp-{WRITER_TOKEN}"
    with open(tmp_items, "wb") as fh:
        np.save(fh, table, allow_pickle=False)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    del table
    if _file_sha256(tmp_items) != items_sha:
        tmp_items.unlink()
        raise BundleError("bad_delta", f"{version}: the item table rebuilt from {base} does "
                                       "not match meta's sha256")
    whole = {VOCAB_FILE: vocab_bytes, **(links.files() if links is not None else {})}
    for name, want in whole_sums.items():
        if name in whole and sha256_hex(whole[name]) != want:
            tmp_items.unlink()
            raise BundleError("bad_delta", f"{version}: {name} rebuilt from {base} does not "
                                           "match meta's sha256")
    for name, blob in whole.items():
        _write_synced(path / f".{name}.tmp-{WRITER_TOKEN}", blob, sync)
        os.replace(path / f".{name}.tmp-{WRITER_TOKEN}", path / name)
    os.replace(tmp_items, path / TWO_STAGE_ITEMS)
    if sync:
        fsync_dir(path)
    return True
