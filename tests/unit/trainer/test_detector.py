"""The fake-user detector: its graph, its training against synthesized attacks, the filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advrec.attacks import AttackConfig, inject
from advrec.suspicion import FEATURES
from advrec.synthetic import SyntheticConfig, synthetic_events
from trainer.detector import DetectorConfig, OnlineDetector, TrainingFilter, UserRecord
from trainer.evaluate import build_examples
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


def decided(guard: TrainingFilter, logit: float) -> TrainingFilter:
    """Make ``guard``'s detector trained and give every user ``logit`` (20: flag everybody
    scored, -20: nobody)."""
    guard.detector.trained = True
    last = guard.detector.classifier.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, logit)
    return guard


def observing(learner: OnlineLearner, events: list, **cfg: object) -> OnlineDetector:
    """A detector that has counted ``events``' clicks, as the sidecar counts every batch."""
    det = OnlineDetector(learner, DetectorConfig(min_clicks=5, **cfg))  # type: ignore[arg-type]
    examples = list(build_examples(events, SMALL.max_len))
    for i in range(0, len(examples), 256):
        det.observe(examples[i : i + 256])
    return det


def test_the_graph_gives_every_named_feature_and_explains_the_logit(trained) -> None:
    learner, records, events = trained
    det = observing(learner, events, seed=1)
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
    for kind in ("random", "bandwagon"):
        stream, labels = inject(events, AttackConfig(kind=kind, budget=0.1, filler=15,
                                                     seed=3))
        det = observing(learner, stream, seed=2, steps_per_round=100)
        reals = list(records.items())
        for _ in range(3):
            det.train_round(reals)
        assert det.trained and det.last_round["train_recall"] > 0.5
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
    det = observing(learner, trained[2], seed=4, outlier_mads=3.0)
    reals = [(u, r) for u, r in records.items() if r.behaviour.clicks >= 5]
    det.train_round(reals)
    logit = det.logits([r for _, r in reals])
    median = np.median(logit)
    bar = median + 3.0 * np.median(np.abs(logit - median))
    floor = np.log(det.cfg.threshold / (1 - det.cfg.threshold))
    assert det.threshold_logit == pytest.approx(max(floor, bar), rel=1e-6, abs=1e-9)
    assert (det.flags([r for _, r in reals]) == (logit >= det.threshold_logit)).all()
    # robust: with a tenth of the recent users scoring far out (an attack among them), the
    # bar stays below them, where the 99th percentile would have risen to their own score
    la = np.concatenate([logit, np.full(len(logit) // 10, logit.max() + 30.0)])
    med_a = np.median(la)
    assert med_a + 3.0 * np.median(np.abs(la - med_a)) < la.max() - 1.0
    assert np.quantile(la, 0.99) == pytest.approx(la.max())


def test_the_filter_drops_flagged_users_examples_and_keeps_the_rest(trained) -> None:
    learner, _, events = trained
    cfg = DetectorConfig(min_clicks=2, hold_batches=0, warmup_rounds=0)
    guard = decided(TrainingFilter(learner, cfg), -20.0)  # nobody is flagged...
    batch = list(build_examples(events[:300], SMALL.max_len))
    assert guard.admit(batch, 0) == batch
    decided(guard, 20.0)  # ...everybody scored is
    kept = guard.admit(list(build_examples(events[300:600], SMALL.max_len)), 1)
    assert all(guard.records[ex.user].behaviour.clicks < 2 for ex in kept)
    assert guard.filtered == 300 - len(kept) > 0


def test_the_detector_exports_to_onnx_that_agrees_with_torch_and_travels_in_the_bundle(
        trained, tmp_path) -> None:
    from advrec.bundle import bundle_files, load_bundle, write_bundle
    from advrec.suspicion import behaviour_features
    from trainer.export import check_detector_parity, detector_model, export_detector

    learner, records, events = trained
    det = observing(learner, events, seed=5)
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


def test_item_stats_read_a_burst_and_pairs_that_others_click_together() -> None:
    from trainer.detector import ItemStats

    stats = ItemStats(half_life=100, window=2, links=8)
    # rows 1-4 clicked steadily as pairs (1, 2) and (3, 4); then row 5, never seen, 60 times
    steady = [((1,), 2), ((3,), 4)] * 200
    stats.observe(steady)
    stats.observe([((), 5)] * 60)
    t = stats.tables(6)
    assert t["burst"][5] > 3.0 > abs(float(t["burst"][2]))
    assert t["pop_pct"][2] > t["pop_pct"][5] and t["pop_pct"][0] == 0
    # a boost imagines extra recent clicks on a row: its burst rises
    boost = np.zeros(6)
    boost[2] = 500.0
    assert stats.tables(6, boost)["burst"][2] > 1.0
    from trainer.detector import Classifier, DetectorGraph

    graph = DetectorGraph(stats.tables(6), 2, torch.zeros(12), torch.ones(12), Classifier(12))
    rows = torch.tensor([[0, 1, 2, 1, 2], [0, 0, 1, 5, 3]])  # (2, 5): linked and unlinked pairs
    c = graph.content(rows)  # (2, 6)
    coherence, unlinked = c[:, 3], c[:, 4]
    assert coherence[0] > coherence[1] and unlinked[0] == 0 and unlinked[1] == 1
    assert c[0, 2] == pytest.approx(0.25) and c[1, 2] == 0  # one repeat of 4 clicks; none


def test_a_flag_stays_until_readmitted_and_flagged_clicks_still_count(trained) -> None:
    learner, _, events = trained
    guard = decided(TrainingFilter(learner, DetectorConfig(min_clicks=2, warmup_rounds=0)), 20.0)
    guard.admit(list(build_examples(events[:300], SMALL.max_len)), 0)
    flagged = set(guard.flagged)
    assert flagged
    clicks = guard.detector.stats.clicks
    decided(guard, -20.0)  # the detector changes its mind...
    later = list(build_examples(events[300:600], SMALL.max_len))
    kept = guard.admit(later, 1)
    assert flagged <= guard.flagged  # ...the flag stays
    assert not any(ex.user in flagged for ex in kept)
    assert guard.detector.stats.clicks == clicks + len(later)  # every click counted


def test_a_new_users_clicks_on_bursting_items_wait_until_the_user_can_be_scored(
        trained) -> None:
    from advrec.contract import TrainingExample

    learner, _, events = trained
    cfg = DetectorConfig(min_clicks=3, hold_batches=2, hold_burst=0.5, warmup_rounds=0)
    guard = decided(TrainingFilter(learner, cfg), -20.0)  # nobody is flagged
    guard.admit(list(build_examples(events[:2000], SMALL.max_len)), 0)

    def click(user: str, item: str, ts: int) -> TrainingExample:
        return TrainingExample(user=user, history=[], item=item, ts=ts)

    hot = "brand-new"  # never clicked before: it bursts at its first clicks
    first = [click(f"n{k}", hot, 10**13 + k) for k in range(3)]
    assert guard.admit(first, 1) == []  # three new users, one click each: all wait
    assert {"n0", "n1", "n2"} <= set(guard.held)
    # n0 reaches min_clicks with a clean score: its waiting click comes out with the new ones
    more = [click("n0", hot, 10**13 + 10), click("n0", hot, 10**13 + 11)]
    out = guard.admit(more, 2)
    assert [ex.user for ex in out].count("n0") == 3
    # n1 is flagged before it can be scored: its waiting click is dropped, counted as filtered;
    # n2, idle since batch 1, has waited hold_batches: its click is released (a session too
    # short to judge)
    assert "n2" in guard.held
    guard.flagged.add("n1")
    filtered = guard.filtered
    out = guard.admit([click("n1", hot, 10**13 + 12)], 3)
    assert "n1" not in guard.held and guard.filtered == filtered + 2
    assert [ex.user for ex in out] == ["n2"] and "n2" not in guard.held


def test_a_readmitted_user_trains_again_and_is_not_flagged_again(trained) -> None:
    learner, _, events = trained
    cfg = DetectorConfig(min_clicks=2, hold_batches=0, warmup_rounds=0)
    guard = decided(TrainingFilter(learner, cfg), 20.0)  # everybody scored is flagged
    guard.admit(list(build_examples(events[:300], SMALL.max_len)), 0)
    user = next(iter(guard.flagged))
    assert guard.readmit(user) and not guard.readmit(user)  # a second time: not flagged
    later = [ex for ex in build_examples(events[:1200], SMALL.max_len)][300:]
    kept = guard.admit(later, 1)
    assert user not in guard.flagged
    assert any(ex.user == user for ex in kept) == any(ex.user == user for ex in later)


def test_nobody_is_flagged_before_the_detector_has_trained_its_warm_up_rounds(trained) -> None:
    learner, _, events = trained
    cfg = DetectorConfig(min_clicks=2, warmup_rounds=2)
    guard = decided(TrainingFilter(learner, cfg), 20.0)  # it would flag everybody...
    examples = list(build_examples(events[:600], SMALL.max_len))
    guard.detector.rounds = 1
    guard.admit(examples[:300], 0)
    assert not guard.flagged  # ...but has trained one round of two
    guard.detector.rounds = 2
    guard.admit(examples[300:], 1)
    assert guard.flagged


def test_the_filter_keeps_counters_of_the_most_recently_active_users_only(trained) -> None:
    learner, _, events = trained
    guard = TrainingFilter(learner, DetectorConfig(min_clicks=2, max_users=20))
    examples = list(build_examples(events[:1000], SMALL.max_len))
    kept = guard.admit(examples, 0)
    assert len(guard.records) == 20
    latest = list(dict.fromkeys(ex.user for ex in reversed(examples)))[:20]
    assert set(guard.records) == set(latest)
    assert len(kept) + sum(len(v) for v in guard.held.values()) == len(examples)  # none lost


@pytest.mark.parametrize(("logit", "as_real"), [(-3.0, True), (5.0, False)])
def test_users_the_detector_finds_more_likely_fake_are_not_taken_as_real_examples(
        trained, logit: float, as_real: bool) -> None:
    learner, _, events = trained
    cfg = DetectorConfig(min_clicks=2, hold_batches=0, warmup_rounds=0, threshold=0.999)
    guard = decided(TrainingFilter(learner, cfg), logit)  # P(fake) 0.05 or 0.993: no flag
    given: list[list[str]] = []
    guard.detector.train_round = lambda reals: given.append([u for u, _ in reals]) or {}
    examples = list(build_examples(events[:2560], SMALL.max_len))
    for bi in range(TrainingFilter.ROUND_EVERY):
        guard.admit(examples[bi * 256:(bi + 1) * 256], bi)
    assert not guard.flagged and len(given) == 1
    scored = {u for u, z in guard.latest.items() if z == pytest.approx(logit)}
    assert len(scored) > 50
    # unflagged users scored as likely fakes stay out of the round's real examples (an
    # attack in progress would otherwise teach the next detector to pass it)
    assert (scored <= set(given[0])) == as_real and (scored & set(given[0]) == set()) != as_real
