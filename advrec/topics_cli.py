"""``advrec topics``: create `clicks`, `clicks-dlq`, `train-batches`, `model-bundles`,
`trainer-checkpoints` and the table changelogs explicitly."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from advrec.topics import TopicMismatch, channel_topics, default_topics, ensure_topics

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
    from stream_app.settings import load_settings

    s = load_settings(partitions=args.partitions)
    bootstrap = args.bootstrap or s.bootstrap
    try:
        asyncio.run(ensure_topics(bootstrap, default_topics(
            clicks=s.topic_clicks, dlq=s.topic_dlq, train=s.topic_train,
            bundles=s.topic_bundles, partitions=s.partitions, replication=s.replication,
            app_id=s.app_id) + channel_topics(
                train=s.topic_train, bundles=s.topic_bundles,
                checkpoints=os.environ.get("ADVREC_TOPIC_CHECKPOINTS", "trainer-checkpoints"),
                replication=s.replication)[2:]))
    except (TopicMismatch, ConnectionError) as exc:
        print(f"advrec topics: {exc}", file=sys.stderr)
        return 1
    print(f"topics ready on {bootstrap}")
    return 0
