"""Trainer test fixtures: one torch thread per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run each test on one intra-op thread (restored afterwards).

    These models are tiny, so a second thread only adds synchronisation; on a busy 2-core
    machine two OpenMP threads made an embedding lookup ~100x slower (spin-waiting).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
