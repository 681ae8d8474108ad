"""The whole loop on the built-in synthetic stream: broker, worker, trainer, replay.

Prints a status line every few seconds (events/s ingested, live model version, trainer's
prequential HR@10, a sample recommendation) so you can watch recommendations improve.
Stops everything on Ctrl-C or after --seconds. Needs no dataset and no Docker.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[1]


def scrape(url: str) -> dict[str, float]:
    try:
        text = urlopen(url, timeout=2).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def get_json(url: str) -> dict:
    import json

    try:
        return json.loads(urlopen(url, timeout=2).read())
    except OSError as exc:
        body = getattr(exc, "read", None)
        return json.loads(body()) if body else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=180, help="how long to run (default 180)")
    p.add_argument("--rate", type=float, default=300, help="synthetic events/s (default 300)")
    p.add_argument("--mode", default="irgan", help="trainer adversarial mode (default irgan)")
    p.add_argument("--port", type=int, default=6066, help="worker HTTP port (default 6066)")
    args = p.parse_args()

    run = ROOT / "var" / f"demo-{int(time.time())}"
    run.mkdir(parents=True)
    env = {**os.environ, "ADVREC_DATA_DIR": str(run / "tables"),
           "ADVREC_CHECKPOINT_DIR": str(run / "checkpoints"),
           "ADVREC_APP_ID": f"advrec-demo-{run.name}", "ADVREC_TOPIC_CLICKS": f"clicks-{run.name}",
           "ADVREC_TOPIC_TRAIN": f"train-batches-{run.name}",
           "ADVREC_TOPIC_DLQ": f"clicks-dlq-{run.name}", "ADVREC_TRAINER_GROUP": run.name,
           "ADVREC_TOPIC_BUNDLES": f"model-bundles-{run.name}",
           "ADVREC_TOPIC_CHECKPOINTS": f"trainer-checkpoints-{run.name}",
           "ADVREC_WEB_PORT": str(args.port), "ADVREC_READY_WITHOUT_MODEL": "1",
           "ADVREC_TRAINER_MODE": args.mode}
    # worker and trainer share nothing but Kafka, as in a deployment: each its own directory
    worker_env = {**env, "ADVREC_BUNDLE_DIR": str(run / "worker-bundles")}
    trainer_env = {**env, "ADVREC_BUNDLE_DIR": str(run / "trainer-bundles")}
    subprocess.run([str(ROOT / "scripts" / "kafka.sh"), "start"], check=True)
    advrec = [sys.executable, "-m", "advrec.cli"]
    procs: list[subprocess.Popen] = []
    logs = {name: open(run / f"{name}.log", "wb") for name in ("worker", "trainer", "replay")}
    print(f"demo state and logs in {run}")
    try:
        procs.append(subprocess.Popen([*advrec, "worker"], env=worker_env,
                                      stdout=logs["worker"], stderr=subprocess.STDOUT))
        for _ in range(120):
            if get_json(f"http://127.0.0.1:{args.port}/readyz").get("ready"):
                break
            time.sleep(0.5)
        url = f"http://127.0.0.1:{args.port}"
        print("while the demo runs, ask the service yourself, e.g.:\n"
              f"  curl '{url}/recommendations/u1?k=5'   (top 5 for user u1)\n"
              f"  curl {url}/users/u1                  (what the worker remembers)\n"
              f"  curl {url}/readyz                    (the model it serves)\n"
              f"  curl {url}/metrics | grep ^advrec_    (worker metrics; the trainer's on "
              "http://127.0.0.1:9108/metrics)\n"
              f"  API description: {url}/openapi.json", flush=True)
        procs.append(subprocess.Popen([*advrec, "trainer"], env=trainer_env,
                                      stdout=logs["trainer"], stderr=subprocess.STDOUT))
        n_events = int(args.rate * args.seconds)
        procs.append(subprocess.Popen(
            [*advrec, "replay", "synthetic", "--rate", str(args.rate), "--limit",
             str(n_events), "--no-progress", "--topic", env["ADVREC_TOPIC_CLICKS"]],
            env=env, stdout=logs["replay"], stderr=subprocess.STDOUT))
        started = last_t = time.monotonic()
        last_n = 0.0
        while time.monotonic() - started < args.seconds:
            time.sleep(5)
            w = scrape(f"http://127.0.0.1:{args.port}/metrics")
            t = scrape("http://127.0.0.1:9108/metrics")
            now = time.monotonic()
            n = w.get("advrec_events_consumed_total", 0.0)
            rate = (n - last_n) / (now - last_t)
            last_n, last_t = n, now
            ready = get_json(f"http://127.0.0.1:{args.port}/readyz")
            rec = get_json(f"http://127.0.0.1:{args.port}/recommendations/u1?k=5")
            hr = t.get('advrec_trainer_prequential{metric="hr_at_10",variant="A"}', 0.0)
            print(f"[{now - started:5.0f}s] ingested {n:8.0f} ({rate:6.0f}/s) | model "
                  f"{ready.get('model_version') or '-':>13} | trainer batches "
                  f"{t.get('advrec_trainer_batches_total', 0):5.0f} HR@10 {hr:.3f} | u1 -> "
                  f"{rec.get('items', [])[:5]}{' (fallback)' if rec.get('fallback') else ''}",
                  flush=True)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"done; logs in {run}\n"
          "the Kafka broker is still running (its topics stay for another demo): stop it with "
          "`scripts/kafka.sh stop` (or `make kafka-stop`); `scripts/kafka.sh status` tells "
          "whether it runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
