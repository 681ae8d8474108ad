"""Two-stage parts: user . items is G's score, the rescorer is the full scorer at candidate
rows (ONNX against torch, for every scorer shape), and a worker ranks a real bundle in two
stages as it ranks it exactly."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from advrec.bundle import (
    PRIOR_FILES,
    TWO_STAGE_FILES,
    TWO_STAGE_ITEMS,
    item_rows,
    load_bundle,
    read_current,
)
from stream_app.retrieval import IndexConfig
from stream_app.serving import load_model
from tests.bundles import count_fsyncs
from tests.unit.trainer.planted import SMALL, planted_stream
from trainer.content import ColdScorer, WithCold
from trainer.export import (
    ExportError,
    PackedTable,
    export_two_stage_checked,
    publish_bundle,
    scoring_model,
)
from trainer.learner import OnlineLearner, TrainConfig
from trainer.prior import PriorConfig
from trainer.twostage import (
    CandidateScorer,
    UserEncoder,
    check_two_stage_parity,
    export_two_stage,
    held_rows,
    item_vectors,
    parity_rows,
    scorer_parts,
)


def trained(item_bias: bool = False, tied: bool = True, prior: float = 4.0) -> OnlineLearner:
    cfg = dataclasses.replace(SMALL, item_bias=item_bias, tied_output=tied)
    learner = OnlineLearner(cfg, TrainConfig(mode="none", lr=3e-3, replay_size=300),
                            prior_cfg=PriorConfig(weight=prior))
    for batch in planted_stream(4, 64):
        learner.train_batch(batch)
    return learner


def with_cold(scorer: torch.nn.Module, n_rows: int, n_cold: int = 30) -> WithCold:
    """``scorer`` with a content score on ``n_cold`` random rows (as catalogue items with no
    click would have), over random unit content vectors."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(n_rows, 8)).astype(np.float32)  # (V+1, k)
    table[0] = 0.0
    table /= np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-6)
    mix = np.zeros(n_rows, dtype=np.float32)
    mix[rng.choice(np.arange(1, n_rows), n_cold, replace=False)] = 1.0
    return WithCold(scorer, ColdScorer(table, mix, [1.0, 0.7, 0.49], 5.0, -3.0)).eval()


def histories(n: int, n_items: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(1, n_items + 1, size=(n, SMALL.max_len))  # (B, L)
    for i in range(n):
        h[i, : rng.integers(0, SMALL.max_len + 1)] = 0  # left padding of every length
    h[0] = 0  # one empty history
    return h.astype(np.int64)


SHAPES = {
    "G": {"prior": 0.0},
    "G+prior": {},
    "G+bias+prior": {"item_bias": True},
    "G untied+prior": {"tied": False},
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cold", [False, True])
def test_two_stage_onnx_matches_torch(shape: str, cold: bool) -> None:
    learner = trained(**SHAPES[shape])
    scorer = scoring_model(learner)
    if cold:
        scorer = with_cold(scorer, learner.generator.n_items + 1)
    files = export_two_stage(scorer, SMALL.max_len, n_cold=10)
    assert check_two_stage_parity(scorer, files, histories(17, len(learner.vocab))) < 1e-4


def test_user_vector_dot_item_table_is_g_score() -> None:
    learner = trained(item_bias=True)
    g = scoring_model(learner)
    encoder = UserEncoder(g).eval()
    h = torch.from_numpy(histories(5, len(learner.vocab)))
    with torch.no_grad():
        user = encoder(h)[0]  # (B, D+1)
        want = encoder.generator(h)  # (B, V+1)
    got = user @ torch.from_numpy(item_vectors(encoder.generator)).t()  # (B, V+1)
    assert user.shape[1] == SMALL.d_model + 1
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-5)


def test_rescorer_is_the_full_scorer_at_the_candidate_rows() -> None:
    learner = trained()
    scorer = with_cold(scoring_model(learner), learner.generator.n_items + 1)
    h = torch.from_numpy(histories(6, len(learner.vocab), seed=3))
    table = torch.from_numpy(item_vectors(learner.generator))
    encoder, rescorer = UserEncoder(scorer).eval(), CandidateScorer(scorer).eval()
    rows = torch.randint(1, len(table), (6, 40))  # (B, C)
    with torch.no_grad():
        user, linked, cold = encoder(h)
        got = rescorer(h, user, rows, table[rows])  # (B, C)
        want = scorer(h).gather(1, rows)  # (B, C)
    assert torch.allclose(got, want, atol=1e-4)
    assert linked.shape == (6, PriorConfig().n_recent * PriorConfig().top_k)
    assert cold.shape == (6, 30) and bool((scorer.cold.mix[cold] == 1).all())


def test_a_two_stage_part_that_disagrees_with_torch_is_not_published() -> None:
    learner = trained()
    scorer = scoring_model(learner)
    files = export_two_stage(scorer, SMALL.max_len)
    with torch.no_grad():  # the model changes after its export
        learner.generator.items.emb.weight.mul_(2.0)
    h = histories(4, len(learner.vocab))
    assert check_two_stage_parity(scoring_model(learner), files, h) > 1e-3
    with pytest.raises(ExportError):
        export_two_stage_checked(scorer, SMALL.max_len, h, parity_tol=-1.0)


def test_the_parity_check_compares_the_rows_it_is_given() -> None:
    learner = trained()
    scorer = scoring_model(learner)
    files = export_two_stage(scorer, SMALL.max_len)
    table = item_rows(np.load(io.BytesIO(files[TWO_STAGE_ITEMS])))  # (V+1, D') float32
    h = histories(5, len(learner.vocab))
    every = np.arange(len(table))
    whole = check_two_stage_parity(scorer, files, h)
    assert check_two_stage_parity(scorer, files, h, stored=table, rows=every) == whole < 1e-4
    bad = table.copy()
    bad[3] += 1.0  # a row the bundle would carry wrong
    assert check_two_stage_parity(scorer, files, h, stored=bad, rows=np.array([3])) > 1e-3
    rows = parity_rows(np.array([7, 3, 3]), n_rows=1000, n_sample=50)
    assert {3, 7} <= set(rows.tolist()) and 40 < len(rows) <= 52
    assert np.array_equal(rows, np.unique(rows)) and rows.max() < 1000


def test_a_published_bundle_ranks_alike_on_both_paths(tmp_path: Path) -> None:
    learner = trained()
    version = publish_bundle(learner, tmp_path, {}, two_stage_items=1)
    assert load_bundle(tmp_path, version).two_stage is not None
    n = len(learner.vocab)
    exact = load_model(tmp_path, version, threads=1)
    staged = load_model(tmp_path, version, threads=1,
                        index=IndexConfig(min_items=0, candidates=n))
    assert staged.path == "two_stage"
    vocab = learner.vocab.items()
    rng = np.random.default_rng(1)
    users = [[vocab[i] for i in rng.choice(n, int(rng.integers(1, 12)), replace=False)]
             for _ in range(30)]
    ks = [10] * len(users)
    assert staged.recommend_batch(users, ks) == exact.recommend_batch(users, ks)
    assert load_bundle(tmp_path, publish_bundle(learner, tmp_path, {})).two_stage is None


def test_the_sidecars_bundle_carries_the_parts_from_its_size_on(tmp_path: Path) -> None:
    from advrec.contract import encode_batch
    from advrec.synthetic import SyntheticConfig, synthetic_events
    from trainer.evaluate import build_examples
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    events = list(synthetic_events(SyntheticConfig(n_users=100, n_items=150, seed=2), 1500))
    examples = list(build_examples(events, 20))
    versions = []
    for threshold in ("1", "100000"):
        sidecar = Sidecar(load_trainer_settings({
            "ADVREC_TRAINER_MODE": "none", "ADVREC_TRAINER_DIM": "16",
            "ADVREC_TRAINER_LAYERS": "1", "ADVREC_TRAINER_STEPS_PER_BATCH": "1",
            "ADVREC_TRAINER_TWO_STAGE_ITEMS": threshold,
            "ADVREC_BUNDLE_DIR": str(tmp_path / threshold / "bundles"),
            "ADVREC_CHECKPOINT_DIR": str(tmp_path / threshold / "checkpoints")}))
        sidecar.build()
        for n, i in enumerate(range(0, len(examples), 256)):
            sidecar.step(encode_batch(examples[i : i + 256]), n)
        export = sidecar.prepare_export()
        assert export is not None
        versions.append((load_bundle(Path(sidecar.s.bundle_dir), export.version),
                         {name for name, _ in export.files}))
    (with_parts, files), (without, plain) = versions
    assert with_parts.two_stage is not None and without.two_stage is None
    assert with_parts.meta["two_stage"]["parity_max_abs_diff"] < 1e-4
    # what travels on the bundle topic: the parts, and the prior's links beside them
    assert files - plain == {*TWO_STAGE_FILES, *PRIOR_FILES}


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_user_encoder_reads_the_history_rows_instead_of_carrying_the_table(
        tied: bool) -> None:
    import onnx

    from advrec.bundle import TWO_STAGE_USER, TWO_STAGE_USER_VECTORS

    learner = trained(tied=tied, prior=0.0)
    files = export_two_stage(scoring_model(learner), SMALL.max_len)
    graph = onnx.load_from_string(files[TWO_STAGE_USER]).graph
    rows = len(learner.vocab) + 1
    tables = [i.name for i in graph.initializer if i.dims and i.dims[0] == rows]
    inputs = [i.name for i in graph.input]
    if tied:  # the worker's index holds the table once: user.onnx has none of its own
        assert TWO_STAGE_USER_VECTORS in inputs and tables == []
    else:  # the input table is not the scoring one the index holds
        assert TWO_STAGE_USER_VECTORS not in inputs and len(tables) == 1
    h = histories(8, len(learner.vocab))
    assert check_two_stage_parity(scoring_model(learner), files, h) < 1e-4


def test_a_compacted_model_ships_int8_rows_that_serve_like_its_exact_graph(
        tmp_path: Path) -> None:
    learner = trained(item_bias=True)
    version = publish_bundle(learner, tmp_path, {}, two_stage_items=1)
    bundle = load_bundle(tmp_path, version)
    stored = np.load(io.BytesIO(bundle.two_stage[TWO_STAGE_ITEMS]))
    full = item_vectors(learner.generator)  # the learner's own float32 rows, bias last
    assert stored.dtype == np.int8 and stored.shape == (len(full), full.shape[1] + 1)
    # each row within half a level of its largest value's 127 levels
    peak = np.abs(full).max(axis=1, keepdims=True)  # (V+1, 1)
    assert (np.abs(item_rows(stored) - full) <= peak / 127 + 1e-12).all()
    n = len(learner.vocab)
    exact = load_model(tmp_path, version, threads=1)
    staged = load_model(tmp_path, version, threads=1,
                        index=IndexConfig(min_items=0, candidates=n))
    users = [[f"i{i}" for i in range(j, j + 8)] for j in range(0, 120, 7)]
    ks = [10] * len(users)
    assert staged.recommend_batch(users, ks) == exact.recommend_batch(users, ks)
    # below the two-stage size nothing is rounded: the bundle serves the learner's lists
    plain = load_model(tmp_path, publish_bundle(learner, tmp_path, {}), threads=1)
    vocab = learner.vocab.items()
    assert [[vocab[r - 1] for r in rows] for rows in plain.recommend_batch(users, ks)] == [
        learner.recommend(user, 10) for user in users]


def _sidecar(tmp_path: Path, **env: str):
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    sidecar = Sidecar(load_trainer_settings({
        "ADVREC_TRAINER_MODE": "none", "ADVREC_TRAINER_DIM": "16",
        "ADVREC_TRAINER_LAYERS": "1", "ADVREC_TRAINER_STEPS_PER_BATCH": "1",
        "ADVREC_TRAINER_TWO_STAGE_ITEMS": "1",
        "ADVREC_BUNDLE_DIR": str(tmp_path / "bundles"),
        "ADVREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), **env}))
    sidecar.build()
    return sidecar


def _export_after(sidecar, batches: list[bytes]):
    """Train on ``batches``, export, and note the export as published to the fleet."""
    for batch in batches:
        sidecar.step(batch, sidecar.learner.batches_seen)
    export = sidecar.prepare_export()
    assert export is not None
    sidecar.deltas.published(export.version, export.two_stage, export.vocab,
                             delta=export.base is not None)
    return export


def _batches(n_items: int, seed: int) -> list[bytes]:
    from advrec.contract import encode_batch
    from advrec.synthetic import SyntheticConfig, synthetic_events
    from trainer.evaluate import build_examples

    events = list(synthetic_events(SyntheticConfig(n_users=100, n_items=n_items, seed=seed),
                                   1200))
    examples = list(build_examples(events, 20))
    return [encode_batch(examples[i : i + 200]) for i in range(0, len(examples), 200)]


def test_between_full_bundles_the_sidecar_publishes_deltas_a_worker_rebuilds_and_serves(
        tmp_path: Path) -> None:
    import shutil

    from advrec.bundle import DELTA_FILES, DELTA_PRIOR_FILES, MODEL_FILE, apply_delta
    from advrec.contract import decode_batch

    sidecar = _sidecar(tmp_path, ADVREC_BUNDLE_DELTA_MAX_SHARE="1")
    full = _export_after(sidecar, _batches(150, 2))
    first = _export_after(sidecar, _batches(180, 3)[:2])  # new items, and fewer rows touched
    delta = _export_after(sidecar, _batches(180, 4)[:1])
    # the gate's next baseline holds the prior as the bundle's links: it ranks as a copy
    # with the links read from the learner's own table
    probe = decode_batch(_batches(180, 9)[0])
    baseline = sidecar.learner.frozen(delta.candidate.generator)
    assert delta.candidate.prior_scorer().sparse is not None
    assert np.array_equal(delta.candidate.target_ranks(probe)["A"],
                          baseline.target_ranks(probe)["A"])
    # each delta is against the bundle before it
    assert full.base is None and first.base == full.version and delta.base == first.version
    sent = {name for name, _ in delta.files}
    assert sent == {"user.onnx", "rescore.onnx", *DELTA_FILES, *DELTA_PRIOR_FILES, "meta.json"}
    trainer_dir = Path(sidecar.s.bundle_dir)
    meta = load_bundle(trainer_dir, delta.version).meta
    assert 0 < meta["delta"]["rows"] < meta["delta"]["of_rows"] == len(delta.vocab) + 1
    assert not (trainer_dir / delta.version / MODEL_FILE).exists()
    assert sum(len(d) for _, d in delta.files) < sum(len(d) for _, d in full.files)
    cache = tmp_path / "cache"  # a worker's: what came over the topic
    for export in (full, first, delta):
        (cache / export.version).mkdir(parents=True)
        for name, data in export.files:
            (cache / export.version / name).write_bytes(data)
    assert apply_delta(cache, first.version) and apply_delta(cache, delta.version)
    n = len(delta.vocab)
    staged = load_model(cache, delta.version, threads=1,
                        index=IndexConfig(min_items=10**9, candidates=n))
    # the same learner's full bundle, ranked exactly
    shutil.rmtree(trainer_dir)
    exact = load_model(trainer_dir, publish_bundle(sidecar.learner, trainer_dir, {},
                                                   two_stage_items=1), threads=1)
    assert staged.path == "two_stage" and exact.path != "two_stage"
    rng = np.random.default_rng(1)
    items = [v for v in delta.vocab if v is not None]
    users = [[items[i] for i in rng.choice(len(items), 6, replace=False)] for _ in range(20)]
    assert staged.recommend_batch(users, [10] * 20) == exact.recommend_batch(users, [10] * 20)


def test_the_trainers_own_copy_of_its_bundles_is_written_whole_without_fsyncs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = _sidecar(tmp_path, ADVREC_BUNDLE_DELTA_MAX_SHARE="1")
    synced = count_fsyncs(monkeypatch)
    full = _export_after(sidecar, _batches(150, 2))
    delta = _export_after(sidecar, _batches(180, 3)[:2])
    assert delta.base == full.version
    # the topic is the record: the copy is read back only to publish it
    assert synced == []
    trainer_dir = Path(sidecar.s.bundle_dir)
    for export in (full, delta):  # whole, checksums and all
        assert load_bundle(trainer_dir, export.version, model=False).vocab == tuple(
            export.vocab)
    assert read_current(trainer_dir) == delta.version


@pytest.mark.parametrize("env", [{"ADVREC_BUNDLE_FULL_EVERY_S": "0"},
                                 {"ADVREC_BUNDLE_DELTA_MAX_SHARE": "0.001"}])
def test_a_full_bundle_goes_out_when_deltas_are_off_or_too_large(
        tmp_path: Path, env: dict[str, str]) -> None:
    sidecar = _sidecar(tmp_path, **env)
    _export_after(sidecar, _batches(150, 2))
    again = _export_after(sidecar, _batches(150, 3)[:2])
    assert again.base is None and "model.onnx" in {name for name, _ in again.files}


def test_with_the_prior_neither_graph_carries_a_table_of_the_catalogues_size() -> None:
    import onnx

    from advrec.bundle import TWO_STAGE_RESCORE, TWO_STAGE_USER
    from advrec.links import LINK_INPUTS

    learner = trained()  # the prior on, G's table tied
    files = export_two_stage(scoring_model(learner), SMALL.max_len)
    rows = len(learner.vocab) + 1
    for name in (TWO_STAGE_USER, TWO_STAGE_RESCORE):
        graph = onnx.load_from_string(files[name]).graph
        assert [i.name for i in graph.initializer if i.dims and i.dims[0] == rows] == []
        assert LINK_INPUTS[0] in [i.name for i in graph.input]
    assert set(PRIOR_FILES) <= set(files)
    h = histories(8, len(learner.vocab))
    assert check_two_stage_parity(scoring_model(learner), files, h) < 1e-4


def test_a_bundle_above_the_exact_size_has_no_exact_graph_and_ranks_in_two_stages(
        tmp_path: Path) -> None:
    from advrec.bundle import MODEL_FILE, BundleError

    learner = trained()
    version = publish_bundle(learner, tmp_path, {}, two_stage_items=1, exact_below_items=1)
    assert not load_bundle(tmp_path, version).exact
    assert not (tmp_path / version / MODEL_FILE).exists()
    # a worker whose switch is far above this catalogue still ranks it, in two stages
    model = load_model(tmp_path, version, threads=1, index=IndexConfig(min_items=10**9))
    assert model.path == "two_stage"
    assert model.recommend_batch([learner.vocab.items()[:3]], [5])[0]
    with pytest.raises(BundleError) as refused:  # two-stage serving is off
        load_model(tmp_path, version, threads=1)
    assert refused.value.reason == "missing_model"


def _scoring_rows(learner: OnlineLearner) -> np.ndarray:
    """G's scoring rows as they are [V+1, D'], bias last: what ``PackedTable`` packs."""
    g = learner.generator
    rows = g.item_table().detach().numpy()  # (V+1, D)
    bias = g.item_bias()
    return rows if bias is None else np.concatenate([rows, bias.detach().numpy()[:, None]], 1)


@pytest.mark.parametrize("item_bias", [False, True])
def test_packed_rows_are_the_whole_tables_int8_rows_and_only_changed_rows_are_packed_again(
        item_bias: bool) -> None:
    from advrec.bundle import int8_rows

    learner = trained(item_bias=item_bias)
    packed = PackedTable()
    first = packed.update(learner.generator)
    assert np.array_equal(first, int8_rows(_scoring_rows(learner)))
    assert packed.repacked == len(learner.vocab) + 1
    assert packed.update(learner.generator) is not None and packed.repacked == 0
    learner.train_batch(planted_stream(6, 8, seed=9)[5])  # a small batch: some rows move
    learner.add_items(["new-1", "new-2"])
    again = packed.update(learner.generator)
    assert np.array_equal(again, int8_rows(_scoring_rows(learner)))
    assert 2 <= packed.repacked < len(learner.vocab) + 1  # the two new rows, the moved ones
    with torch.no_grad():
        learner.generator.item_table()[3, 0] = float("nan")
    with pytest.raises(ValueError):
        packed.update(learner.generator)
    with torch.no_grad():
        learner.generator.item_table()[3, 0] = 0.25
    assert np.array_equal(packed.update(learner.generator),
                          int8_rows(_scoring_rows(learner)))


@pytest.mark.parametrize("item_bias", [False, True])
def test_kept_copies_are_the_tables_made_afresh_and_one_in_use_is_never_written(
        item_bias: bool) -> None:
    learner = trained(item_bias=item_bias)
    table = PackedTable()

    def expected() -> tuple[list[torch.Tensor], np.ndarray]:
        copy = scoring_model(learner, compact=table.packed.copy())
        g = scorer_parts(copy).generator
        return [t.emb.weight for t in g.item_tables()], held_rows(table.packed, g)

    def check(tables: list[torch.Tensor], held: np.ndarray) -> None:
        want_tables, want_held = expected()
        assert [t.shape for t in tables] == [t.shape for t in want_tables]
        assert all(torch.equal(a, b) for a, b in zip(tables, want_tables, strict=True))
        assert np.array_equal(held, want_held)

    table.update(learner.generator)
    first = table.rounded(learner.generator), table.held(learner.generator)
    assert table.copied == len(learner.vocab) + 1  # a new copy: every row
    check(*first)
    kept = [t.clone() for t in first[0]], first[1].copy()
    learner.train_batch(planted_stream(6, 8, seed=9)[5])
    learner.add_items(["new-1", "new-2"])
    learner.generator.set_holes([4])  # a row a bounded vocabulary freed
    table.update(learner.generator)
    # the first copies are still referred to: new ones
    second = table.rounded(learner.generator), table.held(learner.generator)
    assert table.copied == len(learner.vocab) + 1
    check(*second)
    del second
    with torch.no_grad():  # a few rows move (as under the sampled softmax)
        learner.generator.item_table()[[3, 7]] += 0.5
    learner.generator.set_holes([])  # the freed row is live again
    table.update(learner.generator)
    # the second copies are free: written again at the rows packed since (and the held
    # one at the rows it had zeroed), no more
    third = table.rounded(learner.generator)
    assert table.copied == 2
    third_held = table.held(learner.generator)
    assert table.copied == 4  # rows 3 and 7, padding and the row freed before
    check(third, third_held)
    # the first copies, referred to all along, were never written
    assert all(torch.equal(a, b) for a, b in zip(first[0], kept[0], strict=True))
    assert np.array_equal(first[1], kept[1])


@pytest.mark.parametrize("shape", ["G+prior", "G+bias+prior", "G untied+prior"])
def test_an_export_from_packed_rows_is_the_export_that_packs_the_whole_table(
        shape: str) -> None:
    learner = trained(**SHAPES[shape])
    learner.generator.set_holes([2, 5])  # rows a bounded vocabulary freed
    whole = scoring_model(learner, compact=True)
    packed = PackedTable().update(learner.generator)
    scorer = scoring_model(learner, compact=packed)
    h = torch.from_numpy(histories(16, len(learner.vocab)))
    h[(h == 2) | (h == 5)] = 0  # histories hold no freed rows (they map to padding)
    with torch.no_grad():  # the same rounded model, to the bit
        assert torch.equal(scorer(h), whole(h))
    stored = held_rows(packed, scorer_parts(scorer).generator)
    files = export_two_stage(scorer, SMALL.max_len, stored=stored)
    expected = export_two_stage(whole, SMALL.max_len)
    for name in (TWO_STAGE_ITEMS, *(PRIOR_FILES if SHAPES[shape].get("prior", 1) else ())):
        assert files[name] == expected[name], name
    assert check_two_stage_parity(scorer, files, h.numpy()) < 1e-4
