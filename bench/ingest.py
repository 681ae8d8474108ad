"""Ingest throughput against its references, changelog bytes, HTTP load, memory per 100k users.

All on one pre-filled topic (synthetic clicks: 1,000 users, 5,000 items, 4 partitions),
measured side by side in one run on one machine, since absolute rates on shared machines
are noisy:
  * raw: an aiokafka consumer that decodes and validates every message with the same
    ``decode_event`` (no Faust, no state), reading the topic over and over for >= 10 s;
  * faust floor: a Faust agent that only counts the events (bench/_faust_floor.py): what
    Faust's own per-message path costs;
  * ingest, write-behind (the default) and write-through (``ADVREC_STATE_WRITE_BEHIND=0``,
    every batch writes its users: the path before write-behind), each a fresh worker reading
    the topic from the start; then the bytes their tables wrote to the changelog topics per
    event;
  * ingest (write-behind) while 8 HTTP clients read user state without pause;
  * the same events in envelopes (``advrec replay --envelope 20``: each user's events 20 to
    a message, as a producer that batches): the Faust agent and ingest again, in events/s;
  * ingest with the fake-user detector scoring each changed user (a bundle with a detector
    trained on the start of the same stream live) vs the same bundle with scoring off
    (``ADVREC_DETECTOR_SCORING=0``); ``--only detector`` runs just this, twice each way;
  * resident memory after 100,000 distinct users, with the state cache at its default bound.
Writes bench/results/ingest.json and prints a table with each goal and whether it was met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import ClickEvent, InvalidEvent, decode_event, encode_event, encode_key
from advrec.replay import as_envelopes, as_payloads, produce
from advrec.synthetic import SyntheticConfig, synthetic_events
from advrec.topics import default_topics, ensure_topics
from bench._common import (
    BundleTopic,
    machine,
    print_table,
    rss_mib,
    scrape,
    start_worker,
    tag,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4  # of the bench topics and the workers' table changelogs (ADVREC_PARTITIONS)
ENVELOPE = 20  # events per message of a producer that batches (the envelope phase)
GOALS = {"ingest_vs_faust_floor": 0.5, "ingest_vs_write_through": 5.0,
         "changelog_bytes_per_event": 150.0, "rss_mib_after_users": 500.0,
         "under_http_vs_idle": 0.5}


def fill(bootstrap: str, topic: str, payloads: list) -> None:
    asyncio.run(ensure_topics(bootstrap, default_topics(clicks=topic, dlq=topic + "-dlq",
                                                        train=topic + "-train",
                                                        bundles=topic + "-bundles")))
    stats = asyncio.run(produce(bootstrap, topic, payloads, progress=False))
    assert stats.failed == 0, stats


def raw_consumer_rate(bootstrap: str, topic: str, min_seconds: float = 10.0) -> dict:
    """Read the topic with a plain consumer, decoding and validating every message, over
    and over until ``min_seconds`` have passed; return events/s and how many were read."""

    async def run() -> dict:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        c.assign(tps)
        ends = await c.end_offsets(tps)
        got = invalid = 0
        started = time.perf_counter()
        try:
            while True:
                await c.seek_to_beginning(*tps)
                done: set = set()
                while len(done) < len(tps):
                    batch = await c.getmany(timeout_ms=1000, max_records=5000)
                    now_ms = int(time.time() * 1000)
                    for tp, msgs in batch.items():
                        for msg in msgs:
                            try:
                                decode_event(msg.value, msg.key, now_ms=now_ms)
                            except InvalidEvent:
                                invalid += 1
                        got += len(msgs)
                        if msgs and msgs[-1].offset + 1 >= ends[tp]:
                            done.add(tp)
                if time.perf_counter() - started >= min_seconds:
                    break
        finally:
            await c.stop()
        seconds = time.perf_counter() - started
        return {"events": got, "seconds": seconds, "events_per_s": got / seconds,
                "invalid": invalid}

    return asyncio.run(run())


def faust_floor_rate(bootstrap: str, topic: str, n: int) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "_faust_floor.py"), "--topic",
                          topic, "--events", str(n), "--broker", f"kafka://{bootstrap}"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    # Faust's worker writes terminal escape codes before the line
    lines = [line[line.index("{"):] for line in out.stdout.splitlines() if '{"events"' in line]
    if not lines:
        raise RuntimeError(f"the Faust floor agent failed:\n{out.stdout[-2000:]}"
                           f"{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def changelog_bytes(bootstrap: str, app_id: str) -> dict[str, int]:
    """Bytes (keys and values) and records in the table changelogs of app ``app_id``."""

    async def run() -> dict[str, int]:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        out = {"bytes": 0, "records": 0}
        try:
            for table in ("user_state", "trending"):
                topic = f"{app_id}-{table}-changelog"
                tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
                c.assign(tps)
                await c.seek_to_beginning(*tps)
                ends = await c.end_offsets(tps)
                left = {tp for tp in tps if ends[tp] > 0}
                while left:
                    batch = await c.getmany(timeout_ms=2000, max_records=10000)
                    if not batch:
                        break
                    for tp, msgs in batch.items():
                        for msg in msgs:
                            out["bytes"] += len(msg.key or b"") + len(msg.value or b"")
                            out["records"] += 1
                        if msgs and msgs[-1].offset + 1 >= ends[tp]:
                            left.discard(tp)
        finally:
            await c.stop()
        return out

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


def ingest_run(run_dir: Path, bootstrap: str, topic: str, n: int, *,
               write_behind: bool, http_users: list[str] | None = None,
               env_extra: dict[str, str] | None = None) -> dict:
    """A fresh worker reads the whole topic; events/s, and its changelog bytes per event."""
    app_id = f"bench-{tag()}"
    env = {"ADVREC_BROKER": f"kafka://{bootstrap}", "ADVREC_TOPIC_CLICKS": topic,
           "ADVREC_APP_ID": app_id, "ADVREC_TOPIC_TRAIN": topic + "-train",
           "ADVREC_TOPIC_DLQ": topic + "-dlq", "ADVREC_TOPIC_BUNDLES": topic + "-bundles",
           "ADVREC_STATE_WRITE_BEHIND": "1" if write_behind else "0", **(env_extra or {})}
    proc, url = start_worker(run_dir, env)
    scored: dict[str, float] = {}
    stop, counts = threading.Event(), [0, 0]
    loader = None
    if http_users:
        loader = threading.Thread(target=http_load, args=(url, http_users, stop, counts))
        loader.start()
    try:
        t0 = time.perf_counter()
        rate = worker_rate(url, n)
        seconds = time.perf_counter() - t0
        time.sleep(3)  # the last flush and the changelog records behind it
        metrics = f"{url}/metrics"
        scored = {"users_scored": scrape(metrics, "advrec_user_suspicion_count"),
                  "batches_scored": scrape(metrics, "advrec_suspicion_seconds_count"),
                  "scoring_seconds": scrape(metrics, "advrec_suspicion_seconds_sum"),
                  "batches": scrape(metrics, "advrec_ingest_batch_seconds_count")}
    finally:
        stop.set()
        if loader is not None:
            loader.join()
        proc.terminate()
        proc.wait(60)
    log = changelog_bytes(bootstrap, app_id)
    out = {"events_per_s": rate, "changelog_bytes": log["bytes"],
           "changelog_records": log["records"], "changelog_bytes_per_event": log["bytes"] / n}
    if http_users:
        out.update(http_requests=counts[0], http_5xx=counts[1],
                   http_requests_per_s=counts[0] / seconds)
    return {**out, **scored}


def detector_bundle_topic(bootstrap: str, cfg: SyntheticConfig, n_events: int,
                          run_dir: Path) -> dict:
    """Train a generator and the fake-user detector on the first ``n_events`` of the
    bench's own stream (as the trainer would, ``none`` mode for speed: the detector is what
    is measured), and publish them as one bundle on a topic of their own."""
    from advrec.bundle import bundle_files, write_bundle
    from trainer.detector import DetectorConfig, TrainingFilter
    from trainer.evaluate import build_examples
    from trainer.export import export_filter_detector, export_onnx, scoring_model
    from trainer.learner import OnlineLearner, TrainConfig
    from trainer.model import ModelConfig

    started = time.perf_counter()
    learner = OnlineLearner(ModelConfig(), TrainConfig(mode="none", seed=0))
    guard = TrainingFilter(learner, DetectorConfig())
    examples = list(build_examples(synthetic_events(cfg, n_events), learner.model_cfg.max_len))
    n_batches = len(examples) // 256  # full batches, as the trainer gets them
    for bi in range(n_batches):
        learner.train_batch(guard.admit(examples[bi * 256:(bi + 1) * 256], bi))
    detector, meta = export_filter_detector(guard)
    root = run_dir / "detector-bundle"
    version = write_bundle(root, export_onnx(scoring_model(learner), learner.model_cfg.max_len),
                           learner.vocab.items(), {"max_len": learner.model_cfg.max_len,
                                                   "detector": meta}, detector_bytes=detector)
    topic = BundleTopic(bootstrap, f"bench-bundles-{tag()}")
    try:
        topic.publish(version, bundle_files(root, version))
    finally:
        topic.close()
    return {"topic": topic.topic, "version": version, "train_batches": n_batches,
            "detector_rounds": meta["rounds"], "min_clicks": meta["min_clicks"],
            "items": len(learner.vocab), "train_s": time.perf_counter() - started}


def detector_cost(run_dir: Path, bootstrap: str, topic: str, n: int, cfg: SyntheticConfig,
                  repeats: int = 2) -> dict:
    """Ingest (write-behind) with the live bundle's detector scoring users vs not, the
    same bundle live in both, in alternating runs of fresh workers."""
    bundle = detector_bundle_topic(bootstrap, cfg, min(n, 30_000), run_dir)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(repeats):
        for side in ("off", "on"):
            runs[side].append(ingest_run(run_dir, bootstrap, topic, n, write_behind=True,
                                         env_extra={
                                             "ADVREC_TOPIC_BUNDLES": bundle["topic"],
                                             "ADVREC_READY_WITHOUT_MODEL": "0",
                                             "ADVREC_DETECTOR_SCORING": "1" if side == "on"
                                             else "0"}))
    on = sum(r["events_per_s"] for r in runs["on"]) / repeats
    off = sum(r["events_per_s"] for r in runs["off"]) / repeats
    users = sum(r["users_scored"] for r in runs["on"])
    spent = sum(r["scoring_seconds"] for r in runs["on"])
    return {"bundle": bundle, "runs": runs, "on_events_per_s": on, "off_events_per_s": off,
            "on_vs_off": on / off, "users_scored": users / repeats,
            "scored_batch_share": sum(r["batches_scored"] for r in runs["on"])
            / max(1.0, sum(r["batches"] for r in runs["on"])),
            "us_per_scored_user": spent / max(1.0, users) * 1e6,
            "us_per_event": spent / (n * repeats) * 1e6}


def detector_rows(d: dict) -> list[tuple[str, str]]:
    return [("ingest, detector scoring", f"{d['on_events_per_s']:,.0f} events/s on vs "
             f"{d['off_events_per_s']:,.0f} off: {d['on_vs_off']:.2f}x; "
             f"{d['us_per_event']:.1f} us of scoring per event, "
             f"{d['us_per_scored_user']:.1f} us per scored user "
             f"({d['users_scored']:,.0f} users scored per run, "
             f"{d['scored_batch_share']:.0%} of batches)")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000, help="events on the shared topic")
    p.add_argument("--users", type=int, default=100_000, help="distinct users, memory phase")
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--only", choices=("all", "detector"), default="all",
                   help="detector: only ingest with the detector scoring on vs off "
                        "(bench/results/ingest-detector.json)")
    args = p.parse_args()
    run_dir = Path("var") / f"bench-ingest-{tag()}"
    run_dir.mkdir(parents=True)
    cfg = SyntheticConfig(n_users=1000, n_items=5000, seed=1)
    payloads = list(as_payloads(synthetic_events(cfg, args.events)))
    result: dict = {"settings": vars(args), "machine": machine(), "workload": {
        "events": args.events, "synthetic_users": cfg.n_users, "partitions": 4}}
    topic = f"bench-clicks-{tag()}"
    fill(args.bootstrap, topic, payloads)
    if args.only == "detector":
        result["detector"] = detector_cost(run_dir, args.bootstrap, topic, args.events, cfg)
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
        path = write_result("ingest-detector", result)
        print_table("bench/ingest --only detector",
                    [*detector_rows(result["detector"]), ("results", str(path))])
        return 0
    raw = raw_consumer_rate(args.bootstrap, topic)
    floor = faust_floor_rate(args.bootstrap, topic, args.events)
    behind = ingest_run(run_dir, args.bootstrap, topic, args.events, write_behind=True)
    through = ingest_run(run_dir, args.bootstrap, topic, args.events, write_behind=False)
    users = [f"u{i}" for i in range(cfg.n_users)]
    loaded = ingest_run(run_dir, args.bootstrap, topic, args.events, write_behind=True,
                        http_users=users)
    # the same events, 20 of a user to a message
    topic_env = f"bench-clicks-{tag()}"
    # a producer that holds each user's events until 20 or for a while: here, 20 events per
    # user on average in the stream (20,000 events of 1,000 users)
    grouped = list(as_envelopes(synthetic_events(cfg, args.events), ENVELOPE,
                                window=ENVELOPE * cfg.n_users))
    fill(args.bootstrap, topic_env, [p for p, _ in grouped])
    env_floor = faust_floor_rate(args.bootstrap, topic_env, len(grouped))
    env_floor["events_per_s"] = env_floor["events_per_s"] * args.events / len(grouped)
    env_floor["messages"] = len(grouped)
    enveloped = ingest_run(run_dir, args.bootstrap, topic_env, args.events, write_behind=True)
    detector = detector_cost(run_dir, args.bootstrap, topic, args.events, cfg, repeats=1)

    # resident memory after 100,000 distinct users
    topic3 = f"bench-clicks-{tag()}"
    now = int(time.time() * 1000) - 3_600_000
    many = [(encode_key(f"user-{i}"), encode_event(ClickEvent(f"user-{i}", f"i{i % 5000}",
                                                              now + i))) for i in range(args.users)]
    fill(args.bootstrap, topic3, many)
    proc, url = start_worker(run_dir, {"ADVREC_BROKER": f"kafka://{args.bootstrap}",
                                       "ADVREC_TOPIC_CLICKS": topic3,
                                       "ADVREC_APP_ID": f"bench-{tag()}",
                                       "ADVREC_TOPIC_TRAIN": topic3 + "-train",
                                       "ADVREC_TOPIC_DLQ": topic3 + "-dlq",
                                       "ADVREC_TOPIC_BUNDLES": topic3 + "-bundles"})
    try:
        rss_start = rss_mib(proc.pid)
        users_rate = worker_rate(url, args.users, timeout=1800)
        time.sleep(3)
        rss_end = rss_mib(proc.pid)
        cached = scrape(f"{url}/metrics", "advrec_state_cached_users")
    finally:
        proc.terminate()
        proc.wait(60)
    subprocess.run(["rm", "-rf", str(run_dir)], check=False)

    ratios = {
        "ingest_vs_raw": behind["events_per_s"] / raw["events_per_s"],
        "ingest_vs_faust_floor": behind["events_per_s"] / floor["events_per_s"],
        "ingest_vs_write_through": behind["events_per_s"] / through["events_per_s"],
        "under_http_vs_idle": loaded["events_per_s"] / behind["events_per_s"],
        "enveloped_vs_faust_floor_enveloped": enveloped["events_per_s"]
        / env_floor["events_per_s"],
        "enveloped_vs_write_through": enveloped["events_per_s"] / through["events_per_s"],
    }
    result.update(raw=raw, faust_floor=floor, write_behind=behind, write_through=through,
                  under_http=loaded, enveloped={**enveloped, "events_per_message": ENVELOPE,
                                                "messages": len(grouped)},
                  faust_floor_enveloped=env_floor, detector=detector, ratios=ratios,
                  distinct_users=args.users,
                  distinct_users_events_per_s=users_rate, rss_mib_at_start=rss_start,
                  rss_mib_after_users=rss_end, cached_users_after=cached,
                  goals={k: (">= " if k != "changelog_bytes_per_event"
                             and k != "rss_mib_after_users" else "<= ") + str(v)
                         for k, v in GOALS.items()})
    met = {
        "ingest_vs_faust_floor": ratios["ingest_vs_faust_floor"] >= GOALS["ingest_vs_faust_floor"],
        "ingest_vs_write_through": max(ratios["ingest_vs_write_through"],
                                       ratios["enveloped_vs_write_through"])
        >= GOALS["ingest_vs_write_through"],
        "changelog_bytes_per_event": behind["changelog_bytes_per_event"]
        <= GOALS["changelog_bytes_per_event"],
        "rss_mib_after_users": rss_end <= GOALS["rss_mib_after_users"],
        "under_http_vs_idle": ratios["under_http_vs_idle"] >= GOALS["under_http_vs_idle"],
    }
    result["met"] = met

    def verdict(key: str) -> str:
        return f"goal {result['goals'][key]}: {'met' if met[key] else 'MISSED'}"

    path = write_result("ingest", result)
    print_table("bench/ingest", [
        ("raw consumer + decode_event", f"{raw['events_per_s']:,.0f} events/s "
                                        f"({raw['seconds']:.0f} s)"),
        ("Faust counting agent", f"{floor['events_per_s']:,.0f} events/s"),
        ("ingest, write-behind", f"{behind['events_per_s']:,.0f} events/s: "
                                 f"{ratios['ingest_vs_faust_floor']:.2f}x Faust "
                                 f"({verdict('ingest_vs_faust_floor')}), "
                                 f"{ratios['ingest_vs_raw']:.3f}x raw"),
        ("ingest, write-through", f"{through['events_per_s']:,.0f} events/s: write-behind "
                                  f"{ratios['ingest_vs_write_through']:.1f}x, in envelopes "
                                  f"{ratios['enveloped_vs_write_through']:.1f}x "
                                  f"({verdict('ingest_vs_write_through')})"),
        (f"envelopes of {ENVELOPE}", f"{enveloped['events_per_s']:,.0f} events/s ingested "
                                     f"({len(grouped):,} messages), Faust counting "
                                     f"{env_floor['events_per_s']:,.0f} events/s: "
                                     f"{ratios['enveloped_vs_faust_floor_enveloped']:.2f}x; "
                                     f"{enveloped['changelog_bytes_per_event']:.0f} changelog "
                                     "bytes per event"),
        ("changelog bytes per event", f"write-behind {behind['changelog_bytes_per_event']:.0f} "
                                      f"({verdict('changelog_bytes_per_event')}), "
                                      f"write-through "
                                      f"{through['changelog_bytes_per_event']:.0f}"),
        ("ingest with 8 HTTP clients", f"{loaded['events_per_s']:,.0f} events/s "
                                       f"({ratios['under_http_vs_idle']:.2f}x idle, "
                                       f"{verdict('under_http_vs_idle')}; "
                                       f"{loaded['http_requests_per_s']:,.0f} req/s, "
                                       f"{loaded['http_5xx']} 5xx)"),
        *detector_rows(detector),
        (f"RSS after {args.users:,} users", f"{rss_end:,.0f} MiB (start {rss_start:,.0f}; "
                                            f"{cached:,.0f} states cached; "
                                            f"{verdict('rss_mib_after_users')})"),
        ("results", str(path)),
    ])
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
