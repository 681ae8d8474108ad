"""Ingest throughput vs a raw aiokafka consumer, under HTTP load, and memory per 100k users.

Writes bench/results/ingest.json and prints a table. All rates are measured in one run on
one machine, side by side, because absolute numbers on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaConsumer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.replay import as_payloads, produce
from advrec.synthetic import SyntheticConfig, synthetic_events
from advrec.topics import default_topics, ensure_topics
from bench._common import (
    machine,
    print_table,
    rss_mib,
    scrape,
    start_worker,
    tag,
    write_result,
)


def fill(bootstrap: str, topic: str, payloads: list) -> None:
    asyncio.run(ensure_topics(bootstrap, default_topics(clicks=topic, dlq=topic + "-dlq",
                                                        train=topic + "-train")))
    stats = asyncio.run(produce(bootstrap, topic, payloads, progress=False))
    assert stats.failed == 0, stats


def raw_consumer_rate(bootstrap: str, topic: str, n: int) -> float:
    async def run() -> float:
        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest")
        await c.start()
        got, started = 0, None
        try:
            while got < n:
                batch = await c.getmany(timeout_ms=1000, max_records=5000)
                for msgs in batch.values():
                    if started is None and msgs:
                        started = time.perf_counter()
                    got += len(msgs)
        finally:
            await c.stop()
        return n / (time.perf_counter() - (started or time.perf_counter()))

    return asyncio.run(run())


def worker_rate(url: str, n: int, timeout: float = 900) -> float:
    """Events/s from the first consumed event to the n-th (polling the counter)."""
    deadline = time.monotonic() + timeout
    t0 = c0 = None
    while time.monotonic() < deadline:
        count = scrape(f"{url}/metrics", "advrec_events_consumed_total")
        now = time.perf_counter()
        if t0 is None and count > 0:
            t0, c0 = now, count
        if count >= n:
            assert t0 is not None and c0 is not None
            return (count - c0) / max(now - t0, 1e-9)
        time.sleep(0.25)
    raise TimeoutError("worker did not consume the events in time")


def http_load(url: str, users: list[str], stop: threading.Event, counts: list[int]) -> None:
    """Eight clients reading user state back to back (aiohttp: a light client, so the
    load generator takes less of the shared CPU than the server it loads)."""

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            async with session.get(f"{url}/users/{rng.choice(users)}") as r:
                await r.read()
                counts[0] += 1
                if r.status >= 500:
                    counts[1] += 1

    async def run() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
            await asyncio.gather(*(client(i, session) for i in range(8)))

    asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=60_000, help="events per throughput phase")
    p.add_argument("--users", type=int, default=100_000, help="distinct users, memory phase")
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    args = p.parse_args()
    run_dir = Path("var") / f"bench-ingest-{tag()}"
    run_dir.mkdir(parents=True)
    cfg = SyntheticConfig(n_users=1000, n_items=5000, seed=1)
    payloads = list(as_payloads(synthetic_events(cfg, args.events)))
    result: dict = {"settings": vars(args), "machine": machine(), "workload": {
        "events": args.events, "synthetic_users": cfg.n_users, "partitions": 4}}

    # 1. the same topic, read by a raw consumer and by the ingest agent
    topic = f"bench-clicks-{tag()}"
    fill(args.bootstrap, topic, payloads)
    raw = raw_consumer_rate(args.bootstrap, topic, args.events)
    base_env = {"ADVREC_BROKER": f"kafka://{args.bootstrap}"}
    proc, url = start_worker(run_dir, {**base_env, "ADVREC_TOPIC_CLICKS": topic,
                                       "ADVREC_APP_ID": f"bench-{tag()}",
                                       "ADVREC_TOPIC_TRAIN": topic + "-train",
                                       "ADVREC_TOPIC_DLQ": topic + "-dlq"})
    try:
        idle = worker_rate(url, args.events)
    finally:
        proc.terminate()
        proc.wait(60)

    # 2. a fresh worker on a second pre-filled topic while 8 HTTP clients read user state
    topic2 = f"bench-clicks-{tag()}"
    fill(args.bootstrap, topic2, payloads)
    proc, url = start_worker(run_dir, {**base_env, "ADVREC_TOPIC_CLICKS": topic2,
                                       "ADVREC_APP_ID": f"bench-{tag()}",
                                       "ADVREC_TOPIC_TRAIN": topic2 + "-train",
                                       "ADVREC_TOPIC_DLQ": topic2 + "-dlq"})
    stop, counts = threading.Event(), [0, 0]
    users = [f"u{i}" for i in range(cfg.n_users)]
    loader = threading.Thread(target=http_load, args=(url, users, stop, counts))
    loader.start()
    try:
        t0 = time.perf_counter()
        loaded = worker_rate(url, args.events)
        http_seconds = time.perf_counter() - t0
    finally:
        stop.set()
        loader.join()
        proc.terminate()
        proc.wait(60)

    # 3. resident memory after 100,000 distinct users
    topic3 = f"bench-clicks-{tag()}"
    now = int(time.time() * 1000) - 3_600_000
    many = [(encode_key(f"user-{i}"), encode_event(ClickEvent(f"user-{i}", f"i{i % 5000}",
                                                              now + i))) for i in range(args.users)]
    fill(args.bootstrap, topic3, many)
    proc, url = start_worker(run_dir, {**base_env, "ADVREC_TOPIC_CLICKS": topic3,
                                       "ADVREC_APP_ID": f"bench-{tag()}",
                                       "ADVREC_TOPIC_TRAIN": topic3 + "-train",
                                       "ADVREC_TOPIC_DLQ": topic3 + "-dlq"})
    try:
        rss_start = rss_mib(proc.pid)
        users_rate = worker_rate(url, args.users, timeout=1800)
        time.sleep(3)
        rss_end = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    subprocess.run(["rm", "-rf", str(run_dir)], check=False)

    result["raw_consumer_events_per_s"] = raw
    result["ingest_events_per_s"] = idle
    result["ingest_vs_raw"] = idle / raw
    result["ingest_under_http_events_per_s"] = loaded
    result["http_requests"] = counts[0]
    result["http_5xx"] = counts[1]
    result["http_requests_per_s"] = counts[0] / http_seconds
    result["under_http_vs_idle"] = loaded / idle
    result["distinct_users"] = args.users
    result["distinct_users_events_per_s"] = users_rate
    result["rss_mib_at_start"] = rss_start
    result["rss_mib_after_users"] = rss_end
    result["goals"] = {"ingest_vs_raw": ">= 0.3", "under_http_vs_idle": ">= 0.5",
                       "rss_mib_after_users": "<= 500"}
    path = write_result("ingest", result)
    print_table("bench/ingest", [
        ("raw aiokafka consumer", f"{raw:,.0f} events/s"),
        ("ingest agent (RocksDB table)", f"{idle:,.0f} events/s  ({idle / raw:.2f}x raw)"),
        ("ingest with 8 HTTP clients", f"{loaded:,.0f} events/s  ({loaded / idle:.2f}x idle; "
                                       f"{counts[0] / http_seconds:,.0f} req/s, "
                                       f"{counts[1]} 5xx)"),
        (f"RSS after {args.users:,} users", f"{rss_end:,.0f} MiB (start {rss_start:,.0f})"),
        ("results", str(path)),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
