"""The bounded vocabulary: items with no click for ``item_ttl_s`` leave the learner, their
rows are reused, and the bundles and workers carry on without them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from advrec.bundle import load_bundle
from advrec.contract import TrainingExample
from stream_app.retrieval import IndexConfig
from stream_app.serving import load_model
from tests.unit.trainer.planted import SMALL, planted_stream
from trainer.export import publish_bundle
from trainer.learner import OnlineLearner, ReplayBuffer, TrainConfig
from trainer.model import NEG

TTL_S = 600.0  # the planted stream clicks once a second: 10 minutes of event time


def phase(prefix: str, n_batches: int, start_ms: int, seed: int = 0
          ) -> list[list[TrainingExample]]:
    """A planted stream over items named ``prefix``0.. whose clock starts at ``start_ms``."""
    batches = planted_stream(n_batches, 32, n_items=60, n_clusters=6, seed=seed)
    t0 = batches[0][0].ts
    return [[dataclasses.replace(e, item=prefix + e.item, ts=start_ms + e.ts - t0,
                                 history=tuple(prefix + i for i in e.history)) for e in b]
            for b in batches]


def bounded(ttl_s: float = TTL_S, **train: object) -> OnlineLearner:
    return OnlineLearner(SMALL, TrainConfig(mode="none", replay_size=400, item_ttl_s=ttl_s,
                                            **train))


def old_then_new(learner: OnlineLearner) -> tuple[list, list]:
    """Train on items a*, then, an hour later, on items b* whose histories still hold a*."""
    old = phase("a", 6, 0)
    for batch in old:
        learner.train_batch(batch)
    new = phase("b", 6, 3_600_000, seed=1)
    mixed = [[dataclasses.replace(e, history=("a" + e.item[1:], *e.history)) for e in b]
             for b in new]
    return old, mixed


def test_items_without_a_click_for_the_ttl_leave_and_new_items_take_their_rows() -> None:
    learner = bounded()
    old, new = old_then_new(learner)
    n_old = len({e.item for b in old for e in b})
    assert len(learner.vocab) == learner.vocab.n_live == n_old
    stats = learner.train_batch(new[0])
    assert stats["expired_items"] == n_old  # every a* item: an hour without a click
    assert {item for _, item in learner.expired} == {e.item for b in old for e in b}
    assert not any(e.item in learner.vocab for b in old for e in b)
    learner.train_batch([])  # a batch with nothing to train on frees nothing more
    assert learner.expired == []
    for batch in new[1:]:
        learner.train_batch(batch)
    first, n_new = {e.item for e in new[0]}, len({e.item for b in new for e in b})
    # the b* items of the first batch grew the tables; the later ones took the a* rows
    assert len(learner.vocab) == max(n_old + len(first), n_new) < n_old + n_new
    assert learner.generator.n_items == len(learner.vocab)
    assert learner.vocab.n_live == n_new


def test_an_unbounded_learner_keeps_every_item() -> None:
    learner = bounded(ttl_s=0.0)
    _, new = old_then_new(learner)
    for batch in new:
        learner.train_batch(batch)
    assert learner.expire(10**15) == []
    assert learner.vocab.n_live == len(learner.vocab) > 60


def test_a_freed_row_scores_neg_and_is_never_recommended() -> None:
    learner = bounded()
    old = phase("a", 4, 0)
    for batch in old:
        learner.train_batch(batch)
    late = phase("b", 1, 3_600_000, seed=1)[0][:8]  # 8 clicks: most a* rows stay free
    learner.train_batch(late)
    holes = learner.vocab.holes()
    assert len(holes) >= 40
    scores = learner.scores([[e.item for e in late]])[0]  # (V+1,)
    assert np.all(scores[holes] <= NEG / 10)
    assert scores[[learner.vocab.index(e.item) for e in late]].min() > NEG / 10
    top = learner.recommend([late[0].item], k=100, exclude_seen=False)
    assert None not in top and len(top) == learner.vocab.n_live


def test_replay_links_and_counts_forget_the_freed_rows() -> None:
    learner = bounded()
    _, new = old_then_new(learner)
    learner.train_batch(new[0][:4])
    freed = np.array(learner.vocab.holes())
    assert freed.size > 0
    replay = learner.replay
    assert not np.isin(replay.target[: replay.size], freed).any()
    assert not np.isin(replay.history[: replay.size], freed).any()
    assert replay.size > 0  # the b* examples stay
    assert (learner.item_counts[freed] == 0).all()
    idx, val = learner.cooc.table(len(learner.vocab) + 1)
    assert not np.isin(idx[val > 0], freed).any() and (val[freed] == 0).all()


def test_expired_items_in_a_history_are_skipped_like_unknown_ones() -> None:
    learner = bounded()
    _, new = old_then_new(learner)
    stats = [learner.train_batch(b) for b in new]  # histories lead with expired a* items
    assert all(np.isfinite(s["loss_g"]) for s in stats)
    history = new[-1][0].history
    assert learner._encode([history]).tolist() == learner._encode(
        [[i for i in history if i.startswith("b")]]).tolist()
    ranks = learner.target_ranks(new[-1])["A"]
    assert (ranks > 0).all()  # every b* target known and ranked


def test_a_bounded_learner_resumes_exactly_with_its_holes() -> None:
    learner = bounded()
    _, new = old_then_new(learner)
    learner.train_batch(new[0][:4])
    state = learner.state_dict()
    expected = [learner.train_batch(b) for b in new[1:3]]
    resumed = OnlineLearner.from_state_dict(state)
    assert resumed.vocab.holes() == OnlineLearner.from_state_dict(state).vocab.holes() != []
    assert [resumed.train_batch(b) for b in new[1:3]] == expected
    assert resumed.vocab.items() == learner.vocab.items()


def test_replay_forget_closes_the_histories_up() -> None:
    replay = ReplayBuffer(4, 4)
    history = np.array([[0, 1, 2, 3], [0, 0, 2, 5], [4, 5, 6, 7]])
    replay.add(history, np.array([9, 2, 8]), np.random.default_rng(0))
    assert replay.forget(np.array([2, 6])) == 1  # the example that targets 2
    assert replay.size == 2
    assert replay.history[:2].tolist() == [[0, 0, 1, 3], [0, 4, 5, 7]]
    assert replay.target[:2].tolist() == [9, 8]


@pytest.mark.parametrize("path", ["exact", "two_stage"])
def test_a_bundle_leaves_expired_items_out_and_workers_serve_around_them(
        tmp_path: Path, path: str) -> None:
    learner = bounded()
    old = phase("a", 4, 0)
    for batch in old:
        learner.train_batch(batch)
    late = phase("b", 2, 3_600_000, seed=1)
    for batch in late:
        learner.train_batch(batch[:10])
    holes = learner.vocab.holes()
    assert holes
    version = publish_bundle(learner, tmp_path, {}, two_stage_items=1)
    bundle = load_bundle(tmp_path, version)
    assert [bundle.vocab[r - 1] for r in holes] == [None] * len(holes)
    assert not any(i.startswith("a") for i in bundle.vocab if i is not None)
    index = IndexConfig(min_items=0 if path == "two_stage" else 10**9,
                        candidates=len(bundle.vocab))
    model = load_model(tmp_path, version, threads=1, index=index)
    assert model.path == path
    # users whose histories are mostly expired items: those map to nothing, the rest rank
    users = [[e.item[0:0] + "a" + e.item[1:] for e in old[0][:5]] + [e.item]
             for e in late[0][:10]]
    lists = model.recommend_batch(users, [100] * len(users))
    live = {r for r, item in enumerate(bundle.vocab, start=1) if item is not None}
    for user, rows in zip(users, lists, strict=True):
        assert rows and set(rows) <= live  # never a freed row
        assert model.index[user[-1]] not in rows  # the one known history item is excluded
        assert len(rows) == len(live) - 1


def test_the_sidecar_counts_expiries_and_a_click_revives_a_catalogue_item(
        tmp_path: Path) -> None:
    from advrec.catalogue import CatalogueItem
    from advrec.contract import encode_batch
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    sidecar = Sidecar(load_trainer_settings({
        "ADVREC_TRAINER_MODE": "none", "ADVREC_TRAINER_DIM": "16",
        "ADVREC_TRAINER_LAYERS": "1", "ADVREC_TRAINER_STEPS_PER_BATCH": "1",
        "ADVREC_TRAINER_ITEM_TTL_S": str(TTL_S), "ADVREC_TRAINER_CONTENT": "false",
        "ADVREC_BUNDLE_DIR": str(tmp_path / "bundles"),
        "ADVREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}))
    sidecar.build()
    assert sidecar.learner.train_cfg.item_ttl_s == TTL_S
    old = phase("a", 3, 0)
    listed = old[0][0].item
    sidecar.catalogue[listed] = CatalogueItem(listed, "a listed item")
    for n, batch in enumerate(old):
        sidecar.step(encode_batch(batch), n)
    new = phase("b", 2, 3_600_000, seed=1)
    sidecar.step(encode_batch(new[0]), 3)
    n_old = len({e.item for b in old for e in b})
    assert sidecar.m.items_expired._value.get() == n_old
    assert sidecar.m.vocab_size._value.get() == sidecar.learner.vocab.n_live
    assert sidecar.dormant == {listed}  # the one expired item the catalogue lists
    comeback = dataclasses.replace(new[1][0], item=listed)
    sidecar.step(encode_batch([comeback, *new[1][1:]]), 4)
    assert listed in sidecar.learner.vocab and sidecar.dormant == set()
    assert (listed, sidecar.catalogue[listed]) in sidecar.catalogue_in  # to be embedded again
    export = sidecar.prepare_export()
    assert export is not None
    vocab = load_bundle(Path(sidecar.s.bundle_dir), export.version).vocab
    assert listed in vocab and not any(e.item in vocab for b in old for e in b[1:]
                                       if e.item != listed)
