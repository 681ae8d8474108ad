"""RocksDB under one memory budget per worker, for every table store it opens.

Faust opens one RocksDB per table and partition, each with its own block cache, its own
memtables, and index and filter blocks held outside any cache, so a worker's native memory
grew with the number of stores, the data written and the SST files on disk (bench/soak.py:
the stores' own estimate rose from 10 to 28 MiB over 10 minutes, about half of the worker's
RSS growth). Here every store shares one LRU block cache of ``memory_budget`` bytes; index
and filter blocks live in it, and a write-buffer manager charges the memtables to it too
(RocksDB's documented way to cap memtables + blocks under a single limit). Registered with
Faust as the store ``bounded-rocksdb://``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import rocksdict
from faust.stores import STORES
from faust.stores import rocksdb as faust_rocksdb

__all__ = ["BoundedOptions", "Store", "local_stores", "shared_memory"]

STORE_URL = "bounded-rocksdb://"

_SHARED: dict[int, tuple[rocksdict.Cache, rocksdict.WriteBufferManager]] = {}


def shared_memory(budget: int) -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    """Return the process's block cache of ``budget`` bytes and its memtable manager."""
    if budget not in _SHARED:
        cache = rocksdict.Cache(budget)
        # memtables may take up to half the budget; what they use is charged to the cache
        manager = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            budget // 2, False, cache)
        _SHARED[budget] = (cache, manager)
    return _SHARED[budget]


def local_stores(table: Any) -> dict[int, Any]:
    """The open RocksDB of each local partition of a Faust table ({} for other stores)."""
    return getattr(table.data, "_dbs", {})  # Faust keeps them per partition, privately


class BoundedOptions(faust_rocksdb.RocksDBOptions):
    """Faust's per-store options, with the cache and memtables drawn from the shared budget."""

    def __init__(self, memory_budget: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory_budget = memory_budget

    def open(self, path: Path, *, read_only: bool = False) -> Any:
        options = self.as_options()
        options.set_db_paths([rocksdict.DBPath(str(path), self.target_file_size_base)])
        db = faust_rocksdb.DB(str(path), options=options,
                              access_type=rocksdict.AccessType.read_write())
        db.set_read_options(rocksdict.ReadOptions())
        return db

    def as_options(self) -> rocksdict.Options:
        cache, manager = shared_memory(self.memory_budget)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_write_buffer_manager(manager)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, True)
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)  # counted in the budget, not beside it
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options


class Store(faust_rocksdb.Store):
    """Faust's RocksDB table store (rocksdict driver) drawing on the worker's shared budget.

    Needs ``memory_budget`` (bytes) in the table's ``options``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.use_rocksdict:
            raise RuntimeError("bounded-rocksdb needs the rocksdict driver")
        opts = dict(self.options)
        budget = int(opts.pop("memory_budget"))
        self.rocksdb_options = BoundedOptions(budget, **opts, use_rocksdict=True)


STORES.aliases["bounded-rocksdb"] = f"{__name__}:Store"
