"""The catalogue contract: each failure has its reason, valid items round-trip, and catalogue
files read into items the contract accepts."""

from __future__ import annotations

import csv
from pathlib import Path

import msgpack
import pytest

from advrec.catalogue import (
    ITEM_REASONS,
    MAX_CATEGORIES,
    MAX_ITEM_BYTES,
    MAX_TEXT_CHARS,
    MAX_TITLE_CHARS,
    CatalogueItem,
    InvalidItem,
    decode_item,
    encode_item,
    item_key,
)
from advrec.contract import FUTURE_SLACK_MS, MAX_ID_CHARS
from advrec.datasets import (
    DatasetError,
    read_catalogue_csv,
    read_movielens,
    read_movielens_movies,
)
from tests.datasets import (
    MOVIELENS_MOVIES_RATED,
    MOVIELENS_MOVIES_SLICE,
    MOVIELENS_MOVIES_UNRATED,
    MOVIELENS_SLICE,
)

NOW = 1_700_000_000_000


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_decode_item_round_trips_every_field() -> None:
    item = CatalogueItem(item="sku-1", title="Red shoe", text="Leather, size 42.",
                         categories=("shoes", "red"), created=NOW - 1000)
    assert decode_item(encode_item(item), item_key("sku-1"), now_ms=NOW) == item


def test_encode_item_leaves_out_empty_optional_fields() -> None:
    item = CatalogueItem(item="1", title="Toy Story (1995)")
    assert msgpack.unpackb(encode_item(item)) == {"item": "1", "title": "Toy Story (1995)"}
    assert decode_item(encode_item(item), now_ms=NOW) == item


def test_decode_item_ignores_unknown_fields_and_accepts_nil_optionals() -> None:
    payload = pack({"item": "i", "title": "t", "text": None, "categories": None,
                    "created": None, "price": 9.5})
    assert decode_item(payload, now_ms=NOW) == CatalogueItem("i", "t")


def test_item_key_is_the_raw_utf8_item_id() -> None:
    assert item_key("Café-7") == "Café-7".encode()


BAD_RECORDS: list[tuple[str, bytes, bytes | None]] = [
    ("not_msgpack", b"\xc1", None),
    ("too_large", pack({"item": "i", "title": "t", "text": "x" * MAX_ITEM_BYTES}), None),
    ("not_a_map", pack(["i", "t"]), None),
    ("missing_field", pack({"title": "t"}), None),
    ("missing_field", pack({"item": "i"}), None),
    ("bad_type", pack({"item": 7, "title": "t"}), None),
    ("bad_type", pack({"item": "i", "title": ["t"]}), None),
    ("bad_type", pack({"item": "i", "title": "t", "text": 3}), None),
    ("bad_type", pack({"item": "i", "title": "t", "categories": "a|b"}), None),
    ("bad_type", pack({"item": "i", "title": "t", "categories": ["a", 2]}), None),
    ("bad_id", pack({"item": "", "title": "t"}), None),
    ("bad_id", pack({"item": "i" * (MAX_ID_CHARS + 1), "title": "t"}), None),
    ("bad_title", pack({"item": "i", "title": "  "}), None),
    ("bad_title", pack({"item": "i", "title": "t" * (MAX_TITLE_CHARS + 1)}), None),
    ("text_too_long", pack({"item": "i", "title": "t", "text": "x" * (MAX_TEXT_CHARS + 1)}),
     None),
    ("bad_categories", pack({"item": "i", "title": "t",
                             "categories": ["c"] * (MAX_CATEGORIES + 1)}), None),
    ("bad_categories", pack({"item": "i", "title": "t", "categories": ["a", ""]}), None),
    ("bad_categories", pack({"item": "i", "title": "t", "categories": ["c" * 101]}), None),
    ("bad_created", pack({"item": "i", "title": "t", "created": "2024-01-01"}), None),
    ("bad_created", pack({"item": "i", "title": "t", "created": 1.7e12}), None),
    ("bad_created", pack({"item": "i", "title": "t", "created": True}), None),
    ("bad_created", pack({"item": "i", "title": "t", "created": -1}), None),
    ("bad_created", pack({"item": "i", "title": "t", "created": NOW + FUTURE_SLACK_MS + 1}),
     None),
    ("key_mismatch", pack({"item": "i", "title": "t"}), b"other"),
    ("key_mismatch", pack({"item": "i", "title": "t"}), b'"i"'),  # a JSON key, not raw
]


@pytest.mark.parametrize(("reason", "payload", "key"), BAD_RECORDS)
def test_decode_item_names_the_reason_of_each_bad_record(reason: str, payload: bytes,
                                                         key: bytes | None) -> None:
    with pytest.raises(InvalidItem) as caught:
        decode_item(payload, key, now_ms=NOW)
    assert caught.value.reason == reason
    assert caught.value.detail and reason in str(caught.value)


def test_every_reason_has_a_bad_record() -> None:
    assert {reason for reason, _, _ in BAD_RECORDS} == set(ITEM_REASONS)


def test_decode_item_refuses_a_tombstone_as_not_msgpack() -> None:
    # the caller treats a tombstone (null value) before decoding; here it is no record
    with pytest.raises(InvalidItem, match="not_msgpack"):
        decode_item(None, item_key("i"), now_ms=NOW)


def test_created_up_to_a_day_ahead_and_back_to_zero_is_accepted() -> None:
    for created in (0, NOW + FUTURE_SLACK_MS):
        item = CatalogueItem("i", "t", created=created)
        assert decode_item(encode_item(item), now_ms=NOW).created == created


def test_content_text_joins_title_categories_and_text_skipping_empty_parts() -> None:
    toy = CatalogueItem("1", "Toy Story (1995)",
                        categories=("Adventure", "Animation", "Children", "Comedy", "Fantasy"))
    assert toy.content_text() == ("Toy Story (1995). Adventure, Animation, Children, Comedy, "
                                  "Fantasy")
    assert CatalogueItem("2", "Shoe", text="Red leather.").content_text() == "Shoe. Red leather."
    assert CatalogueItem("3", "Shoe", text="  ").content_text() == "Shoe"
    assert (CatalogueItem("4", "Shoe", text="Red.", categories=("shoes",)).content_text()
            == "Shoe. shoes. Red.")


# -- catalogue files ---------------------------------------------------------------------------

def test_movies_slice_holds_every_rated_movie_and_twenty_more() -> None:
    items = read_movielens_movies(MOVIELENS_MOVIES_SLICE)
    assert len(items) == MOVIELENS_MOVIES_RATED + MOVIELENS_MOVIES_UNRATED
    ids = [i.item for i in items]
    assert len(set(ids)) == len(ids)
    rated = {e.item for e in read_movielens(MOVIELENS_SLICE)}  # the ids clicks use
    assert len(rated) == MOVIELENS_MOVIES_RATED and rated <= set(ids)
    assert len(set(ids) - rated) == MOVIELENS_MOVIES_UNRATED


def test_movies_genres_become_categories_and_no_genres_listed_none() -> None:
    by_id = {i.item: i for i in read_movielens_movies(MOVIELENS_MOVIES_SLICE)}
    assert by_id["1"] == CatalogueItem(
        "1", "Toy Story (1995)",
        categories=("Adventure", "Animation", "Children", "Comedy", "Fantasy"))
    assert by_id["114335"] == CatalogueItem("114335", "La cravate (1957)")
    assert sum(not i.categories for i in by_id.values()) == 9
    assert all(c != "(no genres listed)" for i in by_id.values() for c in i.categories)


def test_movies_quoted_titles_keep_their_commas_and_quotes() -> None:
    by_id = {i.item: i for i in read_movielens_movies(MOVIELENS_MOVIES_SLICE)}
    assert by_id["29"].title == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert by_id["29"].categories == ("Adventure", "Drama", "Fantasy", "Mystery", "Sci-Fi")
    assert by_id["7789"].title == "11'09\"01 - September 11 (2002)"


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_read_catalogue_csv_takes_the_named_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "shop.csv", [
        ["sku", "name", "price", "about", "tags", "listed"],
        ["a1", "Red shoe", "9", "Leather, size 42", "shoes; red", "1700000000"],
        ["a2", "Blue hat", "5", "", "", ""],
    ])
    items = read_catalogue_csv(path, id_col="sku", title_col="name", text_col="about",
                               categories_col="tags", categories_sep=";",
                               created_col="listed")
    assert items == [
        CatalogueItem("a1", "Red shoe", "Leather, size 42", ("shoes", "red"), 1_700_000_000_000),
        CatalogueItem("a2", "Blue hat"),
    ]
    only = read_catalogue_csv(path, id_col="sku", title_col="name", created_col="listed",
                              created_unit="ms")
    assert [i.created for i in only] == [1_700_000_000, None]


def test_read_catalogue_csv_names_the_missing_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "shop.csv", [["sku", "name"], ["a1", "Red shoe"]])
    with pytest.raises(DatasetError, match=r"lacks columns \['about'\]") as caught:
        read_catalogue_csv(path, id_col="sku", title_col="name", text_col="about")
    assert caught.value.line == 1 and caught.value.path == str(path)


def test_read_catalogue_csv_names_the_line_of_a_row_the_contract_refuses(
        tmp_path: Path) -> None:
    path = write_csv(tmp_path / "shop.csv", [["sku", "name"], ["a1", "Red shoe"], ["a2", " "]])
    with pytest.raises(DatasetError, match="bad_title") as caught:
        read_catalogue_csv(path, id_col="sku", title_col="name")
    assert caught.value.line == 3


def test_read_movielens_movies_names_a_missing_genres_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "movies.csv", [["movieId", "title"], ["1", "Toy Story"]])
    with pytest.raises(DatasetError, match="genres"):
        read_movielens_movies(path)
