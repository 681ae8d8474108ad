"""Serving: verified sessions, provider report, top-k exclusion, micro-batching, swaps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from advrec.bundle import INPUT_NAME, OUTPUT_NAME, BundleError, write_bundle
from stream_app.hotswap import BundleWatcher
from stream_app.metrics import StreamMetrics
from stream_app.serving import (
    ModelServer,
    ModelTimeout,
    intra_op_threads,
    load_model,
    select_providers,
)
from tests.bundles import publish_toy, toy_detector, toy_model

VOCAB = [f"i{n}" for n in range(30)]


def test_load_model_reports_the_providers_actually_in_use(tmp_path: Path) -> None:
    v = publish_toy(tmp_path, VOCAB)
    model = load_model(tmp_path, v, providers="auto")
    assert model.providers and set(model.providers) <= set(ort.get_available_providers())
    assert model.providers[-1] == "CPUExecutionProvider"


def test_cuda_is_only_requested_when_the_build_offers_it() -> None:
    chosen = select_providers("cuda,cpu")
    assert chosen[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in chosen) == (
        "CUDAExecutionProvider" in ort.get_available_providers())


def test_encode_left_pads_and_skips_unknown_items(tmp_path: Path) -> None:
    model = load_model(tmp_path, publish_toy(tmp_path, VOCAB, max_len=4))
    assert model.encode(["i0", "zzz", "i1"]).tolist() == [0, 0, 1, 2]
    assert model.encode([f"i{n}" for n in range(6)]).tolist() == [3, 4, 5, 6]


def raw_scores(root: Path, version: str, histories: np.ndarray) -> np.ndarray:
    """The bundle's own scores [B, V+1], straight from its graph (no ranking appended)."""
    session = ort.InferenceSession((root / version / "model.onnx").read_bytes(),
                                   providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: histories})[0]


def test_top_k_never_returns_padding_or_seen_rows(tmp_path: Path) -> None:
    vocab = VOCAB[:4]  # rows 1..4
    version = publish_toy(tmp_path, vocab)
    model = load_model(tmp_path, version)
    scores = raw_scores(tmp_path, version, model.encode(["i1"])[None])[0]
    assert model.recommend_batch([["i1"]], [3]) == [sorted([1, 3, 4], key=lambda r: -scores[r])]
    assert model.recommend_batch([vocab], [3]) == [[]]  # everything seen: nothing left
    assert model.recommend_batch([["i0", "i1", "i2"]], [10]) == [[4]]  # k beyond what is left


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"nan": True}, "nan_output"),
    ({"input_name": "tokens"}, "bad_signature"),
    ({"extra_cols": 2}, "vocab_mismatch"),
])
def test_bad_models_are_rejected_with_a_reason(tmp_path: Path, kwargs, reason) -> None:
    v = publish_toy(tmp_path, VOCAB, **kwargs)
    with pytest.raises(BundleError) as info:
        load_model(tmp_path, v)
    assert info.value.reason == reason


@pytest.mark.parametrize(("detector", "ok"), [
    (toy_detector(), True),
    (toy_detector(nan=True), False),  # NaN weights
    (toy_detector(n_terms=3), False),  # explains fewer features than the detector reads
    (b"not a detector", False),
])
def test_a_bundle_is_refused_when_its_detector_does_not_score(tmp_path: Path, detector,
                                                               ok) -> None:
    v = write_bundle(tmp_path, toy_model(len(VOCAB)), VOCAB, {"max_len": 5},
                     detector_bytes=detector)
    if ok:
        assert load_model(tmp_path, v).bundle.detector_bytes == detector
        return
    with pytest.raises(BundleError) as info:
        load_model(tmp_path, v)
    assert info.value.reason == "bad_detector"


def test_a_model_file_that_is_not_onnx_fails_to_load(tmp_path: Path) -> None:
    v = write_bundle(tmp_path, b"not a model", VOCAB, {"max_len": 5})
    with pytest.raises(BundleError) as info:
        load_model(tmp_path, v)
    assert info.value.reason == "load_error"


async def test_concurrent_requests_are_micro_batched_and_exclude_seen(tmp_path: Path) -> None:
    metrics = StreamMetrics.create()
    server = ModelServer(max_batch=16, max_wait_ms=20, metrics=metrics)
    server.swap(load_model(tmp_path, publish_toy(tmp_path, VOCAB)))
    await server.start()
    try:
        histories = [[f"i{n}", f"i{(n + 1) % 30}"] for n in range(16)]
        answers = await asyncio.gather(*(server.recommend(h, 5) for h in histories))
    finally:
        await server.stop()
    for history, answer in zip(histories, answers, strict=True):
        assert answer is not None
        items, _version = answer
        assert len(items) == 5 and not set(items) & set(history)
    sizes = metrics.registry.get_sample_value("advrec_microbatch_size_sum")
    calls = metrics.registry.get_sample_value("advrec_microbatch_size_count")
    assert sizes == 16 and calls < 16  # fewer model calls than requests


def test_prepare_matches_a_row_by_row_left_pad(tmp_path: Path) -> None:
    model = load_model(tmp_path, publish_toy(tmp_path, VOCAB, max_len=4))
    rng = np.random.default_rng(0)
    known = [rng.integers(1, 31, size=n).tolist() for n in (0, 1, 3, 4, 5, 9, 0, 2)]
    model_in, exclude = model.prepare(known)
    assert model_in.shape == (8, 4) and exclude.shape == (8, 10)
    for i, rows in enumerate(known):
        tail = rows[-4:]
        assert model_in[i].tolist() == [0] * (4 - len(tail)) + tail
        assert exclude[i].tolist() == [0] + rows + [0] * (9 - len(rows))
    assert model.prepare([[]])[0].tolist() == [[0, 0, 0, 0]]


async def test_a_batch_runs_on_one_model_even_if_a_swap_lands_after_queueing(
        tmp_path: Path) -> None:
    # the new model has another vocabulary order: rows encoded under the old one are wrong
    server = ModelServer(max_batch=8)
    server.swap(load_model(tmp_path, publish_toy(tmp_path, VOCAB)))
    await server.start()
    new = load_model(tmp_path, publish_toy(tmp_path, VOCAB[::-1]))
    try:
        pending = [asyncio.ensure_future(server.recommend([f"i{n}"], 29)) for n in range(4)]
        await asyncio.sleep(0)  # queued, encoded under the old model, not yet dispatched
        server.swap(new)
        answers = await asyncio.gather(*pending)
    finally:
        await server.stop()
    for n, answer in enumerate(answers):
        assert answer is not None
        items, version = answer
        assert version == new.version
        assert f"i{n}" not in items and len(items) == 29  # its own item excluded, no other


async def test_stop_fails_queued_requests_instead_of_leaving_them_waiting(
        tmp_path: Path) -> None:
    server = ModelServer()
    server.swap(load_model(tmp_path, publish_toy(tmp_path, VOCAB)))
    await server.start()
    server._free = 0  # every model slot busy: the request stays queued
    pending = asyncio.ensure_future(server.recommend(["i1"], 3))
    await asyncio.sleep(0.01)
    assert not pending.done()
    await server.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        await pending


async def test_a_failing_model_call_fails_its_batch_and_the_next_one_is_served(
        tmp_path: Path) -> None:
    server = ModelServer()
    model = load_model(tmp_path, publish_toy(tmp_path, VOCAB))
    server.swap(model)
    await server.start()
    try:
        bad = load_model(tmp_path, publish_toy(tmp_path, VOCAB, seed=4))
        bad.session = None  # type: ignore[assignment]  # run() raises AttributeError
        server.swap(bad)
        with pytest.raises(AttributeError):
            await server.recommend(["i1"], 3)
        server.swap(model)
        answer = await server.recommend(["i1"], 3)
    finally:
        await server.stop()
    assert answer is not None and len(answer[0]) == 3 and answer[1] == model.version


async def test_a_freed_slot_takes_the_next_batch_before_the_finished_one_is_answered(
        tmp_path: Path) -> None:
    server = ModelServer()
    model = load_model(tmp_path, publish_toy(tmp_path, VOCAB))
    real_rank, real_prepare, gate = model.rank, model.prepare, threading.Event()
    answered_at_dispatch: list[bool] = []

    def rank(model_in: np.ndarray, exclude: np.ndarray, k: int) -> Any:
        gate.wait(10)  # the first batch holds the slot until released
        return real_rank(model_in, exclude, k)

    def prepare(known: list[list[int]]) -> Any:
        if gate.is_set():  # encoding the second batch: is the first one answered yet?
            assert first_future is not None
            answered_at_dispatch.append(first_future.done())
        return real_prepare(known)

    model.rank, model.prepare = rank, prepare  # type: ignore[method-assign]
    server.swap(model)
    first_future: asyncio.Future | None = None
    await server.start()
    try:
        first = asyncio.ensure_future(server.recommend(["i0"], 3))
        await asyncio.sleep(0)  # queued, not yet dispatched
        first_future = server._pending[0].future
        await asyncio.sleep(0.05)  # dispatched: its model call waits on the gate
        second = asyncio.ensure_future(server.recommend(["i1"], 3))
        await asyncio.sleep(0.05)  # queued behind the busy slot
        gate.set()
        answers = await asyncio.wait_for(asyncio.gather(first, second), 5)
    finally:
        gate.set()
        await server.stop()
    assert answered_at_dispatch == [False]
    assert all(answer is not None and len(answer[0]) == 3 for answer in answers)


class _SlowQueue:
    """A job queue whose ``get`` returns its job late, as a thread slow to wake would."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay, self.taken = inner, delay, 0

    def put(self, job: Any) -> None:
        self.inner.put(job)

    def get(self) -> Any:
        job = self.inner.get()
        time.sleep(self.delay)
        self.taken += 1
        return job


@pytest.mark.parametrize(("timeout", "taken_first"), [(5.0, True), (0.001, False)])
async def test_the_loop_hands_a_batch_over_but_waits_at_most_the_timeout(
        tmp_path: Path, timeout: float, taken_first: bool) -> None:
    server = ModelServer()
    server.handover_timeout = timeout
    server._jobs = jobs = _SlowQueue(server._jobs, 0.05)  # type: ignore[assignment]
    server.swap(load_model(tmp_path, publish_toy(tmp_path, VOCAB)))
    real_hand_over, taken_on_return = server._hand_over, []

    def hand_over(batch: Any) -> None:
        real_hand_over(batch)
        taken_on_return.append(jobs.taken)

    server._hand_over = hand_over  # type: ignore[method-assign]
    await server.start()
    try:
        answer = await asyncio.wait_for(server.recommend(["i1"], 3), 5)
    finally:
        server._jobs = jobs.inner
        await server.stop()
    assert taken_on_return == [1 if taken_first else 0]  # blocked for the thread, or not
    assert answer is not None and len(answer[0]) == 3  # served either way


@dataclass
class HeldSlot:
    """A started server whose first model call (for ``first``) waits on ``gate``."""

    server: ModelServer
    first: asyncio.Future
    gate: threading.Event
    second_started: threading.Event  # set when the second model call starts
    sizes: list[int]  # the batch size of each model call


@asynccontextmanager
async def held_slot(tmp_path: Path, **options: Any) -> AsyncIterator[HeldSlot]:
    server = ModelServer(**options)
    model = load_model(tmp_path, publish_toy(tmp_path, VOCAB))
    real_rank, sizes, gate, second = model.rank, [], threading.Event(), threading.Event()

    def rank(model_in: np.ndarray, exclude: np.ndarray, k: int) -> Any:
        sizes.append(len(model_in))
        if len(sizes) == 1:
            gate.wait(10)
        elif len(sizes) == 2:
            second.set()
        return real_rank(model_in, exclude, k)

    model.rank = rank  # type: ignore[method-assign]
    server.swap(model)
    await server.start()
    try:
        first = asyncio.ensure_future(server.recommend(["i0"], 3))
        await asyncio.sleep(0.05)  # alone on a slot: nothing else was in the server
        yield HeldSlot(server, first, gate, second, sizes)
    finally:
        gate.set()
        await server.stop()


async def test_a_hung_model_call_times_out_with_a_count_instead_of_waiting_for_ever(
        tmp_path: Path) -> None:
    metrics = StreamMetrics.create()
    async with held_slot(tmp_path, call_timeout_s=0.3, metrics=metrics) as held:
        with pytest.raises(ModelTimeout, match=r"within 0\.3s"):
            await asyncio.wait_for(held.first, 5)
        assert metrics.registry.get_sample_value("advrec_model_timeouts_total") == 1
        held.gate.set()  # the call returns at last: the slot serves again
        answer = await asyncio.wait_for(held.server.recommend(["i1"], 3), 5)
    assert answer is not None and len(answer[0]) == 3


class _ThreadDies(BaseException):
    """Escapes the inference thread's ``except Exception``, as a fatal error would."""


async def test_an_inference_thread_that_dies_is_replaced_at_the_first_timeout(
        tmp_path: Path) -> None:

    metrics = StreamMetrics.create()
    server = ModelServer(call_timeout_s=0.3, metrics=metrics)
    model = load_model(tmp_path, publish_toy(tmp_path, VOCAB))
    real_rank, calls = model.rank, []

    def rank(model_in: np.ndarray, exclude: np.ndarray, k: int) -> Any:
        calls.append(len(model_in))
        if len(calls) == 1:
            raise _ThreadDies
        return real_rank(model_in, exclude, k)

    model.rank = rank  # type: ignore[method-assign]
    server.swap(model)
    hook, threading.excepthook = threading.excepthook, lambda args: None  # quiet the death
    try:
        with pytest.raises(ModelTimeout):
            await server.recommend(["i0"], 3)
    finally:
        threading.excepthook = hook
    assert metrics.registry.get_sample_value("advrec_model_timeouts_total") == 1
    answer = await asyncio.wait_for(server.recommend(["i1"], 3), 5)
    assert answer is not None and len(answer[0]) == 3 and len(calls) == 2
    assert all(t.is_alive() for t in server._workers)
    await server.stop()


async def test_a_batch_takes_at_most_an_even_share_of_the_requests_in_the_server(
        tmp_path: Path) -> None:
    # one slot: half for the model, half for the loop to answer and read meanwhile
    async with held_slot(tmp_path, max_batch=32) as held:
        rest = asyncio.gather(*(held.server.recommend([f"i{n}"], 3) for n in range(1, 10)))
        await asyncio.sleep(0.05)  # queued behind the busy slot: 10 in the server
        held.gate.set()
        first, others = await asyncio.wait_for(asyncio.gather(held.first, rest), 5)
    assert held.sizes == [1, 5, 4]
    assert first is not None and all(answer is not None for answer in others)


async def test_a_slot_whose_call_ends_starts_the_queued_batch_without_the_loop(
        tmp_path: Path) -> None:
    async with held_slot(tmp_path) as held:
        second = asyncio.ensure_future(held.server.recommend(["i1"], 3))
        await asyncio.sleep(0.05)  # queued
        held.gate.set()
        started = held.second_started.wait(5)  # blocks the loop: nothing runs on it meanwhile
        answers = await asyncio.wait_for(asyncio.gather(held.first, second), 5)
    assert started and held.sizes == [1, 1]
    assert all(answer is not None for answer in answers)


async def test_with_two_slots_a_batch_waits_to_fill_its_share_only_until_a_slot_frees(
        tmp_path: Path) -> None:
    async with held_slot(tmp_path, max_batch=32, max_wait_ms=60_000, threads=2) as held:
        # 6 in the server, a share of 2 (two slots and the loop): 2, 2, and 1 left to fill
        group = [asyncio.ensure_future(held.server.recommend([f"i{n}"], 3))
                 for n in range(1, 6)]
        await asyncio.wait_for(asyncio.gather(*group[:4]), 5)
        await asyncio.sleep(0.05)
        assert not group[4].done()  # beside the running batch it waits to fill its share...
        held.gate.set()
        await asyncio.wait_for(group[4], 5)  # ...but not once that slot frees
        await held.first
    assert held.sizes == [1, 2, 2, 1]


async def test_no_usable_history_returns_none_for_the_fallback(tmp_path: Path) -> None:
    server = ModelServer()
    assert await server.recommend(["i1"], 5) is None  # no model yet
    server.swap(load_model(tmp_path, publish_toy(tmp_path, VOCAB)))
    assert await server.recommend(["unknown"], 5) is None
    await server.stop()


def watched(root: Path) -> tuple[StreamMetrics, ModelServer, BundleWatcher]:
    """A model server fed by a watcher over the bundle cache ``root``, counted in metrics."""
    metrics = StreamMetrics.create()
    server = ModelServer(metrics=metrics)
    return metrics, server, BundleWatcher(root, server, metrics=metrics)


async def test_watcher_swaps_new_versions_and_keeps_serving_after_a_bad_one(
        tmp_path: Path) -> None:
    metrics, server, watcher = watched(tmp_path)
    good = publish_toy(tmp_path, VOCAB, seed=1)
    assert await watcher.activate(good) and server.current is not None
    assert server.current.version == good
    bad = publish_toy(tmp_path, VOCAB, seed=2)
    (tmp_path / bad / "model.onnx").write_bytes(b"corrupt")
    assert not await watcher.activate(bad)
    assert server.current.version == good
    assert watcher.rejected == {bad: "checksum_mismatch"}
    assert not await watcher.activate(bad)  # a rejected version is not loaded again
    assert metrics.registry.get_sample_value(
        "advrec_bundles_rejected_total", {"reason": "checksum_mismatch"}) == 1
    newer = publish_toy(tmp_path, VOCAB, seed=3)
    assert await watcher.activate(newer) and server.current.version == newer
    await server.stop()


async def test_a_vocabulary_mismatch_is_rejected(tmp_path: Path) -> None:
    server = ModelServer()
    watcher = BundleWatcher(tmp_path, server)
    model = toy_model(len(VOCAB) + 5)  # scores more columns than the vocabulary has rows
    v = write_bundle(tmp_path, model, VOCAB, {"max_len": 5})
    assert not await watcher.activate(v)
    assert watcher.rejected[v] == "vocab_mismatch" and server.current is None
    await server.stop()


async def test_a_version_rejected_on_the_topic_is_never_loaded(tmp_path: Path) -> None:
    metrics, server, watcher = watched(tmp_path)
    version = publish_toy(tmp_path, VOCAB, seed=1)
    watcher.reject(version, "chunk_gap", "chunk 3 came while chunk 2 was due")
    watcher.reject(version, "chunk_gap", "the same again")  # counted once
    assert not await watcher.activate(version) and server.current is None
    assert metrics.registry.get_sample_value(
        "advrec_bundles_rejected_total", {"reason": "chunk_gap"}) == 1
    await server.stop()


async def test_a_version_pruned_while_it_loads_is_counted_as_pruned_not_remembered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import stream_app.hotswap as hotswap

    metrics, server, watcher = watched(tmp_path)
    version = publish_toy(tmp_path, VOCAB, seed=1)
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / version, saved)
    real_load = hotswap.load_model

    def pruned_midway(root: Path, v: str, **kw: Any) -> Any:
        shutil.rmtree(Path(root) / v)  # the cache's prune got there first
        return real_load(root, v, **kw)

    monkeypatch.setattr(hotswap, "load_model", pruned_midway)
    assert not await watcher.activate(version) and server.current is None
    assert version not in watcher.rejected
    assert metrics.registry.get_sample_value(
        "advrec_bundles_rejected_total", {"reason": "pruned"}) == 1
    assert not metrics.registry.get_sample_value(
        "advrec_bundles_rejected_total", {"reason": "missing"})
    # fetched again, the same version loads
    monkeypatch.setattr(hotswap, "load_model", real_load)
    shutil.copytree(saved, tmp_path / version)
    assert await watcher.activate(version) and server.current.version == version
    await server.stop()


async def test_model_age_counts_from_when_the_newest_batch_was_written_not_event_time(
        tmp_path: Path) -> None:
    metrics, server, watcher = watched(tmp_path)
    now_ms = int(time.time() * 1000)
    model = toy_model(len(VOCAB))
    # a replayed stream: its clicks happened years ago, the batch was cut 5 s ago
    v = write_bundle(tmp_path, model, VOCAB, {"max_len": 5, "last_event_ms": 1_000_000,
                                              "trained_through_ms": now_ms - 5_000})
    assert await watcher.activate(v)
    age = metrics.registry.get_sample_value("advrec_model_age_seconds")
    assert 5.0 <= age < 60.0
    # a bundle from before trained_through_ms existed: the event time, as before
    old = write_bundle(tmp_path, model, VOCAB, {"max_len": 5, "last_event_ms": now_ms - 90_000})
    assert await watcher.activate(old)
    assert 90.0 <= metrics.registry.get_sample_value("advrec_model_age_seconds") < 150.0
    await server.stop()


def test_batched_top_k_agrees_with_a_plain_sort_of_the_bundles_scores(tmp_path: Path) -> None:
    vocab = [f"i{n}" for n in range(39)]  # rows 1..39
    version = publish_toy(tmp_path, vocab, max_len=3)
    model = load_model(tmp_path, version)
    histories = [["i0", "i1"], ["i4"], ["i4", "i5", "i6", "zzz"], vocab[:38], ["i2"], ["i8"] * 4]
    ks = [5, 10, 3, 5, 1, 39]
    got = model.recommend_batch(histories, ks)
    scores = raw_scores(tmp_path, version, np.stack([model.encode(h) for h in histories]))
    for i, history in enumerate(histories):
        seen = {vocab.index(item) + 1 for item in history if item in vocab}
        allowed = [r for r in range(1, 40) if r not in seen]
        assert got[i] == sorted(allowed, key=lambda r: -scores[i, r])[: ks[i]]
    assert got[3] == [39]  # only one row left that is neither padding nor seen
    assert len(got[5]) == 38  # k = 39 asked, one item seen


def test_intra_op_threads_leave_a_core_to_the_event_loop() -> None:
    assert [intra_op_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
