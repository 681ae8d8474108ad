"""The worker's per-user suspicion: users an ingest batch changed are scored with the live
bundle's detector (a real onnxruntime session of a toy detector.onnx) and keep the score."""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client import CollectorRegistry

from advrec.bundle import write_bundle
from advrec.contract import ClickEvent
from advrec.suspicion import behaviour_features
from stream_app.metrics import StreamMetrics
from stream_app.serving import ModelServer, load_model
from stream_app.state import UserState
from stream_app.suspicion import score_users
from tests.bundles import TOY_DETECTOR_META, toy_detector, toy_model

VOCAB = [f"i{n}" for n in range(20)]
T0 = 1_700_000_000_000


def server_with(tmp_path: Path, detector: bytes | None) -> ModelServer:
    meta = {"max_len": 5, **({"detector": TOY_DETECTOR_META} if detector else {})}
    version = write_bundle(tmp_path, toy_model(len(VOCAB)), VOCAB, meta,
                           detector_bytes=detector)
    server = ModelServer()
    server.swap(load_model(tmp_path, version))
    return server


def user(clicks: int, gap_ms: int = 30_000) -> UserState:
    s = UserState()
    for n in range(clicks):
        s.apply(ClickEvent("u", VOCAB[n % len(VOCAB)], T0 + n * gap_ms), 50, 10)
    return s


def test_users_with_enough_clicks_get_the_live_detectors_score_and_version(
        tmp_path: Path) -> None:
    metrics = StreamMetrics.create(CollectorRegistry())
    server = server_with(tmp_path, toy_detector())
    few, fast, slow = user(2), user(6, gap_ms=1000), user(9, gap_ms=600_000)
    assert score_users(server, metrics, [few, fast, slow]) == 2
    assert few.suspicion == -1.0 and few.public()["suspicion"] is None  # 2 < min_clicks 3
    for st in (fast, slow):
        # the toy detector: P(fake) = sigmoid(sum of the behaviour features)
        want = 1 / (1 + math.exp(-sum(behaviour_features(st.behaviour))))
        assert abs(st.suspicion - want) < 1e-5
        assert st.suspicion_rounds == TOY_DETECTOR_META["rounds"]
    assert fast.suspicion != slow.suspicion
    assert metrics.registry.get_sample_value("advrec_user_suspicion_count") == 2


def test_without_a_detector_in_the_live_bundle_nobody_is_scored(tmp_path: Path) -> None:
    metrics = StreamMetrics.create(CollectorRegistry())
    st = user(10)
    assert score_users(ModelServer(), metrics, [st]) == 0  # no model at all
    assert score_users(server_with(tmp_path, None), metrics, [st]) == 0
    assert st.suspicion == -1.0
    assert metrics.registry.get_sample_value("advrec_user_suspicion_count") == 0
