"""``advrec replay``: produce a synthetic or recorded click stream into Kafka, in time order."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from advrec.contract import (
    MAX_ENVELOPE_EVENTS,
    ClickEvent,
    encode_envelope,
    encode_event,
    encode_key,
)

__all__ = ["ReplayStats", "as_envelopes", "as_payloads", "build_parser", "main", "produce", "run"]

log = logging.getLogger("advrec.replay")

MAX_RATE = 1_000_000.0  # events/s; a bound so a typo cannot turn into a flood


@dataclass
class ReplayStats:
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


Payload = tuple[bytes | None, bytes]  # (key, value)


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


async def produce(bootstrap: str, topic: str, payloads: Iterable[Payload], *,
                  rate: float = 0.0, total: int | None = None, progress: bool = True,
                  linger_ms: int = 5) -> ReplayStats:
    """Send ``payloads`` to ``topic`` at ``rate`` events/s (0: as fast as possible).

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
               desc=f"replay -> {topic}", mininterval=0.5)
    pending: list[asyncio.Future] = []
    started = time.perf_counter()

    async def settle() -> None:
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = sum(isinstance(r, BaseException) for r in results)
        stats.failed += failed
        stats.sent += len(results) - failed
        bar.update(len(results))
        pending.clear()

    try:
        for n, (key, value) in enumerate(payloads):
            if rate > 0:
                due = started + n / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                pending.append(await producer.send(topic, value, key=key))
            except Exception as exc:  # buffer full or broker gone: count, keep going
                log.warning("send failed: %s", exc)
                stats.failed += 1
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
                    "yoochoose clicks file, one-user-a-line sequence files, or any CSV.")
    p.add_argument("source", choices=["synthetic", "movielens", "movielens-udata", "yoochoose",
                                      "sequences", "csv"], help="where the events come from")
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
    return p


def _events(args: argparse.Namespace) -> tuple[Iterable[ClickEvent], int | None]:
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


def run(args: argparse.Namespace, transform: Transform | None = None) -> int:
    """Replay what ``args`` name; ``transform`` may change the events first (``advrec
    attack`` merges fake users in: trainer/attack_model.py)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0 <= args.rate <= MAX_RATE:
        print(f"advrec replay: --rate must be within [0, {MAX_RATE:.0f}]", file=sys.stderr)
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
    from advrec.datasets import DatasetError

    try:
        events, total = _events(args)
    except (DatasetError, OSError) as exc:
        print(f"advrec replay: {exc}", file=sys.stderr)
        return 1
    if transform is not None:
        try:
            events, total = transform(args, events)
        except ValueError as exc:
            print(f"{getattr(args, 'prog', 'advrec replay')}: {exc}", file=sys.stderr)
            return 2
    if args.envelope < 1 or args.envelope > MAX_ENVELOPE_EVENTS:
        print(f"advrec replay: --envelope must be within [1, {MAX_ENVELOPE_EVENTS}]",
              file=sys.stderr)
        return 2
    if args.envelope == 1:
        payloads: Iterable[Payload] = as_payloads(events)
        counts: list[int] | None = None
    else:
        counts = []

        def counted(pairs: Iterable[tuple[Payload, int]]) -> Iterator[Payload]:
            for payload, n in pairs:
                counts.append(n)
                yield payload

        payloads = counted(as_envelopes(events, args.envelope))
    stats = asyncio.run(produce(bootstrap, topic, payloads, rate=args.rate,
                                total=total if counts is None else None,
                                progress=not args.no_progress))
    if counts is None:
        print(f"sent {stats.sent} events to {topic} on {bootstrap} in {stats.seconds:.1f} s "
              f"({stats.rate:.0f}/s); failed {stats.failed}")
    else:
        print(f"sent {sum(counts)} events in {stats.sent} envelopes to {topic} on {bootstrap} "
              f"in {stats.seconds:.1f} s; failed {stats.failed} envelopes")
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
