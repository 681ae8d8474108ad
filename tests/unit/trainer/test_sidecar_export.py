"""The trainer's exports: the snapshot holds training, the rest and the publish go on
beside it, one export at a time."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from advrec.contract import encode_batch
from advrec.synthetic import SyntheticConfig, synthetic_events
from tests.unit.trainer.test_sidecar_checkpoint import HeldTopic
from trainer.evaluate import build_examples
from trainer.settings import load_trainer_settings
from trainer.sidecar import Sidecar


def _sidecar(tmp_path: Path, **env: str) -> Sidecar:
    sidecar = Sidecar(load_trainer_settings({
        "ADVREC_TRAINER_MODE": "none", "ADVREC_TRAINER_DIM": "16",
        "ADVREC_TRAINER_LAYERS": "1", "ADVREC_TRAINER_STEPS_PER_BATCH": "1",
        "ADVREC_BUNDLE_DIR": str(tmp_path / "bundles"),
        "ADVREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), **env}))
    sidecar.build()
    return sidecar


def _batches(n: int) -> list[bytes]:
    events = list(synthetic_events(SyntheticConfig(n_users=60, n_items=80, seed=2), 120 * n))
    examples = list(build_examples(events, 10))
    return [encode_batch(examples[i : i + 100]) for i in range(0, 100 * n, 100)]


def _meta(sidecar: Sidecar, version: str) -> dict:
    return json.loads((Path(sidecar.s.bundle_dir) / version / "meta.json").read_text())


def test_training_goes_on_while_an_export_finishes_and_only_one_is_in_flight(
        tmp_path: Path) -> None:
    sidecar = _sidecar(tmp_path)
    topic = HeldTopic()
    sidecar.bundle_pub = topic  # type: ignore[assignment]
    sidecar.active = True
    first, second = _batches(2)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(sidecar.torch_thread, sidecar.step, first, 0)
        assert await sidecar.export(wait=False) is None  # the snapshot is taken
        going_out = sidecar.export_going_out
        assert going_out is not None and not going_out.done()
        sidecar.batches_since_export, sidecar.last_export = 10**6, -1e9
        assert not sidecar.export_due()  # one at a time: a delta extends the last one
        await loop.run_in_executor(sidecar.torch_thread, sidecar.step, second, 1)
        assert sidecar.next_offset == 2 and topic.versions == []  # trained meanwhile
        topic.let_go.set()
        await sidecar.export_published()
        assert len(topic.versions) == 1 and sidecar.export_going_out is None
        assert sidecar.live is not None  # the next gate's baseline
        # the bundle is the model as the snapshot found it, not the batch trained since
        assert _meta(sidecar, topic.versions[0])["batches_seen"] == 1
        assert sidecar.export_due()
        version = await sidecar.export()  # waits for its publish (as tests and stops do)
        assert version == topic.versions[-1] and len(topic.versions) == 2
        assert _meta(sidecar, version)["batches_seen"] == 2

    asyncio.run(run())


def test_an_export_whose_trainer_lost_the_partition_meanwhile_is_not_published(
        tmp_path: Path) -> None:
    sidecar = _sidecar(tmp_path)
    topic = HeldTopic()
    sidecar.bundle_pub = topic  # type: ignore[assignment]
    sidecar.active = True

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(sidecar.torch_thread, sidecar.step, _batches(1)[0], 0)
        await sidecar.export(wait=False)
        sidecar.active = False  # a rebalance handed train-batches to another trainer
        topic.let_go.set()
        await sidecar.export_published()
        assert topic.versions == [] and sidecar.live is None

    asyncio.run(run())


@pytest.mark.parametrize("two_stage", [False, True])
def test_a_snapshot_ranks_as_the_learner_did_however_it_trains_after(
        tmp_path: Path, two_stage: bool) -> None:
    # two-stage without the exact graph: the prior travels as its links (advrec/links.py)
    env = ({"ADVREC_TRAINER_TWO_STAGE_ITEMS": "1", "ADVREC_TRAINER_EXACT_BELOW_ITEMS": "1"}
           if two_stage else {})
    sidecar = _sidecar(tmp_path, **env)
    batches = _batches(1)
    sidecar.step(batches[0], 0)
    assert sidecar.learner.prior_cfg.weight > 0  # the prior is part of what is copied
    snap = sidecar.snapshot_export()
    assert snap is not None and (snap.packed is not None) == two_stage
    assert snap.scorer.prior.sparse is not None if two_stage else snap.scorer.prior.sparse is None
    histories = torch.from_numpy(snap.probes)  # (3, L)
    with torch.no_grad():
        before = snap.scorer(histories).numpy()  # (3, V+1)
    packed = None if snap.packed is None else snap.packed.copy()
    weights = [p.detach().clone() for p in sidecar.learner.generator.parameters()]
    links = sidecar.learner.cooc.table(len(sidecar.learner.vocab) + 1)[1].copy()
    # the same clicks again: the vocabulary stays, the counts change where they are
    sidecar.step(batches[0], 1)
    sidecar.step(batches[0], 2)
    learner = sidecar.learner  # moved on: G's weights and the prior's counts
    assert any(not torch.equal(a, b[: len(a)]) for a, b in
               zip(weights, learner.generator.parameters(), strict=True))
    assert not np.array_equal(learner.cooc.table(len(links))[1], links)
    with torch.no_grad():
        np.testing.assert_array_equal(snap.scorer(histories).numpy(), before)
    if packed is not None:
        np.testing.assert_array_equal(snap.packed, packed)
    export = sidecar.finish_export(snap)
    assert export is not None and _meta(sidecar, export.version)["batches_seen"] == 1
