"""The co-occurrence prior's links as a bundle carries them, and a history's links gathered.

The prior (trainer/prior.py) scores the items that the history's latest items link to: each
row keeps its ``top_k`` strongest links (column, count). In the exact graph they are a
dense [V+1, K] table; at a million items that is 512 MB in every graph that reads it, most
of it padding, since few items have many links. So the two-stage parts carry the links once,
as compressed sparse rows beside the graphs (``PRIOR_FILES``), and the graphs take a
history's links as inputs (``LINK_INPUTS``): the worker gathers them here, as the trainer's
parity check does, so both feed the graphs alike.

A delta bundle (advrec/bundle.py) carries only the rows whose links changed
(``SparseRows`` restricted to them) and ``SparseRows.merge`` rebuilds the whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LINK_INPUTS", "PRIOR_FILES", "SparseRows", "link_inputs", "link_shape",
           "npy_bytes"]

# int64 [V+2] row starts; int32 [nnz] linked rows; float32 [nnz] their counts
PRIOR_FILES = ("prior-indptr.npy", "prior-cols.npy", "prior-vals.npy")
# the graphs' inputs: the links of the history's latest R rows, [B, R, K] int64 and float32
# (padding: row 0, count 0), R and K fixed by the graph (its input shape says them)
LINK_INPUTS = ("history_links", "history_link_counts")


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of its .npy file (what bundles carry)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True)
class SparseRows:
    """Rows of links in CSR form: row ``rows[i]`` links to ``cols[indptr[i]:indptr[i+1]]``
    with those ``vals``. ``rows`` None: every row from 0 on (a whole table)."""

    indptr: np.ndarray  # int64 [n+1]
    cols: np.ndarray  # int32 [nnz]
    vals: np.ndarray  # float32 [nnz]
    rows: np.ndarray | None = None  # int64 [n], ascending

    def __post_init__(self) -> None:
        n = len(self.indptr) - 1
        ok = (self.indptr.ndim == 1 and n >= 0 and self.indptr.dtype == np.int64
              and self.cols.dtype == np.int32 and self.vals.dtype == np.float32
              and self.cols.shape == self.vals.shape == (int(self.indptr[-1]),)
              and int(self.indptr[0]) == 0 and bool((np.diff(self.indptr) >= 0).all())
              and (self.rows is None or (self.rows.dtype == np.int64
                                         and self.rows.shape == (n,))))
        if not ok:
            raise ValueError("links are not compressed sparse rows (int64 indptr, int32 "
                             "cols, float32 vals of one length)")

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_dense(cls, idx: np.ndarray, val: np.ndarray,
                   rows: np.ndarray | None = None) -> SparseRows:
        """From a [V+1, K] table of (column, count), padding (count 0) left out. ``rows``:
        the only rows that may hold links, ascending (the others are all padding): only
        they are read."""
        if rows is None:
            keep = val > 0  # (V+1, K)
            lengths = keep.sum(axis=1)
            cols, vals = idx[keep], val[keep]
        else:
            sub = val[rows]  # (n, K)
            keep = sub > 0
            lengths = np.zeros(len(val), dtype=np.int64)
            lengths[rows] = keep.sum(axis=1)
            cols, vals = idx[rows][keep], sub[keep]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(indptr, cols.astype(np.int32), vals.astype(np.float32))

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def gather(self, rows: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """The links of ``rows`` [...] (a whole table's rows; beyond its end: none) padded
        to ``top_k``: (columns [..., K] int64, counts [..., K] float32)."""
        assert self.rows is None, "gather reads a whole table"
        flat = rows.reshape(-1)
        flat = np.where((flat >= 0) & (flat < self.n_rows), flat, 0)  # row 0 has no links
        starts = self.indptr[flat]
        lengths = np.minimum(self.indptr[flat + 1] - starts, top_k)
        idx = np.zeros((len(flat), top_k), dtype=np.int64)
        val = np.zeros((len(flat), top_k), dtype=np.float32)
        total = int(lengths.sum())
        if total:
            at = np.repeat(np.arange(len(flat)), lengths)
            ends = np.cumsum(lengths)
            within = np.arange(total) - np.repeat(ends - lengths, lengths)
            src = np.repeat(starts, lengths) + within
            idx[at, within] = self.cols[src]
            val[at, within] = self.vals[src]
        return idx.reshape(*rows.shape, top_k), val.reshape(*rows.shape, top_k)

    def files(self) -> dict[str, bytes]:
        """A whole table as the bundle's ``PRIOR_FILES``."""
        assert self.rows is None
        return dict(zip(PRIOR_FILES, map(npy_bytes, (self.indptr, self.cols, self.vals)),
                        strict=True))

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> SparseRows:
        """A whole table from the bundle's ``PRIOR_FILES`` (``ValueError`` if malformed)."""
        return cls(*(_load(files[name]) for name in PRIOR_FILES))

    def changed_rows(self, base: SparseRows) -> np.ndarray:
        """The rows of this whole table whose links differ from ``base``'s (another whole
        table), and the rows with links past the base's end: int64, ascending."""
        assert self.rows is None and base.rows is None
        n = min(self.n_rows, base.n_rows)
        mine, theirs = self.lengths()[:n], base.lengths()[:n]
        changed = mine != theirs
        same = np.flatnonzero(~changed & (mine > 0))  # rows of one length: compare entries
        if same.size:
            lengths = mine[same]
            ends = np.cumsum(lengths)
            within = np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths)
            a = np.repeat(self.indptr[same], lengths) + within
            b = np.repeat(base.indptr[same], lengths) + within
            differs = ((self.cols[a] != base.cols[b])
                       | (self.vals[a].view(np.int32) != base.vals[b].view(np.int32)))
            hit = np.add.reduceat(differs.astype(np.int64), ends - lengths) > 0
            changed[same[hit]] = True
        grown = n + np.flatnonzero(self.lengths()[n:] > 0)
        return np.concatenate([np.flatnonzero(changed), grown]).astype(np.int64)

    def restricted(self, rows: np.ndarray) -> SparseRows:
        """These rows of a whole table, as a partial one (what a delta carries)."""
        assert self.rows is None
        lengths = self.lengths()[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        at = np.repeat(self.indptr[rows], lengths) + (
            np.arange(int(indptr[-1])) - np.repeat(indptr[:-1], lengths))
        return SparseRows(indptr, self.cols[at], self.vals[at], rows.astype(np.int64))

    def merge(self, delta: SparseRows, n_rows: int) -> SparseRows:
        """This whole table with ``delta``'s rows replaced (or added), cut or padded with
        empty rows to ``n_rows``."""
        assert self.rows is None and delta.rows is not None
        if delta.rows.size and not (0 <= delta.rows.min() and delta.rows.max() < n_rows):
            raise ValueError("a delta row lies outside the table")
        lengths = np.zeros(n_rows, dtype=np.int64)
        n = min(self.n_rows, n_rows)
        lengths[:n] = self.lengths()[:n]
        replaced = np.zeros(n_rows, dtype=bool)
        replaced[delta.rows] = True
        lengths[delta.rows] = delta.lengths()
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cols = np.zeros(int(indptr[-1]), dtype=np.int32)
        vals = np.zeros(int(indptr[-1]), dtype=np.float32)
        kept = np.flatnonzero(~replaced[:n] & (lengths[:n] > 0))  # rows copied from here
        for source, rows in ((self, kept), (delta, None)):
            if rows is None:  # the delta's own rows, in its order
                rows, starts, row_lengths = delta.rows, delta.indptr[:-1], delta.lengths()
            else:
                starts, row_lengths = source.indptr[rows], source.lengths()[rows]
            if not row_lengths.size or not row_lengths.sum():
                continue
            ends = np.cumsum(row_lengths)
            within = np.arange(int(ends[-1])) - np.repeat(ends - row_lengths, row_lengths)
            src = np.repeat(starts, row_lengths) + within
            dst = np.repeat(indptr[rows], row_lengths) + within
            cols[dst] = source.cols[src]
            vals[dst] = source.vals[src]
        return SparseRows(indptr, cols, vals)


def link_shape(session: Any) -> tuple[int, int] | None:
    """(R, K) of the link inputs an onnxruntime session reads, or None if it reads none."""
    shapes = {i.name: i.shape for i in session.get_inputs()}
    if LINK_INPUTS[0] not in shapes:
        return None
    _, recent, top_k = shapes[LINK_INPUTS[0]]
    return int(recent), int(top_k)


def link_inputs(links: SparseRows, shape: tuple[int, int],
                history: np.ndarray) -> dict[str, np.ndarray]:
    """The link inputs of a batch of histories [B, L] (left-padded rows): the links of
    each one's latest R rows, [B, R, K] each, by name."""
    recent, top_k = shape
    idx, val = links.gather(history[:, -recent:], top_k)  # (B, R, K) each
    return dict(zip(LINK_INPUTS, (idx, val), strict=True))
