"""``advrec replay``: produce a synthetic or recorded click stream into Kafka, in time order,
and with ``--catalogue`` the items it clicks on, each before the first click it could have."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from advrec.catalogue import CatalogueItem, encode_item, item_key
from advrec.contract import (
    MAX_ENVELOPE_EVENTS,
    ClickEvent,
    encode_envelope,
    encode_event,
    encode_key,
)

__all__ = ["ReplayStats", "as_envelopes", "as_payloads", "as_records", "build_parser",
           "interleave", "main", "produce", "produce_records", "run"]

log = logging.getLogger("advrec.replay")

MAX_RATE = 1_000_000.0  # events/s; a bound so a typo cannot turn into a flood


@dataclass
class ReplayStats:
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    sent_to: Counter[str] = field(default_factory=Counter)  # messages sent, by topic
    failed_to: Counter[str] = field(default_factory=Counter)  # messages that failed, by topic

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


Payload = tuple[bytes | None, bytes]  # (key, value)
Record = tuple[str, bytes | None, bytes]  # (topic, key, value)


def as_payloads(events: Iterable[ClickEvent]) -> Iterator[Payload]:
    """Encode events with the contract's key (raw UTF-8 user id) and msgpack value."""
    for event in events:
        yield encode_key(event.user), encode_event(event)


def as_envelopes(events: Iterable[ClickEvent], size: int,
                 window: int = 1000) -> Iterator[tuple[Payload, int]]:
    """Group each user's events into envelopes of up to ``size`` events, as a producer that
    batches would; yield (payload, events in it). A user's envelope goes out when full, and
    every open one after ``window`` events of the stream, so no event waits long; a user's
    events keep their order."""
    assert size >= 1 and window >= 1
    open_: dict[str, list[ClickEvent]] = {}
    for n, event in enumerate(events, start=1):
        batch = open_.setdefault(event.user, [])
        batch.append(event)
        if len(batch) >= size:
            del open_[event.user]
            yield (encode_key(event.user), encode_envelope(batch)), len(batch)
        if n % window == 0:
            for user, batch in open_.items():
                yield (encode_key(user), encode_envelope(batch)), len(batch)
            open_.clear()
    for user, batch in open_.items():
        yield (encode_key(user), encode_envelope(batch)), len(batch)


def interleave(items: Sequence[CatalogueItem],
               events: Iterable[ClickEvent]) -> Iterator[CatalogueItem | ClickEvent]:
    """Merge a catalogue into a click stream by time, as the catalogue would have grown.

    Items without a ``created`` time come first (they predate the stream); an item with one
    comes just before the first click at or after that time, items created after the last
    click at the end. Ties keep the catalogue's order; ``events`` must be in time order.
    """
    yield from (item for item in items if item.created is None)
    dated = sorted((item for item in items if item.created is not None),
                   key=lambda item: item.created or 0)
    k = 0
    for event in events:
        while k < len(dated) and (dated[k].created or 0) <= event.ts:
            yield dated[k]
            k += 1
        yield event
    yield from dated[k:]


def as_records(stream: Iterable[CatalogueItem | ClickEvent], *, clicks_topic: str,
               items_topic: str, envelope: int = 1) -> Iterator[tuple[Record, int]]:
    """Encode a stream of clicks and catalogue items as Kafka records; yield (record, clicks
    in it: 0 for an item).

    Clicks go out one a message, or with ``envelope`` > 1 in each user's envelopes
    (``as_envelopes``), which hold a click back until its envelope fills. An item goes out
    before the first message that holds a click after it in ``stream``, so an item never
    follows a click it preceded, whichever way the clicks are cut into messages.
    """
    pending: deque[CatalogueItem] = deque()

    def clicks() -> Iterator[ClickEvent]:
        for entry in stream:
            if isinstance(entry, CatalogueItem):
                pending.append(entry)
            else:
                yield entry

    def items_due() -> Iterator[tuple[Record, int]]:
        while pending:
            item = pending.popleft()
            yield (items_topic, item_key(item.item), encode_item(item)), 0

    messages = (as_envelopes(clicks(), envelope) if envelope > 1
                else ((payload, 1) for payload in as_payloads(clicks())))
    for (key, value), n in messages:
        yield from items_due()
        yield (clicks_topic, key, value), n
    yield from items_due()


async def produce(bootstrap: str, topic: str, payloads: Iterable[Payload], *,
                  rate: float = 0.0, total: int | None = None, progress: bool = True,
                  linger_ms: int = 5) -> ReplayStats:
    """Send ``payloads`` to ``topic`` at ``rate`` events/s (0: as fast as possible)."""
    return await produce_records(bootstrap, ((topic, key, value) for key, value in payloads),
                                 rate=rate, total=total, progress=progress,
                                 linger_ms=linger_ms, desc=f"replay -> {topic}")


async def produce_records(bootstrap: str, records: Iterable[Record], *, rate: float = 0.0,
                          paced: str | None = None, total: int | None = None,
                          progress: bool = True, linger_ms: int = 5,
                          desc: str = "replay") -> ReplayStats:
    """Send ``records`` (each to its own topic) at ``rate`` messages/s (0: as fast as
    possible); with ``paced``, only the messages to that topic are paced, the others go
    between them as they come (a catalogue is not held to the click rate).

    Sends are pipelined and awaited in windows of 1000, so a broken broker shows up as
    failures in the summary instead of an unbounded backlog.
    """
    assert 0 <= rate <= MAX_RATE, f"rate must be within [0, {MAX_RATE}]"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms,
                                acks="all", enable_idempotence=True,
                                max_batch_size=256 * 1024)
    await producer.start()
    stats = ReplayStats()
    bar = tqdm(total=total, unit="ev", disable=not progress, file=sys.stderr,
               desc=desc, mininterval=0.5)
    pending: list[asyncio.Future] = []
    pending_topics: list[str] = []
    started = time.perf_counter()

    async def settle() -> None:
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = sum(isinstance(r, BaseException) for r in results)
        stats.failed += failed
        stats.sent += len(results) - failed
        for to, result in zip(pending_topics, results, strict=True):
            (stats.failed_to if isinstance(result, BaseException) else stats.sent_to)[to] += 1
        bar.update(len(results))
        if len(stats.sent_to) > 1:
            bar.set_postfix(stats.sent_to, refresh=False)
        pending.clear()
        pending_topics.clear()

    try:
        n = 0  # messages paced so far
        for topic, key, value in records:
            if rate > 0 and (paced is None or topic == paced):
                due = started + n / rate
                n += 1
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                pending.append(await producer.send(topic, value, key=key))
                pending_topics.append(topic)
            except Exception as exc:  # buffer full or broker gone: count, keep going
                log.warning("send failed: %s", exc)
                stats.failed += 1
                stats.failed_to[topic] += 1
            if len(pending) >= 1000:
                await settle()
        await settle()
        await producer.flush()
    finally:
        stats.seconds = time.perf_counter() - started
        bar.close()
        await producer.stop()
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advrec replay",
        description="Produce click events into Kafka in time order, keyed by user id (raw "
                    "UTF-8) with msgpack values as the event contract says. Sources: the "
                    "built-in synthetic stream, MovieLens ratings.csv or u.data, the "
                    "yoochoose clicks file, one-user-a-line sequence files, or any CSV. With "
                    "--catalogue, the items of a catalogue file go to the items topic too, "
                    "keyed by item id, each before the first click at or after its created "
                    "time (items without one first).")
    p.add_argument("source", nargs="?",
                   choices=["synthetic", "movielens", "movielens-udata", "yoochoose",
                            "sequences", "csv"],
                   help="where the events come from (not with --catalogue-only)")
    p.add_argument("path", nargs="?", help="dataset file (all sources except synthetic)")
    p.add_argument("--bootstrap", default=None,
                   help="broker host:port [ADVREC_BROKER] (default 127.0.0.1:9092)")
    p.add_argument("--topic", default=None, help="target topic [ADVREC_TOPIC_CLICKS] (clicks)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="events per second; 0 sends as fast as the broker takes them")
    p.add_argument("--limit", type=int, default=None,
                   help="stop after this many events (synthetic default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="synthetic stream seed")
    p.add_argument("--users", type=int, default=1000, help="synthetic users")
    p.add_argument("--items", type=int, default=2000, help="synthetic catalogue size")
    p.add_argument("--columns", default=None,
                   help="csv only: mapping such as user=uid,item=sku,ts=time")
    p.add_argument("--ts-unit", default="s", choices=["s", "ms"], help="csv timestamp unit")
    p.add_argument("--delimiter", default=",", help="csv delimiter")
    p.add_argument("--envelope", type=int, default=1, metavar="N",
                   help="send each user's events in envelopes of up to N events (one message "
                        "each, as a producer that batches; README 'Event contract'); 1 sends "
                        "one message per event (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = p.add_argument_group(
        "catalogue", "Publish the items a catalogue file describes to the items topic "
        "(README 'Catalogue events'): items without a created time before the first click, "
        "the others interleaved with the clicks by time (the rate paces the clicks only).")
    c.add_argument("--catalogue", metavar="PATH", default=None,
                   help="catalogue file: MovieLens movies.csv or any CSV with a header")
    c.add_argument("--catalogue-format", choices=CATALOGUE_FORMATS, default=None,
                   help="movielens (movieId,title,genres) or csv (the --catalogue-* columns); "
                        "default: movielens for a file named movies.csv, else csv")
    c.add_argument("--catalogue-only", action="store_true",
                   help="publish the catalogue and no clicks (no SOURCE then)")
    c.add_argument("--catalogue-id", metavar="COL", help="csv: column of the item id (required)")
    c.add_argument("--catalogue-title", metavar="COL", help="csv: column of the title (required)")
    c.add_argument("--catalogue-text", metavar="COL", help="csv: column of the description")
    c.add_argument("--catalogue-categories", metavar="COL",
                   help="csv: column of the categories, separated by --catalogue-sep")
    c.add_argument("--catalogue-sep", default="|", metavar="SEP",
                   help="csv: separator of the categories within their cell (default |)")
    c.add_argument("--catalogue-created", metavar="COL",
                   help="csv: column of the time the item entered the catalogue (unix time)")
    c.add_argument("--catalogue-created-unit", choices=["s", "ms"], default="s",
                   help="csv: unit of --catalogue-created (default s)")
    c.add_argument("--items-topic", default=None,
                   help="catalogue topic [ADVREC_TOPIC_ITEMS] (items)")
    return p


CATALOGUE_FORMATS = ("movielens", "csv")


def _catalogue_format(args: argparse.Namespace) -> str:
    return args.catalogue_format or (
        "movielens" if Path(args.catalogue).name == "movies.csv" else "csv")


def _catalogue(args: argparse.Namespace) -> list[CatalogueItem]:
    """Read the catalogue ``args`` name (DatasetError on a bad file)."""
    from advrec.datasets import read_catalogue_csv, read_movielens_movies

    if _catalogue_format(args) == "movielens":
        return read_movielens_movies(args.catalogue)
    return read_catalogue_csv(
        args.catalogue, id_col=args.catalogue_id, title_col=args.catalogue_title,
        text_col=args.catalogue_text, categories_col=args.catalogue_categories,
        categories_sep=args.catalogue_sep, created_col=args.catalogue_created,
        created_unit=args.catalogue_created_unit)


def _clicks_have_times(args: argparse.Namespace) -> bool:
    """Return whether the source's click times are real ones, not an implicit clock (sequence
    files, a csv without a ts column), which a catalogue's times cannot be merged with."""
    if args.source == "sequences":
        return False
    if args.source == "csv":
        return "ts" in {part.split("=", 1)[0].strip() for part in args.columns.split(",")}
    return True


def _events(args: argparse.Namespace) -> tuple[Iterable[ClickEvent], int | None]:
    if args.catalogue_only:
        return [], 0
    if args.source == "synthetic":
        from advrec.synthetic import SyntheticConfig, synthetic_events

        limit = 10_000 if args.limit is None else args.limit
        cfg = SyntheticConfig(n_users=args.users, n_items=args.items, seed=args.seed)
        return synthetic_events(cfg, limit), limit
    if not args.path:
        raise SystemExit(f"advrec replay: {args.source} needs a PATH")
    from advrec.datasets import load_events

    opts: dict[str, object] = {}
    if args.source == "csv":
        if not args.columns:
            raise SystemExit("advrec replay: csv needs --columns user=...,item=...,ts=...")
        opts = {"columns": args.columns, "ts_unit": args.ts_unit, "delimiter": args.delimiter}
    log_ = load_events(args.source, args.path, **opts)
    events: Iterable[ClickEvent] = log_
    total = len(log_)
    if args.limit is not None:
        events, total = log_[: args.limit], min(total, args.limit)
    return events, total


Transform = Callable[[argparse.Namespace, Iterable[ClickEvent]],
                     tuple[Iterable[ClickEvent], int | None]]


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def _argument_problem(args: argparse.Namespace) -> str | None:
    """Return what is wrong with the combination of sources and flags, if anything."""
    if args.catalogue_only and args.catalogue is None:
        return "--catalogue-only needs --catalogue PATH"
    if args.catalogue_only and args.source is not None:
        return "--catalogue-only publishes no clicks: give no SOURCE"
    if args.source is None and not args.catalogue_only:
        return "a SOURCE is required (or --catalogue PATH --catalogue-only)"
    if args.catalogue is not None and _catalogue_format(args) == "csv" and not (
            args.catalogue_id and args.catalogue_title):
        return "a csv catalogue needs --catalogue-id COL and --catalogue-title COL"
    if not 1 <= args.envelope <= MAX_ENVELOPE_EVENTS:
        return f"--envelope must be within [1, {MAX_ENVELOPE_EVENTS}]"
    return None


def run(args: argparse.Namespace, transform: Transform | None = None) -> int:
    """Replay what ``args`` name; ``transform`` may change the events first (``advrec
    attack`` merges fake users in: trainer/attack_model.py)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prog = getattr(args, "prog", "advrec replay")
    if not 0 <= args.rate <= MAX_RATE:
        print(f"advrec replay: --rate must be within [0, {MAX_RATE:.0f}]", file=sys.stderr)
        return 2
    problem = _argument_problem(args)
    if problem is not None:
        print(f"{prog}: {problem}", file=sys.stderr)
        return 2
    from advrec.config import ConfigError
    from advrec.topics import load_kafka_settings

    try:
        settings = load_kafka_settings()
    except ConfigError as exc:
        print(f"advrec replay: {exc}", file=sys.stderr)
        return 2
    bootstrap = args.bootstrap or settings.bootstrap
    topic = args.topic or settings.topic_clicks
    items_topic = args.items_topic or settings.topic_items
    from advrec.datasets import DatasetError

    try:
        events, total = _events(args)
        items = _catalogue(args) if args.catalogue is not None else []
    except (DatasetError, OSError) as exc:
        print(f"advrec replay: {exc}", file=sys.stderr)
        return 1
    if transform is not None:
        try:
            events, total = transform(args, events)
        except ValueError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    stream: Iterable[CatalogueItem | ClickEvent] = events
    if items:
        dated = sum(item.created is not None for item in items)
        timed = args.catalogue_only or _clicks_have_times(args)
        how = ("no clicks" if args.catalogue_only
               else f"{dated} interleaved with the clicks by created time, the rest first"
               if timed else "all before the clicks (the clicks have no real times)")
        log.info("catalogue %s: %d items to %s, %s", args.catalogue, len(items), items_topic,
                 how)
        stream = interleave(items, events) if timed else [*items, *events]
    events_in = 0  # click events taken into messages (an envelope holds several)

    def counted(pairs: Iterable[tuple[Record, int]]) -> Iterator[Record]:
        nonlocal events_in
        for record, n in pairs:
            events_in += n
            yield record

    records = counted(as_records(stream, clicks_topic=topic, items_topic=items_topic,
                                 envelope=args.envelope))
    targets = ([items_topic] if items else []) + ([] if args.catalogue_only else [topic])
    stats = asyncio.run(produce_records(
        bootstrap, records, rate=args.rate, paced=topic,
        total=total + len(items) if args.envelope == 1 and total is not None else None,
        progress=not args.no_progress, desc=f"replay -> {', '.join(targets)}"))
    sent, failed = stats.sent_to[topic], stats.failed_to[topic]
    if args.envelope == 1 and not args.catalogue_only:
        rate = sent / stats.seconds if stats.seconds > 0 else 0.0
        print(f"sent {sent} events to {topic} on {bootstrap} in {stats.seconds:.1f} s "
              f"({rate:.0f}/s); failed {failed}")
    elif not args.catalogue_only:
        print(f"sent {events_in} events in {sent} envelopes to {topic} on {bootstrap} "
              f"in {stats.seconds:.1f} s; failed {failed} envelopes")
    if args.catalogue is not None:
        print(f"published {stats.sent_to[items_topic]} catalogue items to {items_topic} on "
              f"{bootstrap}; failed {stats.failed_to[items_topic]}")
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
