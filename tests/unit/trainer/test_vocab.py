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


def test_freed_rows_become_holes_and_new_items_take_the_lowest_first() -> None:
    vocab = Vocabulary(["a", "b", "c", "d"])
    assert vocab.free([3, 1, 1, 0, 99]) == ["c", "a"]  # a hole, padding or a stranger: ignored
    assert vocab.items() == [None, "b", None, "d"]
    assert (len(vocab), vocab.n_live, vocab.holes()) == (4, 2, [1, 3])
    assert "a" not in vocab and vocab.index("a") is None and vocab.at(1) is None
    assert vocab.encode_history(["a", "b", "c", "d"], max_len=3) == [0, 2, 4]
    assert vocab.add_many(["e", "b", "f", "g"]) == [1, 2, 3, 5]  # holes first, then growth
    assert vocab.items() == ["e", "b", "f", "d", "g"] and vocab.holes() == []


def test_state_round_trip_keeps_holes_where_they_were() -> None:
    vocab = Vocabulary(["a", "b", "c"])
    vocab.free([2])
    restored = Vocabulary.from_state(vocab.state_dict())
    assert restored.items() == ["a", None, "c"]
    assert restored.holes() == [2] and restored.index("c") == 3
    assert restored.add("z") == 2


def test_the_state_is_one_json_string_and_the_earlier_list_form_still_loads() -> None:
    vocab = Vocabulary(["a", "Ü-ß 東京", "c"])
    vocab.free([1])
    state = vocab.state_dict()
    assert list(state) == ["items_json"] and isinstance(state["items_json"], bytes)
    assert Vocabulary.from_state(state).items() == [None, "Ü-ß 東京", "c"]
    earlier = Vocabulary.from_state({"items": [None, "Ü-ß 東京", "c"]})  # checkpoints before
    assert earlier.items() == [None, "Ü-ß 東京", "c"] and earlier.holes() == [1]
