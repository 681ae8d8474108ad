"""The catalogue contract: the items a catalogue knows, before anyone clicks them.

Catalogue owners write one msgpack map per item to the ``items`` topic, keyed by the item id
as raw UTF-8 bytes (``item_key``). The topic is compacted, so the newest record of an id is
the item as it stands, and a tombstone (a record with a null value) deletes the item from
the catalogue: ``decode_item`` is never called with one, its caller sees the null value and
drops the item. The stream worker validates each record with ``decode_item``; a failure
carries one of the fixed ``ITEM_REASONS``, which are also the label values of the invalid
item metric and the ``reason`` field of the dead letters on ``items-dlq`` (written with
``advrec.contract.encode_dead_letter``, as click dead letters are).

Item ids live in the same space as the ``item`` of click events, under the same rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack

from advrec.contract import FUTURE_SLACK_MS, InvalidEvent, _check_id, _unpack
from advrec.types import ItemId, TimestampMs

__all__ = [
    "ITEM_REASONS",
    "MAX_CATEGORIES",
    "MAX_CATEGORY_CHARS",
    "MAX_ITEM_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_TITLE_CHARS",
    "CatalogueItem",
    "InvalidItem",
    "check_item",
    "decode_item",
    "encode_item",
    "item_key",
]

MAX_ITEM_BYTES = 64 * 1024  # a long description is a few KB; within Kafka's 1 MiB default
MAX_TITLE_CHARS = 1000
MAX_TEXT_CHARS = 20_000  # about 3,000 words: more than a text encoder reads anyway
MAX_CATEGORIES = 64
MAX_CATEGORY_CHARS = 100

ITEM_REASONS = (
    "not_msgpack",  # bytes that do not decode as one msgpack object
    "too_large",  # payload larger than MAX_ITEM_BYTES
    "not_a_map",  # valid msgpack, but not a map
    "missing_field",  # item or title absent
    "bad_type",  # a field of the wrong type (e.g. categories not a list of strings)
    "bad_id",  # item id empty or longer than the click contract's MAX_ID_CHARS
    "bad_title",  # title empty (after stripping blanks) or longer than MAX_TITLE_CHARS
    "text_too_long",  # text longer than MAX_TEXT_CHARS
    "bad_categories",  # more than MAX_CATEGORIES, or one empty or over MAX_CATEGORY_CHARS
    "bad_created",  # created not an integer, negative, or more than a day in the future
    "key_mismatch",  # message key is not item_key(item)
)

# the click contract's checks reused here, under this contract's names for the same faults
_CLICK_TO_ITEM_REASON = {"oversize": "too_large", "wrong_type": "bad_type"}


class InvalidItem(ValueError):
    """A catalogue record breaks the contract; ``reason`` is one of ``ITEM_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in ITEM_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CatalogueItem:
    """One item of the catalogue: its id (as clicks name it), what it is called and about."""

    item: ItemId
    title: str
    text: str = ""
    categories: tuple[str, ...] = ()
    created: TimestampMs | None = None  # when it entered the catalogue, ms since the epoch

    def to_dict(self) -> dict[str, Any]:
        """Return the record's map, without the optional fields that are empty."""
        out: dict[str, Any] = {"item": self.item, "title": self.title}
        if self.text:
            out["text"] = self.text
        if self.categories:
            out["categories"] = list(self.categories)
        if self.created is not None:
            out["created"] = self.created
        return out

    def content_text(self) -> str:
        """Return what a text encoder reads: title, categories, text, each part once.

        >>> toy = CatalogueItem("1", "Toy Story (1995)", categories=("Animation", "Comedy"))
        >>> toy.content_text()
        'Toy Story (1995). Animation, Comedy'
        """
        parts = (self.title, ", ".join(self.categories), self.text)
        return ". ".join(part.strip() for part in parts if part.strip())


def item_key(item: ItemId) -> bytes:
    """Return the Kafka message key for ``item``: its raw UTF-8 bytes (compaction keeps the
    newest record per key, so one key per item)."""
    return item.encode("utf-8")


def encode_item(item: CatalogueItem) -> bytes:
    """Serialize a catalogue item for the ``items`` topic."""
    return msgpack.packb(item.to_dict(), use_bin_type=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


def check_item(item: CatalogueItem, *, now_ms: int | None = None) -> CatalogueItem:
    """Return ``item`` if its values keep the contract's limits, else raise ``InvalidItem``.

    ``decode_item`` checks every record with it, and the file readers every row, so an item
    read from a file is dead-lettered for nothing that the file itself would not show.
    """
    now_ms = _now_ms() if now_ms is None else now_ms
    try:
        _check_id("item", item.item, required=True)
    except InvalidEvent as exc:
        raise InvalidItem(_CLICK_TO_ITEM_REASON.get(exc.reason, exc.reason), exc.detail) from None
    if not item.title.strip() or len(item.title) > MAX_TITLE_CHARS:
        raise InvalidItem("bad_title", f"title must have 1..{MAX_TITLE_CHARS} chars (not only "
                                       f"blanks), got {len(item.title)}: {item.title[:40]!r}")
    if len(item.text) > MAX_TEXT_CHARS:
        raise InvalidItem("text_too_long", f"text has {len(item.text)} chars > {MAX_TEXT_CHARS}")
    if len(item.categories) > MAX_CATEGORIES:
        raise InvalidItem("bad_categories",
                          f"{len(item.categories)} categories > {MAX_CATEGORIES}")
    for category in item.categories:
        if not category.strip() or len(category) > MAX_CATEGORY_CHARS:
            raise InvalidItem("bad_categories", f"a category must have 1..{MAX_CATEGORY_CHARS} "
                                                f"chars (not only blanks), got {category[:40]!r}")
    created = item.created
    if created is not None and not 0 <= created <= now_ms + FUTURE_SLACK_MS:
        raise InvalidItem("bad_created", f"created={created} outside [0, now+1d]")
    size = len(encode_item(item))
    if size > MAX_ITEM_BYTES:
        raise InvalidItem("too_large", f"the record takes {size} bytes > {MAX_ITEM_BYTES}")
    return item


def _string(obj: dict[Any, Any], name: str, default: str | None) -> str:
    value = obj.get(name)
    if value is None:
        if default is None:
            raise InvalidItem("missing_field", f"field {name!r} is required")
        return default
    if not isinstance(value, str):
        raise InvalidItem("bad_type", f"{name} must be a string, got {type(value).__name__}")
    return value


def _categories(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise InvalidItem("bad_type", "categories must be a list of strings")
    return tuple(value)


def _created(value: Any) -> TimestampMs | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidItem("bad_created",
                          f"created must be an integer (ms), got {type(value).__name__}")
    return value


def decode_item(payload: Any, key: bytes | None = None, *,
                now_ms: int | None = None) -> CatalogueItem:
    """Validate one ``items`` record and return the item, or raise ``InvalidItem``.

    ``payload`` is the record's value, never a tombstone's null: a tombstone deletes the
    item named by its key, and the caller handles it before decoding. Unknown fields are
    ignored, as in click events.
    """
    try:
        obj = _unpack(payload, MAX_ITEM_BYTES)
        if not isinstance(obj, dict):
            raise InvalidItem("not_a_map", f"top-level value is {type(obj).__name__}")
        item_id = _check_id("item", obj.get("item"), required=True)
    except InvalidEvent as exc:
        raise InvalidItem(_CLICK_TO_ITEM_REASON.get(exc.reason, exc.reason), exc.detail) from None
    assert item_id is not None
    item = CatalogueItem(item=item_id, title=_string(obj, "title", None),
                         text=_string(obj, "text", ""),
                         categories=_categories(obj.get("categories")),
                         created=_created(obj.get("created")))
    check_item(item, now_ms=now_ms)
    if key is not None and key != item_key(item_id):
        raise InvalidItem("key_mismatch",
                          f"key {bytes(key[:40])!r} is not the item id {item_id[:40]!r}")
    return item
