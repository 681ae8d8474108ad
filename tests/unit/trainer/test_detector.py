"""The fake-user detector: its graph, its training against synthesized attacks, the filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advrec.attacks import AttackConfig, inject
from advrec.suspicion import FEATURES
from advrec.synthetic import SyntheticConfig, synthetic_events
from trainer.detector import DetectorConfig, OnlineDetector, UserRecord
from trainer.evaluate import _Guard, build_examples
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig
from trainer.prior import PriorConfig

SMALL = ModelConfig(n_items=256, max_len=12, d_model=16, n_heads=1, n_layers=1, d_disc=8)


@pytest.fixture(scope="module")
def trained() -> tuple[OnlineLearner, dict[str, UserRecord], list]:
    events = list(synthetic_events(SyntheticConfig(n_users=150, n_items=200, seed=7), 6000))
    learner = OnlineLearner(SMALL, TrainConfig(mode="irgan", steps_per_batch=1, seed=0),
                            prior_cfg=PriorConfig(weight=0.0))
    examples = list(build_examples(events, SMALL.max_len))
    records: dict[str, UserRecord] = {}
    for i in range(0, len(examples), 256):
        batch = examples[i : i + 256]
        learner.train_batch(batch)
        for ex in batch:
            records.setdefault(ex.user, UserRecord()).add(ex.item, ex.ts, SMALL.max_len)
    return learner, records, events


def test_the_graph_gives_every_named_feature_and_explains_the_logit(trained) -> None:
    learner, records, _ = trained
    det = OnlineDetector(learner, DetectorConfig(seed=1))
    users = [r for r in records.values() if r.behaviour.clicks >= 5][:8]
    x = det.features(users)
    assert x.shape == (len(users), len(FEATURES)) and torch.isfinite(x).all()
    det.trained = True
    items = det._rows([u.items for u in users])
    from advrec.suspicion import behaviour_features

    beh = torch.tensor([behaviour_features(u.behaviour) for u in users])
    with torch.no_grad():
        p, terms = det.graph()(items, beh)
    assert np.allclose(p.numpy(), det.score(users), atol=1e-6)
    # a feature's term: how far the logit falls when it is reset to a typical value (z = 0)
    z = (x - det.mean) / det.std
    with torch.no_grad():
        full = det.classifier(z)
        reset = z.clone()
        reset[:, 3] = 0
        assert torch.allclose(terms[:, 3], full - det.classifier(reset), atol=1e-5)
    assert terms.shape == (len(users), len(FEATURES))


def test_detector_tells_random_and_bandwagon_fakes_from_real_users(trained) -> None:
    learner, records, events = trained
    det = OnlineDetector(learner, DetectorConfig(seed=2, steps_per_round=100))
    reals = list(records.items())
    for _ in range(3):
        det.train_round(reals)
    assert det.trained and det.last_round["train_recall"] > 0.5
    for kind in ("random", "bandwagon"):
        stream, labels = inject(events, AttackConfig(kind=kind, budget=0.1, filler=15,
                                                     seed=3))
        fakes: dict[str, UserRecord] = {}
        for e in stream:
            if labels.is_fake(e.user):
                fakes.setdefault(e.user, UserRecord()).add(e.item, e.ts, SMALL.max_len)
        fake_scores = det.score(list(fakes.values()))
        real_scores = det.score([r for r in records.values() if r.behaviour.clicks >= 5])
        # AUC: a fake outranks a real user in most pairs
        auc = (fake_scores[:, None] > real_scores[None, :]).mean()
        assert auc > 0.9, (kind, auc)


def test_the_threshold_in_force_sits_far_out_in_the_recent_users_scores(trained) -> None:
    learner, records, _ = trained
    det = OnlineDetector(learner, DetectorConfig(seed=4, outlier_mads=3.0))
    reals = [(u, r) for u, r in records.items() if r.behaviour.clicks >= 5]
    det.train_round(reals)
    logit = det.logits([r for _, r in reals])
    median = np.median(logit)
    bar = median + 3.0 * np.median(np.abs(logit - median))
    assert det.threshold_logit == pytest.approx(max(0.0, bar), rel=1e-6, abs=1e-9)
    assert (det.flags([r for _, r in reals]) == (logit >= det.threshold_logit)).all()
    # robust: with a tenth of the recent users scoring far out (an attack among them), the
    # bar stays below them, where the 99th percentile would have risen to their own score
    la = np.concatenate([logit, np.full(len(logit) // 10, logit.max() + 30.0)])
    med_a = np.median(la)
    assert med_a + 3.0 * np.median(np.abs(la - med_a)) < la.max() - 1.0
    assert np.quantile(la, 0.99) == pytest.approx(la.max())


def test_the_filter_drops_flagged_users_examples_and_keeps_the_rest(trained) -> None:
    learner, _, events = trained
    guard = _Guard(learner, DetectorConfig(min_clicks=2))
    guard.detector.trained = True
    last = guard.detector.classifier.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, -20.0)  # nobody is flagged...
    batch = list(build_examples(events[:300], SMALL.max_len))
    assert guard.admit(batch, 0) == batch
    torch.nn.init.constant_(last.bias, 20.0)  # ...everybody scored is
    kept = guard.admit(list(build_examples(events[300:600], SMALL.max_len)), 1)
    assert all(guard.records[ex.user].behaviour.clicks < 2 for ex in kept)
    assert guard.filtered == 300 - len(kept) > 0


def test_the_detector_exports_to_onnx_that_agrees_with_torch_and_travels_in_the_bundle(
        trained, tmp_path) -> None:
    from advrec.bundle import bundle_files, load_bundle, write_bundle
    from advrec.suspicion import behaviour_features
    from trainer.export import check_detector_parity, detector_model, export_detector

    learner, records, _ = trained
    det = OnlineDetector(learner, DetectorConfig(seed=5))
    det.train_round(list(records.items()))
    model = detector_model(det)
    onnx_bytes = export_detector(model)
    users = list(records.values())[:32]
    items = det._rows([u.items for u in users]).numpy()
    beh = np.array([behaviour_features(u.behaviour) for u in users], dtype=np.float32)
    assert check_detector_parity(model, onnx_bytes, items, beh) < 1e-4
    assert np.allclose(model(torch.from_numpy(items), torch.from_numpy(beh))[0].detach(),
                       det.score(users), atol=1e-5)
    version = write_bundle(tmp_path, b"model", ["a"], {"max_len": 12,
                           "detector": {"threshold": det.threshold}},
                           detector_bytes=onnx_bytes)
    bundle = load_bundle(tmp_path, version)
    assert bundle.detector_bytes == onnx_bytes
    assert bundle.meta["detector"]["threshold"] == det.threshold
    assert "detector.onnx" in [name for name, _ in bundle_files(tmp_path, version)]


def test_a_bundle_whose_detector_does_not_match_its_checksum_is_rejected(tmp_path) -> None:
    from advrec.bundle import BundleError, load_bundle, write_bundle

    version = write_bundle(tmp_path, b"model", ["a"], {"max_len": 4}, detector_bytes=b"det")
    (tmp_path / version / "detector.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError) as err:
        load_bundle(tmp_path, version)
    assert err.value.reason == "checksum_mismatch"
    (tmp_path / version / "detector.onnx").unlink()
    with pytest.raises(BundleError) as err:
        load_bundle(tmp_path, version)
    assert err.value.reason == "missing_model"
