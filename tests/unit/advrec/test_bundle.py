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
from tests.bundles import count_fsyncs

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


def test_a_bundle_is_fsynced_unless_it_is_a_cache(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    synced = count_fsyncs(monkeypatch)
    durable = write_bundle(tmp_path / "durable", b"model", ["a", "b"], dict(META))
    assert len(synced) >= 4  # model, vocab, meta, the directories, CURRENT
    synced.clear()
    cached = write_bundle(tmp_path / "cache", b"model", ["a", "b"], dict(META), sync=False)
    assert synced == []
    # written the same way otherwise: whole, under its name, pointed at
    assert read_current(tmp_path / "cache") == cached
    assert load_bundle(tmp_path / "cache", cached).model_bytes == load_bundle(
        tmp_path / "durable", durable).model_bytes == b"model"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


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


# ---------------------------------------------------------------------------- deltas


def _npy(array) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _parts(table) -> dict[str, bytes]:
    from advrec.bundle import TWO_STAGE_ITEMS, TWO_STAGE_RESCORE, TWO_STAGE_USER

    return {TWO_STAGE_USER: b"user", TWO_STAGE_RESCORE: b"rescore", TWO_STAGE_ITEMS: _npy(table)}


def _base_and_delta(trainer: Path, form: str = "float16"):
    """A full bundle and a delta after it, as the trainer writes them: rows 2 and 4 changed,
    item b's row freed, two items added; the tables stored as ``form`` (float16 or int8)."""
    import numpy as np

    from advrec.bundle import delta_files, encode_item_rows, int8_rows, item_rows

    def stored(table):  # (N, 3) float32 -> items.npy's array in ``form``
        rows = item_rows(int8_rows(table)) if form == "int8" else table.astype(np.float16)
        out = encode_item_rows(rows)
        assert str(out.dtype) == form
        return out

    rng = np.random.default_rng(0)
    values = rng.normal(size=(8, 3)).astype(np.float32)  # (V+1, D'), 7 items
    values[0] = 0
    later = values.copy()
    later[2] = 0  # b left a bounded vocabulary
    later[4] += 0.5
    old, new = stored(values[:6]), stored(later)  # 5 items, then 7
    vocab0, vocab1 = ["a", "b", "c", "d", "e"], ["a", None, "c", "d", "e", "f", "g"]
    base = write_bundle(trainer, b"model", vocab0, dict(META), two_stage=_parts(old))
    files = delta_files(old, vocab0, new, vocab1)
    delta = write_bundle(trainer, None, vocab1, dict(META), two_stage=_parts(new),
                         delta=(base, files))
    return base, delta, new, files


def _worker_cache(trainer: Path, cache: Path, *versions: str) -> None:
    """Copy what travels on the bundle topic into a reader's cache."""
    from advrec.bundle import bundle_files

    for version in versions:
        (cache / version).mkdir(parents=True)
        for name, data in bundle_files(trainer, version):
            (cache / version / name).write_bytes(data)


def test_a_delta_carries_only_the_changed_rows_and_travels_without_the_whole_table(
        tmp_path: Path) -> None:
    from advrec.bundle import DELTA_CODEC, DELTA_FILES, DELTA_VOCAB, bundle_files, delta_rows

    base, delta, _, files = _base_and_delta(tmp_path)
    assert delta_rows(files).tolist() == [2, 4, 6, 7]
    assert json.loads(files[DELTA_VOCAB]) == {"size": 7, "rows": [[2, None], [6, "f"],
                                                                  [7, "g"]]}
    assert [n for n, _ in bundle_files(tmp_path, delta)] == [
        "user.onnx", "rescore.onnx", *DELTA_FILES, "meta.json"]
    assert "items.npy" in [n for n, _ in bundle_files(tmp_path, base)]
    whole = load_bundle(tmp_path, delta)  # the writer's own copy is whole
    assert not whole.exact and whole.vocab[1] is None and whole.meta["delta"]["base"] == base
    assert whole.meta["delta"]["codec"] == DELTA_CODEC


@pytest.mark.parametrize("form", ["float16", "int8"])
def test_a_reader_rebuilds_a_delta_byte_for_byte_from_its_base(tmp_path: Path,
                                                               form: str) -> None:
    from advrec.bundle import TWO_STAGE_ITEMS, VOCAB_FILE, apply_delta

    base, delta, _, _ = _base_and_delta(tmp_path / "trainer", form)
    cache = tmp_path / "cache"
    _worker_cache(tmp_path / "trainer", cache, base, delta)
    assert not (cache / delta / TWO_STAGE_ITEMS).exists()
    assert apply_delta(cache, delta) and not apply_delta(cache, base)
    for name in (TWO_STAGE_ITEMS, VOCAB_FILE):
        assert ((cache / delta / name).read_bytes()
                == (tmp_path / "trainer" / delta / name).read_bytes())
    rebuilt = load_bundle(cache, delta, model=False)
    assert rebuilt.vocab == ("a", None, "c", "d", "e", "f", "g") and not rebuilt.exact


def test_a_cache_rebuilds_a_delta_without_fsyncs_to_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from advrec.bundle import TWO_STAGE_ITEMS, VOCAB_FILE, apply_delta

    base, delta, _, _ = _base_and_delta(tmp_path / "trainer")
    cache = tmp_path / "cache"
    _worker_cache(tmp_path / "trainer", cache, base, delta)
    synced = count_fsyncs(monkeypatch)
    assert apply_delta(cache, delta, sync=False)
    assert synced == []
    for name in (TWO_STAGE_ITEMS, VOCAB_FILE):
        assert ((cache / delta / name).read_bytes()
                == (tmp_path / "trainer" / delta / name).read_bytes())
    assert not [p for p in (cache / delta).iterdir() if p.name.startswith(".")]


def test_a_delta_steps_int8_rows_across_their_whole_range_and_back_exactly(
        tmp_path: Path) -> None:
    import numpy as np

    from advrec.bundle import TWO_STAGE_ITEMS, apply_delta, delta_files, write_bundle

    rng = np.random.default_rng(5)
    old = rng.integers(-127, 128, size=(6, 5)).astype(np.int8)  # (V+1, D'+1): levels, exp
    new = old.copy()
    new[1, :4] = np.where(old[1, :4] > 0, -127, 127)  # steps of up to 254 levels: they wrap
    new[2, 4] = old[2, 4] - 3  # only the exponent moves
    new[3] = 0  # a row zeroed (a freed item)
    new = np.concatenate([new, rng.integers(-127, 128, size=(2, 5)).astype(np.int8)])
    vocab0, vocab1 = list("abcde"), list("abcdefg")
    trainer = tmp_path / "trainer"
    base = write_bundle(trainer, b"model", vocab0, dict(META), two_stage=_parts(old))
    delta = write_bundle(trainer, None, vocab1, dict(META), two_stage=_parts(new),
                         delta=(base, delta_files(old, vocab0, new, vocab1)))
    cache = tmp_path / "cache"
    _worker_cache(trainer, cache, base, delta)
    assert apply_delta(cache, delta)
    assert np.array_equal(np.load(cache / delta / TWO_STAGE_ITEMS), new)


def test_a_delta_of_small_steps_travels_in_a_fraction_of_its_rows_bytes() -> None:
    import numpy as np

    from advrec.bundle import DELTA_ITEMS, DELTA_ROWS, delta_files, delta_rows, int8_rows

    rng = np.random.default_rng(6)
    table = rng.normal(scale=0.3, size=(20_001, 65)).astype(np.float32)  # (V+1, D')
    moved = table.copy()
    rows = np.sort(rng.choice(np.arange(1, len(table)), 2_000, replace=False))
    moved[rows] += rng.normal(scale=0.01, size=(len(rows), 65))  # a few levels each
    old, new = int8_rows(table), int8_rows(moved)
    vocab = [f"i{k}" for k in range(1, len(table))]
    files = delta_files(old, vocab, new, vocab)
    changed = delta_rows(files)
    assert set(changed) <= set(rows) and len(changed) > 0.9 * len(rows)
    plain = changed.nbytes + new[changed].nbytes  # the rows and their values as arrays
    assert len(files[DELTA_ROWS]) + len(files[DELTA_ITEMS]) < 0.6 * plain


def test_a_delta_an_earlier_trainer_wrote_as_plain_arrays_still_rebuilds(
        tmp_path: Path) -> None:
    import io

    import numpy as np

    from advrec.bundle import (
        DELTA_ITEMS,
        DELTA_ROWS,
        TWO_STAGE_ITEMS,
        apply_delta,
        delta_rows,
        sha256_hex,
    )

    base, delta, new, files = _base_and_delta(tmp_path / "trainer", "int8")
    cache = tmp_path / "cache"
    _worker_cache(tmp_path / "trainer", cache, base, delta)
    rows = delta_rows(files)
    plain = {DELTA_ROWS: _npy(rows), DELTA_ITEMS: _npy(new[rows])}  # no codec: as they are
    meta = json.loads((cache / delta / "meta.json").read_text())
    del meta["delta"]["codec"]
    for name, data in plain.items():
        (cache / delta / name).write_bytes(data)
        meta["delta"]["sha256"][name] = sha256_hex(data)
    (cache / delta / "meta.json").write_text(json.dumps(meta))
    assert apply_delta(cache, delta)
    assert np.array_equal(np.load(io.BytesIO((cache / delta / TWO_STAGE_ITEMS).read_bytes())),
                          new)


def test_a_delta_without_its_base_or_against_another_base_is_refused(tmp_path: Path) -> None:
    import numpy as np

    from advrec.bundle import TWO_STAGE_ITEMS, apply_delta

    base, delta, _, _ = _base_and_delta(tmp_path / "trainer")
    lonely = tmp_path / "lonely"
    _worker_cache(tmp_path / "trainer", lonely, delta)
    with pytest.raises(BundleError) as missing:
        apply_delta(lonely, delta)
    assert missing.value.reason == "bad_delta" and "base" in missing.value.detail
    other = tmp_path / "other"
    _worker_cache(tmp_path / "trainer", other, base, delta)
    table = np.load(other / base / TWO_STAGE_ITEMS)
    table[1] += np.float16(1.0)  # a row the delta does not carry differs in this copy
    np.save(other / base / TWO_STAGE_ITEMS, table)
    with pytest.raises(BundleError) as wrong:
        apply_delta(other, delta)
    assert wrong.value.reason == "bad_delta"
    assert not (other / delta / TWO_STAGE_ITEMS).exists()  # nothing half-written is left
    meta = json.loads((lonely / delta / "meta.json").read_text())
    meta["delta"]["base"] = "../" + base  # only a version beside it can be its base
    (lonely / delta / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as outside:
        apply_delta(lonely, delta)
    assert outside.value.reason == "bad_meta"


@pytest.mark.parametrize("base, vocab", [([], ["a"]), (["a", "b"], ["a", "b"]),
                                         (["a", "b"], ["a", "b", "c", "d"]),
                                         (["a", "b"], ["a", None, "c"])])
def test_a_rebuilt_vocabulary_is_byte_for_byte_the_json_of_the_whole_list(
        base: list, vocab: list) -> None:
    from advrec.bundle import _patched_vocab, appended_items

    changes = [(row, item) for row, item in enumerate(vocab, start=1)
               if row > len(base) or base[row - 1] != item]
    added = appended_items(len(base), len(vocab), changes)
    assert (added is None) == (None in vocab)  # a freed row is not an append
    whole = json.dumps(base, ensure_ascii=False).encode()
    assert _patched_vocab(whole, len(base), len(vocab), changes) == json.dumps(
        vocab, ensure_ascii=False).encode()


@pytest.mark.parametrize("before, after", [(["a"], ["a"]), (["a"], ["a", "b", "c"]),
                                           ([], ["a"]), (["a", "b"], ["a", None, "c"]),
                                           (["a", "b"], ["b", "a"]), (["a", "b"], ["a"])])
def test_a_vocabulary_extended_from_its_last_json_is_the_json_of_the_whole_list(
        before: list, after: list) -> None:
    from advrec.bundle import vocab_json

    previous = (before, vocab_json(before))
    assert vocab_json(after, previous) == json.dumps(after, ensure_ascii=False).encode()


def test_finiteness_read_from_the_stored_rows_agrees_with_the_float32_rows() -> None:
    import numpy as np

    from advrec.bundle import int8_rows, item_rows, item_rows_finite

    rng = np.random.default_rng(5)
    packed = int8_rows(rng.normal(size=(64, 8)).astype(np.float32))  # (N, D+1)
    # the largest levels under the largest exponents: -128 * 2**121 is past float32's range
    packed[:, :-1] = np.where(rng.random((64, 8)) < 0.5, 127, -128)
    packed[3, :2] = [127, -128]
    cases = []
    for exp in range(100, 128):
        stored = packed.copy()
        stored[3, -1] = exp
        cases.append(stored)
    half = item_rows(packed).astype(np.float16)  # (N, D)
    for bad in (np.inf, -np.inf, np.nan):
        broken = half.copy()
        broken[5, 2] = bad
        cases.append(broken)
    plain = item_rows(packed)
    plain_nan = plain.copy()
    plain_nan[1, 1] = np.nan
    cases += [half, plain, plain_nan]
    verdicts = []
    for stored in cases:
        rows = item_rows(stored)
        verdicts.append(item_rows_finite(stored, rows))
        assert verdicts[-1] == bool(np.isfinite(rows).all()), (stored.dtype, stored[3, -1])
        assert item_rows_finite(stored) == verdicts[-1]  # without the widened rows
    assert all(verdicts[:21]) and not any(verdicts[21:28])  # int8: exponents 100..120, 121..127
    assert verdicts[28:] == [False, False, False, True, True, False]


def test_int8_rows_keep_each_value_within_half_a_level_and_round_to_themselves() -> None:
    import numpy as np

    from advrec.bundle import encode_item_rows, int8_rows, item_rows

    rng = np.random.default_rng(3)
    table = rng.normal(size=(200, 16)).astype(np.float32)  # (N, D)
    table *= rng.uniform(1e-3, 10, size=(200, 1)).astype(np.float32)  # rows of every scale
    table[0] = 0  # padding
    table[1] = [127 * 2.0 ** -8] + [0] * 15  # a peak exactly on a power of two's 127 levels
    packed = int8_rows(table)  # (N, D+1)
    assert packed.dtype == np.int8 and packed.shape == (200, 17)
    levels = np.abs(packed[:, :-1].astype(np.int32)).max(axis=1)
    assert levels[0] == 0 and (64 <= levels[1:]).all() and (levels <= 127).all()
    assert packed[1, 0] == 127 and packed[1, -1] == -8  # the smallest scale that holds it
    rounded = item_rows(packed)  # (N, D) float32
    peak = np.abs(table).max(axis=1, keepdims=True)
    assert (np.abs(rounded - table) <= peak / 127 * 1.0001).all()
    assert np.array_equal(item_rows(int8_rows(rounded)), rounded)  # rounding twice: no change
    assert np.array_equal(encode_item_rows(rounded), packed)  # stored as int8 when exact


def test_a_table_is_stored_in_the_smallest_form_that_keeps_its_values_exactly() -> None:
    import numpy as np

    from advrec.bundle import encode_item_rows, item_rows

    rng = np.random.default_rng(4)
    table = rng.normal(size=(10, 4)).astype(np.float32)  # off every int8 grid
    assert encode_item_rows(table).dtype == np.float32
    half = table.astype(np.float16).astype(np.float32)
    assert encode_item_rows(half).dtype == np.float16
    for values in (table, half):
        assert np.array_equal(item_rows(encode_item_rows(values)), values)


@pytest.mark.parametrize("stored", ["int64", "int8_without_exponent", "one_dimensional"])
def test_item_rows_refuse_what_items_npy_never_holds(stored: str) -> None:
    import numpy as np

    from advrec.bundle import item_rows

    array = {"int64": np.zeros((3, 4), dtype=np.int64),
             "int8_without_exponent": np.zeros((3, 1), dtype=np.int8),
             "one_dimensional": np.zeros(3, dtype=np.float32)}[stored]
    with pytest.raises(ValueError):
        item_rows(array)


def test_item_rows_written_into_a_given_array_are_the_rows_made_afresh() -> None:
    import numpy as np

    from advrec.bundle import encode_item_rows, int8_rows, item_rows, item_width

    rng = np.random.default_rng(6)
    table = rng.normal(size=(32, 8)).astype(np.float32)
    packed = int8_rows(table)
    for stored in (packed, item_rows(packed).astype(np.float16), table):
        assert item_width(stored) == 8
        out = np.full((12, 8), np.nan, np.float32)
        got = item_rows(stored[10:22], out=out)
        assert got is out and np.array_equal(out, item_rows(stored)[10:22])
    assert encode_item_rows(item_rows(packed)).dtype == np.int8
    with pytest.raises(ValueError):
        item_width(np.zeros((4, 1), np.int8))  # levels without an exponent
