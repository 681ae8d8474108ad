"""RocksDB under one budget: every store draws on the same cache, memtables charged to it."""

from __future__ import annotations

import time
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
    cache, manager = shared_memory(budget)
    assert manager.get_buffer_size() == budget // 2
    value = bytes(range(256)) * 16  # 4 KiB, not compressible to nothing
    peak = 0
    for round_ in range(3):
        for db in dbs:  # 8 stores x 3 x 1 MiB written: 6x the budget
            for i in range(256):
                db[f"k{round_}-{i}".encode()] = value
            peak = max(peak, cache.get_usage())
        for db in dbs:  # read back: data, index and filter blocks enter the cache
            assert db[b"k0-7"] == value
    # 8 private 8 MiB caches and 2 MiB memtables would have allowed 96 MiB. The shared
    # limit is soft (memtables are flushed in the background), so while writing it may
    # overshoot by at most the memtables each store holds before it stalls (8 x 2 x 1 MiB),
    # and it settles back near the budget once the flushes are done.
    assert 0 < peak <= budget + 8 * 2 * MIB
    deadline = time.monotonic() + 30
    while cache.get_usage() > budget * 1.25 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 < cache.get_usage() <= budget * 1.25  # slack: index blocks pinned by L0 files
    for db in dbs:
        db.close()
