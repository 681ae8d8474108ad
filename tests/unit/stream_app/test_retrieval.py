"""Two-stage ranking: the index's candidates, rescored, give the exact path's top k where the
index is exact; seen rows never return; a bundle whose index cannot be built is refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from advrec.bundle import TWO_STAGE_ITEMS, BundleError, encode_item_rows, int8_rows, item_rows
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
    elif kind == "int8_without_exponent":
        table = np.zeros((len(table), 1), dtype=np.int8)
    elif kind == "int8_overflowing":  # 127 * 2**127 is past float32's largest
        table = int8_rows(item_rows(table))
        table[7, 0], table[7, -1] = 127, 127
    elif kind == "float16_inf":
        table = item_rows(table).astype(np.float16)
        table[7, 0] = np.inf
    elif kind == "not_npy":
        parts[TWO_STAGE_ITEMS] = b"not an array"
        return parts
    parts[TWO_STAGE_ITEMS] = items_npy(table)
    return parts


@pytest.mark.parametrize("kind", ["nan", "short", "float64", "int8_without_exponent",
                                  "int8_overflowing", "float16_inf", "not_npy"])
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


def test_an_int8_table_is_served_as_the_float32_rows_it_stands_for(tmp_path: Path) -> None:
    parts = toy_two_stage(N_ITEMS)
    values = item_rows(int8_rows(np.load(io.BytesIO(parts[TWO_STAGE_ITEMS]))))  # (V+1, D)
    stored = encode_item_rows(values)
    assert stored.dtype == np.int8  # 9 bytes a row instead of 32
    parts[TWO_STAGE_ITEMS] = items_npy(stored)
    staged = load_model(tmp_path, publish_toy(tmp_path, VOCAB, two_stage=parts), index=EVERY)
    assert staged.two_stage is not None
    rows = np.arange(1, N_ITEMS + 1)
    assert np.array_equal(staged.two_stage.index.vectors(rows), values[1:])
    # the toy's exact graph keeps the float32 rows: the lists agree but for near ties
    exact = load_model(tmp_path, publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS)))
    users = histories(40, seed=5)
    got = staged.recommend_batch(users, [10] * len(users))
    want = exact.recommend_batch(users, [10] * len(users))
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]) >= 0.9


def test_two_stage_keeps_no_bundle_bytes_but_still_verifies_the_model(tmp_path: Path) -> None:
    version = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS))
    staged = load_model(tmp_path, version, index=EVERY)
    assert staged.bundle.model_bytes == b"" and staged.bundle.two_stage is None
    (tmp_path / version / "model.onnx").write_bytes(b"corrupt")
    with pytest.raises(BundleError) as info:
        load_model(tmp_path, version, index=EVERY)
    assert info.value.reason == "checksum_mismatch"


def test_a_refreshed_index_holds_the_new_vectors_and_leaves_the_old_one_as_it_was() -> None:
    rng = np.random.default_rng(3)
    old_table = rng.normal(size=(N_ITEMS + 1, 8)).astype(np.float32)
    old_table[0] = 0.0
    old = retrieval.ItemIndex(old_table, EVERY)
    assert not old.refreshed
    new_table = np.concatenate([old_table + 0.3 * rng.normal(size=old_table.shape),
                                rng.normal(size=(20, 8))]).astype(np.float32)  # 20 new rows
    new_table[0] = 0.0
    new = retrieval.ItemIndex(new_table, EVERY, previous=old)
    assert new.refreshed and len(new) == N_ITEMS + 20
    rows = np.arange(1, N_ITEMS + 21).reshape(1, -1)
    assert np.array_equal(new.vectors(rows)[0], new_table[1:])
    assert np.array_equal(old.vectors(rows[:, :N_ITEMS])[0], old_table[1:])  # still serving
    users = rng.normal(size=(5, 8)).astype(np.float32)
    exact = np.argsort(-(users @ new_table[1:].T), axis=1)[:, :10] + 1  # (5, 10)
    assert np.array_equal(new.search(users, 10), exact)


def test_an_index_over_stored_int8_rows_holds_their_float32_rows_built_or_refreshed() -> None:
    from advrec.bundle import int8_rows, item_rows

    rng, table, _ = first_index(9)
    stored = int8_rows(table)  # (V+1, D+1): items.npy's form
    first = retrieval.ItemIndex(stored, EVERY)
    rows = np.arange(1, N_ITEMS + 1).reshape(1, -1)
    assert first.dim == 8 and np.array_equal(first.vectors(rows)[0], item_rows(stored)[1:])
    moved_stored = int8_rows(moved(item_rows(stored), rng, extra=20))
    second = retrieval.ItemIndex(moved_stored, EVERY, previous=first)
    assert second.refreshed and len(second) == N_ITEMS + 20
    rows = np.arange(1, N_ITEMS + 21).reshape(1, -1)
    assert np.array_equal(second.vectors(rows)[0], item_rows(moved_stored)[1:])


@pytest.mark.parametrize("why", ["always afresh", "other width"])
def test_an_index_is_built_afresh_in_the_load_when_it_cannot_be_refreshed(why: str) -> None:
    import dataclasses

    rng = np.random.default_rng(4)
    table = rng.normal(size=(N_ITEMS + 1, 8)).astype(np.float32)
    config = EVERY
    old = retrieval.ItemIndex(table, config)
    if why == "always afresh":
        config = dataclasses.replace(EVERY, rebuild_after_s=0.0)
    else:
        table = rng.normal(size=(N_ITEMS + 1, 9)).astype(np.float32)
    new = retrieval.ItemIndex(table, config, previous=old)
    assert not new.refreshed and new.rebuild is None
    assert new.built_at >= old.built_at and len(new) == len(table) - 1


def moved(table: np.ndarray, rng: np.random.Generator, extra: int = 0) -> np.ndarray:
    """``table`` [V+1, D] moved a little, with ``extra`` new rows: the next bundle's."""
    out = np.concatenate([table + 0.3 * rng.normal(size=table.shape),
                          rng.normal(size=(extra, table.shape[1]))]).astype(np.float32)
    out[0] = 0.0
    return out


def first_index(seed: int) -> tuple[np.random.Generator, np.ndarray, retrieval.ItemIndex]:
    """A random table [V+1, 8] and its index, built afresh: (rng, table, index)."""
    rng = np.random.default_rng(seed)
    table = moved(np.zeros((N_ITEMS + 1, 8), dtype=np.float32), rng)
    return rng, table, retrieval.ItemIndex(table, EVERY)


def due_index(seed: int) -> tuple[np.random.Generator, np.ndarray, retrieval.ItemIndex]:
    """As ``first_index``, its graph old enough to be built afresh."""
    rng, table, index = first_index(seed)
    index.built_at -= EVERY.rebuild_after_s
    return rng, table, index


def finds_the_exact_top_10(index: retrieval.ItemIndex, table: np.ndarray,
                           rng: np.random.Generator) -> bool:
    """Whether ``index`` finds the exact top 10 rows of ``table`` for 5 random users."""
    users = rng.normal(size=(5, table.shape[1])).astype(np.float32)
    exact = np.argsort(-(users @ table[1:].T), axis=1)[:, :10] + 1  # (5, 10)
    return np.array_equal(index.search(users, 10), exact)


def holds_the_rows_of(index: retrieval.ItemIndex, table: np.ndarray) -> bool:
    """Whether ``index`` stores exactly ``table``'s rows 1..V."""
    rows = np.arange(1, len(table)).reshape(1, -1)
    return len(index) == len(table) - 1 and np.array_equal(index.vectors(rows)[0], table[1:])


def test_the_next_load_refreshes_the_spare_graph_in_place_once_its_index_is_gone() -> None:
    rng, table, first = first_index(9)
    graph = first.index
    second_table = moved(table, rng, 3)
    second = retrieval.ItemIndex(second_table, EVERY, previous=first)
    assert second.refreshed and not second.reused and second.index is not graph
    assert second.spare is not None and second.spare[1] is graph
    del first  # its model left the server: nobody can search its graph any more
    table = moved(second_table, rng, 5)
    third = retrieval.ItemIndex(table, EVERY, previous=second)
    assert third.refreshed and third.reused and third.index is graph  # no copy
    assert holds_the_rows_of(third, table) and finds_the_exact_top_10(third, table, rng)
    assert second.spare is None and third.spare is not None and third.spare[1] is second.index
    assert holds_the_rows_of(second, second_table)  # the live graph was not touched
    assert finds_the_exact_top_10(second, second_table, rng)


def test_a_spare_whose_index_may_still_serve_is_copied_not_overwritten() -> None:
    rng, first_table, first = first_index(10)
    second = retrieval.ItemIndex(moved(first_table, rng), EVERY, previous=first)
    # ``first`` still held, as by a request admitted under its model: its graph is read
    table = moved(first_table, rng, 2)
    third = retrieval.ItemIndex(table, EVERY, previous=second)
    assert third.refreshed and not third.reused
    assert third.index is not first.index and third.index is not second.index
    assert holds_the_rows_of(first, first_table)
    assert finds_the_exact_top_10(first, first_table, rng)
    assert holds_the_rows_of(third, table) and finds_the_exact_top_10(third, table, rng)


def test_without_a_spare_graph_every_refresh_copies_the_live_graph() -> None:
    import dataclasses

    config = dataclasses.replace(EVERY, spare=False)
    rng, table, first = first_index(11)
    second = retrieval.ItemIndex(moved(table, rng), config, previous=first)
    graph = first.index
    del first
    table = moved(table, rng, 4)
    third = retrieval.ItemIndex(table, config, previous=second)
    assert second.spare is None and third.refreshed and not third.reused
    assert third.index is not graph and finds_the_exact_top_10(third, table, rng)


@pytest.mark.parametrize("why", ["graph too old", "grown too much"])
def test_a_due_graph_is_rebuilt_in_the_background_while_loads_keep_refreshing(
        why: str) -> None:
    rng, table, first = first_index(4)
    extra = 0
    if why == "graph too old":
        first.built_at -= EVERY.rebuild_after_s
    else:
        extra = int(EVERY.rebuild_growth * N_ITEMS) + 1
    table = moved(table, rng, extra)
    due = retrieval.ItemIndex(table, EVERY, previous=first)
    # the load refreshes as ever, and leaves a fresh graph building behind it
    assert due.refreshed and not due.rebuilt and due.rebuild_started
    assert due.rebuild is not None and due.built_at == first.built_at
    assert due.rebuild.wait(60) and not due.rebuild.failed
    table = moved(table, rng, 7)  # the next bundle moves every row and adds 7
    adopted = retrieval.ItemIndex(table, EVERY, previous=due)
    assert adopted.refreshed and adopted.rebuilt and adopted.rebuild is None
    assert adopted.spare is None and due.spare is None  # the old graph is no spare of it
    assert adopted.built_at > first.built_at and adopted.built_rows == len(due)
    assert adopted.rebuild_seconds is not None and not adopted.due(EVERY)
    rows = np.arange(1, len(table)).reshape(1, -1)
    assert np.array_equal(adopted.vectors(rows)[0], table[1:])
    assert finds_the_exact_top_10(adopted, table, rng)
    assert len(due) == len(table) - 1 - 7  # the graph it lent was not grown


def test_a_load_while_the_background_build_runs_refreshes_the_old_graph_and_hands_it_on(
        ) -> None:
    rng, table, first = due_index(5)
    due = retrieval.ItemIndex(moved(table, rng), EVERY, previous=first)
    pending = due.rebuild
    assert pending is not None
    pending.wait(60)
    pending._thread = _Running()  # as if the build were still going
    nxt = retrieval.ItemIndex(moved(table, rng), EVERY, previous=due)
    assert nxt.refreshed and not nxt.rebuilt and not nxt.rebuild_started
    assert nxt.rebuild is pending and nxt.built_at == first.built_at


def test_a_failed_background_build_leaves_the_old_graph_serving_and_is_started_again(
        ) -> None:
    rng, table, first = due_index(6)
    due = retrieval.ItemIndex(moved(table, rng), EVERY, previous=first)
    assert due.rebuild is not None and due.rebuild.wait(60)
    due.rebuild.failed.append(RuntimeError("out of memory"))
    table = moved(table, rng)
    nxt = retrieval.ItemIndex(table, EVERY, previous=due)
    assert nxt.refreshed and not nxt.rebuilt and nxt.built_at == first.built_at
    assert nxt.rebuild_started and nxt.rebuild is not due.rebuild  # still due: tried again
    assert finds_the_exact_top_10(nxt, table, rng)


def test_a_background_graph_is_taken_over_once_even_if_that_load_is_refused() -> None:
    rng, table, first = due_index(7)
    live = retrieval.ItemIndex(moved(table, rng), EVERY, previous=first)
    assert live.rebuild is not None and live.rebuild.wait(60)
    refused = retrieval.ItemIndex(moved(table, rng, 30), EVERY, previous=live)
    assert refused.rebuilt  # ... and then its bundle fails its warm-up: dropped
    table = moved(table, rng, 5)  # the next bundle, from the live model again
    nxt = retrieval.ItemIndex(table, EVERY, previous=live)
    assert nxt.refreshed and not nxt.rebuilt and len(nxt) == N_ITEMS + 5
    assert nxt.rebuild_started  # the graph is still due: built again
    assert finds_the_exact_top_10(nxt, table, rng)


def test_a_background_build_that_cannot_start_leaves_the_refreshed_index_serving(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng, table, first = due_index(8)

    def no_memory(*args: object) -> None:
        raise MemoryError("no room for the copy")

    monkeypatch.setattr(retrieval, "_Rebuild", no_memory)
    table = moved(table, rng)
    due = retrieval.ItemIndex(table, EVERY, previous=first)
    assert due.refreshed and due.rebuild is None and not due.rebuild_started
    assert finds_the_exact_top_10(due, table, rng)


class _Running:
    """A thread that never ends, for a build caught in progress."""

    def is_alive(self) -> bool:
        return True

    def join(self, timeout: float | None = None) -> None:
        return None


def test_a_swap_refreshes_the_live_index_and_ranks_as_the_exact_path(tmp_path: Path) -> None:
    first = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS))
    live = load_model(tmp_path, first, index=EVERY)
    second = publish_toy(tmp_path, VOCAB, seed=1, two_stage=toy_two_stage(N_ITEMS, seed=1))
    staged = load_model(tmp_path, second, index=EVERY, previous=live)
    assert staged.two_stage is not None and staged.two_stage.index.refreshed
    exact = load_model(tmp_path, second)
    users = histories(40, seed=2)
    ks = [10] * len(users)
    assert staged.recommend_batch(users, ks) == exact.recommend_batch(users, ks)
    assert live.recommend_batch(users, ks) == load_model(tmp_path, first).recommend_batch(
        users, ks)  # the live model is untouched by its successor's refresh


async def serves_as_the_exact_path(server: ModelServer, root: Path, version: str,
                                   seed: int) -> bool:
    """Whether ``server`` answers 10 random histories with ``version`` and the exact path's
    top 10 of that bundle."""
    exact = load_model(root, version)
    for history in histories(10, seed=seed):
        items, served = await server.recommend(history, 10)
        rows = exact.recommend_batch([history], [10])[0]
        if served != version or items != [VOCAB[r - 1] for r in rows]:
            return False
    return True


async def test_the_watcher_refreshes_the_live_index_and_then_the_spare_in_place(
        tmp_path: Path) -> None:
    metrics = StreamMetrics.create()
    server = ModelServer(metrics=metrics)
    watcher = BundleWatcher(tmp_path, server, metrics=metrics, index=EVERY)
    assert await watcher.activate(publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS)))
    assert server.current is not None and not server.current.two_stage.index.refreshed
    second = publish_toy(tmp_path, VOCAB, seed=1, two_stage=toy_two_stage(N_ITEMS, seed=1))
    assert await watcher.activate(second)
    assert server.current.version == second and server.current.two_stage.index.refreshed
    assert await serves_as_the_exact_path(server, tmp_path, second, seed=5)
    # the first model has left the server: the third refreshes its graph in place
    third = publish_toy(tmp_path, VOCAB, seed=2, two_stage=toy_two_stage(N_ITEMS, seed=2))
    assert await watcher.activate(third)
    assert server.current.version == third and server.current.two_stage.index.reused
    assert await serves_as_the_exact_path(server, tmp_path, third, seed=6)
    assert metrics.registry.get_sample_value("advrec_index_build_seconds_count") == 3
    await server.stop()


async def test_the_watcher_swaps_in_a_graph_rebuilt_in_the_background(tmp_path: Path) -> None:
    metrics = StreamMetrics.create()
    server = ModelServer(metrics=metrics)
    watcher = BundleWatcher(tmp_path, server, metrics=metrics, index=EVERY)
    assert await watcher.activate(publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(N_ITEMS)))
    assert server.current is not None and server.current.two_stage is not None
    server.current.two_stage.index.built_at -= EVERY.rebuild_after_s  # the graph is due
    second = publish_toy(tmp_path, VOCAB, seed=1, two_stage=toy_two_stage(N_ITEMS, seed=1))
    assert await watcher.activate(second)
    pending = server.current.two_stage.index.rebuild
    assert server.current.version == second and pending is not None and pending.wait(60)
    assert metrics.registry.get_sample_value("advrec_index_rebuild_seconds_count") == 0
    third = publish_toy(tmp_path, VOCAB, seed=2, two_stage=toy_two_stage(N_ITEMS, seed=2))
    assert await watcher.activate(third)
    assert server.current.version == third and server.current.two_stage.index.rebuilt
    assert metrics.registry.get_sample_value("advrec_index_rebuild_seconds_count") == 1
    assert await serves_as_the_exact_path(server, tmp_path, third, seed=7)
    await server.stop()
