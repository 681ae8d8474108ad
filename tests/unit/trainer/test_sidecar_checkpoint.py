"""The trainer's checkpoints: the save holds training, the publish goes on beside it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from advrec.channel import split_version
from advrec.channel_io import Published
from advrec.contract import encode_batch
from advrec.synthetic import SyntheticConfig, synthetic_events
from trainer.evaluate import build_examples
from trainer.settings import load_trainer_settings
from trainer.sidecar import Sidecar


class HeldTopic:
    """Stands in for the checkpoint topic's publisher: a publish ends once it is let go."""

    def __init__(self) -> None:
        self.let_go = asyncio.Event()
        self.versions: list[str] = []

    async def publish(self, version: str, files: list[tuple[str, bytes]], *,
                      meta: dict[str, Any], stale: Any) -> Published:
        await self.let_go.wait()
        chunks, manifest = split_version(version, files, chunk_bytes=1 << 20, meta=meta)
        self.versions.append(version)
        return Published(version, len(chunks), sum(len(d) for _, d in files), 0,
                         len(chunks), 0.01, manifest)


class Commits:
    def __init__(self) -> None:
        self.seen: list[dict[str, int]] = []

    async def commit(self, offsets: dict[str, int]) -> None:
        self.seen.append(dict(offsets))


def _batches(n: int) -> list[bytes]:
    events = list(synthetic_events(SyntheticConfig(n_users=30, n_items=40, seed=2), 60 * n))
    examples = list(build_examples(events, 10))
    return [encode_batch(examples[i : i + 40]) for i in range(0, 40 * n, 40)]


def test_training_goes_on_while_a_checkpoint_goes_out_and_its_own_offset_is_committed(
        tmp_path: Path) -> None:
    sidecar = Sidecar(load_trainer_settings({
        "ADVREC_TRAINER_MODE": "none", "ADVREC_TRAINER_DIM": "16",
        "ADVREC_TRAINER_LAYERS": "1", "ADVREC_BUNDLE_DIR": str(tmp_path / "bundles"),
        "ADVREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}))
    sidecar.build()
    topic, consumer = HeldTopic(), Commits()
    sidecar.checkpoint_pub = topic  # type: ignore[assignment]
    first, second = _batches(2)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(sidecar.torch_thread, sidecar.step, first, 0)
        await sidecar.checkpoint(consumer, "tp")  # saved; its publish is held
        assert sidecar.checkpoint_path.is_file() and topic.versions == []
        going_out = sidecar.checkpoint_going_out
        assert going_out is not None and not going_out.done()
        sidecar.batches_since_checkpoint, sidecar.last_checkpoint = 10**6, -1e9
        assert not sidecar.checkpoint_due()  # one at a time
        await loop.run_in_executor(sidecar.torch_thread, sidecar.step, second, 1)
        assert sidecar.next_offset == 2 and consumer.seen == []  # trained meanwhile
        topic.let_go.set()
        await sidecar.checkpoint_published()
        assert len(topic.versions) == 1 and sidecar.checkpoint_going_out is None
        assert consumer.seen == [{"tp": 1}]  # where the checkpoint resumes, not offset 2
        assert sidecar.checkpoint_due()
        await sidecar.checkpoint(consumer, "tp", wait=True)  # as the trainer stops
        assert len(topic.versions) == 2 and consumer.seen[-1] == {"tp": 2}

    asyncio.run(run())
