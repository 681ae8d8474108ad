"""The container entry commands, run as plain processes with the manifests' environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from advrec.contract import encode_event, encode_key
from advrec.synthetic import SyntheticConfig, synthetic_events
from tests.integration.conftest import BOOTSTRAP, ROOT, Names, free_port, send, wait_for

pytestmark = pytest.mark.kafka


def manifest_env_and_args() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Return the ConfigMap's variables and each container's args, as Kubernetes runs them."""
    base = ROOT / "k8s" / "base"
    config = yaml.safe_load((base / "configmap.yaml").read_text())["data"]
    deployment = yaml.safe_load((base / "deployment.yaml").read_text())
    spec = deployment["spec"]["template"]["spec"]
    args = {c["name"]: c.get("args", []) for c in spec["containers"] + spec["initContainers"]}
    return {k: str(v) for k, v in config.items()}, args


def test_worker_and_trainer_start_from_the_manifest_settings_and_get_ready(
        kafka: str, names: Names, tmp_path: Path) -> None:
    env, args = manifest_env_and_args()
    assert args["worker"] == ["worker"] and args["trainer"] == ["trainer"]
    web_port, metrics_port = free_port(), free_port()
    # what differs outside the cluster: addresses, writable paths, one broker, private topics
    env.update({
        "ADVREC_BROKER": f"kafka://{BOOTSTRAP}", "ADVREC_REPLICATION": "1",
        "ADVREC_DATA_DIR": str(tmp_path / "stream"), "ADVREC_BUNDLE_DIR": str(tmp_path / "b"),
        "ADVREC_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "ADVREC_WEB_BIND": "127.0.0.1",
        "ADVREC_WEB_HOST": "127.0.0.1", "ADVREC_WEB_PORT": str(web_port),
        "ADVREC_TRAINER_METRICS_BIND": "127.0.0.1",
        "ADVREC_TRAINER_METRICS_PORT": str(metrics_port), "ADVREC_APP_ID": names.app_id,
        "ADVREC_TOPIC_CLICKS": names.clicks, "ADVREC_TOPIC_DLQ": names.dlq,
        "ADVREC_TOPIC_TRAIN": names.train, "ADVREC_TRAINER_GROUP": names.app_id + "-t",
    })
    full_env = {**os.environ, **env}
    procs = []
    try:
        for name in ("worker", "trainer"):
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "advrec.cli", *args[name]],
                                          env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=ROOT))
        url = f"http://127.0.0.1:{web_port}"
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 90,
                 "worker /healthz")
        # not ready before a model is warm (the manifests do not declare fallback mode)
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
        cfg = SyntheticConfig(n_users=200, n_items=300, seed=2)
        send(names.clicks, [(encode_key(e.user), encode_event(e))
                            for e in synthetic_events(cfg, 3000)])
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 180,
                 "worker ready with a warm model")
        ready = httpx.get(f"{url}/readyz", timeout=5).json()
        assert ready["providers"] == ["CPUExecutionProvider"]  # ADVREC_ORT_PROVIDERS=cpu
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert metrics.status_code == 200 and "advrec_trainer_batches_total" in metrics.text
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
