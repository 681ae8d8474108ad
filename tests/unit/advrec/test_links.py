"""The prior's links as sparse rows: gathered as the dense table would give them, and a
delta's rows merged back into the whole, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from advrec.links import SparseRows, link_inputs

K = 6


def dense(n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A [V+1, K] link table as the prior keeps it: each row's links first, then padding
    (column 0, count 0); row 0 has none."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(1, n_rows, (n_rows, K)).astype(np.int32)
    val = rng.random((n_rows, K)).astype(np.float32) + 0.1
    n_links = rng.integers(0, K + 1, n_rows)
    n_links[0] = 0
    pad = np.arange(K)[None, :] >= n_links[:, None]
    idx[pad], val[pad] = 0, 0.0
    return idx, val


def test_gathered_links_are_the_dense_tables_rows() -> None:
    idx, val = dense(40, 0)
    links = SparseRows.from_dense(idx, val)
    rows = np.random.default_rng(1).integers(0, 40, (5, 3))  # (B, R)
    got_idx, got_val = links.gather(rows, K)
    assert np.array_equal(got_idx, idx[rows]) and np.array_equal(got_val, val[rows])
    history = np.array([[0, 0, 7, 9], [3, 1, 2, 39]])  # (B, L), left-padded
    fed = link_inputs(links, (2, K), history)
    assert np.array_equal(fed["history_links"], idx[history[:, -2:]])
    assert fed["history_links"].dtype == np.int64 and fed["history_link_counts"].shape == (2, 2, K)


def test_links_read_from_the_rows_that_hold_them_are_the_whole_tables() -> None:
    idx, val = dense(40, 2)
    whole = SparseRows.from_dense(idx, val)
    held = np.flatnonzero((val > 0).any(axis=1))
    assert 0 < len(held) < 40
    for rows in (held, np.union1d(held, [5, 6])):  # rows with no links read as nothing
        part = SparseRows.from_dense(idx, val, rows=rows)
        for got, want in ((part.indptr, whole.indptr), (part.cols, whole.cols),
                          (part.vals, whole.vals)):
            assert got.dtype == want.dtype and np.array_equal(got, want)


def test_a_delta_of_the_changed_rows_merges_back_into_the_new_table() -> None:
    idx, val = dense(40, 0)
    new_idx, new_val = dense(45, 2)  # five rows more
    new_idx[:30], new_val[:30] = idx[:30], val[:30]  # rows 30..44 changed or new
    new_val[4, 0] += 1.0  # a count changed
    base, new = SparseRows.from_dense(idx, val), SparseRows.from_dense(new_idx, new_val)
    changed = new.changed_rows(base)
    assert 4 in changed and not set(changed) & (set(range(30)) - {4})
    assert set(changed) >= {r for r in range(30, 40) if not (
        np.array_equal(idx[r], new_idx[r]) and np.array_equal(val[r], new_val[r]))}
    merged = base.merge(new.restricted(changed), new.n_rows)
    for a, b in ((merged.indptr, new.indptr), (merged.cols, new.cols), (merged.vals, new.vals)):
        assert np.array_equal(a, b)
    assert merged.files() == new.files()


def test_malformed_sparse_rows_are_refused() -> None:
    with pytest.raises(ValueError):
        SparseRows(np.array([0, 2], np.int64), np.zeros(1, np.int32), np.zeros(1, np.float32))
    links = SparseRows.from_dense(*dense(10, 0))
    part = links.restricted(np.array([3], np.int64))
    with pytest.raises(ValueError):
        links.merge(part, 3)  # row 3 lies outside a table of 3 rows
