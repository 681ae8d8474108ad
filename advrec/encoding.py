"""How a user's history becomes the generator's input: one encoding for trainer and worker.

The generator reads a history as the embedding rows of its items, oldest first, left-padded
with row 0 to the model's ``max_len``. Items the vocabulary does not know are dropped (they
have no row) before the last ``max_len`` are taken, so a history of 25 items of which 10 are
unknown fills 15 positions. The worker also excludes every known item of the history from
the list it serves (0-padded, one leading 0 so that an empty history still has a column).

The trainer (``trainer.vocab``, ``trainer.learner``) and the worker (``stream_app.serving``)
both call these functions; a change here changes both sides at once, so what the model is
trained on and what it is asked at serving time cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from advrec.types import ItemId

__all__ = ["exclusion_rows", "known_rows", "model_input", "padded"]


def known_rows(index: Mapping[ItemId, int], history: Iterable[ItemId],
               limit: int | None = None) -> list[int]:
    """Return the rows of the items of ``history`` that ``index`` knows, oldest first;
    ``limit``: only rows up to it (a map shared with a larger vocabulary's)."""
    # map in C, filter only when an item is unknown: 2.6 vs 4.5 us for 50 known items
    rows = list(map(index.get, history))
    if None in rows:
        rows = [r for r in rows if r is not None]
    if limit is not None and rows and max(rows) > limit:  # type: ignore[type-var]
        rows = [r for r in rows if r <= limit]  # type: ignore[operator]
    return rows  # type: ignore[return-value]


def padded(rows: Sequence[int], max_len: int) -> list[int]:
    """Return the last ``max_len`` of ``rows``, left-padded with 0 to ``max_len``."""
    if len(rows) >= max_len:
        return list(rows[len(rows) - max_len:])
    return [0] * (max_len - len(rows)) + list(rows)


def model_input(known: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Return the model input [B, L] for the known rows of B histories.

    Padded as Python lists and converted once: at B=13 with 50 rows each this took 34 us
    against 57 for filling numpy rows one by one.
    """
    out = np.array([padded(rows, max_len) for rows in known], dtype=np.int64)
    return out.reshape(len(known), max_len)  # (B, L)


def exclusion_rows(known: Sequence[Sequence[int]]) -> np.ndarray:
    """Return the rows to exclude from each list [B, S]: every known row of the history,
    after one leading 0 and right-padded with 0 (row 0 is padding, never served)."""
    S = 1 + max(map(len, known), default=0)
    return np.array([[0, *rows] + [0] * (S - 1 - len(rows)) for rows in known],
                    dtype=np.int64).reshape(len(known), S)  # (B, S)
