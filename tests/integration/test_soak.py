"""A one-minute run of bench/soak.py: steady events, concurrent reads and live model swaps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.kafka


def test_a_minute_of_traffic_with_swaps_has_no_error_and_bounded_lag(kafka: str,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    res = subprocess.run([sys.executable, "bench/soak.py", "--duration", "60", "--rate", "100",
                          "--clients", "2", "--export-every", "5", "--bootstrap", kafka,
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=400)
    assert out.exists(), res.stdout + res.stderr
    result = json.loads(out.read_text())
    assert result["processes_alive_at_end"] == {"worker": True, "trainer": True}
    assert result["requests"] > 0 and result["errors"] == 0, result["statuses"]
    assert result["swaps"] >= 1  # the trainer published and the worker swapped under load
    assert result["goals"]["lag_bounded"], result["max_lag_after_warmup"]
    # Memory growth is judged by the ten-minute run (bench/results/soak.json): one minute
    # is mostly warm-up (replay buffer, vocabulary and RocksDB memtables still filling).
