"""Faust's own floor: an agent that only counts the events of a topic (no decoding, no state).

Run by bench/ingest.py as a reference beside the ingest agent: the same consumer group
settings and batching (``take_events`` of 1,000 within 0.2 s), the same number of
partitions; the rate it reaches is what Faust itself costs per event on this machine.
Prints one line of JSON: ``{"events": n, "seconds": s, "events_per_s": r}`` once it counted
``--events`` (from the first event to the n-th).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import faust


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--topic", required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--broker", default="kafka://127.0.0.1:9092")
    p.add_argument("--partitions", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = faust.App(f"bench-floor-{os.getpid()}", broker=args.broker, store="memory://",
                    datadir=tempfile.mkdtemp(prefix="faust-floor-"), web_enabled=False,
                    key_serializer="raw", value_serializer="raw",
                    topic_partitions=args.partitions, consumer_auto_offset_reset="earliest",
                    broker_commit_every=1000, broker_commit_interval=1.0,
                    stream_wait_empty=False)
    topic = app.topic(args.topic, key_type=bytes, value_type=bytes,
                      partitions=args.partitions)
    state: dict[str, Any] = {"n": 0, "t0": None}

    @app.agent(topic)
    async def count(stream: Any) -> None:
        async for events in stream.take_events(1000, within=0.2):
            if state["t0"] is None:
                state["t0"] = time.perf_counter()
            state["n"] += len(events)
            if state["n"] >= args.events:
                seconds = time.perf_counter() - state["t0"]
                print(json.dumps({"events": state["n"], "seconds": seconds,
                                  "events_per_s": state["n"] / seconds}), flush=True)
                os._exit(0)  # the measurement is done; no need for a graceful stop

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.spinner = None  # as advrec's worker: no debug records built (stream_app/main.py)
    worker.execute_from_commandline()
    return 1


if __name__ == "__main__":
    sys.exit(main())
