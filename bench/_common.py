"""Helpers shared by the benchmark scripts: processes, scraping, result files."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str, name: str) -> float:
    text = urlopen(url, timeout=5).read().decode()
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M):
        total += float(m.group(1))
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process: its main thread and all its other threads."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"main": 0.0, "other": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out["main" if tid == str(pid) else "other"] += (int(fields[11]) + int(fields[12])) / tick
    return out


def tag() -> str:
    return uuid.uuid4().hex[:8]


def start_worker(run_dir: Path, env_extra: dict[str, str], *, wait: bool = True,
                 timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start a worker; with ``wait``, return once its /readyz says 200 (within
    ``timeout`` seconds)."""
    port = free_port()
    env = {**os.environ, "ADVREC_WEB_PORT": str(port), "ADVREC_WEB_BIND": "127.0.0.1",
           "ADVREC_DATA_DIR": str(run_dir / f"tables-{port}"),
           "ADVREC_BUNDLE_DIR": str(run_dir / "bundles"), "ADVREC_READY_WITHOUT_MODEL": "1",
           "ADVREC_LOG_LEVEL": "warning", **env_extra}
    log = open(run_dir / f"worker-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "advrec.cli", "worker"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_ready(proc, url, timeout)
    return proc, url


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urlopen(f"{url}/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited; see {url} log in the run directory")
        time.sleep(0.2)
    raise RuntimeError(f"worker {url} did not become ready in {timeout:.0f} s")


def pair_env(name: str, run_dir: Path, bootstrap: str) -> dict[str, str]:
    """Environment for a worker and a trainer with topics, app, group and dirs of their own."""
    t = tag()
    return {"ADVREC_BROKER": f"kafka://{bootstrap}", "ADVREC_TOPIC_CLICKS": f"{name}-{t}",
            "ADVREC_TOPIC_DLQ": f"{name}-{t}-dlq", "ADVREC_TOPIC_TRAIN": f"{name}-{t}-train",
            "ADVREC_TOPIC_BUNDLES": f"{name}-{t}-bundles",
            "ADVREC_TOPIC_CHECKPOINTS": f"{name}-{t}-checkpoints",
            "ADVREC_APP_ID": f"{name}-{t}", "ADVREC_CHECKPOINT_DIR": str(run_dir / "ckpt"),
            "ADVREC_TRAINER_GROUP": f"{name}-{t}-trainer",
            "ADVREC_TRAINER_METRICS_PORT": str(free_port())}


def start_trainer(run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    own = {"ADVREC_BUNDLE_DIR": str(run_dir / "trainer-bundles")}  # never a worker's cache
    return subprocess.Popen([sys.executable, "-m", "advrec.cli", "trainer"],
                            env={**os.environ, **own, **env, "ADVREC_LOG_LEVEL": "warning"},
                            stdout=open(run_dir / "trainer.log", "wb"),
                            stderr=subprocess.STDOUT)


class BundleTopic:
    """A bundle topic the benchmark publishes to as the trainer does (chunks, manifest,
    tombstones beyond ``keep``, pointer), from an event loop on a thread of its own."""

    def __init__(self, bootstrap: str, topic: str, keep: int = 3) -> None:
        from advrec.channel import TopicView
        from advrec.channel_io import ChannelPublisher
        from advrec.topics import CHANNEL_CONFIG, TopicSpec, ensure_topics

        self.topic, self.keep = topic, keep
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._run(ensure_topics(bootstrap, [TopicSpec(topic, 1, config=dict(CHANNEL_CONFIG))]))
        self.publisher = ChannelPublisher(bootstrap, topic, producer_id="bench")
        self.view = TopicView()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def publish(self, version: str, files: list[tuple[str, bytes]]) -> Any:
        # a delta names its base on the topic, as the trainer does: no link of its chain
        # back to a full bundle is tombstoned (advrec/channel.py ``TopicView.stale``)
        meta = json.loads(dict(files).get("meta.json", b"{}"))
        base = (meta.get("delta") or {}).get("base")
        done = self._run(self.publisher.publish(
            version, files, meta={"base": base} if base else {},
            stale=self.view.stale(self.keep, adding=version, base=base)))
        self.view.note_published(done.manifest, done.tombstoned)
        return done

    def close(self) -> None:
        self._run(self.publisher.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def stop_processes(*procs: subprocess.Popen) -> None:
    """SIGTERM all, then wait for each (up to 60 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(60)


def finish(run_dir: Path, ok: bool, failure: str) -> int:
    """Exit status of a bench run: remove its run directory if ``ok``, else keep the logs."""
    if ok:
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
        return 0
    print(f"{failure}; logs kept in {run_dir}", file=sys.stderr)
    return 1


def machine() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "processor": platform.processor()}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return path


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 20))
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
