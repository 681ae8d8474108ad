"""Vocabulary: stable 1-based rows, left-padded history encoding, state round trip."""

from trainer.vocab import Vocabulary


def test_add_gives_rows_from_one_in_order() -> None:
    vocab = Vocabulary()
    assert vocab.add("a") == 1
    assert vocab.add_many(["b", "a", "c"]) == [2, 1, 3]
    assert len(vocab) == 3
    assert vocab.items() == ["a", "b", "c"]  # row i + 1 holds items()[i]


def test_growth_keeps_existing_rows() -> None:
    vocab = Vocabulary(["x", "y"])
    before = {item: vocab.index(item) for item in vocab.items()}
    vocab.add_many(f"n{i}" for i in range(100))
    assert {item: vocab.index(item) for item in before} == before
    assert vocab.item(vocab.index("n99")) == "n99"
    assert vocab.index("unknown") is None


def test_encode_history_left_pads_and_skips_unknowns() -> None:
    vocab = Vocabulary(["a", "b", "c"])
    assert vocab.encode_history(["a", "zzz", "c"], max_len=5) == [0, 0, 0, 1, 3]
    assert vocab.encode_history([], max_len=3) == [0, 0, 0]
    assert vocab.encode_history(["nope"], max_len=2) == [0, 0]


def test_encode_history_keeps_the_last_max_len_known_items() -> None:
    vocab = Vocabulary(["a", "b", "c", "d"])
    assert vocab.encode_history(["a", "b", "q", "c", "d", "q"], max_len=3) == [2, 3, 4]


def test_state_round_trip() -> None:
    vocab = Vocabulary(["a", "b"])
    restored = Vocabulary.from_state(vocab.state_dict())
    assert restored.items() == ["a", "b"]
    assert restored.add("c") == 3
