"""The sidecar with the fake-user detector on: it filters flagged users' examples, reports
them as metrics and ships the detector in its bundles (the live path: tests/integration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advrec.attacks import AttackConfig, inject
from advrec.bundle import load_bundle
from advrec.contract import encode_batch
from advrec.synthetic import SyntheticConfig, synthetic_events
from trainer.evaluate import build_examples


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    tmp = tmp_path_factory.mktemp("sidecar")
    s = load_trainer_settings({
        "ADVREC_TRAINER_DETECTOR": "1", "ADVREC_TRAINER_MODE": "none",
        "ADVREC_TRAINER_DIM": "16", "ADVREC_TRAINER_LAYERS": "1",
        "ADVREC_TRAINER_STEPS_PER_BATCH": "1", "ADVREC_TRAINER_MAX_LEN": "20",
        "ADVREC_BUNDLE_DIR": str(tmp / "bundles"),
        "ADVREC_CHECKPOINT_DIR": str(tmp / "checkpoints")})
    events = list(synthetic_events(SyntheticConfig(n_users=300, n_items=200, seed=3), 14000))
    stream, labels = inject(events, AttackConfig(kind="random", budget=0.05, filler=20,
                                                 start=0.6, end=0.7, seed=1))
    sidecar = Sidecar(s)
    sidecar.build()
    examples = list(build_examples(stream, 20))
    for n, i in enumerate(range(0, len(examples), 256)):
        sidecar.step(encode_batch(examples[i : i + 256]), n)
    return sidecar, labels


def test_the_sidecar_flags_fake_users_and_counts_what_it_filters(ran) -> None:
    sidecar, labels = ran
    f = sidecar.filter
    assert f is not None and f.detector.rounds >= 3
    fake = set(labels.fake_users)
    assert len(f.flagged & fake) >= len(fake) // 2  # most fake users caught...
    assert len(f.flagged - fake) <= len(f.flagged & fake)  # ...more of them than real ones
    reg = sidecar.m.registry
    assert reg.get_sample_value("advrec_trainer_flagged_users") == len(f.flagged)
    assert reg.get_sample_value("advrec_trainer_filtered_examples_total") == f.filtered > 0
    assert reg.get_sample_value("advrec_trainer_detector_rounds") == f.detector.rounds
    assert reg.get_sample_value("advrec_trainer_suspect_users") == len(f.streak)
    # each flag raised for the topic says why: features, then the company it was caught in
    assert {r.user for r in sidecar.flags_out} == f.flagged
    assert all(r.reasons[-1][0] == "company" and r.reasons[-1][1] >= 3
               for r in sidecar.flags_out)
    assert reg.get_sample_value("advrec_trainer_held_examples") == sum(
        len(v) for v in f.held.values())


def test_the_sidecars_bundle_carries_the_detector_checked_and_described(ran) -> None:
    sidecar, _ = ran
    export = sidecar.prepare_export()
    assert export is not None
    bundle = load_bundle(Path(sidecar.s.bundle_dir), export.version)
    assert bundle.detector_bytes
    meta = bundle.meta["detector"]
    assert meta["rounds"] == sidecar.filter.detector.rounds
    assert meta["parity_max_abs"] < 1e-4 and meta["threshold"] == sidecar.filter.detector.threshold


def test_a_trainer_that_resumes_from_the_checkpoint_goes_on_with_the_same_detector(
        ran, tmp_path: Path) -> None:
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    sidecar, _ = ran
    sidecar.save_checkpoint()
    other = Sidecar(load_trainer_settings({
        "ADVREC_TRAINER_DETECTOR": "1", "ADVREC_TRAINER_MODE": "none",
        "ADVREC_TRAINER_DIM": "16", "ADVREC_TRAINER_LAYERS": "1",
        "ADVREC_TRAINER_STEPS_PER_BATCH": "1", "ADVREC_TRAINER_MAX_LEN": "20",
        "ADVREC_BUNDLE_DIR": str(tmp_path / "bundles"),
        "ADVREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}))
    other.build(sidecar.checkpoint_path)
    a, b = sidecar.filter, other.filter
    assert b.detector.rounds == a.detector.rounds and b.flagged == a.flagged
    assert b.streak == a.streak
    assert b.filtered == a.filtered and set(b.records) == set(a.records)
    users = list(a.records.values())[-50:]
    assert np.allclose(a.detector.logits(users), b.detector.logits(users))
    assert np.allclose(a.detector.stats.burst(np.arange(1, 50)),
                       b.detector.stats.burst(np.arange(1, 50)))
