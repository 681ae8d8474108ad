"""The bundle feed without Kafka: records in, cache and target out; what a worker serves."""

from __future__ import annotations

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
        chunks, manifest = split_version(version, bundle_files(self.scratch, version),
                                         chunk_bytes=2048)
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
