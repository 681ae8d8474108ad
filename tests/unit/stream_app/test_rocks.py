"""RocksDB under one budget: every store draws on the same cache, memtables charged to it."""

from __future__ import annotations

from pathlib import Path

import faust.stores

from stream_app.rocks import BoundedOptions, Store, shared_memory

MIB = 1024 * 1024


def test_the_store_is_registered_with_faust() -> None:
    assert faust.stores.by_url("bounded-rocksdb://") is Store


def test_many_stores_stay_within_one_shared_budget(tmp_path: Path) -> None:
    budget = 4 * MIB
    options = BoundedOptions(budget, write_buffer_size=MIB, max_write_buffer_number=2,
                             use_rocksdict=True)
    dbs = [options.open(tmp_path / f"store{n}") for n in range(8)]
    value = bytes(range(256)) * 16  # 4 KiB, not compressible to nothing
    for round_ in range(3):
        for db in dbs:  # 8 stores x 3 x 1 MiB written: 6x the budget
            for i in range(256):
                db[f"k{round_}-{i}".encode()] = value
        for db in dbs:  # read back: data, index and filter blocks enter the cache
            assert db[b"k0-7"] == value
    cache, manager = shared_memory(budget)
    assert manager.get_buffer_size() == budget // 2
    # 8 private 8 MiB caches and 2 MiB memtables would have allowed 96 MiB; one budget
    # holds it all (RocksDB's limit is soft: a little slack for blocks pinned by readers)
    assert 0 < cache.get_usage() <= budget * 1.25
    for db in dbs:
        db.close()
