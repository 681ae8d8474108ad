"""Real-broker fixtures: the local Kafka, worker processes, producing and consuming."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from advrec.replay import Payload, produce

ROOT = Path(__file__).resolve().parents[2]
KAFKA_PORT = int(os.environ.get("KAFKA_PORT", "9092"))
BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"


def _kafka(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "kafka.sh"), cmd], capture_output=True,
                          text=True, env={**os.environ, "KAFKA_PORT": str(KAFKA_PORT)})


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """Return the bootstrap address of the local broker, starting it if it is not up."""
    started_here = False
    if _kafka("status").returncode != 0:
        res = _kafka("start")
        assert res.returncode == 0, f"could not start Kafka:\n{res.stderr}"
        started_here = True
    yield BOOTSTRAP
    if started_here:
        _kafka("stop")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateBroker:
    """A broker of one test's own, on free ports, so the test may stop and restart it."""

    def __init__(self) -> None:
        self.port, self.controller_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"

    def _script(self, cmd: str) -> None:
        res = subprocess.run([str(ROOT / "scripts" / "kafka.sh"), cmd], capture_output=True,
                             text=True, env={**os.environ, "KAFKA_PORT": str(self.port),
                                             "KAFKA_CONTROLLER_PORT": str(self.controller_port)})
        assert res.returncode == 0, f"kafka.sh {cmd} on port {self.port} failed:\n{res.stderr}"

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")

    def remove(self) -> None:
        """Stop and delete its data and run directories."""
        self._script("reset")
        shutil.rmtree(ROOT / "kafka" / "run" / str(self.port), ignore_errors=True)


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    broker = PrivateBroker()
    broker.start()
    yield broker
    broker.remove()


class Names:
    """Topic and app names private to one test, so tests never see each other's data."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.app_id = f"advrec-test-{tag}"
        self.clicks = f"clicks-{tag}"
        self.dlq = f"clicks-dlq-{tag}"
        self.train = f"train-batches-{tag}"
        self.bundles = f"model-bundles-{tag}"
        self.checkpoints = f"trainer-checkpoints-{tag}"
        self.flags = f"user-flags-{tag}"
        self.items = f"items-{tag}"
        self.items_dlq = f"items-dlq-{tag}"


@pytest.fixture
def names() -> Names:
    return Names()


class AdvrecProcess:
    """An ``advrec <command>`` subprocess in its own session: start, scrape, kill, stop."""

    command = ""
    url = ""
    log_path: Path
    env: dict[str, str]

    def start(self) -> Self:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "advrec.cli", self.command],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)
        return self

    def metric(self, name: str, labels: str | None = None) -> float:
        """Return the sum of the samples of ``name`` (matching ``labels``), 0 if none."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
        for match in pattern.finditer(text):
            if labels is None or (match.group(1) and labels in match.group(1)):
                total += float(match.group(2))
        return total

    def alive(self) -> bool:
        return getattr(self, "proc", None) is not None and self.proc.poll() is None

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:]) or "(no log)"


class Worker(AdvrecProcess):
    """An ``advrec worker`` subprocess with its own port and table directory."""

    command = "worker"

    def __init__(self, names: Names, tmp: Path, *, partitions: int = 4,
                 bundle_dir: Path | None = None, extra_env: dict[str, str] | None = None,
                 port: int | None = None, data_dir: Path | None = None,
                 bootstrap: str = BOOTSTRAP) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir or tmp / f"tables-{self.port}"
        self.bundle_dir = bundle_dir or tmp / f"bundles-{self.port}"  # its own cache
        self.log_path = tmp / f"worker-{self.port}-{uuid.uuid4().hex[:4]}.log"
        self.env = {
            **os.environ,
            "ADVREC_BROKER": f"kafka://{bootstrap}",
            "ADVREC_APP_ID": names.app_id,
            "ADVREC_TOPIC_CLICKS": names.clicks,
            "ADVREC_TOPIC_DLQ": names.dlq,
            "ADVREC_TOPIC_TRAIN": names.train,
            "ADVREC_TOPIC_BUNDLES": names.bundles,
            "ADVREC_TOPIC_FLAGS": names.flags,
            "ADVREC_TOPIC_ITEMS": names.items,
            "ADVREC_TOPIC_ITEMS_DLQ": names.items_dlq,
            "ADVREC_PARTITIONS": str(partitions),
            "ADVREC_DATA_DIR": str(self.data_dir),
            "ADVREC_BUNDLE_DIR": str(self.bundle_dir),
            "ADVREC_WEB_PORT": str(self.port),
            "ADVREC_WEB_BIND": "127.0.0.1",
            "ADVREC_WEB_HOST": "127.0.0.1",
            "ADVREC_READY_WITHOUT_MODEL": "1",
            "ADVREC_LOG_LEVEL": "info",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, \
                f"worker exited with {self.proc and self.proc.returncode}:\n{self.log_tail()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.log_tail()}")


@pytest.fixture
def workers(names: Names, tmp_path: Path) -> Iterator[list[Worker]]:
    """A list to put started workers in; all are stopped at the end of the test."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


def send(topic: str, payloads: list[Payload], rate: float = 0.0,
         bootstrap: str = BOOTSTRAP) -> None:
    stats = asyncio.run(produce(bootstrap, topic, payloads, rate=rate, progress=False))
    assert stats.failed == 0 and stats.sent == len(payloads), stats


def consume_all(topic: str, expected: int, timeout: float = 60.0,
                bootstrap: str = BOOTSTRAP) -> list:
    """Read ``topic`` from the beginning until ``expected`` messages came (or timeout)."""

    async def run() -> list:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        out: list = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < expected and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500, max_records=5000)
                for msgs in batch.values():
                    out.extend(msgs)
            # linger a moment: more than expected would be a bug the caller should see
            extra = await consumer.getmany(timeout_ms=1000)
            for msgs in extra.values():
                out.extend(msgs)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
            last_exc = None
        except (httpx.HTTPError, OSError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} ({last_exc})")


class TrainerProcess(AdvrecProcess):
    """An ``advrec trainer`` subprocess with its own metrics port and directories."""

    command = "trainer"

    def __init__(self, names: Names, tmp: Path, *, bundle_dir: Path,
                 checkpoint_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, bootstrap: str = BOOTSTRAP) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoint_dir = checkpoint_dir or tmp / "checkpoints"
        self.log_path = tmp / f"trainer-{self.port}.log"
        self.env = {
            **os.environ,
            "ADVREC_BROKER": f"kafka://{bootstrap}",
            "ADVREC_TOPIC_TRAIN": names.train,
            "ADVREC_TOPIC_BUNDLES": names.bundles,
            "ADVREC_TOPIC_CHECKPOINTS": names.checkpoints,
            "ADVREC_TOPIC_FLAGS": names.flags,
            "ADVREC_TOPIC_ITEMS": names.items,
            "ADVREC_TRAINER_GROUP": f"{names.app_id}-trainer",
            "ADVREC_CHECKPOINT_MIN_INTERVAL_S": "0",
            "ADVREC_BUNDLE_DIR": str(bundle_dir),
            "ADVREC_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "ADVREC_TRAINER_METRICS_PORT": str(self.port),
            "ADVREC_TRAINER_THREADS": "1",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None
