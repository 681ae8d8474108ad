"""The item vocabulary: external item ids to embedding rows (1-based; row 0 is padding)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from advrec.encoding import known_rows, padded
from advrec.types import ItemId, ItemIndex

__all__ = ["Vocabulary"]


class Vocabulary:
    """Grow-only map between external item ids and embedding rows; row 0 is padding."""

    def __init__(self, items: Iterable[ItemId] = ()) -> None:
        self._rows: dict[ItemId, ItemIndex] = {}
        self._items: list[ItemId] = []
        self.add_many(items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._rows

    def add(self, item: ItemId) -> ItemIndex:
        """Return the row of ``item``, giving it the next free row if it is new."""
        row = self._rows.get(item)
        if row is None:
            self._items.append(item)
            row = self._rows[item] = len(self._items)
        return row

    def add_many(self, items: Iterable[ItemId]) -> list[ItemIndex]:
        """Add every item in order; return their rows."""
        return [self.add(item) for item in items]

    def index(self, item: ItemId) -> ItemIndex | None:
        """Return the row of ``item``, or None if it is unknown."""
        return self._rows.get(item)

    def item(self, row: ItemIndex) -> ItemId:
        """Return the external id stored at ``row`` (1-based)."""
        assert 1 <= row <= len(self._items), f"row {row} outside 1..{len(self._items)}"
        return self._items[row - 1]

    def encode_history(self, items: Iterable[ItemId], max_len: int) -> list[ItemIndex]:
        """Return the last ``max_len`` known items' rows, left-padded with 0; unknowns skipped
        (``advrec.encoding``: the worker encodes a served history the same way)."""
        return padded(self.known_rows(items), max_len)

    def known_rows(self, items: Iterable[ItemId]) -> list[ItemIndex]:
        """Return the rows of the known items of ``items``, oldest first."""
        return known_rows(self._rows, items)

    def items(self) -> list[ItemId]:
        """Return the ids in row order: row ``i + 1`` holds ``items()[i]`` (the bundle's vocab)."""
        return list(self._items)

    def state_dict(self) -> dict[str, Any]:
        return {"items": list(self._items)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Vocabulary:
        """Rebuild a vocabulary saved by ``state_dict``."""
        vocab = cls(state["items"])
        assert len(vocab) == len(state["items"]), "duplicate item ids in a saved vocabulary"
        return vocab
