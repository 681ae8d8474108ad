"""Fleet: bundles, pins and checkpoints over Kafka, measured side by side on one machine.

Phase 1, a fleet: two workers and two trainers (one active, one standby) share nothing but
the broker; a live synthetic stream (event time = wall clock) runs at ``--rate`` events/s.
  * freshness at every worker: event produced -> served by a model trained on it (a probe
    every 0.5 s; a probe is fresh once the model a worker *serves* has a ``last_event_ms`` at
    or after it). Goal: median <= 10 s.
  * a third worker started late: start -> ready with the current model.
  * cost of the channel: bytes per bundle and per checkpoint on Kafka, bytes per minute on
    the bundle topic, CPU of each worker's bundle feed (its thread's CPU time).
  * takeover: kill -9 of the active trainer -> the standby's first published bundle, and ->
    every worker serving it. Goal: <= the trainer's session timeout + 2 export intervals.
Phase 2, overload: one worker, one trainer, clicks at ``--overload-rate`` (about 5x what the
trainer trains at the default mode on this machine) for ``--overload-seconds``; the worker's
model age sampled every second. Goal: median <= 30 s and bounded (the last minute's median
no higher than the second minute's + 10 s); the share of examples trained is reported.

Writes bench/results/fleet.json and fleet.png (model age and trained share over the
overload run) and prints a table; exits 1 if a goal was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.request import Request, urlopen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.replay import produce
from advrec.synthetic import SyntheticConfig, synthetic_events
from bench._common import (
    RESULTS,
    finish,
    free_port,
    machine,
    pair_env,
    print_table,
    scrape,
    start_worker,
    stop_processes,
    tag,
    wait_ready,
    write_result,
)
from trainer.settings import TrainerSettings

FRESHNESS_GOAL_S = 10.0
AGE_GOAL_S = 30.0


def live_stream(rate: float, stop: threading.Event,
                probes: list[tuple[float, int]] | None = None) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) paced in real time until ``stop``; every 0.5 s note a probe."""
    cfg = SyntheticConfig(n_users=2000, n_items=3000, seed=4)
    next_probe = 0.0
    started = time.monotonic()
    for n, e in enumerate(synthetic_events(cfg, 10**9)):
        if stop.is_set():
            return
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.time()
        ts = int(now * 1000)
        if probes is not None and now >= next_probe:
            probes.append((now, ts))
            next_probe = now + 0.5
        yield encode_key(e.user), encode_event(ClickEvent(e.user, e.item, ts, id=f"f{n}"))


def producer(bootstrap: str, topic: str, rate: float, stop: threading.Event,
             probes: list[tuple[float, int]] | None = None) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(produce(
        bootstrap, topic, live_stream(rate, stop, probes), progress=False)), daemon=True)
    thread.start()
    return thread


def start_trainer(run_dir: Path, env: dict[str, str], name: str) -> tuple[subprocess.Popen,
                                                                         str, Path]:
    port = free_port()
    bundles = run_dir / f"bundles-{name}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "advrec.cli", "trainer"],
        env={**os.environ, **env, "ADVREC_TRAINER_ID": name, "ADVREC_BUNDLE_DIR": str(bundles),
             "ADVREC_CHECKPOINT_DIR": str(run_dir / f"ckpt-{name}"),
             "ADVREC_TRAINER_METRICS_PORT": str(port), "ADVREC_LOG_LEVEL": "info"},
        stdout=open(run_dir / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/metrics", bundles


def worker_env(env: dict[str, str], run_dir: Path) -> dict[str, str]:
    return {**env, "ADVREC_BUNDLE_DIR": str(run_dir / f"cache-{tag()}"),
            "ADVREC_ADMIN_TOKEN": "bench", "ADVREC_READY_WITHOUT_MODEL": "0"}


def live_meta(url: str) -> dict | None:
    request = Request(f"{url}/admin/model", headers={"Authorization": "Bearer bench"})
    try:
        live = json.loads(urlopen(request, timeout=2).read())["live"]
    except (OSError, ValueError, KeyError):
        return None
    return None if live is None else {"version": live["version"], **live["meta"]}


def metric(url: str, name: str, labels: str | None = None) -> float:
    try:
        if labels is None:
            return scrape(url, name)
        text = urlopen(url, timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and labels in line)
    except OSError:
        return float("nan")


class Poller:
    """Records, per worker, when each served version was first seen and its meta."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self.seen: dict[str, list[tuple[float, dict]]] = {u: [] for u in urls}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add(self, url: str) -> None:
        self.seen[url] = []
        self.urls.append(url)

    def _run(self) -> None:
        while not self.stop.is_set():
            for url in list(self.urls):
                meta = live_meta(url)
                served = self.seen[url]
                if meta and (not served or served[-1][1]["version"] != meta["version"]):
                    served.append((time.time(), meta))
            self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def freshness(probes: list[tuple[float, int]], served: list[tuple[float, dict]],
              since: float, until: float) -> list[float]:
    out = []
    for wall, ts in probes:
        if not since <= wall <= until:
            continue
        fresh = [t for t, meta in served if int(meta.get("last_event_ms") or 0) >= ts
                 and t >= wall]
        if fresh:
            out.append(min(fresh) - wall)
    return out


def phase_fleet(args: argparse.Namespace, run_dir: Path, rows: list, result: dict) -> bool:
    env = {**pair_env("fleet", run_dir, args.bootstrap),
           "ADVREC_TRAINER_SESSION_TIMEOUT_S": str(args.session_timeout)}
    workers: list[tuple[subprocess.Popen, str]] = []
    trainers: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    probes: list[tuple[float, int]] = []
    stop = threading.Event()
    prod = poller = late = None
    started = time.time()
    ok = True
    try:
        # ready only with a model: started first, ready once the trainers have published one
        workers += [start_worker(run_dir, worker_env(env, run_dir), wait=False)
                    for _ in range(2)]
        time.sleep(5)  # the first worker creates the topics
        for name in ("trainer-a", "trainer-b"):
            trainers[name] = start_trainer(run_dir, env, name)
        prod = producer(args.bootstrap, env["ADVREC_TOPIC_CLICKS"], args.rate, stop, probes)
        for proc, url in workers:
            wait_ready(proc, url)
        poller = Poller([url for _, url in workers])
        time.sleep(args.warmup)
        feed0 = {url: (metric(f"{url}/metrics", "advrec_bundle_feed_cpu_seconds_total"),
                       metric(f"{url}/metrics", "advrec_bundles_assembled_total"),
                       metric(f"{url}/metrics", "advrec_bundle_feed_bytes_total"))
                 for _, url in workers}
        window0 = time.time()
        time.sleep(args.fleet_seconds / 2)
        late_started = time.monotonic()
        late = start_worker(run_dir, worker_env(env, run_dir))
        late_ready_s = time.monotonic() - late_started
        late_meta = live_meta(late[1])
        poller.add(late[1])
        time.sleep(args.fleet_seconds / 2)
        window1 = time.time()
        feed = {}
        for _, url in workers:
            cpu0, n0, b0 = feed0[url]
            feed[url] = {
                "cpu_s": metric(f"{url}/metrics", "advrec_bundle_feed_cpu_seconds_total") - cpu0,
                "bundles": metric(f"{url}/metrics", "advrec_bundles_assembled_total") - n0,
                "bytes": metric(f"{url}/metrics", "advrec_bundle_feed_bytes_total") - b0}
        minutes = (window1 - window0) / 60
        delays = {url: freshness(probes, poller.seen[url], window0, window1 - 15)
                  for _, url in workers}
        all_delays = sorted(d for ds in delays.values() for d in ds)
        active = next(name for name, (_, murl, _) in trainers.items()
                      if metric(murl, "advrec_trainer_active") == 1)
        standby = next(name for name in trainers if name != active)
        bundle_bytes = metric(trainers[active][1], "advrec_trainer_bundle_bytes")
        ckpt_bytes = metric(trainers[active][1], "advrec_trainer_checkpoint_bytes")
        ckpt_seconds = metric(trainers[active][1], "advrec_trainer_checkpoint_publish_seconds_sum")
        ckpt_count = metric(trainers[active][1], "advrec_trainer_checkpoint_publish_seconds_count")
        # takeover: kill -9 of the active trainer
        killed = time.monotonic()
        trainers[active][0].send_signal(signal.SIGKILL)
        trainers[active][0].wait(10)
        standby_url = trainers[standby][1]
        became_active = first_bundle = served_all = None
        deadline = killed + args.session_timeout + 120
        while time.monotonic() < deadline and served_all is None:
            now = time.monotonic() - killed
            if became_active is None and metric(standby_url, "advrec_trainer_active") == 1:
                became_active = now
            if first_bundle is None and metric(
                    standby_url, "advrec_trainer_exports_total", 'outcome="published"') > 0:
                first_bundle = now
            if first_bundle is not None and all(
                    (live_meta(url) or {}).get("trainer") == standby
                    for url in [u for _, u in workers] + [late[1]]):
                served_all = now
            time.sleep(0.2)
        resumed = metric(standby_url, "advrec_trainer_resumed_offset")
        takeover_goal = args.session_timeout + 2 * TrainerSettings.export_every_s
        result["fleet"] = {
            "workers": 2, "trainers": 2, "rate": args.rate,
            "freshness_s": {
                "median": statistics.median(all_delays) if all_delays else None,
                "p95": (statistics.quantiles(all_delays, n=20)[18]
                        if len(all_delays) > 2 else None),
                "max": max(all_delays) if all_delays else None,
                "probes": len(all_delays),
                "per_worker_median": {u: statistics.median(d) if d else None
                                      for u, d in delays.items()},
                "goal": f"median <= {FRESHNESS_GOAL_S} s"},
            "late_worker": {"start_to_ready_s": late_ready_s,
                            "ready_with": late_meta and late_meta["version"]},
            "channel": {
                "bytes_per_bundle": bundle_bytes, "bytes_per_checkpoint": ckpt_bytes,
                "checkpoint_publish_s_mean": ckpt_seconds / max(ckpt_count, 1),
                "bundle_topic_bytes_per_min": statistics.mean(
                    f["bytes"] for f in feed.values()) / minutes,
                "feed_cpu_s_per_min": {u: f["cpu_s"] / minutes for u, f in feed.items()},
                "feed_cpu_ms_per_bundle": {u: 1000 * f["cpu_s"] / max(f["bundles"], 1)
                                           for u, f in feed.items()},
                "bundles_per_min": statistics.mean(f["bundles"] for f in feed.values())
                / minutes},
            "takeover": {"session_timeout_s": args.session_timeout,
                         "kill_to_standby_active_s": became_active,
                         "kill_to_first_bundle_s": first_bundle,
                         "kill_to_served_everywhere_s": served_all,
                         "resumed_offset": resumed,
                         "goal": f"first bundle <= {takeover_goal:.0f} s "
                                 "(session timeout + 2 export intervals)"},
        }
        fresh_ok = bool(all_delays) and statistics.median(all_delays) <= FRESHNESS_GOAL_S
        take_ok = first_bundle is not None and first_bundle <= takeover_goal
        ok = fresh_ok and take_ok
        f = result["fleet"]
        ch = f["channel"]
        rows += [
            ("freshness (2 workers)", f"median {f['freshness_s']['median']:.1f} s, p95 "
                                      f"{f['freshness_s']['p95']:.1f} s, max "
                                      f"{f['freshness_s']['max']:.1f} s over "
                                      f"{len(all_delays)} probes (goal median <= 10 s: "
                                      f"{'met' if fresh_ok else 'MISSED'})"
             if all_delays else "no probe served (MISSED)"),
            ("late worker", f"start -> ready with the current model {late_ready_s:.1f} s"),
            ("bundle on Kafka", f"{bundle_bytes / 1e6:.2f} MB each, "
                                f"{ch['bundles_per_min']:.1f} a minute = "
                                f"{ch['bundle_topic_bytes_per_min'] / 1e6:.1f} MB/min read "
                                "by each worker"),
            ("checkpoint on Kafka", f"{ckpt_bytes / 1e6:.2f} MB each, published in "
                                    f"{ch['checkpoint_publish_s_mean']:.2f} s"),
            ("bundle feed CPU", ", ".join(f"{v:.2f} s/min" for v in
                                          ch["feed_cpu_s_per_min"].values())
             + " per worker (" + ", ".join(f"{v:.0f} ms" for v in
                                           ch["feed_cpu_ms_per_bundle"].values())
             + " per bundle)"),
            ("takeover", (f"kill -9 -> standby active {became_active or float('nan'):.1f} s, "
                          f"-> its first bundle {first_bundle or float('nan'):.1f} s, -> served "
                          f"by every worker {served_all or float('nan'):.1f} s (session "
                          f"timeout {args.session_timeout:.0f} s; goal <= "
                          f"{takeover_goal:.0f} s: {'met' if take_ok else 'MISSED'})")),
        ]
    finally:
        stop.set()
        if poller is not None:
            poller.close()
        if prod is not None:
            prod.join(30)
        procs = [p for p, _ in workers] + [p for p, _, _ in trainers.values()]
        if late is not None:
            procs.append(late[0])
        stop_processes(*[p for p in procs if p.poll() is None])
    result["fleet_run_s"] = time.time() - started
    return ok


def phase_overload(args: argparse.Namespace, run_dir: Path, rows: list, result: dict) -> bool:
    env = pair_env("overload", run_dir, args.bootstrap)
    worker, url = start_worker(run_dir, worker_env(env, run_dir), wait=False)
    trainer = prod = None
    stop = threading.Event()
    samples: list[tuple[float, float, float, float, float]] = []
    try:
        time.sleep(5)  # the worker creates the topics
        trainer, murl, _ = start_trainer(run_dir, env, "trainer-o")
        prod = producer(args.bootstrap, env["ADVREC_TOPIC_CLICKS"], args.overload_rate, stop)
        wait_ready(worker, url)
        started = time.monotonic()
        while time.monotonic() - started < args.overload_seconds:
            t = time.monotonic() - started
            samples.append((t, metric(f"{url}/metrics", "advrec_model_age_seconds"),
                            metric(murl, "advrec_trainer_train_fraction"),
                            metric(murl, "advrec_trainer_lag_seconds"),
                            metric(f"{url}/metrics", "advrec_consumer_lag_messages")))
            time.sleep(1.0)
        trained = metric(murl, "advrec_trainer_examples_total")
        shed = metric(murl, "advrec_trainer_shed_examples_total")
        consumed = metric(f"{url}/metrics", "advrec_events_consumed_total")
        skipped = metric(murl, "advrec_trainer_skipped_batches_total")
    finally:
        stop.set()
        if prod is not None:
            prod.join(30)
        stop_processes(*[p for p in (trainer, worker) if p is not None and p.poll() is None])
    ages = [a for t, a, *_ in samples if t >= 60 and a == a and a > 0]
    minute2 = [a for t, a, *_ in samples if 60 <= t < 120 and a > 0]
    last = [a for t, a, *_ in samples if t >= args.overload_seconds - 60 and a > 0]
    median = statistics.median(ages) if ages else None
    bounded = bool(minute2 and last) and statistics.median(last) <= statistics.median(
        minute2) + 10
    ok = median is not None and median <= AGE_GOAL_S and bounded
    share = trained / max(trained + shed, 1)
    factor = args.overload_rate / max(trained / args.overload_seconds, 1e-9)
    result["overload"] = {
        "rate": args.overload_rate, "seconds": args.overload_seconds,
        "trained_per_s": trained / args.overload_seconds, "clicks_vs_trained": factor,
        "events_consumed": consumed, "examples_trained": trained, "examples_shed": shed,
        "share_trained": share, "batches_skipped": skipped,
        "model_age_s": {"median_after_1min": median, "max_after_1min": max(ages) if ages
                        else None, "median_minute2": statistics.median(minute2) if minute2
                        else None, "median_last_minute": statistics.median(last) if last
                        else None, "goal": f"median <= {AGE_GOAL_S} s and bounded"},
        "samples": [{"t": t, "model_age_s": a, "train_fraction": f, "trainer_lag_s": lag,
                     "worker_lag_messages": wl} for t, a, f, lag, wl in samples],
    }
    rows.append(("overload", (
        f"{args.overload_rate:.0f} clicks/s for {args.overload_seconds:.0f} s: model age "
        f"median {median or float('nan'):.1f} s, max {max(ages) if ages else float('nan'):.1f}"
        f" s after the first minute (goal median <= {AGE_GOAL_S:.0f} s and bounded: "
        f"{'met' if ok else 'MISSED'}); trained {100 * share:.0f} % of "
        f"{trained + shed:.0f} examples ({trained / args.overload_seconds:.0f}/s: the clicks "
        f"came {factor:.1f}x faster), {skipped:.0f} batches skipped")))
    plot(result["overload"]["samples"], RESULTS / "fleet.png", factor)
    return ok


def plot(samples: list[dict], path: Path, factor: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the serving-only install has no matplotlib
        return
    t = [s["t"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    ax1.plot(t, [s["model_age_s"] for s in samples], label="served model's age (s)")
    ax1.plot(t, [s["trainer_lag_s"] for s in samples], label="age of the batch trained (s)",
             alpha=0.7)
    ax1.axhline(AGE_GOAL_S, color="grey", linestyle="--", label="goal (median)")
    ax1.set_ylabel("seconds")
    ax1.legend(loc="upper right")
    ax2.plot(t, [s["train_fraction"] for s in samples], color="tab:green")
    ax2.set_ylabel("share of each batch trained")
    ax2.set_xlabel("seconds into the overload run")
    fig.suptitle(f"bench/fleet: one trainer under clicks at {factor:.1f}x what it trains")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=200.0, help="clicks/s in the fleet phase")
    p.add_argument("--warmup", type=float, default=40.0, help="seconds before measuring")
    p.add_argument("--fleet-seconds", type=float, default=90.0,
                   help="freshness window (the late worker starts half-way)")
    p.add_argument("--session-timeout", type=float, default=30.0,
                   help="ADVREC_TRAINER_SESSION_TIMEOUT_S of the trainers")
    p.add_argument("--overload-rate", type=float, default=800.0,
                   help="clicks/s in the overload phase (the default trainer trains ~130/s "
                        "beside a worker on 2 cores)")
    p.add_argument("--overload-seconds", type=float, default=300.0)
    p.add_argument("--skip-overload", action="store_true", help="run the fleet phase only")
    p.add_argument("--skip-fleet", action="store_true", help="run the overload phase only")
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    args = p.parse_args()
    run_dir = Path("var") / f"bench-fleet-{tag()}"
    run_dir.mkdir(parents=True)
    rows: list[tuple[str, str]] = []
    result: dict = {"settings": vars(args), "machine": machine()}
    ok = True
    if not args.skip_fleet:
        ok = phase_fleet(args, run_dir, rows, result)
    if not args.skip_overload:
        ok = phase_overload(args, run_dir, rows, result) and ok
    path = write_result("fleet", result)
    print_table("bench/fleet (workers and trainers sharing nothing but Kafka)",
                [*rows, ("results", str(path))])
    return finish(run_dir, ok, "a fleet goal was missed")


if __name__ == "__main__":
    sys.exit(main())
