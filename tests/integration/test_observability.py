"""Metrics against live processes: counters move by exactly what was sent, and a real
Prometheus answers every query of the Grafana dashboard and of the alert rules.

Dashboard expressions must return a non-empty result once the stream has run. Alert
expressions mostly return nothing unless they fire, so each one is checked three ways:
Prometheus evaluates it without error, every metric it reads has data (a renamed metric
cannot disarm a rule silently), and Prometheus' own rule evaluation reports it healthy.
One rule, AdvrecBundlesRejected, is made to fire. Prometheus and promtool come from
scripts/install-prometheus.sh (.tools/bin/); the tests needing them skip when absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from advrec.bundle import write_bundle
from advrec.contract import encode_event, encode_key
from advrec.synthetic import SyntheticConfig, malformed_payloads, synthetic_events
from tests.bundles import publish_dir, publish_toy_to_topic, toy_model
from tests.integration.conftest import (
    BOOTSTRAP as KAFKA,
)
from tests.integration.conftest import (
    ROOT,
    Names,
    TrainerProcess,
    Worker,
    free_port,
    send,
    wait_for,
)

pytestmark = pytest.mark.kafka

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "advrec.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
COMPOSE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# Grafana fills these in at query time; any value Prometheus accepts will do here.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
N_ITEMS = 200
VOCAB = [f"i{n}" for n in range(N_ITEMS)]  # the synthetic stream's items: toy bundles know them

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def tool(name: str) -> str:
    path = ROOT / ".tools" / "bin" / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not in .tools/bin nor on PATH: run scripts/install-prometheus.sh")
    return found


def scrape(url: str) -> Samples:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def clicks(n: int, seed: int, n_users: int = 50) -> list[tuple[bytes, bytes]]:
    cfg = SyntheticConfig(n_users=n_users, n_items=N_ITEMS, seed=seed)
    return [(encode_key(e.user), encode_event(e)) for e in synthetic_events(cfg, n)]


@dataclass
class Stack:
    names: Names
    tmp: Path
    bundles: Path
    worker: Worker
    trainer: TrainerProcess


@pytest.fixture(scope="module")
def stack(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker serving a toy bundle, then an IRGAN trainer publishing to the same folder."""
    tmp = tmp_path_factory.mktemp("observability")
    names = Names()
    bundles = tmp / "trainer-bundles"  # the trainer's own copy; the worker has its cache
    publish_toy_to_topic(kafka, names.bundles, VOCAB, seed=0)  # the first swap, at start-up
    worker = Worker(names, tmp, extra_env={
        "ADVREC_WATCH_INTERVAL_S": "0.2", "ADVREC_TRAIN_BATCH_SIZE": "32",
        "ADVREC_TRAIN_BATCH_S": "0.5"})
    # started after the worker, which creates train-batches
    trainer = TrainerProcess(names, tmp, bundle_dir=bundles, extra_env={
        "ADVREC_TRAINER_MODE": "irgan", "ADVREC_TRAINER_DIM": "16",
        "ADVREC_TRAINER_LAYERS": "1", "ADVREC_EXPORT_EVERY_S": "1",
        "ADVREC_CHECKPOINT_EVERY_BATCHES": "2"})
    try:
        worker.start().wait_ready()
        trainer.start()
        yield Stack(names, tmp, bundles, worker, trainer)
    finally:
        trainer.stop()
        worker.stop()


def test_counters_move_by_exactly_the_events_and_requests_sent(stack: Stack) -> None:
    worker, names = stack.worker, stack.names
    valid = clicks(300, seed=3)
    bad = malformed_payloads(np.random.default_rng(3), 16)
    before = scrape(worker.url)
    send(names.clicks, valid + [(f"u{i}".encode(), raw) for i, (raw, _) in enumerate(bad)])
    total = len(valid) + len(bad)
    wait_for(lambda: moved(before, scrape(worker.url), "advrec_events_consumed_total") >= total
             and moved(before, scrape(worker.url), "advrec_dlq_writes_total") >= len(bad),
             60, "every event consumed and every bad one dead-lettered")
    time.sleep(1.0)  # anything beyond the expected counts would show up by now
    after = scrape(worker.url)
    assert moved(before, after, "advrec_events_consumed_total") == total
    assert moved(before, after, "advrec_dlq_writes_total") == len(bad)
    for reason, n in Counter(reason for _, reason in bad).items():
        assert moved(before, after, "advrec_events_invalid_total", reason=reason) == n, reason
    assert sum(v for (name, _), v in after.items()
               if name == "advrec_events_invalid_total") \
        - sum(v for (name, _), v in before.items()
              if name == "advrec_events_invalid_total") == len(bad)

    users = sorted({key.decode() for key, _ in valid})[:10]
    wait_for(lambda: httpx.get(f"{worker.url}/users/{users[-1]}").status_code == 200, 30,
             "the clicks applied")
    before = scrape(worker.url)
    with httpx.Client(base_url=worker.url, timeout=10) as http:
        answers = [http.get(f"/recommendations/{u}", params={"k": 5})
                   for u in [*users, "nobody-1", "nobody-2"]]
        client_errors = [http.get("/recommendations/u1", params={"k": "0"}),
                         http.get("/recommendations/u1", params={"k": "ten"}),
                         http.get(f"/recommendations/{'x' * 129}")]
        unknown = http.get("/users/nobody-3")
        known = http.get(f"/users/{users[0]}")
    assert [r.status_code for r in answers] == [200] * len(answers)
    assert [r.status_code for r in client_errors] == [400] * 3
    assert (unknown.status_code, known.status_code) == (404, 200)
    after = scrape(worker.url)
    count = "advrec_http_request_seconds_count"
    assert moved(before, after, count, endpoint="recommendations", status_class="2xx") == 12
    assert moved(before, after, count, endpoint="recommendations", status_class="4xx") == 3
    assert moved(before, after, count, endpoint="users", status_class="4xx") == 1
    assert moved(before, after, count, endpoint="users", status_class="2xx") == 1
    causes = Counter(r.json()["fallback_cause"] for r in answers if r.json()["fallback"])
    assert causes["no_history"] >= 2  # the two unknown users at least
    for cause, n in causes.items():
        assert moved(before, after, "advrec_fallback_answers_total", cause=cause) == n, cause
    assert sum(moved(before, after, "advrec_fallback_answers_total", cause=c)
               for c in ("no_model", "no_history", "no_known_items", "model_error")) \
        == sum(causes.values())


# ---------------------------------------------------------------- a real Prometheus


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (panel title, PromQL with Grafana's variables filled in) for every target."""
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {panel['title']!r}: {expr}"
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping the test's worker and trainer every second."""

    def __init__(self, binary: str, tmp: Path, worker: Worker, trainer: TrainerProcess) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [  # job names as in deploy/prometheus/prometheus.yml
                {"job_name": "advrec-worker",
                 "static_configs": [{"targets": [worker.url.split("//")[1]]}]},
                {"job_name": "advrec-trainer",
                 "static_configs": [{"targets": [trainer.url.split("//")[1]]}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address={self.url.split('//')[1]}"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate ``expr`` now; fail the test on any query error."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", \
            f"query failed: {expr}\n{body.get('errorType')}: {body.get('error')}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=10).json()["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Iterator[Prometheus]:
    prom = Prometheus(tool("prometheus"), stack.tmp, stack.worker, stack.trainer)
    try:
        wait_for(lambda: httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200, 30,
                 "Prometheus ready")
        wait_for(lambda: sorted(float(s["value"][1]) for s in prom.query("up")) == [1.0, 1.0],
                 30, "both targets scraped")
        yield prom
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nprometheus log:\n{prom.log_tail()}") from None
    finally:
        prom.stop()


def publish_corrupt_bundle(kafka: str, topic: str, scratch: Path, name: str) -> None:
    """Publish a bundle whose model bytes do not match its meta's checksum."""
    write_bundle(scratch, toy_model(N_ITEMS), VOCAB, {"max_len": 10, "version": name,
                                                      "last_event_ms": 0})
    (scratch / name / "model.onnx").write_bytes(b"\x00garbage")
    publish_dir(kafka, topic, scratch, name)


def test_every_dashboard_and_alert_query_answers_from_a_real_prometheus(
        stack: Stack, prometheus: Prometheus) -> None:
    worker, trainer, names = stack.worker, stack.trainer, stack.names
    # A rejected bundle, while Prometheus watches. The trainer may move the pointer on
    # before the worker gets to it; then try again.
    for attempt in range(5):
        rejected = worker.metric("advrec_bundles_rejected_total")
        publish_corrupt_bundle(KAFKA, names.bundles, stack.tmp / "scratch", f"corrupt-{attempt}")
        try:
            wait_for(lambda r=rejected: worker.metric("advrec_bundles_rejected_total") > r, 5,
                     "the corrupt bundle rejected")
            break
        except AssertionError:
            assert attempt < 4, "no corrupt bundle was ever rejected"

    # A stream with some invalid events; requests served by the model, by the fallback, 4xx.
    bad = malformed_payloads(np.random.default_rng(5), 8)
    send(names.clicks, clicks(1500, seed=5, n_users=100)
         + [(b"u1", raw) for raw, _ in bad])

    def requests() -> None:
        with httpx.Client(base_url=worker.url, timeout=10) as http:
            for n in range(30):
                http.get(f"/recommendations/u{n}", params={"k": 10})
            http.get("/recommendations/u1", params={"k": "0"})
            http.get("/recommendations/nobody")
            http.get("/users/nobody")
            http.get("/users/u1")

    def trainer_bundle_live() -> bool:
        requests()
        w = scrape(worker.url)
        t = scrape(trainer.url)
        return (w.get(("advrec_model_age_seconds", frozenset()), 0) > 0
                and w.get(("advrec_microbatch_size_count", frozenset()), 0) > 0
                and t.get(("advrec_trainer_checkpoint_seconds_count", frozenset()), 0) > 0
                and t.get(("advrec_trainer_exports_total",
                           frozenset({("outcome", "published")})), 0) > 0)

    wait_for(trainer_bundle_live, 90, "a trainer bundle live, checkpoints, model calls",
             interval=1)

    # Every dashboard query answers with data (scrapes and rate windows need a moment).
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_expressions(dashboard)
    assert len(exprs) >= 20
    empty: list[str] = []

    def all_answer() -> bool:
        requests()
        empty[:] = [f"{title}: {expr}" for title, expr in exprs if not prometheus.query(expr)]
        return not empty

    try:
        wait_for(all_answer, 30, "every dashboard query to return data", interval=2)
    except AssertionError:
        raise AssertionError("dashboard queries with no data:\n" + "\n".join(empty)) from None

    # Every alert expression evaluates, and every metric it reads exists.
    rules = alert_rules()
    for rule in rules:
        prometheus.query(rule["expr"])
        for metric in set(re.findall(r"\badvrec_\w+|\bup\b", rule["expr"])):
            assert prometheus.query(metric), f"{rule['alert']} reads {metric}, which has no data"

    # Prometheus loaded and evaluated every rule without error ...
    def rules_healthy() -> bool:
        loaded = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        return (sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)
                and all(r["health"] == "ok" for r in loaded))

    wait_for(rules_healthy, 15, "every rule loaded and evaluated healthy")
    # ... and the bundle rejected above fires its alert.
    wait_for(lambda: any(a["labels"]["alertname"] == "AdvrecBundlesRejected"
                         and a["labels"]["reason"] == "checksum_mismatch"
                         for a in prometheus.get("/api/v1/alerts")["alerts"]), 15,
             "AdvrecBundlesRejected firing")


def test_dashboard_panels_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    ours = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ours, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ours, panel["title"]
    titles = " ".join(p["title"].lower() for p in dashboard_panels(dashboard))
    for wanted in ("throughput", "invalid", "lag", "p50 / p95 / p99", "status class",
                   "model version", "model age", "rejected", "losses", "accuracy",
                   "hr@10", "exports", "fallback", "replay", "vocabulary"):
        assert wanted in titles, wanted


def test_alert_rules_carry_severity_summary_and_description() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_accepts_the_rules_and_the_compose_config() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(COMPOSE_CONFIG)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
