"""Read public interaction logs as click events in time order, and catalogues as items.

Every click loader returns an ``EventLog``: the events sorted by timestamp (ms), stable, so events
sharing a timestamp keep their file order. Event ids are derived from the source and the
line number (``movielens:42``), so replaying a file twice yields the same ids and redelivery
de-duplication holds across replays. A malformed line raises ``DatasetError`` naming the file,
the line and the problem; with ``strict=False`` such lines are skipped and counted instead.
The catalogue readers (``read_movielens_movies``, ``read_catalogue_csv``) return the items in
file order and hold every row to the catalogue contract (``advrec.catalogue.check_item``), so
a file that reads is a catalogue the worker accepts.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, overload

from advrec.catalogue import CatalogueItem, InvalidItem, check_item
from advrec.contract import FUTURE_SLACK_MS, MAX_ID_CHARS, MIN_TS_MS, ClickEvent
from advrec.types import TimestampMs

__all__ = [
    "SOURCES",
    "DatasetError",
    "EventLog",
    "count_events",
    "load_events",
    "read_catalogue_csv",
    "read_csv",
    "read_movielens",
    "read_movielens_movies",
    "read_movielens_udata",
    "read_sequences",
    "read_yoochoose",
]

IMPLICIT_START_MS = 1_000_000_000_000  # 2001-09-09: fixed, so implicit timestamps replay alike
MAX_KEPT_ERRORS = 20
_LINE_ERROR = "{path}:{line}: {problem}"


class DatasetError(ValueError):
    """A dataset file cannot be read; names the file, the line (0: whole file) and why."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        super().__init__(_LINE_ERROR.format(path=path, line=line, problem=problem))
        self.path = str(path)
        self.line = line
        self.problem = problem


@dataclass
class EventLog(Sequence[ClickEvent]):
    """Events of one dataset, oldest first, with what was skipped on the way."""

    source: str
    paths: tuple[str, ...]
    events: list[ClickEvent]
    skipped: int = 0  # malformed lines dropped (only with strict=False)
    errors: list[DatasetError] = field(default_factory=list)  # the first MAX_KEPT_ERRORS

    def __len__(self) -> int:
        return len(self.events)

    @overload
    def __getitem__(self, index: int) -> ClickEvent: ...
    @overload
    def __getitem__(self, index: slice) -> list[ClickEvent]: ...
    def __getitem__(self, index: int | slice) -> ClickEvent | list[ClickEvent]:
        return self.events[index]

    def __iter__(self) -> Iterator[ClickEvent]:
        return iter(self.events)

    def n_users(self) -> int:
        """Return the number of distinct users."""
        return len({e.user for e in self.events})

    def n_items(self) -> int:
        """Return the number of distinct items."""
        return len({e.item for e in self.events})


class _Collector:
    """Gather events of one load; raise on a bad line or, when not strict, count it."""

    def __init__(self, source: str, strict: bool) -> None:
        self.source = source
        self.strict = strict
        self.events: list[ClickEvent] = []
        self.paths: list[str] = []
        self.skipped = 0
        self.errors: list[DatasetError] = []
        self.max_ts = int(time.time() * 1000) + FUTURE_SLACK_MS

    def fail(self, path: Path, line: int, problem: str) -> None:
        error = DatasetError(path, line, problem)
        if self.strict:
            raise error
        self.skipped += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(error)

    def add(self, path: Path, line: int, user: str, item: str, ts: TimestampMs,
            event_id: str, session: str | None = None) -> None:
        for name, value in (("user", user), ("item", item), ("session", session)):
            if value is not None and not 1 <= len(value) <= MAX_ID_CHARS:
                raise _BadLine(f"{name} id must have 1..{MAX_ID_CHARS} chars, got {value!r}"[:200])
        if not MIN_TS_MS <= ts <= self.max_ts:
            raise _BadLine(f"timestamp {ts} ms is before 1990 or in the future (wrong unit?)")
        self.events.append(ClickEvent(user=user, item=item, ts=ts, session=session,
                                      id=event_id))

    def result(self) -> EventLog:
        self.events.sort(key=lambda e: e.ts)  # stable: ties keep file order
        return EventLog(self.source, tuple(self.paths), self.events, self.skipped, self.errors)


class _BadLine(ValueError):
    """One line breaks its format; turned into a DatasetError with the file and line."""


def _open(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(path, 0, "no such file")
    return path.open(encoding="utf-8", newline="")


def _to_ms(raw: str, unit: str, what: str = "timestamp") -> TimestampMs:
    text = raw.strip()
    try:
        value = int(text)
        return value * 1000 if unit == "s" else value
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise _BadLine(f"{what} {raw[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise _BadLine(f"{what} {raw[:40]!r} is not finite")
    return round(number * 1000) if unit == "s" else round(number)


def _rows(path: Path, collect: _Collector, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of a delimited file, skipping blank lines."""
    collect.paths.append(str(path))
    yield from _delimited(path, delimiter)


def _delimited(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    with _open(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            for fields in reader:
                if fields and any(f.strip() for f in fields):
                    yield reader.line_num, fields
        except csv.Error as exc:
            raise DatasetError(path, reader.line_num, f"unreadable CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(path, reader.line_num + 1, f"not UTF-8: {exc}") from None


def _parse_each(path: Path, collect: _Collector, rows: Iterator[tuple[int, list[str]]],
                parse: Callable[[int, list[str]], None]) -> None:
    for line, fields in rows:
        try:
            parse(line, fields)
        except _BadLine as exc:
            collect.fail(path, line, str(exc))


def _expect_fields(fields: list[str], n: int, what: str) -> None:
    if len(fields) != n:
        raise _BadLine(f"expected {n} fields ({what}), got {len(fields)}")


def _header_index(path: Path, header: list[str], names: Sequence[str]) -> list[int]:
    clean = [h.strip().lstrip("\ufeff") for h in header]
    missing = [n for n in names if n not in clean]
    if missing:
        raise DatasetError(path, 1, f"header {clean} lacks columns {missing}")
    return [clean.index(n) for n in names]


def _rating_kept(rating: str, min_rating: float | None) -> bool:
    """Return whether a MovieLens rating passes ``min_rating``; a non-number is a bad line."""
    try:
        value = float(rating)
    except ValueError:
        raise _BadLine(f"rating {rating[:40]!r} is not a number") from None
    return min_rating is None or value >= min_rating


def read_movielens(path: str | Path, *, min_rating: float | None = None,
                   strict: bool = True) -> EventLog:
    """Read a MovieLens ``ratings.csv`` (``userId,movieId,rating,timestamp``, seconds).

    Parameters
    ----------
    path
        The ``ratings.csv`` file.
    min_rating
        Keep only ratings at least this high; None keeps every rating as a click.
    strict
        Raise on the first malformed line; otherwise skip and count such lines.
    """
    path = Path(path)
    collect = _Collector("movielens", strict)
    rows = _rows(path, collect, ",")
    first = next(rows, None)
    if first is None:
        raise DatasetError(path, 1, "empty file: expected a header userId,movieId,rating,timestamp")
    cols = _header_index(path, first[1], ("userId", "movieId", "rating", "timestamp"))
    width = len(first[1])

    def parse(line: int, fields: list[str]) -> None:
        _expect_fields(fields, width, "userId,movieId,rating,timestamp")
        user, item, rating, ts = (fields[c].strip() for c in cols)
        ts_ms = _to_ms(ts, "s")
        if _rating_kept(rating, min_rating):
            collect.add(path, line, user, item, ts_ms, f"movielens:{line}")

    _parse_each(path, collect, rows, parse)
    return collect.result()


def read_movielens_udata(path: str | Path, *, min_rating: float | None = None,
                         strict: bool = True) -> EventLog:
    """Read a MovieLens-100k ``u.data`` (tab separated ``user item rating seconds``)."""
    path = Path(path)
    collect = _Collector("movielens-udata", strict)

    def parse(line: int, fields: list[str]) -> None:
        _expect_fields(fields, 4, "user, item, rating, timestamp")
        user, item, rating, ts = (f.strip() for f in fields)
        ts_ms = _to_ms(ts, "s")
        if _rating_kept(rating, min_rating):
            collect.add(path, line, user, item, ts_ms, f"movielens-udata:{line}")

    _parse_each(path, collect, _rows(path, collect, "\t"), parse)
    return collect.result()


def _yoochoose_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    train = sorted(path.glob("*train_full*"))
    test = sorted(path.glob("*_test*"))
    if not train and not test:
        raise DatasetError(path, 0, "directory holds no *train_full* or *_test* file")
    return train + test  # the test file's sessions come after the train file's


def _iso_to_ms(raw: str) -> TimestampMs:
    try:
        return round(datetime.fromisoformat(raw.strip()).timestamp() * 1000)
    except ValueError:
        raise _BadLine(f"timestamp {raw[:40]!r} is not ISO 8601") from None


def read_yoochoose(path: str | Path, *, strict: bool = True) -> EventLog:
    """Read YOOCHOOSE clicks, each session as one user.

    Two layouts are understood: the session-rec preparation (TSV with header
    ``SessionId ItemId Time``, seconds with a fraction; a directory means its
    ``*train_full*`` file then its ``*_test*`` file), and the challenge's raw
    ``yoochoose-clicks.dat`` (CSV ``session,ISO time,item,category``, no header).
    """
    collect = _Collector("yoochoose", strict)
    for file in _yoochoose_files(Path(path)):
        tag = file.stem[:60]
        with _open(file) as handle:
            head = handle.readline()
        delimiter = "\t" if "\t" in head else ","
        rows = _rows(file, collect, delimiter)
        if "SessionId" in head:
            first = next(rows)
            cols = _header_index(file, first[1], ("SessionId", "ItemId", "Time"))
            width = len(first[1])

            def parse(line: int, fields: list[str], cols: list[int] = cols, width: int = width,
                      file: Path = file, tag: str = tag) -> None:
                _expect_fields(fields, width, "SessionId, ItemId, Time")
                session, item, ts = (fields[c].strip() for c in cols)
                collect.add(file, line, session, item, _to_ms(ts, "s", "Time"),
                            f"yoochoose:{tag}:{line}", session=session)
        else:

            def parse(line: int, fields: list[str], file: Path = file, tag: str = tag) -> None:
                _expect_fields(fields, 4, "session, timestamp, item, category")
                session, ts, item = (f.strip() for f in fields[:3])
                collect.add(file, line, session, item, _iso_to_ms(ts),
                            f"yoochoose:{tag}:{line}", session=session)

        _parse_each(file, collect, rows, parse)
    return collect.result()


def read_sequences(path: str | Path, *, order: str = "file",
                   start_ms: TimestampMs = IMPLICIT_START_MS, step_ms: int = 1000,
                   strict: bool = True) -> EventLog:
    """Read one-user-a-line sequences ``user item1 item2 ...`` (whitespace separated).

    Lines may hold one item each (``user item`` pairs); a user may span several lines. There
    are no timestamps: the order is the time. Event ``k`` gets ``start_ms + k * step_ms``.

    Parameters
    ----------
    order
        ``"file"``: events in file order (a line's items, then the next line's).
        ``"interleave"``: every user's first item, then every user's second, ... (users in
        order of first appearance), which looks more like concurrent users.
    start_ms, step_ms
        The implicit clock; fixed defaults so that replays give identical events.
    """
    assert order in ("file", "interleave"), f"order must be 'file' or 'interleave', not {order!r}"
    assert step_ms >= 0, "step_ms must be >= 0"
    path = Path(path)
    collect = _Collector("sequences", strict)
    collect.paths.append(str(path))
    raw: list[tuple[str, str, str]] = []  # (user, item, event id) in file order
    keys: list[tuple[int, int]] = []  # (position in the user's sequence, user's first line)
    position: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    with _open(path) as handle:
        line = 0
        try:
            for line, text in enumerate(handle, 1):
                parts = text.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    collect.fail(path, line, f"expected 'user item ...', got {text.strip()[:60]!r}")
                    continue
                user = parts[0]
                too_long = [p for p in parts if len(p) > MAX_ID_CHARS]
                if too_long:
                    collect.fail(path, line, f"id longer than {MAX_ID_CHARS} chars: "
                                 f"{too_long[0][:40]!r}...")
                    continue
                seen = position.get(user, 0)
                first_seen.setdefault(user, line)
                for offset, item in enumerate(parts[1:]):
                    raw.append((user, item, f"sequences:{line}:{offset + 1}"))
                    keys.append((seen + offset, first_seen[user]))
                position[user] = seen + len(parts) - 1
        except UnicodeDecodeError as exc:
            raise DatasetError(path, line + 1, f"not UTF-8: {exc}") from None
    ranks = range(len(raw)) if order == "file" else sorted(range(len(raw)), key=keys.__getitem__)
    for k, index in enumerate(ranks):
        user, item, event_id = raw[index]
        collect.events.append(ClickEvent(user=user, item=item, ts=start_ms + k * step_ms,
                                         id=event_id))
    return collect.result()


def _parse_columns(columns: str | Mapping[str, str | int]) -> dict[str, str]:
    if isinstance(columns, str):
        pairs = [part.split("=", 1) for part in columns.split(",") if part.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"columns {columns!r} must look like 'user=col,item=col,ts=col'")
        mapping = {k.strip(): v.strip() for k, v in pairs}
    else:
        mapping = {k: str(v) for k, v in columns.items()}
    unknown = set(mapping) - {"user", "item", "ts", "session"}
    if unknown or not {"user", "item"} <= set(mapping):
        raise ValueError(f"columns {mapping} need user and item, optionally ts and session, "
                         f"and nothing else (got {sorted(unknown)})")
    return mapping


def read_csv(path: str | Path, *, columns: str | Mapping[str, str | int],
             ts_unit: str = "s", delimiter: str = ",", header: bool = True,
             start_ms: TimestampMs = IMPLICIT_START_MS, step_ms: int = 1000,
             strict: bool = True) -> EventLog:
    """Read any delimited file of interactions, given which column holds what.

    Parameters
    ----------
    columns
        ``"user=col,item=col,ts=col[,session=col]"`` or a mapping; ``col`` is a header name,
        or a 0-based index when ``header`` is False. Without ``ts`` the file order is the
        time, on the implicit clock ``start_ms + k * step_ms``.
    ts_unit
        ``"s"`` (fractions allowed) or ``"ms"``.
    """
    assert ts_unit in ("s", "ms"), f"ts_unit must be 's' or 'ms', not {ts_unit!r}"
    mapping = _parse_columns(columns)
    path = Path(path)
    collect = _Collector("csv", strict)
    rows = _rows(path, collect, delimiter)
    if header:
        first = next(rows, None)
        if first is None:
            raise DatasetError(path, 1, "empty file: expected a header line")
        names = list(mapping.values())
        index = dict(zip(mapping, _header_index(path, first[1], names), strict=True))
    else:
        try:
            index = {k: int(v) for k, v in mapping.items()}
        except ValueError:
            raise ValueError(f"columns {mapping} must be 0-based indices without a header") \
                from None
    width = max(index.values()) + 1
    counter = itertools.count()

    def parse(line: int, fields: list[str]) -> None:
        if len(fields) < width:
            raise _BadLine(f"expected at least {width} fields, got {len(fields)}")
        k = next(counter)
        ts = (_to_ms(fields[index["ts"]], ts_unit) if "ts" in index
              else start_ms + k * step_ms)
        session = fields[index["session"]].strip() if "session" in index else None
        collect.add(path, line, fields[index["user"]].strip(), fields[index["item"]].strip(),
                    ts, f"csv:{line}", session=session)

    _parse_each(path, collect, rows, parse)
    return collect.result()


MOVIELENS_NO_GENRES = "(no genres listed)"  # movies.csv's word for a movie without genres


def _catalogue(path: Path, rows: Iterator[tuple[int, list[str]]],
               parse: Callable[[list[str]], CatalogueItem]) -> list[CatalogueItem]:
    """Turn each row into an item held to the catalogue contract; raise on the first bad one."""
    now_ms = int(time.time() * 1000)
    items: list[CatalogueItem] = []
    for line, fields in rows:
        try:
            items.append(check_item(parse(fields), now_ms=now_ms))
        except (_BadLine, InvalidItem) as exc:
            raise DatasetError(path, line, str(exc)) from None
    return items


def _split_categories(raw: str, sep: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(sep) if part.strip())


def read_movielens_movies(path: str | Path) -> list[CatalogueItem]:
    """Read a MovieLens ``movies.csv`` (``movieId,title,genres``) as catalogue items.

    The item id is the ``movieId`` as ``read_movielens`` gives it to clicks, the genres
    (``|``-separated; ``(no genres listed)`` means none) become the categories. Titles hold
    commas and quotes, so the file is read as CSV, never split by hand.
    """
    path = Path(path)
    rows = _delimited(path, ",")
    first = next(rows, None)
    if first is None:
        raise DatasetError(path, 1, "empty file: expected a header movieId,title,genres")
    cols = _header_index(path, first[1], ("movieId", "title", "genres"))
    width = len(first[1])

    def parse(fields: list[str]) -> CatalogueItem:
        _expect_fields(fields, width, "movieId,title,genres")
        item, title, genres = (fields[c].strip() for c in cols)
        categories = () if genres == MOVIELENS_NO_GENRES else _split_categories(genres, "|")
        return CatalogueItem(item=item, title=title, categories=categories)

    return _catalogue(path, rows, parse)


def read_catalogue_csv(path: str | Path, *, id_col: str, title_col: str,
                       text_col: str | None = None, categories_col: str | None = None,
                       categories_sep: str = "|", created_col: str | None = None,
                       created_unit: str = "s") -> list[CatalogueItem]:
    """Read any CSV catalogue with a header line, given which column holds what.

    Parameters
    ----------
    id_col, title_col
        Header names of the item id (as the clicks name items) and of the title.
    text_col, categories_col, created_col
        Header names of the optional description, categories and creation time; None: the
        file has none. An empty cell is an absent value.
    categories_sep
        What separates the categories within their cell.
    created_unit
        ``"s"`` (fractions allowed) or ``"ms"`` since the epoch.
    """
    assert created_unit in ("s", "ms"), f"created_unit must be 's' or 'ms', not {created_unit!r}"
    assert categories_sep, "categories_sep must not be empty"
    path = Path(path)
    rows = _delimited(path, ",")
    first = next(rows, None)
    if first is None:
        raise DatasetError(path, 1, "empty file: expected a header line")
    wanted = {"id": id_col, "title": title_col, "text": text_col,
              "categories": categories_col, "created": created_col}
    named = {role: col for role, col in wanted.items() if col is not None}
    index = dict(zip(named, _header_index(path, first[1], list(named.values())), strict=True))
    width = max(index.values()) + 1

    def cell(fields: list[str], role: str) -> str:
        return fields[index[role]].strip() if role in index else ""

    def parse(fields: list[str]) -> CatalogueItem:
        if len(fields) < width:
            raise _BadLine(f"expected at least {width} fields, got {len(fields)}")
        created = cell(fields, "created")
        return CatalogueItem(
            item=cell(fields, "id"), title=cell(fields, "title"), text=cell(fields, "text"),
            categories=_split_categories(cell(fields, "categories"), categories_sep),
            created=_to_ms(created, created_unit, "created") if created else None)

    return _catalogue(path, rows, parse)


SOURCES: dict[str, Callable[..., EventLog]] = {
    "movielens": read_movielens,
    "movielens-udata": read_movielens_udata,
    "yoochoose": read_yoochoose,
    "sequences": read_sequences,
    "csv": read_csv,
}


def load_events(source: str, path: str | Path, **opts: Any) -> EventLog:
    """Read ``path`` with the loader named ``source`` (a key of ``SOURCES``)."""
    try:
        loader = SOURCES[source]
    except KeyError:
        raise ValueError(f"unknown dataset source {source!r}; known: {sorted(SOURCES)}") from None
    return loader(path, **opts)


def count_events(source: str, path: str | Path, **opts: Any) -> int:
    """Return how many events ``load_events(source, path, **opts)`` yields."""
    return len(load_events(source, path, **opts))
