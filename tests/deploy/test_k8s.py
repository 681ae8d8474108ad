"""The kustomize overlays render, validate against Kubernetes schemas and keep their promises."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from advrec.config import from_env
from stream_app.settings import ENV_PREFIX, Settings
from trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "k8s" / "base"
CHECKOV_CONFIG = ROOT / "k8s" / ".checkov.yaml"

# Oldest release with native sidecars on by default (SidecarContainers beta), and the newest
# schema the installed kubernetes-validate ships.
K8S_MIN_VERSION = "1.29.0"

RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)
EXPECTED_CONFIG = {
    "ADVREC_BROKER": "kafka://kafka:9092",
    "ADVREC_APP_ID": "advrec",
    "ADVREC_DATA_DIR": "/var/lib/advrec/stream",
    "ADVREC_BUNDLE_DIR": "/var/lib/advrec/bundles",
    "ADVREC_CHECKPOINT_DIR": "/var/lib/advrec/checkpoints",
    "ADVREC_TOPIC_BUNDLES": "model-bundles",
    "ADVREC_TOPIC_CHECKPOINTS": "trainer-checkpoints",
    "ADVREC_TOPIC_FLAGS": "user-flags",
    "ADVREC_BUNDLES_KEEP": "5",
    "ADVREC_CHECKPOINT_MIN_INTERVAL_S": "30",
    "ADVREC_TRAINER_SESSION_TIMEOUT_S": "30",
    "ADVREC_WEB_BIND": "0.0.0.0",
    "ADVREC_WEB_PORT": "6066",
    "ADVREC_PARTITIONS": "8",
    "ADVREC_REPLICATION": "3",
    "ADVREC_HISTORY_LEN": "50",
    "ADVREC_TRAINER_METRICS_BIND": "0.0.0.0",
    "ADVREC_TRAINER_METRICS_PORT": "9108",
    "ADVREC_TRAINER_THREADS": "2",
    "ADVREC_TRAINER_MODE": "apr",
    "ADVREC_EXCLUDE": "seen",
    "ADVREC_TRAINER_DETECTOR": "0",
    "ADVREC_ORT_PROVIDERS": "cpu",
    "ADVREC_LOG_LEVEL": "info",
}
Obj = dict[str, Any]


def only(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[Obj]) -> Obj:
    return only(objects, "Deployment", "advrec")["spec"]["template"]["spec"]


def container(objects: list[Obj], name: str) -> Obj:
    spec = pod_spec(objects)
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def all_containers(objects: list[Obj]) -> list[tuple[str, Obj]]:
    out = []
    for obj in objects:
        template = obj.get("spec", {}).get("template", {}).get("spec")
        if template:
            for c in template.get("initContainers", []) + template["containers"]:
                out.append((f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", c))
    return out


def config(objects: list[Obj]) -> dict[str, str]:
    return only(objects, "ConfigMap", "advrec")["data"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- rendering and schemas --------------------------------------------------------------------

def test_overlay_renders_expected_objects(objects: list[Obj]) -> None:
    # configMapGenerator appends a content hash to the script's ConfigMap name.
    kinds = sorted(re.sub(r"^(ConfigMap/advrec-topics-script)-[a-z0-9]+$", r"\1-<hash>",
                          f"{o['kind']}/{o['metadata']['name']}") for o in objects)
    assert kinds == [
        "ConfigMap/advrec",
        "ConfigMap/advrec-topics-script-<hash>",
        "Deployment/advrec",
        "Job/advrec-topics",
        "NetworkPolicy/advrec",
        "NetworkPolicy/advrec-topics",
        "PodDisruptionBudget/advrec",
        "ScaledObject/advrec",
        "Service/advrec",
        "ServiceAccount/advrec",
        "ServiceMonitor/advrec",
    ]
    assert all(o["metadata"].get("namespace") == "advrec" for o in objects)


@pytest.mark.parametrize("version", [K8S_MIN_VERSION, "latest"])
def test_builtin_objects_validate_against_kubernetes_schema(
        objects: list[Obj], version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate missing: pip install -e '.[dev]'")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    checked = 0
    for obj in objects:
        if obj["kind"] in ("ScaledObject", "ServiceMonitor"):
            continue  # CRDs: test_custom_resources_validate_against_their_crd_models
        # strict: unknown fields (typos) are errors too
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked == len(objects) - 2


def _unknown_fields(given: Any, parsed: Any, path: str = "") -> list[str]:
    """Return the paths in ``given`` that the model dropped (pydantic ignores unknown keys)."""
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            return [path or "/"]
        out = []
        for key, value in given.items():
            if key not in parsed:
                out.append(f"{path}/{key}")
            else:
                out += _unknown_fields(value, parsed[key], f"{path}/{key}")
        return out
    if isinstance(given, list) and isinstance(parsed, list):
        return [p for i, (a, b) in enumerate(zip(given, parsed, strict=False))
                for p in _unknown_fields(a, b, f"{path}/{i}")]
    return []


def test_custom_resources_validate_against_their_crd_models(objects: list[Obj]) -> None:
    # cloudcoil's models are generated from the KEDA and Prometheus Operator CRD schemas:
    # pydantic checks types and required fields, _unknown_fields catches misspelt keys.
    keda = pytest.importorskip(
        "cloudcoil.models.keda.v1alpha1",
        reason="cloudcoil-models-keda missing: pip install -e '.[dev]'")
    monitoring = pytest.importorskip(
        "cloudcoil.models.prometheus_operator.v1",
        reason="cloudcoil-models-prometheus-operator missing: pip install -e '.[dev]'")
    models = {"ScaledObject": keda.ScaledObject, "ServiceMonitor": monitoring.ServiceMonitor}
    for kind, model in models.items():
        obj = only(objects, kind)
        parsed = model.model_validate(obj).model_dump(by_alias=True, exclude_none=True,
                                                      mode="json")
        assert _unknown_fields(obj, parsed) == [], f"{kind} has fields its CRD lacks"


def test_crd_check_catches_a_misspelt_field(objects: list[Obj]) -> None:
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1",
                               reason="cloudcoil-models-keda missing: pip install -e '.[dev]'")
    obj = json.loads(json.dumps(only(objects, "ScaledObject")))
    obj["spec"]["maxReplicaCont"] = 8
    parsed = keda.ScaledObject.model_validate(obj).model_dump(by_alias=True, exclude_none=True,
                                                              mode="json")
    assert _unknown_fields(obj, parsed) == ["/spec/maxReplicaCont"]


# -- the pod ----------------------------------------------------------------------------------

def test_trainer_is_a_native_sidecar(objects: list[Obj]) -> None:
    spec = pod_spec(objects)
    assert [c["name"] for c in spec["initContainers"]] == ["trainer"]
    assert [c["name"] for c in spec["containers"]] == ["worker"]
    trainer, worker = spec["initContainers"][0], spec["containers"][0]
    assert trainer["restartPolicy"] == "Always"
    assert trainer["args"] == ["trainer"]
    assert worker["args"] == ["worker"]
    assert trainer["image"] == worker["image"]
    assert "command" not in trainer and "command" not in worker  # the image's ENTRYPOINT


def test_worker_probes(objects: list[Obj]) -> None:
    worker = container(objects, "worker")
    probes = {kind: worker[kind]["httpGet"]
              for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert {p["port"] for p in probes.values()} == {"http"}
    assert worker["ports"] == [{"name": "http", "containerPort": 6066, "protocol": "TCP"}]
    # The start-up budget covers RocksDB recovery: at least two minutes.
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_trainer_liveness_and_no_readiness(objects: list[Obj]) -> None:
    trainer = container(objects, "trainer")
    assert trainer["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "trainer-metrics"}
    assert "readinessProbe" not in trainer  # would gate the pod's readiness
    assert trainer["ports"] == [
        {"name": "trainer-metrics", "containerPort": 9108, "protocol": "TCP"}]


def test_pod_security_context(objects: list[Obj]) -> None:
    for spec in (pod_spec(objects), only(objects, "Job")["spec"]["template"]["spec"]):
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert ctx["runAsUser"] == 10001
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False


def test_every_container_is_locked_down(objects: list[Obj]) -> None:
    for where, c in all_containers(objects):
        ctx = c["securityContext"]
        assert ctx["runAsNonRoot"] is True, where
        assert ctx["runAsUser"] == 10001, where
        assert ctx["allowPrivilegeEscalation"] is False, where
        assert ctx["readOnlyRootFilesystem"] is True, where
        assert ctx["capabilities"] == {"drop": ["ALL"]}, where
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where


def test_every_container_has_requests_and_limits(objects: list[Obj]) -> None:
    for where, c in all_containers(objects):
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where} {bound}"


def test_writable_paths_are_emptydirs_where_settings_point(objects: list[Obj]) -> None:
    spec, settings = pod_spec(objects), config(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert all("emptyDir" in v for v in volumes.values())
    mounts = {name: {m["mountPath"]: m["name"] for m in container(objects, name)["volumeMounts"]}
              for name in ("worker", "trainer")}
    assert settings["ADVREC_DATA_DIR"] in mounts["worker"]
    assert settings["ADVREC_CHECKPOINT_DIR"] in mounts["trainer"]
    # Worker and trainer share nothing but Kafka: each has a bundle directory of its own
    # (the worker's is a cache of the bundle topic, the trainer's a copy of what it sent).
    bundles = settings["ADVREC_BUNDLE_DIR"]
    assert mounts["worker"][bundles] != mounts["trainer"][bundles], "bundle dir shared"
    assert not set(mounts["worker"].values()) & set(mounts["trainer"].values())


def test_configmap_keys_are_the_settings_env_names(objects: list[Obj]) -> None:
    expected = dict(EXPECTED_CONFIG)
    if only(objects, "Deployment")["spec"]["template"]["spec"].get("nodeSelector"):
        expected["ADVREC_ORT_PROVIDERS"] = "cuda,cpu"
    assert config(objects) == expected
    for where, c in all_containers(objects):
        assert c["envFrom"] == [{"configMapRef": {"name": "advrec"}}], where


def test_configmap_is_what_the_settings_read(objects: list[Obj]) -> None:
    # Every key is a field of the worker's or the trainer's settings, and both parse the
    # whole ConfigMap: a misspelt key would be silently ignored by the app.
    pytest.importorskip("torch", reason="the trainer extra is not installed")
    settings = config(objects)
    fields = {f"{ENV_PREFIX}{f.name.upper()}"
              for cls in (Settings, TrainerSettings) for f in dataclasses.fields(cls)}
    assert set(settings) - fields == set(), "keys no settings read"
    worker = from_env(Settings, ENV_PREFIX, settings)
    trainer = from_env(TrainerSettings, ENV_PREFIX, settings)
    assert worker.partitions == 8 and worker.web_bind == "0.0.0.0"
    assert trainer.trainer_metrics_bind == "0.0.0.0"
    assert worker.topic_bundles == trainer.topic_bundles == "model-bundles"
    assert worker.bundles_keep == trainer.bundles_keep


def test_settings_fit_the_containers(objects: list[Obj]) -> None:
    settings = config(objects)
    trainer = container(objects, "trainer")
    assert int(settings["ADVREC_TRAINER_THREADS"]) == int(trainer["resources"]["limits"]["cpu"])
    # Both servers must listen beyond loopback for probes, Service and Prometheus.
    assert settings["ADVREC_WEB_BIND"] == settings["ADVREC_TRAINER_METRICS_BIND"] == "0.0.0.0"
    assert int(settings["ADVREC_WEB_PORT"]) == container(objects, "worker")["ports"][0][
        "containerPort"]
    assert int(settings["ADVREC_TRAINER_METRICS_PORT"]) == trainer["ports"][0]["containerPort"]


def test_pod_ip_and_admin_token_env(objects: list[Obj]) -> None:
    env = {e["name"]: e for e in container(objects, "worker")["env"]}
    assert env["ADVREC_WEB_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["ADVREC_ADMIN_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "advrec-admin", "key": "token", "optional": True}}
    assert not [o for o in objects if o["kind"] == "Secret"], "no Secret is committed"


def test_recommended_labels_everywhere(objects: list[Obj]) -> None:
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        missing = [k for k in RECOMMENDED_LABELS if k not in labels]
        if obj["kind"] not in ("ServiceAccount", "ConfigMap"):  # shared, no component
            assert not missing, f"{where} lacks {missing}"
        else:
            assert missing in ([], ["app.kubernetes.io/component"]), f"{where} lacks {missing}"
        template = obj.get("spec", {}).get("template", {}).get("metadata")
        if template:
            assert all(k in template["labels"] for k in RECOMMENDED_LABELS), where


# -- around the pod ---------------------------------------------------------------------------

def test_service_monitor_pdb_and_policy_select_the_worker_pods(objects: list[Obj]) -> None:
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    job_labels = only(objects, "Job")["spec"]["template"]["metadata"]["labels"]

    service = only(objects, "Service")
    assert selects(service["spec"]["selector"], pod_labels)
    assert not selects(service["spec"]["selector"], job_labels)
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (6066, "http"), "trainer-metrics": (9108, "trainer-metrics")}

    monitor = only(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]} == {
        ("http", "/metrics"), ("trainer-metrics", "/metrics")}

    pdb = only(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert not selects(pdb["spec"]["selector"]["matchLabels"], job_labels)

    policy = only(objects, "NetworkPolicy", "advrec")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {6066, 9108}


def test_scaledobject_scales_on_clicks_lag_up_to_the_partition_count(
        objects: list[Obj]) -> None:
    scaled, settings = only(objects, "ScaledObject"), config(objects)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == only(objects, "Deployment")["metadata"]["name"]
    assert spec["maxReplicaCount"] == int(settings["ADVREC_PARTITIONS"]) == 8
    assert spec["minReplicaCount"] >= 1
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["topic"] == "clicks"
    assert meta["consumerGroup"] == settings["ADVREC_APP_ID"] == "advrec"  # Faust's group id
    assert meta["bootstrapServers"] == settings["ADVREC_BROKER"].removeprefix("kafka://")
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    # KEDA owns the replica count: a `replicas` field would reset it on every apply.
    assert "replicas" not in only(objects, "Deployment")["spec"]


def test_topics_job_runs_the_shared_script(objects: list[Obj]) -> None:
    job = only(objects, "Job", "advrec-topics")
    spec = job["spec"]["template"]["spec"]
    [c] = spec["containers"]
    assert c["image"] == "apache/kafka:3.9.1"
    assert spec["restartPolicy"] in ("OnFailure", "Never")
    [script_volume] = [v for v in spec["volumes"] if "configMap" in v]
    script_map = only(objects, "ConfigMap", script_volume["configMap"]["name"])
    script = script_map["data"]["create-topics.sh"]
    assert script == (BASE / "create-topics.sh").read_text()
    mount = next(m for m in c["volumeMounts"] if m["name"] == script_volume["name"])
    assert c["command"] == ["/bin/bash", f"{mount['mountPath']}/create-topics.sh"]


def test_create_topics_script_creates_the_eight_topics() -> None:
    script = (BASE / "create-topics.sh").read_text()
    assert subprocess.run(["bash", "-n", str(BASE / "create-topics.sh")],
                          check=False).returncode == 0
    creates = dict(re.findall(r'^create ("\$\{[A-Z_]+:-[a-z-]+\}"|\S+) ("\$PARTITIONS"|\d+)',
                              script, re.MULTILINE))
    assert creates == {"clicks": '"$PARTITIONS"', "clicks-dlq": '"$PARTITIONS"',
                       "train-batches": "1", '"${ADVREC_TOPIC_BUNDLES:-model-bundles}"': "1",
                       '"${ADVREC_TOPIC_CHECKPOINTS:-trainer-checkpoints}"': "1",
                       '"${ADVREC_TOPIC_FLAGS:-user-flags}"': "1", "items": "1",
                       "items-dlq": "1"}
    assert "--if-not-exists" in script


def test_the_catalogue_topic_gets_the_settings_the_app_creates_it_with() -> None:
    # a catalogue topic that is not compacted keeps every old version of every item, and
    # every reader (the trainer) reads them all at start-up
    from advrec.topics import ITEMS_CONFIG

    script = (BASE / "create-topics.sh").read_text()
    [raw] = re.findall(r"^create items 1 (.*)$", script, re.MULTILINE)
    assert dict(kv.split("=", 1) for kv in raw.split()) == ITEMS_CONFIG


def test_the_channel_topics_get_the_settings_the_app_creates_them_with() -> None:
    # The Job and `advrec worker` / `advrec trainer` (which create missing topics themselves)
    # must agree on compaction and sizes: a bundle topic that is never compacted grows
    # without bound, and a too small max.message.bytes refuses every chunk.
    from advrec.topics import CHANNEL_CONFIG

    script = (BASE / "create-topics.sh").read_text()
    [raw] = re.findall(r'^CHANNEL="([^"]*)"', script, re.MULTILINE)
    assert dict(kv.split("=", 1) for kv in raw.split()) == CHANNEL_CONFIG
    for topic in ("ADVREC_TOPIC_BUNDLES", "ADVREC_TOPIC_CHECKPOINTS"):
        assert re.search(rf'^create "\$\{{{topic}:-[a-z-]+\}}" 1 \$CHANNEL$', script,
                         re.MULTILINE), topic


# -- overlays ---------------------------------------------------------------------------------

def test_gpu_limit_only_in_gpu_overlay(objects_of) -> None:
    for overlay in ("cpu", "gpu"):
        objects = objects_of(overlay)
        gpus = {name: c["resources"].get("limits", {}).get("nvidia.com/gpu")
                for name, c in all_containers(objects)}
        spec = pod_spec(objects)
        image = container(objects, "worker")["image"]
        if overlay == "gpu":
            assert gpus.pop("Deployment/advrec/worker") == 1
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                spec["tolerations"])
            assert config(objects)["ADVREC_ORT_PROVIDERS"] == "cuda,cpu"
            assert image.endswith("-gpu")
        else:
            assert "nodeSelector" not in spec and "tolerations" not in spec
            assert config(objects)["ADVREC_ORT_PROVIDERS"] == "cpu"
            assert not image.endswith("-gpu")
        assert set(gpus.values()) == {None}, f"{overlay}: unexpected GPU limits {gpus}"


# -- security scan ----------------------------------------------------------------------------

def test_checkov_config_gives_a_reason_for_every_skip() -> None:
    text = CHECKOV_CONFIG.read_text()
    skips = yaml.safe_load(text)["skip-check"]
    assert skips, "nothing skipped: drop the list instead"
    for check in skips:
        line = next(line for line in text.splitlines() if re.match(rf"\s*- {check}\b", line))
        reason = line.partition("#")[2].strip()
        assert len(reason) > 20, f"{check} is skipped without a reason"


def test_checkov_finds_nothing_on_the_rendered_manifests(
        render, checkov: str, overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"advrec-{overlay}.yaml"
    manifest.write_text(render(overlay))
    result = subprocess.run(
        [checkov, "--config-file", str(CHECKOV_CONFIG), "-f", str(manifest), "-o", "json"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})"
              for r in reports for c in r["results"]["failed_checks"]]
    assert failed == [], "checkov findings (fix, or skip with a reason in k8s/.checkov.yaml)"
    assert sum(r["summary"]["passed"] for r in reports) > 100, "checkov checked nothing"
    assert result.returncode == 0, result.stderr[-2000:]
