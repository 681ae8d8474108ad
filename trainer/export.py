"""Export G's scoring path to ONNX, check it against torch, and publish it as a bundle.

Also the ``advrec export`` command: checkpoint in, bundle out.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import logging
import os
import pickle
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aiokafka.errors import KafkaError
from torch import nn

from advrec.bundle import (
    DETECTOR_INPUTS,
    DETECTOR_OUTPUTS,
    INPUT_NAME,
    OUTPUT_NAME,
    TWO_STAGE_ITEMS,
    bundle_files,
    delta_files,
    delta_rows,
    int8_rows,
    item_rows,
    write_bundle,
)
from advrec.channel_io import publish_to_topic
from advrec.config import bootstrap_servers, settings_as_dict
from advrec.links import PRIOR_FILES, SparseRows
from trainer.learner import OnlineLearner
from trainer.model import Generator

__all__ = ["EXACT_BELOW_ITEMS", "TWO_STAGE_FROM_ITEMS", "DeltaPlanner", "ExportError",
           "PackedTable",
           "check_detector_parity", "check_parity", "detector_model", "export_detector",
           "export_filter_detector", "export_onnx", "export_two_stage_checked", "main",
           "publish_bundle", "require_two_stage_parity", "scoring_model"]

OPSET = 17  # LayerNormalization is a native op from 17; onnxruntime 1.20+ runs it
PARITY_TOL = 1e-3  # float32 scores of a 2-layer model agree to ~1e-6; 1e-3 flags real bugs
PARITY_HISTORIES = 64  # replayed histories (plus an empty one) checked before publishing
# bundles of this many items or more carry the two-stage parts (trainer/twostage.py): half
# the worker's default switch (ADVREC_TWO_STAGE_ITEMS, 200k), so that a worker told to switch
# a little lower still finds them; below, they would only add to every bundle's bytes
TWO_STAGE_FROM_ITEMS = 100_000
# bundles of this many items or more carry no exact graph (model.onnx): a worker ranks them
# in two stages whatever its switch says. Twice the worker's default switch: a worker told to
# switch a little higher still finds the graph; above, it would be the largest file of every
# full bundle (G's table and the prior's, 768 MB at 1M items) and the slowest part of export
EXACT_BELOW_ITEMS = 400_000

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """A model cannot be exported or failed its check; nothing was published."""


@dataclass(frozen=True)
class _Base:
    version: str
    items: np.ndarray  # (V0+1, D') as its items.npy holds it
    vocab: tuple[str | None, ...]
    links: SparseRows | None  # the prior's, when its parts carry them


def _links(two_stage: dict[str, bytes]) -> SparseRows | None:
    return SparseRows.from_files(two_stage) if PRIOR_FILES[0] in two_stage else None


class DeltaPlanner:
    """Says whether a two-stage export goes out whole or as a delta (advrec/bundle.py)
    against the bundle published before it: a full one first, then every ``full_every_s``
    (0: always), and whenever a delta would change more than ``max_share`` of the rows.

    Each delta is against the previous bundle, full or delta: it carries what changed in
    one export interval, not everything since the last full bundle (at 1M items the sampled
    softmax steps ~4k rows a batch, so the rows changed since a full bundle soon number in
    the hundreds of thousands). A reader rebuilds the chain in order; the bundle topic keeps
    every link of it back to its full bundle (``advrec.channel.TopicView.stale``).
    """

    def __init__(self, full_every_s: float, max_share: float) -> None:
        self.full_every_s = full_every_s
        self.max_share = max_share
        self.base: _Base | None = None  # the bundle published last
        self.full_at = 0.0  # time.monotonic() of the last full one

    def plan(self, two_stage: dict[str, bytes], vocab: Sequence[str | None],
             items: np.ndarray | None = None) -> tuple[str, dict[str, bytes], int] | None:
        """(base version, the delta's files, rows it changes) for these two-stage parts, or
        None: a full bundle. ``items``: their items.npy's array, when the caller has it."""
        base = self.base
        if (base is None or self.full_every_s <= 0
                or time.monotonic() - self.full_at >= self.full_every_s):
            return None
        items = _items(two_stage) if items is None else items
        try:
            files = delta_files(base.items, base.vocab, items, vocab, base.links,
                                _links(two_stage))
        except ValueError:  # the table's dtype or width changed, or the prior's presence
            return None
        n_rows = len(delta_rows(files))
        if n_rows > self.max_share * len(items):
            return None
        return base.version, files, n_rows

    def published(self, version: str, two_stage: dict[str, bytes] | None,
                  vocab: Sequence[str | None], delta: bool,
                  items: np.ndarray | None = None) -> None:
        """Note a bundle the fleet received: the next delta's base (with two-stage parts;
        ``items``: their items.npy's array, kept as is: the caller no longer changes it)."""
        now = time.monotonic()
        if not delta:
            self.full_at = now
        self.base = None if two_stage is None else _Base(
            version, _items(two_stage) if items is None else items, tuple(vocab),
            _links(two_stage))


def _items(two_stage: dict[str, bytes]) -> np.ndarray:
    return np.load(io.BytesIO(two_stage[TWO_STAGE_ITEMS]), allow_pickle=False)


class PackedTable:
    """G's two-stage item table in int8 rows (``int8_rows``), kept from one export to the
    next and packed again only where G's rows changed since; and the export's two copies of
    it, kept too and written again only where it changed.

    At 1M items, packing the whole table twice per export (the rounded copy of G, then its
    items.npy) took ~0.75 s of the trainer's core, and the sampled softmax changes only the
    ~25k rows its batches touched. Each ``update`` compares G's rows with a float32 copy of
    what it packed last (one pass) and packs the rows that differ or are new: the result is
    ``int8_rows`` of the whole table, row for row (a test pins it). It costs that float32
    copy and the int8 table in memory (~330 MB at 1M items x 64).

    An export also needs G's rows widened from those int8 rows (``rounded``: the tables of
    the export's copy of G) and items.npy's array (``held``: a copy with padding and freed
    rows zero). Made afresh, they took ~0.25 s and ~0.1 s of every export at 1M items, most
    of it the kernel handing out 320 MB of new pages. They outlive the export (the quality
    gate ranks with the copy of G until the next bundle goes out; the next delta is
    computed against the items), so each kind keeps a few copies: one that nothing outside
    refers to any more is written again where the table changed since it was made, and
    handed out again. A copy still referred to is never written. Two of each are held most
    of the time (~640 MB at 1M items x 64): what exports made anyway, now kept between them.
    """

    COPIES = 3  # of each kind: the live bundle's, the export's, one an export dropped
    LOG = 8  # updates whose repacked rows are kept: a copy older than that is refilled
    CHUNK = 1 << 16  # rows a copy is written at a time: no temporary of the whole table

    def __init__(self) -> None:
        self._raw = np.zeros((0, 0), np.float32)  # (capacity, D'): G's rows as packed last
        self._packed = np.zeros((0, 1), np.int8)  # (capacity, D'+1)
        self.n = 0  # rows held: V+1 at the last update
        self.repacked = 0  # rows the last update packed
        self.updates = 0  # updates since the table last started over
        self._log: list[tuple[int, np.ndarray]] = []  # (update, rows it packed), the latest
        self._copies: dict[str, list[_Copy]] = {"rounded": [], "held": []}
        self.copied = 0  # rows the last ``rounded`` or ``held`` wrote

    def update(self, generator: Generator) -> np.ndarray:
        """Pack G's scoring rows [V+1, D'] (bias last, as ``item_vectors`` reads them, padding
        and freed rows as they are) and return them as [V+1, D'+1] int8: a view, valid
        until the next update. ``ValueError`` on values that are not finite."""
        with torch.no_grad():
            table = generator.item_table().detach().float().cpu().numpy()  # (V+1, D)
            bias = generator.item_bias()
            bias = None if bias is None else bias.detach().float().cpu().numpy()  # (V+1,)
        n, d = table.shape
        width = d + (bias is not None)
        if self._raw.shape[1] != width or n < self.n:  # another shape: start over
            self._raw = np.zeros((0, width), np.float32)
            self._packed = np.zeros((0, width + 1), np.int8)
            self.n, self.updates, self._log = 0, 0, []
            self._copies = {kind: [] for kind in self._copies}
        if n > len(self._raw):  # room for growth: the vocabulary grows a little each export
            capacity = max(n, len(self._raw) + len(self._raw) // 4)
            raw = np.zeros((capacity, width), np.float32)
            packed = np.zeros((capacity, width + 1), np.int8)
            raw[: self.n], packed[: self.n] = self._raw[: self.n], self._packed[: self.n]
            self._raw, self._packed = raw, packed
        old = self._raw[: self.n]  # (n_old, D')
        changed = (table[: self.n] != old[:, :d]).any(axis=1)  # (n_old,)
        if bias is not None:
            changed |= bias[: self.n] != old[:, d]
        rows = np.concatenate([np.flatnonzero(changed), np.arange(self.n, n)])  # (r,)
        fresh = table[rows]  # (r, D)
        if bias is not None:
            fresh = np.concatenate([fresh, bias[rows, None]], axis=1)  # (r, D')
        self._packed[rows] = int8_rows(fresh)  # ValueError first: nothing half-updated
        self._raw[rows] = fresh
        self.n, self.repacked = n, len(rows)
        self.updates += 1
        self._log = [*self._log[-(self.LOG - 1):], (self.updates, rows)]
        return self._packed[:n]

    @property
    def packed(self) -> np.ndarray:
        """The rows packed at the last ``update`` [V+1, D'+1] int8 (what it returned)."""
        return self._packed[: self.n]

    def rounded(self, generator: Generator) -> list[torch.Tensor]:
        """The tables of a tied G's copy (``item_tables``' order: its rows [V+1, D], then
        the bias [V+1, 1] when it has one) widened from the rows packed at the last
        ``update``: ``_rounded_tables`` of them, in a kept copy."""
        columns = _table_columns(self._packed[: self.n], generator)

        def fill(arrays: list[np.ndarray], rows: np.ndarray) -> None:
            for out, cols in zip(arrays, columns, strict=True):
                out[rows] = item_rows(self._packed[rows], cols)

        widths = [c.stop - c.start for c in columns]
        arrays = self._copy("rounded", widths, np.float32, fill)
        return [torch.from_numpy(a[: self.n]) for a in arrays]

    def held(self, generator: Generator) -> np.ndarray:
        """items.npy's array [V+1, D'+1] for the rows packed at the last ``update``, with
        padding and G's freed rows zero: ``twostage.held_rows`` of them, in a kept copy."""
        assert generator.n_items + 1 == self.n, (generator.n_items, self.n)
        zero = np.concatenate([[0], _freed_rows(generator)]).astype(np.int64)  # (z,)

        def fill(arrays: list[np.ndarray], rows: np.ndarray) -> None:
            arrays[0][rows] = self._packed[rows]

        (array,) = self._copy("held", [self._packed.shape[1]], np.int8, fill, zero)
        return array[: self.n]

    def _copy(self, kind: str, widths: list[int], dtype: type, fill: _Fill,
              zero: np.ndarray | None = None) -> list[np.ndarray]:
        """A copy of this kind that nothing outside refers to, brought up to the last
        update (``fill`` writes given rows from the packed ones), with the ``zero`` rows
        zero; a new one if none is free or fits."""
        now = self.updates
        # a free copy too small for the grown table is given back, not kept
        copies = self._copies[kind] = [c for c in self._copies[kind]
                                       if not c.unused() or c.fits(self.n, widths, dtype)]
        free = [c for c in copies if c.unused()]
        if free:
            copy_ = max(free, key=lambda c: c.at)  # the most recent: the fewest rows to write
            oldest = self._log[0][0]  # the first update whose rows the log still has
            if copy_.at + 1 >= oldest:  # the rows packed since it was made, and its zeros
                since = [rows for u, rows in self._log if u > copy_.at]
                rows = np.unique(np.concatenate([*since, copy_.zeroed]))
                rows = rows[rows < self.n]
            else:  # older than the log: all of it
                rows = np.arange(self.n)
        else:
            capacity = len(self._packed)  # the packed table's: grows with it, a little ahead
            copy_ = _Copy([np.empty((capacity, w), dtype) for w in widths])
            copies.append(copy_)
            if len(copies) > self.COPIES:  # drop the oldest (a caller may still hold it)
                copies.pop(0)
            rows = np.arange(self.n)
        for start in range(0, len(rows), self.CHUNK):
            fill(copy_.arrays, rows[start: start + self.CHUNK])
        if zero is not None:
            for a in copy_.arrays:
                a[zero] = 0
        copy_.at, copy_.zeroed = now, (np.zeros(0, np.int64) if zero is None else zero)
        self.copied = len(rows)
        return copy_.arrays


_Fill = Callable[[list[np.ndarray], np.ndarray], None]


@dataclass
class _Copy:
    """A copy ``PackedTable`` hands out and takes back: its arrays (each [capacity, width],
    the owners of their memory), the update they reflect and the rows set to zero."""

    arrays: list[np.ndarray]
    at: int = -1
    zeroed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def unused(self) -> bool:
        # a view of an array refers to it (its base), and so does a tensor made from one by
        # torch.from_numpy: only this copy's list, the loop and the call refer to a free one
        return all(sys.getrefcount(a) <= 3 for a in self.arrays)

    def fits(self, n: int, widths: list[int], dtype: type) -> bool:
        return ([a.shape[1] for a in self.arrays] == widths and len(self.arrays[0]) >= n
                and self.arrays[0].dtype == dtype)


def _table_columns(packed: np.ndarray, generator: Generator) -> list[slice]:
    """The packed rows' columns of each of a tied G's item tables: its rows, then its bias."""
    d = generator.config.d_model
    columns = [slice(0, d)] + ([slice(d, d + 1)] if generator.item_bias() is not None else [])
    assert packed.shape[1] == d + len(columns), (packed.shape, d)
    return columns


def _freed_rows(generator: Generator) -> np.ndarray:
    """The rows a bounded vocabulary freed (G scores them NEG), int64."""
    if generator.hole_offset is None:
        return np.zeros(0, np.int64)
    offset = generator.hole_offset[: generator.n_items + 1].cpu().numpy()
    return np.flatnonzero(offset < 0).astype(np.int64)


def _scoring_copy(generator: Generator,
                  compact: bool | np.ndarray | PackedTable = False) -> Generator:
    """Return an eval-mode CPU copy of G whose item table holds exactly the live rows;
    ``compact``: their values rounded as the two-stage table stores them
    (``compact_item_tables``; an array: G's rows packed already; a ``PackedTable``
    updated from G: its rows, and its kept copy of the tables)."""
    if isinstance(compact, PackedTable):
        if generator.out_items is None:
            return generator.live_copy(compact.rounded(generator)).cpu().eval()
        compact = compact.packed
    if isinstance(compact, np.ndarray) and generator.out_items is None:
        # tied (the default): the rounded rows are the copy's tables, not a clone rounded
        # in place (at 1M items a 256 MB clone and a pass over it, per export)
        return generator.live_copy(_rounded_tables(compact, generator)).cpu().eval()
    # the tables keep spare capacity for growth; the served model needs only V+1 rows
    g = generator.live_copy().cpu().eval()
    if compact is not False:
        compact_item_tables(g, None if compact is True else compact)
    return g


def _rounded_tables(packed: np.ndarray, generator: Generator) -> list[torch.Tensor]:
    """A tied G's item tables (``item_tables``: its rows [V+1, D], then the bias [V+1, 1]
    when it has one) from its scoring rows packed as int8 [V+1, D'+1]."""
    return [torch.from_numpy(item_rows(packed, cols))
            for cols in _table_columns(packed, generator)]


def compact_item_tables(generator: Generator, packed: np.ndarray | None = None) -> None:
    """Round G's item tables in place to what the two-stage item table stores: the scoring
    rows (with their bias, when G has one) to int8 levels with a power-of-two scale per row
    (``advrec.bundle.int8_rows``: 65 MB at 1M items instead of 128 as float16), any
    other table (the input rows of an untied G) to float16. Every path of the bundle, exact
    or two-stage, then scores with the same rounded rows (bench/rank.py and
    bench/compact.py measure what it changes). ``packed``: ``int8_rows`` of G's scoring rows
    as they are, when the caller has them (``PackedTable``)."""
    with torch.no_grad():
        scoring = generator.item_table()  # (V+1, D), a view of the weights
        bias = generator.item_bias()  # (V+1,) or None
        if packed is None:
            rows = scoring if bias is None else torch.cat([scoring, bias[:, None]], dim=1)
            packed = int8_rows(rows.detach().cpu().numpy())  # (V+1, D'+1)
        assert packed.shape[0] == scoring.shape[0], (packed.shape, scoring.shape)
        rounded = torch.from_numpy(item_rows(packed))  # (V+1, D')
        scoring.copy_(rounded[:, : scoring.shape[1]])  # (V+1, D)
        if bias is not None:
            bias.copy_(rounded[:, -1])
        if generator.out_items is not None:  # untied: the input rows are in the graphs
            weight = generator.items.emb.weight
            weight.copy_(weight.half().float())


def scoring_model(learner: OnlineLearner,
                  compact: bool | np.ndarray | PackedTable = False) -> nn.Module:
    """Return what the workers will serve, as a CPU eval-mode copy: G over its live rows,
    plus the co-occurrence prior when the learner's prior weight is > 0 (trainer/prior.py),
    plus the content score of catalogue items with no click (trainer/content.py).
    ``compact``: G's item tables rounded as the two-stage table stores them (bundles with
    the two-stage parts: ``compact_item_tables``); an array: G's rows packed already
    (``PackedTable.update``); a ``PackedTable`` just updated from G: those rows, and the
    tables widened from them in a copy it keeps."""
    return learner.scorer(_scoring_copy(learner.generator, compact)).cpu().eval()


def _as_scorer(model: nn.Module) -> nn.Module:
    return _scoring_copy(model) if isinstance(model, Generator) else model.cpu().eval()


def _n_items(model: nn.Module) -> int:
    return model.n_items if isinstance(model, Generator) else model.generator.n_items


def export_onnx(model: nn.Module, max_len: int | None = None, *,
                dynamo: bool = False) -> bytes:
    """Export a scorer ``history[B, L] int64 -> scores[B, V+1] float32`` to ONNX bytes: a
    ``Generator`` (copied over its live rows) or a ``scoring_model`` (G with the prior).

    One self-contained model (weights inline), dynamic batch axis, eval mode. The default
    is the TorchScript exporter: the dynamo exporter gives the same graph but took ~6-10 s
    instead of ~0.3 s on 2 cores and raises a FutureWarning from torch's own pytree code.
    """
    g = _as_scorer(model)
    config = g.config if isinstance(g, Generator) else g.generator.config
    L = max_len or config.max_len
    assert L <= config.max_len, f"max_len {L} > the model's {config.max_len}"
    example = torch.zeros((2, L), dtype=torch.int64)  # (B, L)
    example[0, -1] = 1 if _n_items(g) else 0
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of dynamo (see above)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if dynamo:
            registry = logging.getLogger("torch.onnx._internal.exporter._registration")
            level = registry.level
            registry.setLevel(logging.ERROR)  # "torchvision is not installed" x4
            try:
                program = torch.onnx.export(
                    g, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=max(OPSET, 18),
                    dynamo=True, external_data=False, verbose=False)
            finally:
                registry.setLevel(level)
            assert program is not None
            return program.model_proto.SerializeToString()
        buf = io.BytesIO()
        torch.onnx.export(
            g, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def detector_model(detector: Any) -> nn.Module:
    """Return the detector the workers will run (trainer/detector.py): a CPU eval-mode copy
    whose tables cover the learner's live rows, as the bundle's vocabulary does."""
    graph = detector.graph()
    graph.classifier = copy.deepcopy(graph.classifier)
    graph.max_len = detector.learner.model_cfg.max_len
    return graph.cpu().eval()


def export_detector(model: nn.Module) -> bytes:
    """Export a ``detector_model``: items [B, L] int64 and behaviour [B, F_b] float32 ->
    P(fake) [B] and each feature's term in its logit [B, F]."""
    from advrec.suspicion import BEHAVIOUR_FEATURES

    L = model.max_len
    items = torch.zeros((2, L), dtype=torch.int64)  # (B, L)
    items[0, -2:] = 1 if model.pop_pct.shape[0] > 1 else 0
    behaviour = torch.zeros((2, len(BEHAVIOUR_FEATURES)), dtype=torch.float32)
    names_in, names_out = list(DETECTOR_INPUTS), list(DETECTOR_OUTPUTS)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model, (items, behaviour), buf, input_names=names_in, output_names=names_out,
            dynamic_axes={n: {0: "batch"} for n in names_in + names_out},
            opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def check_detector_parity(model: nn.Module, onnx_bytes: bytes, items: np.ndarray,
                          behaviour: np.ndarray) -> float:
    """Return max |torch - onnxruntime| over P(fake) and the terms; inf on NaN."""
    import onnxruntime as ort

    x = torch.as_tensor(items, dtype=torch.int64)  # (B, L)
    b = torch.as_tensor(behaviour, dtype=torch.float32)  # (B, F_b)
    with torch.no_grad():
        expected = [t.numpy() for t in model(x, b)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    got = session.run(list(DETECTOR_OUTPUTS), dict(zip(DETECTOR_INPUTS, (x.numpy(), b.numpy()),
                                                        strict=True)))
    diff = 0.0
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape or not (np.isfinite(g).all() and np.isfinite(e).all()):
            return float("inf")
        diff = max(diff, float(np.abs(g.astype(np.float64) - e).max(initial=0.0)))
    return diff


def export_filter_detector(guard: Any, parity_tol: float = PARITY_TOL
                           ) -> tuple[bytes, dict[str, Any]]:
    """A training filter's trained detector (trainer/detector.py ``TrainingFilter``) as the
    bundle carries it: detector.onnx, parity-checked on the most recently active users, and
    what meta.json says of it. Raise ``ExportError`` if it is not trained or fails parity."""
    from advrec.suspicion import FEATURES, behaviour_matrix

    if not guard.detector.trained:
        raise ExportError("the detector has not finished a training round yet")
    model = detector_model(guard.detector)
    data = export_detector(model)
    records = list(guard.records.values())[-32:]
    items = guard.detector._rows([r.items for r in records]).numpy()  # (B, L)
    diff = check_detector_parity(model, data, items, behaviour_matrix(
        r.behaviour for r in records))
    if not diff <= parity_tol:
        raise ExportError(f"detector ONNX scores differ from torch by {diff:.3g} > "
                          f"{parity_tol:g}")
    return data, {"threshold": guard.detector.threshold, "features": list(FEATURES),
                  "rounds": guard.detector.rounds, "min_clicks": guard.cfg.min_clicks,
                  "flagged_users": len(guard.flagged), "filtered_examples": guard.filtered,
                  "parity_max_abs": diff}


def check_parity(model: nn.Module, onnx_bytes: bytes,
                 histories: np.ndarray | torch.Tensor) -> float:
    """Return max |torch - onnxruntime| over the scores of ``histories`` [B, L]; inf on NaN
    (``model``: what ``export_onnx`` was given, a ``Generator`` or a ``scoring_model``)."""
    import onnxruntime as ort  # only the export path needs it

    history = torch.as_tensor(np.asarray(histories), dtype=torch.int64)  # (B, L)
    with torch.no_grad():
        expected = _as_scorer(model)(history).numpy()  # (B, V+1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a check, not a benchmark: leave the cores to training
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: history.numpy()})[0]  # (B, V+1)
    if got.shape != expected.shape or not (np.isfinite(got).all() and np.isfinite(expected).all()):
        return float("inf")
    return float(np.abs(got.astype(np.float64) - expected).max(initial=0.0))


def export_two_stage_checked(scorer: nn.Module, max_len: int, histories: np.ndarray,
                             parity_tol: float = PARITY_TOL, stored: np.ndarray | None = None
                             ) -> tuple[dict[str, bytes], float]:
    """A ``scoring_model``'s two-stage parts (the bundle files) and their parity with torch;
    raise ``ExportError`` if they disagree (``stored``: as ``export_two_stage`` takes it)."""
    from trainer.twostage import export_two_stage

    files = export_two_stage(scorer, max_len, stored=stored)
    return files, require_two_stage_parity(scorer, files, histories, parity_tol)


def require_two_stage_parity(scorer: nn.Module, files: dict[str, bytes],
                             histories: np.ndarray, parity_tol: float = PARITY_TOL, *,
                             stored: np.ndarray | None = None,
                             rows: np.ndarray | None = None) -> float:
    """The two-stage parts' parity with torch (``check_two_stage_parity``, ``stored`` and
    ``rows`` as it takes them); raise ``ExportError`` if they disagree."""
    from trainer.twostage import check_two_stage_parity

    diff = check_two_stage_parity(scorer, files, histories, stored=stored, rows=rows)
    if not diff <= parity_tol:
        raise ExportError(f"two-stage ONNX scores differ from torch by {diff:.3g} > "
                          f"{parity_tol:g}")
    return diff


def publish_bundle(learner: OnlineLearner, root: Path | str, metrics: dict[str, float],
                   keep: int = 5, *, parity_tol: float = PARITY_TOL,
                   two_stage_items: int = TWO_STAGE_FROM_ITEMS,
                   exact_below_items: int = EXACT_BELOW_ITEMS) -> str:
    """Export the learner's G, check parity, publish a bundle under ``root``; return its
    version. From ``two_stage_items`` items on, the bundle carries the two-stage parts;
    from ``exact_below_items`` on, only those (no exact graph)."""
    gen, vocab = learner.generator, learner.vocab
    if len(vocab) == 0:
        raise ExportError("the learner has not seen any item yet; nothing to publish")
    assert gen.n_items == len(vocab), f"G has {gen.n_items} rows for {len(vocab)} items"
    max_len = learner.model_cfg.max_len
    staged = len(vocab) >= two_stage_items
    scorer = scoring_model(learner, compact=staged)
    replayed, _ = learner.replay.sample(PARITY_HISTORIES, np.random.default_rng(0))
    histories = np.concatenate([np.zeros((1, max_len), np.int64), replayed])  # (1+n, L)
    model_bytes, diff = None, 0.0
    if not staged or len(vocab) < exact_below_items:
        model_bytes = export_onnx(scorer, max_len)
        diff = check_parity(scorer, model_bytes, histories)
        if not diff <= parity_tol:
            raise ExportError(f"ONNX scores differ from torch by {diff:.3g} > {parity_tol:g}")
    two_stage = None
    if staged:
        two_stage, two_stage_diff = export_two_stage_checked(scorer, max_len, histories,
                                                             parity_tol)
    meta: dict[str, Any] = {
        "max_len": max_len,
        "examples_seen": learner.examples_seen,
        "batches_seen": learner.batches_seen,
        "last_event_ms": learner.last_event_ms,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "parity_max_abs_diff": diff,
        "mode": learner.train_cfg.mode,
        "model_config": settings_as_dict(learner.model_cfg),
        "train_config": settings_as_dict(learner.train_cfg),
        "adversarial_config": settings_as_dict(learner.adv_cfg),
        "prior_config": settings_as_dict(learner.prior_cfg),
    }
    if two_stage is not None:
        meta["two_stage"] = {"parity_max_abs_diff": two_stage_diff}
    version = write_bundle(root, model_bytes, vocab.items(), meta, keep=keep,
                           two_stage=two_stage)
    log.info("published bundle %s (%d items, %d examples seen, parity %.2g)",
             version, len(vocab), learner.examples_seen, diff)
    return version


def main(argv: list[str] | None = None) -> int:
    """Run ``advrec export``: load a checkpoint and publish its generator as a bundle."""
    parser = argparse.ArgumentParser(
        prog="advrec export",
        description="Turn a trainer checkpoint into a model bundle: export the generator to "
                    "ONNX, check its scores against torch, and publish it atomically under "
                    "the bundle directory (CURRENT then points at it).")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="checkpoint file written by the trainer (trainer/checkpoint.py)")
    parser.add_argument("--bundle-dir", required=True, metavar="DIR",
                        help="bundle root: versions are written here, CURRENT names the live one")
    parser.add_argument("--keep", type=int, default=5, metavar="N",
                        help="versions to keep for rollback (default: %(default)s)")
    parser.add_argument("--parity-tol", type=float, default=PARITY_TOL, metavar="X",
                        help="max abs score difference ONNX vs torch (default: %(default)s)")
    parser.add_argument("--two-stage-items", type=int, default=TWO_STAGE_FROM_ITEMS,
                        metavar="N",
                        help="from this many items on, the bundle also carries the two-stage "
                             "parts: user encoder, item table, rescorer (default: %(default)s)")
    parser.add_argument("--exact-below-items", type=int, default=EXACT_BELOW_ITEMS,
                        metavar="N",
                        help="from this many items on, the bundle carries only the two-stage "
                             "parts, no exact graph: workers rank it in two stages "
                             "(default: %(default)s)")
    parser.add_argument("--publish", action="store_true",
                        help="also publish the bundle to the bundle topic as the current "
                             "version: every worker of the fleet swaps to it (unless a pin "
                             "holds the fleet)")
    parser.add_argument("--broker", default=os.environ.get("ADVREC_BROKER",
                                                           "kafka://127.0.0.1:9092"),
                        help="Kafka, with --publish [ADVREC_BROKER] (default: %(default)s)")
    parser.add_argument("--topic", default=os.environ.get("ADVREC_TOPIC_BUNDLES",
                                                          "model-bundles"),
                        help="bundle topic, with --publish [ADVREC_TOPIC_BUNDLES] "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    from trainer.checkpoint import load_checkpoint

    try:
        learner, extra = load_checkpoint(args.checkpoint, device="cpu")
        metrics = extra.get("metrics", {}) if isinstance(extra, dict) else {}
        version = publish_bundle(learner, args.bundle_dir, metrics, keep=args.keep,
                                 parity_tol=args.parity_tol,
                                 two_stage_items=args.two_stage_items,
                                 exact_below_items=args.exact_below_items)
        if args.publish:
            bootstrap = bootstrap_servers(args.broker)
            done = asyncio.run(publish_to_topic(
                bootstrap, args.topic, version, bundle_files(args.bundle_dir, version),
                keep=args.keep, producer_id=f"advrec-export@{socket.gethostname()}"))
            print(f"published {version} to {args.topic} ({done.chunks} chunks, "
                  f"{done.bytes / 1e6:.1f} MB)")
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError,
            KafkaError) as exc:
        print(f"advrec export: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"published {version} under {args.bundle_dir} "
          f"({len(learner.vocab)} items, {learner.examples_seen} examples seen)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
