"""Checkpoints: atomic replace, exact resume, foreign files rejected."""

from pathlib import Path

import pytest
import torch

from tests.unit.trainer.planted import SMALL, planted_stream
from trainer import checkpoint
from trainer.checkpoint import load_checkpoint, read_extra, save_checkpoint
from trainer.learner import OnlineLearner, TrainConfig


def _trained(n_batches: int = 3) -> tuple[OnlineLearner, list]:
    batches = planted_stream(n_batches + 1, 32, seed=2)
    learner = OnlineLearner(SMALL, TrainConfig(mode="irgan+apr", lr=3e-3, replay_size=200))
    for batch in batches[:n_batches]:
        learner.train_batch(batch)
    return learner, batches[n_batches]


def test_save_load_round_trip_resumes_exactly(tmp_path: Path) -> None:
    learner, next_batch = _trained()
    path = tmp_path / "sub" / "trainer.pt"
    save_checkpoint(path, learner, {"metrics": {"hr@10": 0.3}, "offset": 42})
    resumed, extra = load_checkpoint(path)
    assert extra == {"metrics": {"hr@10": 0.3}, "offset": 42}
    assert resumed.vocab.items() == learner.vocab.items()
    assert resumed.evaluate_batch(next_batch) == learner.evaluate_batch(next_batch)
    assert resumed.train_batch(next_batch) == learner.train_batch(next_batch)
    # no temporary left: the checkpoint and its extra, read without loading the model
    assert sorted(p.name for p in path.parent.iterdir()) == ["trainer.pt", "trainer.pt.json"]
    assert read_extra(path) == extra


def test_a_checkpoint_with_the_vocabulary_as_a_list_still_loads(tmp_path: Path) -> None:
    learner, next_batch = _trained()
    state = learner.state_dict()
    # as checkpoints before the JSON form hold it
    state["format"], state["vocab"] = 1, {"items": learner.vocab.items()}
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "learner": state, "extra": {"n": 3},
                "detector": None}, tmp_path / "earlier.pt")
    resumed, extra = load_checkpoint(tmp_path / "earlier.pt")
    assert extra == {"n": 3} and resumed.vocab.items() == learner.vocab.items()
    assert resumed.evaluate_batch(next_batch) == learner.evaluate_batch(next_batch)


def test_a_state_to_keep_is_a_copy_and_one_to_save_at_once_is_not() -> None:
    learner, _ = _trained(1)
    table = learner.generator.items.emb.weight
    kept, saved = learner.state_dict(), learner.state_dict(keep=False)
    assert kept["generator"]["items.emb.weight"].data_ptr() != table.data_ptr()
    assert saved["generator"]["items.emb.weight"].data_ptr() == table.data_ptr()


def test_a_failed_save_keeps_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    learner, next_batch = _trained(1)
    path = tmp_path / "trainer.pt"
    save_checkpoint(path, learner, {"n": 1})
    learner.train_batch(next_batch)

    def crash(obj: object, fh: object) -> None:
        fh.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, learner, {"n": 2})
    monkeypatch.undo()
    resumed, extra = load_checkpoint(path)
    assert extra == {"n": 1} and resumed.batches_seen == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer.pt", "trainer.pt.json"]
    assert read_extra(path) == {"n": 1}  # the extra of the checkpoint that is there


def test_load_rejects_a_foreign_file(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an advrec trainer checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoints_are_spaced_to_keep_their_cost_within_a_share_of_the_time(
        tmp_path: Path) -> None:
    import time

    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    sidecar = Sidecar(load_trainer_settings({
        "ADVREC_BUNDLE_DIR": str(tmp_path / "b"), "ADVREC_CHECKPOINT_DIR": str(tmp_path / "c"),
        "ADVREC_CHECKPOINT_EVERY_BATCHES": "1", "ADVREC_CHECKPOINT_MIN_INTERVAL_S": "30",
        "ADVREC_CHECKPOINT_MAX_SHARE": "0.1"}))
    sidecar.batches_since_checkpoint = 5
    sidecar.last_checkpoint = time.monotonic() - 60
    assert sidecar.checkpoint_due()  # a cheap checkpoint: the minimum interval rules
    sidecar.checkpoint_cost_s = 25.0  # as at 1M items: at most every 250 s
    assert not sidecar.checkpoint_due()
    sidecar.last_checkpoint = time.monotonic() - 251
    assert sidecar.checkpoint_due()
