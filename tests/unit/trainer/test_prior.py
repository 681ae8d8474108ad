"""The co-occurrence prior and the hybrid: counts, the top-k table, torch vs ONNX, state."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from advrec.bundle import INPUT_NAME, OUTPUT_NAME
from advrec.contract import TrainingExample
from advrec.links import SparseRows
from tests.unit.trainer.planted import SMALL, planted_stream
from trainer.baselines import ItemKNN
from trainer.evaluate import build_examples, run_prequential, run_prequential_all
from trainer.export import check_parity, export_onnx, scoring_model
from trainer.learner import OnlineLearner, TrainConfig
from trainer.prior import Cooccurrence, PriorConfig, PriorScorer


def test_learning_links_recent_items_forward_and_backward_with_decay() -> None:
    c = Cooccurrence(n_recent=2, decay=0.5, backward=0.25)
    c.learn([2, 1], 3)  # 3 clicked after ... 1, 2 (2 the latest)
    assert dict(zip(*map(np.ndarray.tolist, c.row(2)), strict=True)) == {3: 1.0}
    assert dict(zip(*map(np.ndarray.tolist, c.row(1)), strict=True)) == {3: 0.5}
    assert dict(zip(*map(np.ndarray.tolist, c.row(3)), strict=True)) == {2: 0.25, 1: 0.125}


def test_the_table_keeps_the_strongest_links_ties_to_the_lower_column() -> None:
    c = Cooccurrence(n_recent=1, backward=0.0, top_k=2)
    for j, times in ((5, 1), (4, 3), (3, 1), (2, 3)):
        for _ in range(times):
            c.learn([1], j)
    idx, val = c.table(6)
    assert idx[1].tolist() == [2, 4] and val[1].tolist() == [3.0, 3.0]
    assert idx[0].tolist() == [0, 0] and val[0].tolist() == [0.0, 0.0]  # padding row
    c.learn([1], 3)
    c.learn([1], 3)
    c.learn([1], 3)  # 3 now has 4: the row is re-cut on the next table()
    idx, _ = c.table(6)
    assert idx[1].tolist() == [3, 2]


def test_the_scorer_sums_the_latest_items_links_as_log1p() -> None:
    cfg = PriorConfig(weight=1.0, top_k=4, n_recent=2, decay=0.5, backward=0.0)
    c = Cooccurrence.from_config(cfg)
    c.learn([1], 3)
    c.learn([2], 3)
    c.learn([2], 4)
    idx, val = c.table(5)
    scorer = PriorScorer(idx, val, cfg)
    history = torch.tensor([[0, 1, 2], [0, 0, 0]])  # (2, L): 2 is the latest
    out = scorer(history, torch.zeros(2, 5)).numpy()
    # row 0: item 2 weighs 1 (links 3 and 4), item 1 weighs 0.5 (link 3)
    np.testing.assert_allclose(out[0], np.log1p([0, 0, 0, 1.5, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.0)  # an empty history has no prior


def test_ranking_in_place_gives_the_dense_graphs_scores_exactly() -> None:
    cfg = PriorConfig(weight=1.0, top_k=8, n_recent=3)
    rng = np.random.default_rng(0)
    n_rows = 50
    c = Cooccurrence.from_config(cfg)
    for _ in range(400):  # many links, some rows linking the same column twice over
        history = rng.integers(1, n_rows, size=int(rng.integers(1, 5))).tolist()
        c.learn(history, int(rng.integers(1, n_rows)))
    idx, val = c.table(n_rows)
    scorer = PriorScorer(idx, val, cfg)
    history = torch.from_numpy(rng.integers(0, n_rows, size=(6, 7)))  # (6, 7)
    history[2] = 0  # an empty history: nothing added
    history[3, :4] = history[3, 4:].max()  # one item three times: its links thrice
    logits = torch.randn(6, n_rows)
    dense = logits + 0.7 * scorer(history, logits)
    fast = scorer.add_to(history, logits.clone(), 0.7)
    assert torch.equal(fast, dense) and not torch.equal(fast, logits)
    assert torch.equal(fast[2], logits[2])


def test_a_scorer_holding_its_links_as_rows_scores_as_the_dense_table() -> None:
    from advrec.links import SparseRows

    cfg = PriorConfig(weight=1.0, top_k=8, n_recent=3)
    rng = np.random.default_rng(1)
    n_rows = 60
    c = Cooccurrence.from_config(cfg)
    for _ in range(300):
        history = rng.integers(1, n_rows - 10, size=int(rng.integers(1, 5))).tolist()
        c.learn(history, int(rng.integers(1, n_rows - 10)))
    idx, val = c.table(n_rows)  # rows 50.. have no links
    dense = PriorScorer(idx, val, cfg)
    sparse = PriorScorer.from_links(SparseRows.from_dense(idx, val), 8, cfg)
    assert sparse.idx.numel() == 8  # the table is not held twice
    history = torch.from_numpy(rng.integers(0, n_rows, size=(7, 6)))  # (7, 6)
    history[1] = 0
    logits = torch.randn(7, n_rows)
    assert torch.equal(sparse(history, logits), dense(history, logits))
    assert torch.equal(sparse.add_to(history, logits.clone(), 0.3),
                       dense.add_to(history, logits.clone(), 0.3))
    rows = torch.from_numpy(rng.integers(0, n_rows, size=(7, 5)))  # (7, 5)
    assert torch.equal(sparse.at(history, rows), dense.at(history, rows))
    assert not torch.equal(sparse(history, logits), torch.zeros(7, n_rows))


def test_item_knn_ranks_as_before_on_its_shared_counts() -> None:
    knn = ItemKNN(n_recent=2, decay=0.5, backward=0.5)
    examples = [TrainingExample("u", ("a",), "b", 1), TrainingExample("u", ("a", "b"), "c", 2),
                TrainingExample("v", ("b",), "c", 3)]
    knn.train_batch(examples)
    scores = knn.scores([("a", "b")])[0]  # columns a, b, c
    # from b (weight 1): b->c 2, b->a 0.5 (backward); from a (0.5): a->b 1, a->c 0.5
    np.testing.assert_allclose(scores, [0.5, 0.5, 2.25])
    assert knn.n_links() == knn.cooc.n_links() == 6


def _hybrid_learner(weight: float = 2.0) -> OnlineLearner:
    learner = OnlineLearner(SMALL, TrainConfig(mode="none", replay_size=200),
                            prior_cfg=PriorConfig(weight=weight, top_k=8))
    for batch in planted_stream(3, 64):
        learner.train_batch(batch)
    return learner


def test_the_exported_hybrid_scores_as_the_learner_ranks() -> None:
    learner = _hybrid_learner()
    rng = np.random.default_rng(0)
    history = rng.integers(0, len(learner.vocab) + 1, size=(9, SMALL.max_len))  # (B, L)
    history[0] = 0
    scorer = scoring_model(learner)
    onnx_bytes = export_onnx(scorer, SMALL.max_len)
    assert check_parity(scorer, onnx_bytes, history) < 1e-4
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: history.astype(np.int64)})[0]
    expected = learner._score_rows(history.astype(np.int64))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    g_alone = learner._score_rows(history.astype(np.int64), weight=0.0)
    assert np.abs(expected - g_alone)[1:, 1:].max() > 0.1  # the prior changed the scores


def test_a_prior_weight_of_zero_exports_the_generator_alone() -> None:
    learner = _hybrid_learner(weight=0.0)
    assert scoring_model(learner).__class__.__name__ == "Generator"


def test_the_counts_survive_a_state_round_trip() -> None:
    learner = _hybrid_learner()
    back = OnlineLearner.from_state_dict(learner.state_dict())
    assert back.prior_cfg == learner.prior_cfg
    assert back.cooc.n_links() == learner.cooc.n_links() > 0
    h = np.zeros((1, SMALL.max_len), dtype=np.int64)
    h[0, -2:] = [1, 2]
    np.testing.assert_allclose(back._score_rows(h), learner._score_rows(h), atol=1e-6)


def test_several_prior_weights_rank_one_run_as_separate_runs_would() -> None:
    events = [e for batch in planted_stream(2, 48) for e in batch]
    examples = list(build_examples(events, SMALL.max_len))
    both = run_prequential_all(examples, "none+cooc", batch_size=32, model_cfg=SMALL,
                               prior_weights=[0.0, 3.0], report_from=40)
    assert [r.method for r in both] == ["none+cooc@0", "none+cooc@3"]
    alone = run_prequential(examples, "none+cooc", batch_size=32, model_cfg=SMALL,
                            prior_weights=[3.0], report_from=40)
    plain = run_prequential(examples, "none", batch_size=32, model_cfg=SMALL)
    np.testing.assert_array_equal(both[1].ranks, alone.ranks)
    np.testing.assert_array_equal(both[0].ranks, plain.ranks)
    assert "test:hr@10" in alone.metrics and alone.settings["prior"]["weight"] == 3.0


@pytest.mark.parametrize("backward", [0.5, 0.0])
def test_forget_removes_every_link_from_and_to_the_rows(backward: float) -> None:
    cooc = Cooccurrence(n_recent=2, decay=0.5, backward=backward, top_k=4)
    for recent, j in [([1, 2], 3), ([3, 1], 4), ([4, 3], 2), ([2], 1)]:
        cooc.learn(recent, j)
    cooc.forget([3])
    assert cooc.row(3)[0].size == 0
    for i in range(cooc.n_rows):
        assert 3 not in cooc.row(i)[0].tolist()
        assert 3 not in cooc.slots[i]
    idx, _ = cooc.table(5)
    assert not (idx == 3).any()
    assert cooc.row(1)[0].tolist() != [] and 4 in cooc.row(1)[0].tolist()  # others stay
    cooc.learn([1], 3)  # a reused row links afresh
    assert cooc.row(1)[0].tolist().count(3) == 1


def test_counts_whose_rows_are_mostly_empty_survive_a_state_round_trip() -> None:
    c = Cooccurrence(n_recent=2, decay=0.5, backward=0.25, top_k=3)
    c.grow(5000)  # a large catalogue: few rows have links
    c.learn([7, 4999], 12)
    c.learn([12], 7)
    c.learn([1, 2], 3)
    back = Cooccurrence.from_state_dict(c.state_dict())
    assert back.n_rows == c.n_rows == 5000 and back.n_links() == c.n_links()
    for got, want in zip(back.table(5000), c.table(5000), strict=True):
        np.testing.assert_array_equal(got, want)
    assert [back.slots[i] for i in (3, 7, 12, 4999)] == [c.slots[i] for i in (3, 7, 12, 4999)]
    for counts in (back, c):  # an empty row and a linked one go on growing alike
        counts.learn([100, 7], 4998)
        for j in range(20, 30):
            counts.learn([100], j)
    for got, want in zip(back.table(5000), c.table(5000), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backward", [0.5, 0.0])
def test_the_rows_said_to_hold_links_are_the_tables_rows_with_any(backward: float) -> None:
    cooc = Cooccurrence(n_recent=2, decay=0.5, backward=backward, top_k=3)
    cooc.grow(50)
    for recent, j in [([1, 2], 3), ([3, 1], 4), ([4, 3], 2), ([2], 1), ([40], 17)]:
        cooc.learn(recent, j)

    def check() -> None:
        idx, val = cooc.table(50)
        assert cooc.held_rows(50).tolist() == np.flatnonzero((val > 0).any(axis=1)).tolist()
        scorer = PriorScorer(idx, val, PriorConfig(top_k=3), held=cooc.held_rows(50))
        rows, whole = scorer.as_rows(), SparseRows.from_dense(idx, val)
        assert all(np.array_equal(a, b) for a, b in ((rows.indptr, whole.indptr),
                                                      (rows.cols, whole.cols),
                                                      (rows.vals, whole.vals)))

    check()
    cooc.forget([40, 3])  # rows that held links hold none
    check()
    back = Cooccurrence.from_state_dict(cooc.state_dict())
    assert back.held_rows(50).tolist() == cooc.held_rows(50).tolist()
