"""``advrec topics``: create `clicks`, `clicks-dlq`, `train-batches`, `model-bundles`,
`trainer-checkpoints`, `user-flags`, `items`, `items-dlq` and the table changelogs
explicitly."""

from __future__ import annotations

import argparse
import asyncio
import sys

from advrec.config import ConfigError
from advrec.topics import TopicMismatch, ensure_topics, load_kafka_settings

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="advrec topics",
        description="Create the source topics if missing and check their partition counts.")
    p.add_argument("--bootstrap", default=None,
                   help="host:port of a broker [ADVREC_BROKER without kafka://] "
                        "(default 127.0.0.1:9092)")
    p.add_argument("--partitions", type=int, default=None,
                   help="partitions of clicks and clicks-dlq [ADVREC_PARTITIONS] (default 4)")
    args = p.parse_args(argv)
    try:
        s = load_kafka_settings(partitions=args.partitions)
    except ConfigError as exc:
        print(f"advrec topics: {exc}", file=sys.stderr)
        return 2
    bootstrap = args.bootstrap or s.bootstrap
    try:
        asyncio.run(ensure_topics(bootstrap, s.topics()))
    except (TopicMismatch, ConnectionError) as exc:
        print(f"advrec topics: {exc}", file=sys.stderr)
        return 1
    print(f"topics ready on {bootstrap}")
    return 0
