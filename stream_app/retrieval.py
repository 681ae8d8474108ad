"""Two-stage ranking for large catalogues: a nearest-neighbour index over G's item table
finds candidates for a user vector, the bundle's rescorer ranks them exactly.

The bundle's two-stage parts (trainer/twostage.py, advrec/bundle.py ``TWO_STAGE_*``):
the user encoder (history -> user vector, the prior's linked rows and the best content-only
rows), the item table whose inner product with the user vector is G's score, and the full
scorer restricted to candidate rows. A request: user vector -> the index's ``candidates``
best rows (plus as many as the user has excluded rows, which leave them), with the linked
and content rows beside them; seen rows dropped; the rescorer's exact top k among the rest.

The index is faiss's HNSW graph (``IndexHNSWFlat``) under the inner product, chosen by
measurement at 1,000,000 items x 64 (bench/ann.py, bench/results/ann-choice.json; one
thread, as the worker builds it): against usearch's HNSW it built in half the time (75 vs
150 s), answered a batch of 32 in half the time (8 vs 16 ms) with less memory (394 vs 509
MiB) at the same recall@10 (0.99); faiss's IVF-flat built in 3 s but found 0.35 of the
top 10.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from advrec.bundle import (
    TWO_STAGE_ITEMS,
    TWO_STAGE_RESCORE,
    TWO_STAGE_RESCORE_INPUTS,
    TWO_STAGE_RESCORE_OUTPUT,
    TWO_STAGE_USER,
    TWO_STAGE_USER_INPUT,
    TWO_STAGE_USER_OUTPUTS,
    TWO_STAGE_USER_VECTORS,
    BundleError,
    item_rows,
    item_rows_finite,
    item_width,
)
from advrec.links import PRIOR_FILES, SparseRows, link_inputs, link_shape

if TYPE_CHECKING:  # the settings import IndexConfig: onnxruntime only where a model loads
    import onnxruntime as ort

__all__ = ["IndexConfig", "ItemIndex", "TwoStage", "build_two_stage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """When the worker ranks in two stages, and how its index is built and searched."""

    min_items: int = 200_000  # catalogues of this many items or more (0: every catalogue)
    candidates: int = 100  # rows the index returns per request, before the seen ones leave
    m: int = 16  # HNSW edges per item (M): memory ~ 2 x 4 bytes x M per item
    ef_construction: int = 80  # HNSW breadth while building: build time vs recall
    ef_search: int = 100  # HNSW breadth while searching (at least ``candidates``)
    threads: int = 1  # index build threads: the other cores answer requests meanwhile
    # a new bundle's index is the previous one's graph with the new vectors (and its new
    # rows inserted); once the graph is this old (s), a fresh one is built in the background
    # and refreshed in its place when ready. 0: every bundle's index built afresh in its load
    rebuild_after_s: float = 900.0
    # ... or until the rows inserted since the last full build pass this share of it
    rebuild_growth: float = 0.1
    # keep the graph a refresh was copied from, and refresh it in place at the next load
    # once no request can read it any more (``ItemIndex``): one more graph held, no copy
    spare: bool = True

    def __post_init__(self) -> None:
        assert self.min_items >= 0 and self.candidates >= 1, (self.min_items, self.candidates)
        assert self.m >= 2 and self.ef_construction >= 1 and self.threads >= 1
        assert self.rebuild_after_s >= 0 and self.rebuild_growth >= 0

    def use_for(self, n_items: int) -> bool:
        """Whether a catalogue of ``n_items`` items is ranked in two stages."""
        return n_items >= self.min_items


# The index builds on a thread of its own at the lowest CPU priority, so that the threads
# answering requests take the cores first: at 1M items a build is ~75 s of one core, and
# at normal priority requests' p99 at c=32 rose 3.3x while it ran (bench/rank.py, 2 cores).
BUILD_NICE = 19


def _niced(build: Any, failed: list[BaseException]) -> Any:
    """``build`` as a thread's target: at ``BUILD_NICE``, its error kept in ``failed``."""

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICE)
        except (OSError, AttributeError):  # not Linux: build at the caller's priority
            pass
        try:
            build()
        except BaseException as exc:  # handed to whoever reads ``failed``
            failed.append(exc)

    return run


def _build_niced(build: Any) -> None:
    """Run ``build()`` on a new thread at ``BUILD_NICE`` and wait for it; re-raise its error."""
    failed: list[BaseException] = []
    thread = threading.Thread(target=_niced(build, failed), name="advrec-index-build",
                              daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


# rows handed to a background build at a time: each chunk is freed once the graph holds it,
# so the build's input and the graph's own copy of the vectors never coexist in full
REBUILD_CHUNK = 65_536


class _Rebuild:
    """A fresh HNSW graph over a copy of one table's rows, built on a background thread at
    ``BUILD_NICE`` while refreshed bundles keep going live; a later load adopts it.

    At 1M items a build is ~75 s of an idle core and minutes of a busy one: built inside a
    load, it held every swap back that long (bench/freshness.py at 1M items).
    """

    def __init__(self, table: np.ndarray, config: IndexConfig) -> None:
        import faiss

        self.started_at = time.monotonic()  # the graph is as old as the vectors it is laid for
        self.rows = len(table) - 1
        self.config = config
        self.seconds = 0.0
        self.taken = False  # a load has taken the graph over
        self.index = faiss.IndexHNSWFlat(item_width(table), config.m,
                                         faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = config.ef_construction
        chunks = [_widened(table, i, min(i + REBUILD_CHUNK, len(table)))  # the table may go
                  for i in range(1, len(table), REBUILD_CHUNK)]
        self.failed: list[BaseException] = []

        def build() -> None:
            started = time.perf_counter()
            faiss.omp_set_num_threads(config.threads)
            while chunks:
                self.index.add(chunks.pop(0))  # ids in row order: id i is row i + 1
            self.seconds = time.perf_counter() - started

        self._thread = threading.Thread(target=_niced(build, self.failed),
                                        name="advrec-index-rebuild", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the build; whether it has ended (built or failed)."""
        self._thread.join(timeout)
        return self.done()


class ItemIndex:
    """Inner-product HNSW index over the item table's rows 1..V (row 0 is padding).

    Built afresh, an index costs ~75 s of one core at 1M items: longer than the trainer takes
    to publish the next bundle. So a ``previous`` index is *refreshed* instead when it can be
    (``can_refresh``): a copy of its graph gets the new table's vectors in place of the old
    ones and only the rows added since are inserted. The graph was laid out for older
    vectors; a search still scores the new ones, and the candidates are rescored exactly,
    so what drifts is only which rows a search reaches. Once a graph is ``rebuild_after_s``
    old or the rows inserted since its full build pass ``rebuild_growth`` of it, a fresh
    graph is built in the background (``_Rebuild``) over the table of that moment, while
    the next bundles still refresh the old one; the first load after it has ended refreshes
    the fresh graph instead (``rebuilt``). bench/rank.py measures recall either way.

    The copy is most of a refresh's cost: at 1M items cloning the graph took 0.18 s and the
    first rows added to the clone 0.59 s, as its vectors and edges moved to a larger buffer
    (both copied whole; 2 ms per add after that). So a refreshed index keeps the graph it
    was copied from as its *spare*, with a weak reference to the index that served it; the
    next load takes the spare instead of copying the live graph, once that index is gone (no
    request can search the spare then), and refreshes it in place: its vectors overwritten
    (22 ms at 1M) and the rows it lacks added. The two graphs take turns, each one bundle
    behind the other; a fresh graph from the background starts a new pair.
    """

    def __init__(self, table: np.ndarray, config: IndexConfig,
                 previous: ItemIndex | None = None) -> None:
        """``table``: the item table [V+1, ...] as items.npy stores it (int8 rows with
        their exponent, float16 or float32: advrec/bundle.py ``item_rows``). Its rows are
        widened to float32 where the graph takes them: into a refreshed graph's own
        vectors, on the build's thread, with no whole float32 copy first (at 1M items that
        copy was 256 MB of new pages and ~0.2 s of every load, at the load's priority)."""
        import faiss

        width = item_width(table)  # ValueError on a table of another kind
        started = time.perf_counter()
        self.config = config
        self.rebuild: _Rebuild | None = None  # a fresh graph being built, handed down
        self.rebuilt = False  # this index is a background build's graph, refreshed
        self.rebuild_seconds: float | None = None  # that build's time, once adopted
        self.rebuild_started = False  # this load found the graph due and started one
        self.reused = False  # the spare graph was refreshed in place: no copy was made
        # the graph this index was copied from, and a weak reference to the index serving it
        self.spare: tuple[weakref.ref[ItemIndex], Any] | None = None
        self.refreshed = previous is not None and previous.can_refresh(table, config)
        if previous is not None and self.refreshed:
            base, self.rebuild = previous.index, previous.rebuild
            spare, previous.spare = previous.spare, None  # one load takes it, or drops it
            self.built_at, self.built_rows = previous.built_at, previous.built_rows
            pending = self.rebuild
            if pending is not None and pending.done():
                self.rebuild = None
                if pending.failed:
                    log.warning("the background index build failed (%s); the old graph "
                                "serves until the next one", pending.failed[0])
                elif (not pending.taken and pending.config.m == config.m
                      and pending.index.d == width
                      and pending.index.ntotal <= len(table) - 1):
                    # nobody reads the fresh graph yet: it is taken over, not copied, and
                    # only once (were this load refused, the graph would hold its vectors)
                    base, self.rebuilt, pending.taken = pending.index, True, True
                    self.built_at, self.built_rows = pending.started_at, pending.rows
                    self.rebuild_seconds = pending.seconds
            adopted = self.rebuilt
            if (not adopted and config.spare and spare is not None and spare[0]() is None
                    and spare[1].d == width and spare[1].ntotal <= len(table) - 1):
                base, self.reused = spare[1], True  # nobody searches it: refreshed in place
            spare = None  # an unused spare (its index still serves, or it is of the old graph)
            reused = self.reused
            old = int(base.ntotal)

            def build() -> None:
                faiss.omp_set_num_threads(config.threads)
                # a copy of a graph that serves, or one nobody else reads: the fresh graph
                # or the spare
                index = base if adopted or reused else faiss.clone_index(base)
                stored = _stored_view(index, old)  # (old, D'): rows 1..old, in place
                for i in range(0, old, REBUILD_CHUNK):
                    j = min(i + REBUILD_CHUNK, old)
                    item_rows(table[i + 1 : j + 1], out=stored[i:j])
                if len(table) - 1 > old:
                    index.add(_widened(table, old + 1, len(table)))  # new rows join the graph
                self.index = index
        else:
            self.built_at, self.built_rows = time.monotonic(), len(table) - 1
            self.index = faiss.IndexHNSWFlat(width, config.m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = config.ef_construction

            def build() -> None:
                # OpenMP's thread count is each thread's own: set where the work runs
                faiss.omp_set_num_threads(config.threads)
                self.index.add(_widened(table, 1, len(table)))  # id i is row i + 1

        _build_niced(build)
        if previous is not None and self.refreshed and config.spare and not self.rebuilt:
            # the graph copied from (or the spare's twin): the next load's spare once
            # ``previous`` is gone. A fresh graph starts anew: the old one is no twin of it
            self.spare = (weakref.ref(previous), previous.index)
        self.index.hnsw.efSearch = max(config.ef_search, config.candidates)
        # the index's own copy of the vectors, seen without a copy: the rescorer reads the
        # candidates' rows from it (a second table would cost V x D' x 4 bytes: 256 MB at 1M)
        self._stored = _stored_view(self.index, len(table) - 1)  # (V, D')
        if self.refreshed and self.rebuild is None and self.due(config):
            try:
                self.rebuild, self.rebuild_started = _Rebuild(table, config), True
            except Exception as exc:  # e.g. no memory for the copy: this bundle still serves
                log.warning("could not start the background index build (%s); the next "
                            "load tries again", exc)
        self.build_seconds = time.perf_counter() - started

    def can_refresh(self, table: np.ndarray, config: IndexConfig) -> bool:
        """Whether the index for ``table`` (as ``__init__`` takes it) may be this one
        refreshed (see the class)."""
        return (config.rebuild_after_s > 0 and config.m == self.config.m
                and item_width(table) == self.dim and len(table) - 1 >= len(self))

    def due(self, config: IndexConfig) -> bool:
        """Whether this index's graph is old enough, or grown enough, to be built afresh."""
        grown = len(self) - self.built_rows
        return (time.monotonic() - self.built_at >= config.rebuild_after_s
                or grown > config.rebuild_growth * self.built_rows)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The item vectors of ``rows`` [B, C] -> [B, C, D'] (row 0, padding: zero)."""
        out = self._stored[np.maximum(rows - 1, 0)]  # (B, C, D')
        out[rows == 0] = 0.0
        return out

    def search(self, users: np.ndarray, n: int) -> np.ndarray:
        """The ``n`` best rows for each user vector [B, D'] -> [B, n] int64, 0 where the
        index had fewer."""
        import faiss

        n = min(n, len(self))
        # one thread: a search runs on an inference thread, beside the event loop's core
        # (OpenMP's count is per thread, and a thread that never set it gets every core)
        faiss.omp_set_num_threads(1)
        _, ids = self.index.search(np.ascontiguousarray(users, dtype=np.float32), n)  # (B, n)
        return ids + 1  # faiss marks a missing answer -1: row 0, padding


def _widened(table: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a stored item table as a new float32 array [n, D']."""
    part = table[start:stop]
    return item_rows(part, out=np.empty((len(part), item_width(table)), np.float32))


def _stored_view(index: Any, n: int) -> np.ndarray:
    """The vectors an HNSW index stores, [n, d] float32, seen in place (no copy); valid
    until rows are added to it."""
    import faiss

    storage = faiss.downcast_index(index.storage)
    return faiss.rev_swig_ptr(storage.get_xb(), n * index.d).reshape(n, index.d)


def _session(data: bytes, threads: int, providers: list[str]) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as serving's
    return ort.InferenceSession(data, sess_options=opts, providers=providers)


@dataclass
class TwoStage:
    """The loaded two-stage parts of one bundle: what ``LoadedModel.rank`` runs instead of
    the exact graph."""

    user: ort.InferenceSession
    rescore: ort.InferenceSession
    index: ItemIndex  # holds the item vectors too
    candidates: int
    freed: np.ndarray | None = None  # (V+1,) bool: rows no item holds (bounded vocabulary)
    links: SparseRows | None = None  # the prior's links, when the graphs read them

    def __post_init__(self) -> None:
        # the exporter drops an input the graph never reads (history, when G alone scores)
        self._rescore_inputs = {i.name for i in self.rescore.get_inputs()}
        # a user encoder without an item table of its own reads the history's rows here
        self._user_inputs = {i.name for i in self.user.get_inputs()}
        self._user_reads_vectors = TWO_STAGE_USER_VECTORS in self._user_inputs
        # graphs without the prior's table read the history's links, gathered here
        self._link_shape = link_shape(self.user)
        if self._link_shape is not None and self.links is None:
            raise ValueError("the user encoder reads the prior's links; the bundle has none")

    def link_feed(self, model_in: np.ndarray) -> dict[str, np.ndarray]:
        """The graphs' link inputs for a batch [B, L] ({} when they read none)."""
        if self._link_shape is None or self.links is None:
            return {}
        return link_inputs(self.links, self._link_shape, model_in)

    @property
    def index_seconds(self) -> float:
        return self.index.build_seconds

    def candidate_rows(self, model_in: np.ndarray, exclude: np.ndarray, k: int,
                       links: dict[str, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Return the user vectors [B, D'] and the candidate rows [B, C] of a batch asking
        for ``k`` rows: the index's (``candidates``, at least ``k`` besides the excluded
        ones), the linked and the content rows, each once, excluded rows and padding left
        out (0: no candidate; a column of zeros when nobody has one there). ``links``: the
        batch's ``link_feed``, if gathered already."""
        links = self.link_feed(model_in) if links is None else links
        feed = {TWO_STAGE_USER_INPUT: model_in,
                **{name: v for name, v in links.items() if name in self._user_inputs}}
        if self._user_reads_vectors:
            feed[TWO_STAGE_USER_VECTORS] = self.index.vectors(model_in)  # (B, L, D')
        user, linked, cold = self.user.run(list(TWO_STAGE_USER_OUTPUTS), feed)
        # the index's breadth is what a search costs (bench/results/ann-sweep.json): ask for
        # ``candidates``, or for k plus room for the excluded rows that may take places
        found = self.index.search(user, max(self.candidates, k + exclude.shape[1]))  # (B, n)
        rows = np.concatenate([found, linked, cold], axis=1)  # (B, C0)
        if self.freed is not None:
            rows[self.freed[rows]] = 0
        rows.sort(axis=1)
        rows[:, 1:][rows[:, 1:] == rows[:, :-1]] = 0  # repeats
        seen = (rows[:, :, None] == exclude[:, None, :]).any(axis=2)  # (B, C0)
        rows[seen] = 0
        rows.sort(axis=1)  # padding first: cut the columns that are padding in every row
        live = (rows != 0).any(axis=0)  # (C0,)
        first = int(live.argmax()) if live.any() else rows.shape[1] - 1
        return user, rows[:, first:]  # (B, D'), (B, C)

    def rank(self, model_in: np.ndarray, exclude: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-``k`` (scores, rows) [B, k] each, best first, -inf (and row 0) where
        fewer than ``k`` candidates remain: what the exact graph returns."""
        links = self.link_feed(model_in)  # (B, R, K) each, or none
        user, rows = self.candidate_rows(model_in, exclude, k, links)  # (B, D'), (B, C)
        feed = {name: value for name, value in [*zip(
            TWO_STAGE_RESCORE_INPUTS, (model_in, user, rows, self.index.vectors(rows)),
            strict=True), *links.items()]
            if name in self._rescore_inputs}
        (scores,) = self.rescore.run([TWO_STAGE_RESCORE_OUTPUT], feed)  # (B, C)
        scores = np.where(rows > 0, scores, -np.inf).astype(np.float32)
        if rows.shape[1] < k:  # fewer candidates than asked: pad with nothing
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)))
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k), unordered
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)  # (B, k), best first
        return np.take_along_axis(scores, top, axis=1), np.take_along_axis(rows, top, axis=1)


def _npy_view(data: bytes) -> np.ndarray:
    """The array an .npy file holds, read in place from its bytes (no copy: the index
    copies it anyway, and at 1M items x 64 it is 256 MB)."""
    buf = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(buf)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(buf)
    if fortran_order or dtype.hasobject:
        raise ValueError(f"a C-ordered numeric array is expected, not {dtype} "
                         f"(fortran order: {fortran_order})")
    count = int(np.prod(shape))
    return np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell()).reshape(shape)


def build_two_stage(parts: dict[str, bytes], n_items: int, config: IndexConfig, *,
                    threads: int, providers: list[str], version: str,
                    holes: np.ndarray | None = None,
                    previous: TwoStage | None = None) -> TwoStage:
    """Load a bundle's two-stage parts and build the index over its item table (refreshing
    ``previous``'s, the live bundle's, when it can: ``ItemIndex``); raise
    ``BundleError("bad_index")`` if any part is unusable."""
    try:
        table = _npy_view(parts[TWO_STAGE_ITEMS])
    except Exception as exc:  # numpy raises ValueError, OSError, ... on a bad file
        raise BundleError("bad_index", f"{version}: items.npy: {exc}"[:500]) from None
    if table.ndim != 2 or table.shape[0] != n_items + 1:
        raise BundleError("bad_index", f"{version}: item table {table.shape} {table.dtype}, "
                                       f"the vocabulary needs [{n_items + 1}, D]")
    try:
        item_width(table)  # int8, float16 or float32 rows: the index widens them
    except ValueError as exc:
        raise BundleError("bad_index", f"{version}: items.npy: {exc}"[:500]) from None
    if not item_rows_finite(table):
        raise BundleError("bad_index", f"{version}: the item table is not finite")
    try:
        user = _session(parts[TWO_STAGE_USER], threads, providers)
        rescore = _session(parts[TWO_STAGE_RESCORE], threads, providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors on bad graphs
        raise BundleError("bad_index", f"{version}: two-stage graphs: {exc}"[:500]) from None
    try:
        index = ItemIndex(table, config, None if previous is None else previous.index)
    except Exception as exc:  # whatever the library raises: the bundle cannot serve
        raise BundleError("bad_index", f"{version}: index build: {exc}"[:500]) from None
    if len(index) != n_items:
        raise BundleError("bad_index", f"{version}: the index holds {len(index)} of "
                                       f"{n_items} items")
    freed = None
    if holes is not None and holes.size:  # rows a bounded vocabulary freed: never candidates
        freed = np.zeros(n_items + 1, dtype=bool)
        freed[holes] = True
    try:
        links = None
        if PRIOR_FILES[0] in parts:
            links = SparseRows.from_files(parts)
            if links.n_rows != n_items + 1:
                raise ValueError(f"links for {links.n_rows} rows, the vocabulary has "
                                 f"{n_items + 1}")
        return TwoStage(user, rescore, index, config.candidates, freed, links)
    except (ValueError, KeyError) as exc:
        raise BundleError("bad_index", f"{version}: the prior's links: {exc}"[:500]) from None
