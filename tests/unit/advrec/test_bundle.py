"""Bundle format: atomic publish, pointer, pruning, and verification failures by reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advrec.bundle import (
    CURRENT,
    BundleError,
    list_versions,
    load_bundle,
    read_current,
    set_current,
    write_bundle,
)

META = {"max_len": 5}


def test_write_bundle_publishes_and_points_current(tmp_path: Path) -> None:
    v = write_bundle(tmp_path, b"model", ["a", "b"], dict(META))
    assert read_current(tmp_path) == v
    b = load_bundle(tmp_path, v)
    assert b.vocab == ("a", "b") and b.model_bytes == b"model" and b.max_len == 5
    assert sorted(p.name for p in (tmp_path / v).iterdir()) == [
        "meta.json", "model.onnx", "vocab.json"]


def test_versions_increase_and_old_ones_are_pruned_but_never_current(tmp_path: Path) -> None:
    versions = [write_bundle(tmp_path, b"m%d" % i, ["a"], dict(META), keep=3)
                for i in range(5)]
    assert versions == sorted(versions) and len(set(versions)) == 5
    assert list_versions(tmp_path) == versions[-3:]
    set_current(tmp_path, versions[-3])
    write_bundle(tmp_path, b"m", ["a"], dict(META), keep=1, make_current=False)
    assert versions[-3] in list_versions(tmp_path)


def test_no_temporary_directory_is_left_behind(tmp_path: Path) -> None:
    write_bundle(tmp_path, b"m", ["a"], dict(META))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_read_current_is_none_before_anything_is_published(tmp_path: Path) -> None:
    assert read_current(tmp_path) is None
    assert list_versions(tmp_path / "missing") == []


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: (d / "model.onnx").write_bytes(b"tampered"), "checksum_mismatch"),
    (lambda d: (d / "model.onnx").unlink(), "missing_model"),
    (lambda d: (d / "meta.json").unlink(), "missing_meta"),
    (lambda d: (d / "meta.json").write_text("{not json"), "bad_meta"),
    (lambda d: (d / "vocab.json").write_text('["a"]'), "checksum_mismatch"),
])
def test_load_bundle_rejects_damage_with_its_reason(tmp_path: Path, damage, reason) -> None:
    v = write_bundle(tmp_path, b"model", ["a", "b"], dict(META))
    damage(tmp_path / v)
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path, v)
    assert info.value.reason == reason


def test_load_bundle_rejects_a_vocabulary_that_disagrees_with_meta(tmp_path: Path) -> None:
    v = write_bundle(tmp_path, b"model", ["a", "b"], dict(META))
    meta_path = tmp_path / v / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["vocab_size"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path, v)
    assert info.value.reason == "vocab_mismatch"


def test_a_vocabulary_may_hold_freed_rows_but_no_id_twice(tmp_path: Path) -> None:
    v = write_bundle(tmp_path, b"model", ["a", None, "c", None], dict(META))
    assert load_bundle(tmp_path, v).vocab == ("a", None, "c", None)
    bad = write_bundle(tmp_path, b"model", ["a", None, "a"], dict(META))
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path, bad)
    assert info.value.reason == "vocab_mismatch"


def test_set_current_refuses_a_missing_version(tmp_path: Path) -> None:
    with pytest.raises(BundleError):
        set_current(tmp_path, "0000000000000")


def test_writers_sharing_a_pid_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Two processes that are both PID 1 in their containers may share a volume; threads of
    one process share a PID too, so concurrent pointer updates from threads pin it."""
    import threading

    versions = [write_bundle(tmp_path, b"m", ["a"], {"max_len": 2}) for _ in range(2)]
    errors: list[BaseException] = []

    def flip(n: int) -> None:
        try:
            for i in range(200):
                set_current(tmp_path, versions[(n + i) % 2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=flip, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert read_current(tmp_path) in versions
    assert not list(tmp_path.glob(f".{CURRENT}.tmp-*"))
