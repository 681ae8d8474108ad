"""Item co-occurrence: the streaming item-kNN's counts, and the prior that the hybrid adds to G.

One structure, ``Cooccurrence``, counts which item follows which: learning that item ``j``
was clicked after a history adds ``decay**p`` to ``C[h_p, j]`` (and ``backward * decay**p``
to ``C[j, h_p]``) for the ``n_recent`` latest history items (p = 0 is the latest). Items are
plain integer ids (the baseline's columns, or the generator's vocabulary rows).

``ItemKNN`` (trainer/baselines.py) ranks by these counts alone. The hybrid ranks by G's
logits plus ``weight * log(1 + prior)``, where the prior sums, over the history's latest
items, their ``top_k`` strongest links (``Cooccurrence.table``): a fixed-width table, so that
the same arithmetic runs in torch while training and evaluating (``PriorScorer``) and in the
exported ONNX graph that the workers serve (trainer/export.py). Rows are kept current lazily:
only rows that changed since the last ``table`` call are re-cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from advrec.links import SparseRows

__all__ = ["Cooccurrence", "HybridScorer", "PriorConfig", "PriorScorer"]


@dataclass(frozen=True)
class PriorConfig:
    """How the co-occurrence prior is counted and how much it weighs beside G.

    ``weight`` 0 turns the hybrid off (G alone). The link shape (``decay``, ``backward``) is
    item-kNN's. The defaults were chosen on the validation prefix (first 30 %) of both shared
    streams (docs/results.md): weight 4 ranked best among 0..16 on both; the 5 latest items
    beat 1 and 3 and matched 8; 256 links per item ranked as 64 did.
    """

    weight: float = 4.0  # w in  G logits + w * log(1 + prior)
    top_k: int = 64  # links kept per item in the table the model carries
    n_recent: int = 5  # history items (latest first) that link to the next click
    decay: float = 0.7  # weight factor per step back in the history
    backward: float = 0.5  # weight of the reverse link, next item -> history item

    def __post_init__(self) -> None:
        assert self.weight >= 0, "prior weight must be >= 0"
        assert self.top_k >= 1 and self.n_recent >= 1, "top_k and n_recent must be >= 1"
        assert 0 < self.decay <= 1 and self.backward >= 0, "decay in (0, 1], backward >= 0"

    def position_weights(self) -> list[float]:
        """Return the weight of each recent position, latest first."""
        return [self.decay**p for p in range(self.n_recent)]


class Cooccurrence:
    """Sparse streaming counts ``C[i, j]`` over integer item ids, growable, with a top-k table."""

    def __init__(self, n_recent: int = 3, decay: float = 0.7, backward: float = 0.5,
                 top_k: int = 64) -> None:
        self.weights = [decay**p for p in range(n_recent)]
        self.n_recent = n_recent
        self.backward = backward
        self.top_k = top_k
        # row i as growable parallel arrays plus a column -> slot map
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.slots: list[dict[int, int]] = []
        # int32, as the scorer and the bundle hold the links: a scorer reads it without a copy
        self._idx = np.zeros((0, top_k), dtype=np.int32)  # (rows, K) the strongest links
        self._val = np.zeros((0, top_k), dtype=np.float32)  # (rows, K) their counts
        self._held = np.zeros(0, dtype=bool)  # (rows,) the table rows that hold links
        self._dirty: set[int] = set()

    @classmethod
    def from_config(cls, cfg: PriorConfig) -> Cooccurrence:
        return cls(cfg.n_recent, cfg.decay, cfg.backward, cfg.top_k)

    @property
    def n_rows(self) -> int:
        return len(self.slots)

    def grow(self, n_rows: int) -> None:
        """Make rows ``0 .. n_rows - 1`` exist."""
        while len(self.slots) < n_rows:
            self.cols.append(np.zeros(4, dtype=np.int64))
            self.vals.append(np.zeros(4))
            self.slots.append({})

    def link(self, i: int, j: int, w: float) -> None:
        """Add ``w`` to ``C[i, j]``."""
        self.grow(max(i, j) + 1)
        slots = self.slots[i]
        slot = slots.get(j)
        if slot is None:
            slot = slots[j] = len(slots)
            if slot == self.cols[i].size:
                self.cols[i] = np.concatenate([self.cols[i], np.zeros(slot, np.int64)])
                self.vals[i] = np.concatenate([self.vals[i], np.zeros(slot)])
            self.cols[i][slot] = j
        self.vals[i][slot] += w
        self._dirty.add(i)

    def learn(self, recent: Sequence[int], j: int) -> None:
        """Count a click on ``j`` after the items ``recent`` (latest first; extra ones ignored)."""
        self.grow(j + 1)
        for w, i in zip(self.weights, recent, strict=False):
            self.link(i, j, w)
            if self.backward:
                self.link(j, i, self.backward * w)

    def forget(self, rows: Sequence[int]) -> None:
        """Remove every link from and to ``rows`` (freed vocabulary rows). With backward
        links, the rows linking to ``i`` are exactly those ``i`` links to; without them,
        every row is looked through."""
        gone = {int(r) for r in rows if 0 <= r < self.n_rows}
        if not gone:
            return
        if self.backward:
            touched = {int(j) for i in gone for j in self.row(i)[0]} - gone
        else:
            touched = set(range(self.n_rows)) - gone
        for i in gone:
            self.cols[i], self.vals[i], self.slots[i] = (np.zeros(4, dtype=np.int64),
                                                         np.zeros(4), {})
            self._dirty.add(i)
        drop = np.fromiter(gone, dtype=np.int64)
        for i in touched:
            cols, vals = self.row(i)
            keep = ~np.isin(cols, drop)
            if keep.all():
                continue
            cols, vals = cols[keep], vals[keep]
            size = max(4, cols.size)  # room to grow, as a new row has
            self.cols[i], self.vals[i] = np.zeros(size, np.int64), np.zeros(size)
            self.cols[i][: cols.size], self.vals[i][: vals.size] = cols, vals
            self.slots[i] = {int(j): s for s, j in enumerate(cols.tolist())}
            self._dirty.add(i)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the columns and counts of row ``i`` (views, in insertion order)."""
        n = len(self.slots[i])
        return self.cols[i][:n], self.vals[i][:n]

    def add_scores(self, out: np.ndarray, recent: Sequence[int]) -> None:
        """Add the full (untruncated) weighted rows of ``recent`` (latest first) to ``out``."""
        for w, i in zip(self.weights, recent, strict=False):
            if 0 <= i < self.n_rows:
                cols, vals = self.row(i)
                out[cols] += w * vals

    def n_links(self) -> int:
        """Return the number of non-zero entries."""
        return sum(len(s) for s in self.slots)

    def strongest(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return row ``i``'s ``top_k`` strongest links: by count, then by lower column."""
        cols, vals = self.row(i)
        if cols.size > self.top_k:
            order = np.lexsort((cols, -vals))[: self.top_k]
            cols, vals = cols[order], vals[order]
        return cols, vals

    def table(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (idx, val), each (n_rows, top_k): every row's strongest links, padded with
        column 0 and count 0 (row and column 0 are the generator's padding)."""
        self.grow(n_rows)
        if self._idx.shape[0] < n_rows:
            grow = max(n_rows, 2 * self._idx.shape[0]) - self._idx.shape[0]
            self._idx = np.concatenate([self._idx, np.zeros((grow, self.top_k), np.int32)])
            self._val = np.concatenate([self._val, np.zeros((grow, self.top_k), np.float32)])
            self._held = np.concatenate([self._held, np.zeros(grow, bool)])
        for i in self._dirty:
            cols, vals = self.strongest(i)
            self._idx[i] = 0
            self._val[i] = 0.0
            self._idx[i, : cols.size] = cols
            self._val[i, : cols.size] = vals
            self._held[i] = cols.size > 0
        self._dirty.clear()
        return self._idx[:n_rows], self._val[:n_rows]

    def held_rows(self, n_rows: int) -> np.ndarray:
        """The rows of ``table(n_rows)`` that hold any link, ascending int64 (the others
        are all padding): at 1M items a few hundred thousand, where finding them in the
        table is a pass over all [V+1, K] of it (~0.2 s of every export)."""
        self.table(n_rows)
        return np.flatnonzero(self._held[:n_rows])

    def state_dict(self) -> dict:
        """Return the counts as CSR tensors (what ``torch.load(weights_only=True)`` reads)."""
        # the rows with links only: at 1M items most rows have none, and a call per row
        # took ~5 s of a checkpoint's save
        lengths = np.fromiter(map(len, self.slots), np.int64, self.n_rows)  # (rows,)
        rows = [self.row(i) for i in np.flatnonzero(lengths).tolist()]
        cols = [c for c, _ in rows]
        vals = [v for _, v in rows]
        return {"n_recent": self.n_recent, "weights": list(self.weights),
                "backward": self.backward, "top_k": self.top_k,
                "indptr": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])
                                           .astype(np.int64)),
                "cols": torch.from_numpy(np.concatenate(cols) if cols
                                         else np.zeros(0, np.int64)),
                "vals": torch.from_numpy(np.concatenate(vals) if vals else np.zeros(0))}

    @classmethod
    def from_state_dict(cls, state: dict) -> Cooccurrence:
        out = cls(state["n_recent"], 1.0, state["backward"], state["top_k"])
        out.weights = list(state["weights"])
        indptr = state["indptr"].numpy()
        cols, vals = state["cols"].numpy(), state["vals"].numpy()
        out.grow(len(indptr) - 1)
        # rows with no links are as ``grow`` made them, and their table rows stay zero
        for i in np.flatnonzero(np.diff(indptr)).tolist():
            c = cols[indptr[i]:indptr[i + 1]].astype(np.int64)
            v = vals[indptr[i]:indptr[i + 1]].astype(np.float64)
            out.cols[i], out.vals[i] = c, v
            out.slots[i] = {int(j): s for s, j in enumerate(c.tolist())}
            out._dirty.add(i)
        return out


class PriorScorer(nn.Module):
    """history rows [B, L] -> ``log(1 + prior)`` [B, V+1] from a fixed top-k table.

    The table is (V+1, K) link columns and counts; the history's latest ``n_recent`` rows
    (left padding keeps the newest at the end; padding row 0 has no links) gather their
    links, which are summed into the score row with ``scatter_add`` (ONNX ScatterElements
    with reduction ``add``, opset 16+).
    """

    def __init__(self, idx: np.ndarray, val: np.ndarray, cfg: PriorConfig,
                 held: np.ndarray | None = None) -> None:
        super().__init__()
        # int32 halves what the bundle carries for the links (cast per call, on [B, R, K])
        self.register_buffer("idx", torch.as_tensor(idx, dtype=torch.int32))  # (V+1, K)
        self.register_buffer("val", torch.as_tensor(val, dtype=torch.float32))  # (V+1, K)
        pos = torch.tensor(cfg.position_weights()[::-1], dtype=torch.float32)  # oldest first
        self.register_buffer("pos", pos)  # (R,)
        self.n_recent = cfg.n_recent
        self.top_k = int(self.idx.shape[1])
        self.sparse: SparseRows | None = None  # the links, when held as rows (``from_links``)
        self.held = held  # the rows of the table that may hold links (None: any)

    def as_rows(self) -> SparseRows:
        """The links as rows (a whole table): ``sparse``, or read from the dense table."""
        if self.sparse is not None:
            return self.sparse
        return SparseRows.from_dense(self.idx.cpu().numpy(), self.val.cpu().numpy(),
                                     rows=self.held)

    @classmethod
    def from_links(cls, links: SparseRows, top_k: int, cfg: PriorConfig) -> PriorScorer:
        """A scorer that holds the table as its rows of links (a whole table, ``top_k`` per
        row) and gathers a history's links from them: what ranks as the dense table does,
        at the size of the links. At 1M items the dense [V+1, K] copy that the quality
        gate's baseline kept cost ~0.9 s of every export (150k linked rows: a page fault
        per row); this one is the bundle's own links. It ranks; it is never exported."""
        scorer = cls(np.zeros((1, top_k), np.int32), np.zeros((1, top_k), np.float32), cfg)
        scorer.sparse = links
        return scorer

    def recent(self, history: torch.Tensor) -> torch.Tensor:
        """The history's rows whose links count: its latest R, [B, R] oldest .. newest."""
        return history[:, -min(self.n_recent, int(history.shape[1])):]

    def links(self, history: torch.Tensor,
              gathered: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the links of the history's latest items: rows [B, R*K] int64 and their
        position-weighted counts [B, R*K] (padding: row 0, count 0). The prior of a row is
        the sum of the counts of the links that name it. ``gathered``: the links of
        ``recent(history)`` [B, R, K] each, read outside the graph (advrec/links.py) instead
        of from this table."""
        recent = self.recent(history)  # (B, R) oldest .. newest
        R = int(recent.shape[1])
        if gathered is None and self.sparse is not None:
            found = self.sparse.gather(recent.cpu().numpy(), self.top_k)  # (B, R, K) each
            gathered = (torch.from_numpy(found[0]).to(recent.device),
                        torch.from_numpy(found[1]).to(recent.device))
        if gathered is None:
            idx, val = self.idx[recent].long(), self.val[recent]  # (B, R, K) each
        else:
            idx, val = gathered[0].long(), gathered[1]  # (B, R, K) each
        val = val * self.pos[-R:].view(1, R, 1)  # (B, R, K)
        return idx.flatten(1), val.flatten(1)  # (B, R*K) each

    def forward(self, history: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Return ``log(1 + prior)`` for ``history`` [B, L], shaped as the scores ``like``
        [B, V+1] (whose values are not used)."""
        idx, val = self.links(history)  # (B, R*K) each
        # ``like * 0``, not zeros_like: the latter exports as Shape + ConstantOfShape, and the
        # served graph reads no tensor shapes (tests/unit/trainer/test_export.py)
        counts = (like * 0.0).scatter_add(1, idx, val)  # (B, V+1)
        return torch.log1p(counts)

    @torch.no_grad()
    def add_to(self, history: torch.Tensor, logits: torch.Tensor,
               weight: float) -> torch.Tensor:
        """``logits + weight * forward(history, logits)`` [B, V+1], written into ``logits``
        at the linked columns only: the same values (``log1p(0)`` adds nothing elsewhere)
        without the four passes over [B, V+1] that the dense graph makes (at 1M items,
        ~45 % of the prequential scoring's time). For ranking, never for export."""
        idx, val = self.links(history)  # (B, R*K) each
        n_cols = int(logits.shape[1])
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
        keys, where = torch.unique((rows * n_cols + idx).flatten(), return_inverse=True)
        # summed in the order the dense scatter_add sums them: the same float32 counts
        counts = torch.zeros(keys.shape, dtype=val.dtype, device=val.device)  # (U,)
        counts.scatter_add_(0, where, val.flatten())
        r, c = keys // n_cols, keys % n_cols  # (U,) each
        logits[r, c] = logits[r, c] + weight * torch.log1p(counts)
        return logits

    def at(self, history: torch.Tensor, rows: torch.Tensor,
           gathered: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Return ``log(1 + prior)`` of the candidate ``rows`` [B, C] only -> [B, C] (what
        ``forward`` gives at those columns; ``gathered`` as for ``links``)."""
        idx, val = self.links(history, gathered)  # (B, R*K) each
        hits = (idx.unsqueeze(1) == rows.unsqueeze(2)).to(val.dtype)  # (B, C, R*K)
        counts = (hits @ val.unsqueeze(2)).squeeze(2)  # (B, C)
        return torch.log1p(counts)


class HybridScorer(nn.Module):
    """G's logits plus ``weight * log(1 + prior)``: history [B, L] -> scores [B, V+1].

    What the learner ranks with when the prior is on, and what ``trainer/export.py`` exports.
    """

    def __init__(self, generator: nn.Module, prior: PriorScorer, weight: float,
                 in_place: bool = False) -> None:
        super().__init__()
        self.generator = generator
        self.prior = prior
        self.weight = float(weight)
        self.in_place = in_place  # rank with ``PriorScorer.add_to`` (no grad, no export)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        logits = self.generator(history)  # (B, V+1)
        if self.in_place:
            return self.prior.add_to(history, logits, self.weight)
        return logits + self.weight * self.prior(history, logits)
