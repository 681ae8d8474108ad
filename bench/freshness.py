"""Freshness: time from producing an event to a served model that trained on it; and the
bundle topic's traffic.

Runs a worker and a trainer with default settings on a live synthetic stream whose events
carry the wall-clock time as event time. Every half second one event is a probe; a probe
is fresh once the model the worker *serves* (its /readyz version) has a ``last_event_ms``
at or after the probe's time. Bytes on the bundle topic are counted over the same window
(after the warm-up): what the trainer wrote, by kind (full bundles, deltas), and what the
worker read. Writes bench/results/freshness.json (freshness-<items>.json with ``--items``)
and prints a table.

``--items N`` (a large catalogue, issue 23): the trainer starts from a checkpoint whose
vocabulary holds all N items of the synthetic catalogue (untrained rows, as after a
catalogue load), so its bundles carry N items from the first; the stream clicks among
them. At 1M items the worker's first bundle builds its index (~2 min on one core): give
the warm-up room for it (``--warmup 300``), and a window of at least
``ADVREC_BUNDLE_FULL_EVERY_S`` (900 s: ``--seconds 1020 --warmup 120``) to see a whole
cycle of full bundle and deltas.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.request import urlopen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.replay import produce
from advrec.synthetic import SyntheticConfig, synthetic_events
from bench._common import (
    finish,
    machine,
    pair_env,
    print_table,
    rss_mib,
    scrape,
    start_trainer,
    start_worker,
    stop_processes,
    tag,
    write_result,
)


def live_stream(rate: float, seconds: float, probes: list[tuple[float, int]],
                n_items: int = 2000, until: threading.Event | None = None, seed: int = 4):
    """Yield (key, value) in real time; every 0.5 s remember a probe (wall time, ts);
    ``until``: stop as soon as it is set."""
    cfg = SyntheticConfig(n_users=1000, n_items=n_items, seed=seed)
    next_probe = 0.0
    started = time.monotonic()
    for n, e in enumerate(synthetic_events(cfg, int(rate * seconds))):
        if until is not None and until.is_set():
            return
        due = started + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.time()
        ts = int(now * 1000)
        if now >= next_probe:
            probes.append((now, ts))
            next_probe = now + 0.5
        yield encode_key(e.user), encode_event(ClickEvent(e.user, e.item, ts, id=f"f{n}"))


def _ratio(total: float | None, n: float | None) -> float | None:
    return total / n if total is not None and n else None


def _median_peak(values: list[float]) -> dict[str, float | None]:
    return {"median": statistics.median(values) if values else None,
            "peak": max(values) if values else None}


def _window(traffic: dict[str, dict[str, float]], key: str) -> float | None:
    """How far the counter ``key`` moved between the window's "start" and "end" readings."""
    try:
        return traffic["end"][key] - traffic["start"][key]
    except KeyError:
        return None


def scrape_kind(url: str, name: str, kind: str) -> float:
    """The value of the series ``name{kind="..."}`` at ``url``."""
    text = urlopen(url, timeout=5).read().decode()
    found = re.search(rf'^{re.escape(name)}\{{kind="{re.escape(kind)}"\}} (\S+)$', text, re.M)
    if found is None:
        raise ValueError(f"no {name}{{kind={kind!r}}} at {url}")
    return float(found.group(1))


def seed_checkpoint(env: dict[str, str], n_items: int) -> float:
    """Write the trainer's local checkpoint: a fresh learner (the trainer's own settings)
    whose vocabulary holds the synthetic catalogue's ``n_items`` items; its seconds.

    G's item rows start with planted clusters (bench/ann.py ``planted_table``), as a trained
    table has them: over the untrained table's random rows, the worker's first index took
    over 5 minutes to build on a busy core (random 64-dim rows are HNSW's worst case)."""
    import torch

    from bench.ann import planted_table
    from trainer.checkpoint import save_checkpoint
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    started = time.perf_counter()
    sidecar = Sidecar(load_trainer_settings({**os.environ, **env}))
    learner = sidecar.fresh_learner()
    learner.add_items(f"i{k}" for k in range(n_items))  # SyntheticConfig's item ids
    with torch.no_grad():
        learner.generator.items.emb.weight[: n_items + 1] = torch.from_numpy(
            planted_table(n_items, learner.model_cfg.d_model, 20, 0))  # (V+1, D)
    save_checkpoint(sidecar.checkpoint_path, learner, {"next_offset": None})
    return time.perf_counter() - started


def main() -> int:
    from trainer.settings import TrainerSettings  # the defaults the trainer runs with

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=120.0, help="length of the live stream")
    p.add_argument("--rate", type=float, default=200.0, help="events per second")
    p.add_argument("--warmup", type=float, default=30.0, help="probes before this are ignored")
    p.add_argument("--items", type=int, default=0,
                   help="a catalogue of this many items, all in the trainer's vocabulary "
                        "from the start (0: the 2,000-item stream, vocabulary from clicks)")
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    args = p.parse_args()
    run_dir = Path("var") / f"bench-fresh-{tag()}"
    run_dir.mkdir(parents=True)
    bundles = run_dir / "bundles"
    env = pair_env("fresh", run_dir, args.bootstrap)
    seeded_s = None
    if args.items:
        print(f"seeding the trainer's checkpoint with {args.items:,} items ...", flush=True)
        seeded_s = seed_checkpoint(env, args.items)
    worker, url = start_worker(run_dir, env)
    trainer = start_trainer(run_dir, env)
    trainer_url = f"http://127.0.0.1:{env['ADVREC_TRAINER_METRICS_PORT']}"
    traffic: dict[str, dict[str, float]] = {}
    index_counters: dict[str, float] = {}
    trainer_times: dict[str, float | None] = {}

    def count_traffic(label: str) -> None:
        """The bundle topic's bytes so far: written by kind, read by the worker."""
        try:
            traffic[label] = {
                "at": time.time(),
                "read": scrape(f"{url}/metrics", "advrec_bundle_feed_bytes_total"),
                "deltas_rebuilt": scrape(f"{url}/metrics", "advrec_bundle_deltas_total"),
                **{kind: scrape_kind(f"{trainer_url}/metrics",
                                     "advrec_trainer_bundle_bytes_published_total", kind)
                   for kind in ("full", "delta")},
                # the worker's loads so far: the window's figures leave out the first
                # load, whose full index build (minutes at 1M items) is the preload's
                **{key: scrape(f"{url}/metrics", f"advrec_{name}")
                   for key, name in (("model_loads", "model_load_seconds_count"),
                                     ("load_seconds", "model_load_seconds_sum"),
                                     ("index_loads", "index_build_seconds_count"),
                                     ("index_seconds", "index_build_seconds_sum"))}}
        except (OSError, ValueError) as exc:
            print(f"could not read the traffic counters ({label}): {exc}", file=sys.stderr)
    probes: list[tuple[float, int]] = []
    served: list[tuple[float, int]] = []  # (wall time first seen, last_event_ms of the model)
    ages: list[tuple[float, float]] = []  # (wall time, the worker's advrec_model_age_seconds)
    rss: list[tuple[float, float]] = []  # (wall time, the worker's RSS in MiB)
    trainer_rss: list[tuple[float, float]] = []  # (wall time, the trainer's RSS in MiB)
    stop = threading.Event()

    def poll() -> None:
        seen: set[str] = set()
        next_age = 0.0
        while not stop.is_set():
            if time.time() >= next_age and served:
                next_age = time.time() + 0.5
                try:
                    ages.append((time.time(), scrape(f"{url}/metrics",
                                                     "advrec_model_age_seconds")))
                    rss.append((time.time(), rss_mib(worker.pid)))
                    trainer_rss.append((time.time(), rss_mib(trainer.pid)))
                except OSError:
                    pass
            try:
                version = json.loads(urlopen(f"{url}/readyz", timeout=2).read())["model_version"]
            except (OSError, ValueError, KeyError):
                version = None
            if version and version not in seen:
                seen.add(version)
                meta = json.loads((bundles / version / "meta.json").read_text())
                served.append((time.time(), int(meta.get("last_event_ms") or 0)))
            stop.wait(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    preload_s = None
    if args.items:
        # the worker's first bundle builds its index (~2 min of a core at 1M items), which
        # on this machine's 2 cores, shared with the trainer at work, took over 10 min: a
        # trickle of clicks gets the first bundle published and built before the measured
        # stream starts, as a worker that joins a running fleet has it
        first = threading.Event()

        def wait_first() -> None:
            while not served and not stop.is_set():
                stop.wait(0.5)
            first.set()

        waiter = threading.Thread(target=wait_first)
        waiter.start()
        t0 = time.time()
        print("preloading: a trickle of clicks until the worker serves its first bundle ...",
              flush=True)
        asyncio.run(produce(args.bootstrap, env["ADVREC_TOPIC_CLICKS"],
                            live_stream(10.0, 1800.0, [], args.items, first, seed=5),
                            progress=False))
        first.set()
        waiter.join()
        preload_s = time.time() - t0
        served.clear()
    started = time.time()
    window = threading.Timer(args.warmup, count_traffic, ("start",))
    window.start()
    try:
        asyncio.run(produce(args.bootstrap, env["ADVREC_TOPIC_CLICKS"],
                            live_stream(args.rate, args.seconds, probes,
                                        args.items or 2000), progress=False))
        count_traffic("end")
        try:  # the trainer's own timings over the whole run: what its delay is made of
            # a checkpoint's save holds training; its publish goes on beside it
            for name, count in (("step", "steps"), ("export", "exports"),
                                ("checkpoint", "checkpoints"),
                                ("checkpoint_publish", "checkpoint_publishes")):
                n = scrape(f"{trainer_url}/metrics", f"advrec_trainer_{name}_seconds_count")
                total = scrape(f"{trainer_url}/metrics", f"advrec_trainer_{name}_seconds_sum")
                trainer_times[f"{name}_mean_s"] = total / n if n else None
                trainer_times[count] = n
        except OSError as exc:
            print(f"could not read the trainer's timings: {exc}", file=sys.stderr)
        try:
            index_counters.update(
                loads=scrape(f"{url}/metrics", "advrec_index_build_seconds_count"),
                rebuilds=scrape(f"{url}/metrics", "advrec_index_rebuild_seconds_count"),
                rebuild_seconds=scrape(f"{url}/metrics", "advrec_index_rebuild_seconds_sum"))
        except OSError as exc:
            print(f"could not read the index counters: {exc}", file=sys.stderr)
        time.sleep(20)  # let the last probes reach a model
    finally:
        window.cancel()
        stop.set()
        poller.join()
        stop_processes(trainer, worker)
    delays = []
    for wall, ts in probes:
        if wall - started < args.warmup:
            continue
        fresh = [t for t, last in served if last >= ts and t >= wall]
        if fresh:
            delays.append(min(fresh) - wall)
    missing = sum(1 for wall, _ in probes if wall - started >= args.warmup) - len(delays)
    # the gauge, sampled while the stream ran (after the warm-up): how old the served model
    # said it was; steady exports every T s give both figures about delay + T/2
    stream_end = started + args.seconds
    gauge = [a for t, a in ages if started + args.warmup <= t <= stream_end]
    window_rss = [m for t, m in rss if started + args.warmup <= t <= stream_end]
    window_trainer_rss = [m for t, m in trainer_rss if started + args.warmup <= t <= stream_end]
    # a stall shows as a long wait between two versions going live
    went_live = [t for t, _ in served if started + args.warmup <= t <= stream_end]
    gaps = [b - a for a, b in itertools.pairwise(went_live)]
    result = {"settings": vars(args), "machine": machine(), "probes": len(delays),
              "probes_never_served": missing, "swaps_seen": len(served),
              "median_s": statistics.median(delays) if delays else None,
              "p95_s": (statistics.quantiles(delays, n=20)[18] if len(delays) > 2 else None),
              "max_s": max(delays) if delays else None,
              "model_age_gauge": {
                  "samples": len(gauge),
                  "median_s": statistics.median(gauge) if gauge else None,
                  "p95_s": statistics.quantiles(gauge, n=20)[18] if len(gauge) > 2 else None},
              "longest_wait_between_swaps_s": max(gaps) if gaps else None,
              "trainer": trainer_times,
              "index": {k: index_counters.get(k)
                        for k in ("loads", "rebuilds", "rebuild_seconds")},
              # the worker's side of the delay: a bundle's verify, load and warm-up, of
              # which the index's refresh (mean seconds per load), over the measured window
              "worker_load": {
                  "loads": _window(traffic, "model_loads"),
                  "mean_s": _ratio(_window(traffic, "load_seconds"),
                                   _window(traffic, "model_loads")),
                  "index_mean_s": _ratio(_window(traffic, "index_seconds"),
                                         _window(traffic, "index_loads"))},
              "worker_rss_mib": _median_peak(window_rss),
              "trainer_rss_mib": _median_peak(window_trainer_rss),
              "defaults": {"ADVREC_TRAIN_BATCH_S": 2.0,
                           "ADVREC_EXPORT_EVERY_S": TrainerSettings.export_every_s,
                           "ADVREC_WATCH_INTERVAL_S": 1.0,
                           "ADVREC_BUNDLE_FULL_EVERY_S": TrainerSettings.bundle_full_every_s},
              # settings given to the worker and the trainer beside the defaults above
              "env": {k: v for k, v in os.environ.items() if k.startswith("ADVREC_")},
              "items": args.items or None, "checkpoint_seed_s": seeded_s,
              "preload_s": preload_s,
              "goal": "median <= 10 s" + ("; bundle traffic <= 20 MB/min" if args.items
                                          else "")}
    rows = []
    if "start" in traffic and "end" in traffic:
        a, b = traffic["start"], traffic["end"]
        minutes = (b["at"] - a["at"]) / 60
        per_min = {k: (b[k] - a[k]) / 1e6 / minutes for k in ("full", "delta", "read")}
        result["bundle_topic"] = {
            "window_s": b["at"] - a["at"], "counters": traffic,
            "written_mb_per_min": per_min["full"] + per_min["delta"],
            "written_full_mb_per_min": per_min["full"],
            "written_delta_mb_per_min": per_min["delta"],
            "read_by_the_worker_mb_per_min": per_min["read"],
            "deltas_rebuilt": b["deltas_rebuilt"] - a["deltas_rebuilt"]}
        rows.append(("bundle topic", f"{per_min['full'] + per_min['delta']:.1f} MB/min written "
                     f"(full {per_min['full']:.1f}, deltas {per_min['delta']:.1f}), "
                     f"{per_min['read']:.1f} MB/min read, over {minutes:.1f} min"))
    path = write_result(f"freshness-{args.items}" if args.items else "freshness", result)
    print_table("bench/freshness (event produced -> served by a model trained on it)", [
        ("probes", f"{len(delays)} (never served: {missing})"),
        ("median", f"{result['median_s']:.2f} s" if delays else "-"),
        ("p95", f"{result['p95_s']:.2f} s" if result["p95_s"] else "-"),
        ("bundles served", str(len(served))),
        ("longest wait between swaps", f"{max(gaps):.1f} s" if gaps else "-"),
        ("trainer step / export (mean)",
         f"{trainer_times['step_mean_s']:.2f} s / {trainer_times['export_mean_s']:.2f} s"
         if trainer_times.get("step_mean_s") and trainer_times.get("export_mean_s") else "-"),
        ("checkpoints: save / publish (mean)",
         f"{trainer_times['checkpoints']:.0f}: {trainer_times['checkpoint_mean_s']:.2f} s / "
         f"{trainer_times['checkpoint_publish_mean_s']:.2f} s"
         if trainer_times.get("checkpoint_mean_s") and trainer_times.get(
             "checkpoint_publish_mean_s") else "-"),
        ("worker load / of which index (mean)",
         f"{result['worker_load']['mean_s']:.2f} s / {result['worker_load']['index_mean_s']:.2f} s"
         if result["worker_load"]["mean_s"] and result["worker_load"]["index_mean_s"] else "-"),
        ("index loads / background builds taken over",
         f"{index_counters.get('loads', 0):.0f} / {index_counters.get('rebuilds', 0):.0f}"),
        ("worker RSS", f"median {statistics.median(window_rss):.0f} MiB, peak "
                       f"{max(window_rss):.0f}" if window_rss else "-"),
        ("trainer RSS", f"median {statistics.median(window_trainer_rss):.0f} MiB, peak "
                        f"{max(window_trainer_rss):.0f}" if window_trainer_rss else "-"),
        ("advrec_model_age_seconds", f"median {statistics.median(gauge):.2f} s over "
                                     f"{len(gauge)} samples" if gauge else "-"),
        *rows,
        ("results", str(path)),
    ])
    return finish(run_dir, bool(delays), "no probe was served")


if __name__ == "__main__":
    sys.exit(main())
