"""One history encoding for trainer and worker (``advrec.encoding``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advrec.contract import ClickEvent
from advrec.encoding import exclusion_rows, known_rows, model_input, padded


def test_padded_left_pads_and_keeps_the_newest() -> None:
    assert padded([], 3) == [0, 0, 0]
    assert padded([7], 3) == [0, 0, 7]
    assert padded([1, 2, 3, 4, 5], 3) == [3, 4, 5]


def test_unknown_items_are_dropped_before_the_window_is_cut() -> None:
    index = {"a": 1, "b": 2, "c": 3}
    rows = known_rows(index, ["a", "x", "b", "y", "c"])
    assert rows == [1, 2, 3]
    # two known items remain for a window of 2 even though "y" sits between them
    assert model_input([rows], 2).tolist() == [[2, 3]]


def test_model_input_and_exclusion_shapes_hold_for_empty_histories() -> None:
    known = [[], [4, 5, 6]]
    assert model_input(known, 4).tolist() == [[0, 0, 0, 0], [0, 4, 5, 6]]
    assert model_input(known, 4).dtype == np.int64
    assert exclusion_rows(known).tolist() == [[0, 0, 0, 0], [0, 4, 5, 6]]
    assert exclusion_rows([[]]).shape == (1, 1)


def test_trainer_and_worker_encode_one_user_state_identically(tmp_path: Path) -> None:
    """A user's state on the worker, encoded by the served model, gives the generator the
    same input as the training example the worker sends the trainer for the user's next click,
    encoded by the learner."""
    from stream_app.serving import load_model
    from stream_app.settings import load_settings
    from stream_app.state import UserState
    from tests.bundles import publish_toy
    from trainer.learner import OnlineLearner
    from trainer.model import ModelConfig
    from trainer.vocab import Vocabulary

    settings = load_settings({})
    max_len = 20
    vocab = [f"i{n}" for n in range(60)]
    model = load_model(tmp_path, publish_toy(tmp_path, vocab, max_len=max_len))
    learner = OnlineLearner(ModelConfig(max_len=max_len, d_model=8, n_layers=1))
    learner.vocab = Vocabulary(vocab)

    state = UserState()
    # 45 clicks; the oldest ones include items no model knows yet
    clicks = ["new-a", "new-b"] + [f"i{(7 * n) % 60}" for n in range(43)]
    for n, item in enumerate(clicks):
        state.apply(ClickEvent("u1", item, 1_000 + n, id=f"e{n}"), settings.history_len,
                    settings.dedup_window)
    served_history = list(state.history)  # what /recommendations hands the model server
    example = state.apply(ClickEvent("u1", "i1", 9_000, id="next"), settings.history_len,
                          settings.dedup_window, example_len=settings.train_history_len)
    assert example is not None

    served_in, exclude = model.prepare([model.known_rows(served_history)])  # (1, L), (1, S)
    trained_in = learner._encode([example.history])  # (1, L)
    assert served_in.shape == trained_in.shape == (1, max_len)
    np.testing.assert_array_equal(served_in, trained_in)
    # and the served list excludes every known item of the history
    assert set(exclude[0, 1:].tolist()) == {learner.vocab.index(i) for i in served_history
                                           if i in learner.vocab}
