"""The bundle feed without Kafka: records in, cache and target out; what a worker serves."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from pathlib import Path

from advrec.bundle import bundle_files, list_versions, write_bundle
from advrec.channel import Assembler, pin_record, pointer_record, split_version, tombstones
from stream_app.feed import BundleFeed
from stream_app.hotswap import BundleWatcher
from stream_app.metrics import StreamMetrics
from stream_app.serving import ModelServer
from stream_app.settings import Settings
from tests.bundles import toy_model

VOCAB = [f"i{n}" for n in range(30)]
Rec = namedtuple("Rec", "key value offset")


class Topic:
    """A list of records standing in for the bundle topic, fed to a feed one by one."""

    def __init__(self, feed: BundleFeed, scratch: Path) -> None:
        self.feed, self.scratch, self.offset = feed, scratch, 0

    def put(self, key: bytes, value: bytes | None) -> None:
        self.feed._handle(Rec(key, value, self.offset))
        self.offset += 1

    def publish(self, version: str, *, seed: int = 0, current: bool = True) -> int:
        write_bundle(self.scratch, toy_model(len(VOCAB), seed=seed), VOCAB,
                     {"max_len": 5, "version": version}, keep=100)
        return self.put_version(version, bundle_files(self.scratch, version), current=current)

    def put_version(self, version: str, files: list[tuple[str, bytes]],
                    meta: dict | None = None, *, current: bool = True) -> int:
        chunks, manifest = split_version(version, files, chunk_bytes=2048, meta=meta)
        for key, value in chunks:
            self.put(key, value)
        self.put(f"manifest/{version}".encode(), manifest.value())
        if current:
            self.put(*pointer_record(version))
        return manifest.chunks


def make_feed(tmp_path: Path, keep: int = 2) -> tuple[BundleFeed, Topic]:
    settings = Settings(bundle_dir=str(tmp_path / "cache"), bundles_keep=keep)
    metrics = StreamMetrics.create()
    watcher = BundleWatcher(settings.bundle_dir, ModelServer(), metrics=metrics)
    feed = BundleFeed(settings, watcher, metrics)
    feed._assembler = Assembler(settings.bundle_dir)
    return feed, Topic(feed, tmp_path / "scratch")


def test_versions_are_rebuilt_into_the_cache_and_the_pointer_is_the_target(
        tmp_path: Path) -> None:
    feed, topic = make_feed(tmp_path)
    topic.publish("v1")
    topic.publish("v2", seed=1)
    snap = feed.snapshot
    assert snap.local == ("v1", "v2") and snap.target == "v2" and snap.position == topic.offset
    assert list_versions(feed.watcher.root) == ["v1", "v2"]
    assert feed.wanted() == "v2"
    assert feed.metrics.registry.get_sample_value("advrec_bundles_assembled_total") == 2


def test_the_cache_keeps_the_newest_versions_and_the_pinned_one(tmp_path: Path) -> None:
    feed, topic = make_feed(tmp_path, keep=2)
    for n in range(3):
        topic.publish(f"v{n}", seed=n)
    assert list_versions(feed.watcher.root) == ["v1", "v2"]
    topic.put(*pin_record("v1", by="ops"))
    assert feed.snapshot.target == "v1" and feed.wanted() == "v1"
    topic.publish("v3", seed=3)
    topic.publish("v4", seed=4)
    assert list_versions(feed.watcher.root) == ["v1", "v3", "v4"]  # pinned + newest two
    topic.put(*pin_record(None, by="ops"))
    topic.publish("v5", seed=5)
    assert list_versions(feed.watcher.root) == ["v4", "v5"]


def test_a_tombstoned_version_leaves_the_cache(tmp_path: Path) -> None:
    feed, topic = make_feed(tmp_path, keep=5)
    n_chunks = topic.publish("v1")
    topic.publish("v2", seed=1)
    for key, value in tombstones("v1", n_chunks):
        topic.put(key, value)
    assert feed.snapshot.local == ("v2",) and list_versions(feed.watcher.root) == ["v2"]


def test_with_nothing_live_a_refused_target_falls_back_to_the_newest_good_one(
        tmp_path: Path) -> None:
    feed, topic = make_feed(tmp_path, keep=5)
    topic.publish("v1")
    topic.publish("v2", seed=1)
    chunks, manifest = split_version("v3", [("model.onnx", b"m" * 5000)], chunk_bytes=2048)
    for key, value in chunks[:-1]:  # a chunk is lost: v3 can never be rebuilt
        topic.put(key, value)
    topic.put(b"manifest/v3", manifest.value())
    topic.put(*pointer_record("v3"))
    assert feed.snapshot.target == "v3" and "v3" not in feed.snapshot.local
    assert feed.wanted() == "v2"
    feed.watcher.rejected["v2"] = "nan_output"
    assert feed.wanted() == "v1"
    assert feed.metrics.registry.get_sample_value(
        "advrec_bundle_chunks_rejected_total", {"reason": "missing_chunks"}) == 1


def test_a_bad_record_is_counted_and_changes_nothing(tmp_path: Path) -> None:
    feed, topic = make_feed(tmp_path)
    topic.publish("v1")
    topic.put(b"not-a-channel-key", b"junk")
    assert feed.snapshot.target == "v1" and feed.snapshot.position == topic.offset
    assert feed.metrics.registry.get_sample_value(
        "advrec_bundle_chunks_rejected_total", {"reason": "bad_record"}) == 1


def test_a_delta_is_rebuilt_from_its_base_which_stays_in_the_cache_and_serves(
        tmp_path: Path) -> None:
    import io

    import numpy as np

    from advrec.bundle import TWO_STAGE_ITEMS, delta_files
    from stream_app.retrieval import IndexConfig
    from stream_app.serving import load_model
    from tests.bundles import toy_two_stage

    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    feed, topic = make_feed(tmp_path, keep=1)
    meta = {"max_len": 5, "last_event_ms": 0}
    base_parts = toy_two_stage(len(VOCAB))
    write_bundle(topic.scratch, toy_model(len(VOCAB)), VOCAB, {**meta, "version": "v1"},
                 two_stage=base_parts)
    topic.put_version("v1", bundle_files(topic.scratch, "v1"))
    vocab = [*VOCAB, "new1", "new2"]
    parts = toy_two_stage(len(vocab))  # the same rows, two more
    base_table, table = (np.load(io.BytesIO(p[TWO_STAGE_ITEMS])) for p in (base_parts, parts))
    table2 = table.copy()
    table2[5] += 1.0  # one row moves
    chain = [("v2", "v1", base_table, VOCAB, table), ("v3", "v2", table, vocab, table2)]
    for version, base, old, old_vocab, new in chain:  # each a delta of the one before
        write_bundle(topic.scratch, None, vocab, {**meta, "version": version},
                     two_stage={**parts, TWO_STAGE_ITEMS: npy(new)},
                     delta=(base, delta_files(old, old_vocab, new, vocab)))
        topic.put_version(version, bundle_files(topic.scratch, version), {"base": base})
    # keep 1: v2 stays as v3's base, v1 as the newest whole bundle
    assert feed.snapshot.local == ("v1", "v2", "v3") and feed.snapshot.target == "v3"
    assert list_versions(feed.watcher.root) == ["v1", "v2", "v3"]
    assert feed.metrics.registry.get_sample_value("advrec_bundle_deltas_total") == 2
    assert np.array_equal(np.load(feed.watcher.root / "v3" / TWO_STAGE_ITEMS), table2)
    # a delta has no exact graph: it is ranked in two stages whatever the switch says
    config = IndexConfig(min_items=10**9)
    fresh = load_model(feed.watcher.root, "v3", index=config)
    assert fresh.path == "two_stage" and fresh.bundle.vocab[-1] == "new2"
    users = [["new1"], ["i3", "new2"], ["i7"]]
    assert all(fresh.recommend_batch(users, [3] * 3))
    # loaded over the live v1 (its base), v2 takes v1's vocabulary and id -> row map with the
    # new items added instead of decoding its own, and so does v3 over v2; v1 still reads
    # only its own rows
    v1 = load_model(topic.scratch, "v1", index=config)  # as the worker had it live
    v2 = load_model(feed.watcher.root, "v2", index=config, previous=v1)
    v3 = load_model(feed.watcher.root, "v3", index=config, previous=v2)
    assert v3.index is v2.index is v1.index and v3.bundle.vocab == fresh.bundle.vocab
    assert v3.known_rows(["new1", "i0"]) == [31, 1] and v1.known_rows(["new1", "i0"]) == [1]
    assert v3.recommend_batch(users, [3] * 3) == fresh.recommend_batch(users, [3] * 3)
    # a worker that skipped v2 follows the chain back to its live v1
    live = load_model(topic.scratch, "v1", index=config)
    skipped = load_model(feed.watcher.root, "v3", index=config, previous=live)
    assert skipped.index is live.index and skipped.bundle.vocab == fresh.bundle.vocab


def test_a_fresh_worker_whose_deltas_are_all_refused_falls_back_to_their_whole_bundle(
        tmp_path: Path) -> None:
    import io

    import numpy as np

    from advrec.bundle import TWO_STAGE_ITEMS, delta_files
    from advrec.links import npy_bytes
    from tests.bundles import toy_two_stage

    feed, topic = make_feed(tmp_path, keep=1)
    parts = toy_two_stage(len(VOCAB))
    table = np.load(io.BytesIO(parts[TWO_STAGE_ITEMS]))
    meta = {"max_len": 5, "last_event_ms": 0}
    write_bundle(topic.scratch, None, VOCAB, {**meta, "version": "v1"}, two_stage=parts)
    topic.put_version("v1", bundle_files(topic.scratch, "v1"))
    for n in range(2, 6):  # a chain of four deltas, each moving one row
        new = table.copy()
        new[n] += 1.0
        write_bundle(topic.scratch, None, VOCAB, {**meta, "version": f"v{n}"},
                     two_stage={**parts, TWO_STAGE_ITEMS: npy_bytes(new)},
                     delta=(f"v{n - 1}", delta_files(table, VOCAB, new, VOCAB)))
        topic.put_version(f"v{n}", bundle_files(topic.scratch, f"v{n}"), {"base": f"v{n - 1}"})
        table = new
    assert feed.snapshot.local == ("v1", "v4", "v5") and feed.wanted() == "v5"
    for version in ("v5", "v4"):  # each refused as it is tried (say, it does not load)
        feed.watcher.rejected[version] = "vocab_mismatch"
    assert feed.wanted() == "v1"
    feed._prune()
    assert "v1" in list_versions(feed.watcher.root) and feed.wanted() == "v1"


def test_a_delta_whose_base_never_came_is_refused(tmp_path: Path) -> None:
    import io

    import numpy as np

    from advrec.bundle import TWO_STAGE_ITEMS, delta_files
    from tests.bundles import toy_two_stage

    feed, topic = make_feed(tmp_path)
    loop = asyncio.new_event_loop()  # the worker's, where refusals are recorded
    feed._main = loop
    parts = toy_two_stage(len(VOCAB))
    table = np.load(io.BytesIO(parts[TWO_STAGE_ITEMS]))
    write_bundle(topic.scratch, None, VOCAB, {"max_len": 5, "version": "v2"}, two_stage=parts,
                 delta=("v1", delta_files(table, VOCAB, table, VOCAB)))
    topic.put_version("v2", bundle_files(topic.scratch, "v2"), {"base": "v1"})
    topic.put(*pointer_record("v2"))
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert "v2" not in feed.snapshot.local and feed.wanted() is None
    assert feed.watcher.rejected == {"v2": "bad_delta"}
    assert feed.metrics.registry.get_sample_value(
        "advrec_bundles_rejected_total", {"reason": "bad_delta"}) == 1
