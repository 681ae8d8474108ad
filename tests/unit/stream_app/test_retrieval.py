"""Two-stage ranking: the index's candidates, rescored, give the exact path's top k where the
index is exact; seen rows never return; a bundle whose index cannot be built is refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from advrec.bundle import TWO_STAGE_ITEMS, BundleError
from stream_app import retrieval
from stream_app.hotswap import BundleWatcher
from stream_app.metrics import StreamMetrics
from stream_app.retrieval import IndexConfig
from stream_app.serving import ModelServer, load_model
from stream_app.settings import load_settings
from tests.bundles import publish_toy, toy_two_stage

N_ITEMS = 300
VOCAB = [f"i{n}" for n in range(N_ITEMS)]
EVERY = IndexConfig(min_items=0, candidates=N_ITEMS)  # the index returns every row: exact


def histories(n: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[VOCAB[i] for i in rng.choice(N_ITEMS, int(rng.integers(1, 15)), replace=False)]
            for _ in range(n)]


def items_npy(table: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    return buf.getvalue()


def test_two_stage_and_exact_paths_return_the_same_top_k(tmp_path: Path) -> None:
    version = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS))
    exact = load_model(tmp_path, version)
    staged = load_model(tmp_path, version, index=EVERY)
    assert exact.path == "exact" and staged.path == "two_stage" and staged.session is None
    users = histories(40)
    ks = [10] * 20 + [1, 5, 50, 200] * 5
    assert staged.recommend_batch(users, ks) == exact.recommend_batch(users, ks)
    for user in users[:5]:  # batch 1 as well
        assert staged.recommend_batch([user], [10]) == exact.recommend_batch([user], [10])


def test_two_stage_finds_the_exact_top_10_with_fewer_candidates(tmp_path: Path) -> None:
    version = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS))
    exact = load_model(tmp_path, version)
    staged = load_model(tmp_path, version, index=IndexConfig(min_items=0, candidates=50))
    users = histories(50, seed=1)
    got = staged.recommend_batch(users, [10] * len(users))
    want = exact.recommend_batch(users, [10] * len(users))
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]) >= 0.95


@pytest.mark.parametrize("linked", [None, [1, 2, 3, 4, 5]])
def test_seen_rows_never_come_back_on_either_path(tmp_path: Path, linked) -> None:
    # the linked rows (as the prior's links would) name seen rows as candidates too
    version = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS, linked=linked))
    users = [[*VOCAB[:5], *h] for h in histories(30, seed=2)]
    for model in (load_model(tmp_path, version),
                  load_model(tmp_path, version, index=IndexConfig(min_items=0, candidates=20))):
        for user, top in zip(users, model.recommend_batch(users, [50] * len(users)),
                             strict=True):
            assert len(top) == 50 and 0 not in top
            assert not set(top) & set(model.known_rows(user)), model.path


def test_fewer_candidates_than_k_returns_what_is_left(tmp_path: Path) -> None:
    vocab = VOCAB[:6]
    version = publish_toy(tmp_path, vocab, two_stage=toy_two_stage(len(vocab)))
    staged = load_model(tmp_path, version, index=IndexConfig(min_items=0, candidates=3))
    exact = load_model(tmp_path, version)
    user = [vocab[:2]]
    assert staged.recommend_batch(user, [10]) == exact.recommend_batch(user, [10])
    assert len(staged.recommend_batch(user, [10])[0]) == 4
    assert staged.recommend_batch([vocab], [10]) == [[]]  # everything seen: nothing left


def test_the_switch_is_by_catalogue_size_and_needs_the_parts(tmp_path: Path) -> None:
    with_parts = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS))
    without = publish_toy(tmp_path, VOCAB, seed=1)
    assert load_model(tmp_path, with_parts, index=IndexConfig(min_items=N_ITEMS)).path \
        == "two_stage"
    assert load_model(tmp_path, with_parts, index=IndexConfig(min_items=N_ITEMS + 1)).path \
        == "exact"
    assert load_model(tmp_path, without, index=EVERY).path == "exact"
    assert load_settings({}).index.use_for(200_000)
    assert not load_settings({}).index.use_for(199_999)
    assert load_settings({"ADVREC_TWO_STAGE_ITEMS": "0"}).index.use_for(1)


def broken_table(kind: str) -> dict[str, bytes]:
    parts = toy_two_stage(N_ITEMS)
    table = np.load(io.BytesIO(parts[TWO_STAGE_ITEMS]))
    if kind == "nan":
        table[7, 0] = np.nan
    elif kind == "short":
        table = table[:-1]
    elif kind == "float64":
        table = table.astype(np.float64)
    elif kind == "not_npy":
        parts[TWO_STAGE_ITEMS] = b"not an array"
        return parts
    parts[TWO_STAGE_ITEMS] = items_npy(table)
    return parts


@pytest.mark.parametrize("kind", ["nan", "short", "float64", "not_npy"])
def test_a_table_no_index_can_be_built_over_is_refused(tmp_path: Path, kind: str) -> None:
    version = publish_toy(tmp_path, VOCAB, two_stage=broken_table(kind))
    with pytest.raises(BundleError) as info:
        load_model(tmp_path, version, index=EVERY)
    assert info.value.reason == "bad_index"


async def test_a_bundle_whose_index_fails_is_rejected_and_the_old_one_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = StreamMetrics.create()
    server = ModelServer(metrics=metrics)
    watcher = BundleWatcher(tmp_path, server, metrics=metrics, index=EVERY)
    good = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS))
    assert await watcher.activate(good)
    assert server.current is not None and server.current.path == "two_stage"
    assert metrics.registry.get_sample_value("advrec_index_build_seconds_count") == 1
    before = await server.recommend(VOCAB[:3], 10)

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    bad = publish_toy(tmp_path, VOCAB, seed=1, two_stage=toy_two_stage(N_ITEMS, seed=1))
    monkeypatch.setattr(retrieval.ItemIndex, "__init__", fail)
    assert not await watcher.activate(bad)
    assert watcher.rejected == {bad: "bad_index"}
    assert metrics.registry.get_sample_value(
        "advrec_bundles_rejected_total", {"reason": "bad_index"}) == 1
    assert server.current.version == good
    assert await server.recommend(VOCAB[:3], 10) == before
    await server.stop()


def test_two_stage_keeps_no_bundle_bytes_but_still_verifies_the_model(tmp_path: Path) -> None:
    version = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS))
    staged = load_model(tmp_path, version, index=EVERY)
    assert staged.bundle.model_bytes == b"" and staged.bundle.two_stage is None
    (tmp_path / version / "model.onnx").write_bytes(b"corrupt")
    with pytest.raises(BundleError) as info:
        load_model(tmp_path, version, index=EVERY)
    assert info.value.reason == "checksum_mismatch"
