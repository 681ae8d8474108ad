"""Dataset loaders: formats, time order, deterministic ids, errors naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from advrec.contract import decode_event, encode_event
from advrec.datasets import (
    IMPLICIT_START_MS,
    DatasetError,
    count_events,
    load_events,
    read_movielens,
    read_sequences,
)
from tests.datasets import MOVIELENS_SLICE, MOVIELENS_SLICE_ROWS

RATINGS = """userId,movieId,rating,timestamp
1,10,4.0,964982703
1,20,3.5,964982000
2,10,5.0,964982000
2,30,1.0,964990000
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_movielens_sorts_by_time_keeping_file_order_on_ties(tmp_path: Path) -> None:
    log = load_events("movielens", write(tmp_path, "ratings.csv", RATINGS))
    assert [(e.user, e.item, e.ts) for e in log] == [
        ("1", "20", 964_982_000_000), ("2", "10", 964_982_000_000),
        ("1", "10", 964_982_703_000), ("2", "30", 964_990_000_000)]


def test_read_movielens_ids_name_source_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.csv", RATINGS)
    ids = [e.id for e in load_events("movielens", path)]
    assert ids == ["movielens:3", "movielens:4", "movielens:2", "movielens:5"]
    assert ids == [e.id for e in load_events("movielens", path)]  # same on every replay


def test_read_movielens_accepts_crlf_and_min_rating(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_bytes(RATINGS.replace("\n", "\r\n").encode())
    assert len(read_movielens(path)) == 4
    assert {e.item for e in read_movielens(path, min_rating=4.0)} == {"10"}


def test_read_movielens_events_pass_the_contract(tmp_path: Path) -> None:
    for event in load_events("movielens", write(tmp_path, "ratings.csv", RATINGS)):
        assert decode_event(encode_event(event)) == event


@pytest.mark.parametrize(("bad_row", "problem"), [
    ("3,40,4.0,notatime", "timestamp 'notatime' is not a number"),
    ("3,40,4.0", "expected 4 fields"),
    ("3,40,good,964982703", "rating 'good' is not a number"),
    ("3,40,4.0,964982703000", "in the future (wrong unit?)"),
    (",40,4.0,964982703", "user id must have 1..128 chars"),
])
def test_read_movielens_error_names_file_and_line(tmp_path: Path, bad_row: str,
                                                   problem: str) -> None:
    path = write(tmp_path, "ratings.csv", RATINGS + "\n" + bad_row + "\n")  # blank line 6
    with pytest.raises(DatasetError) as caught:
        load_events("movielens", path)
    assert caught.value.line == 7
    assert caught.value.path == str(path)
    assert problem in str(caught.value)
    assert str(caught.value).startswith(f"{path}:7: ")


def test_read_movielens_rejects_a_foreign_header(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.csv", "user,item,ts\n1,2,964982703\n")
    with pytest.raises(DatasetError, match=r":1: header .* lacks columns"):
        load_events("movielens", path)


def test_read_movielens_not_strict_skips_and_counts_bad_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.csv", RATINGS + "3,40,4.0,x\n4,50,2.0\n")
    log = load_events("movielens", path, strict=False)
    assert len(log) == 4
    assert log.skipped == 2
    assert [e.line for e in log.errors] == [6, 7]


def test_read_movielens_missing_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_events("movielens", tmp_path / "absent.csv")


def test_read_movielens_udata_reads_tab_separated_seconds(tmp_path: Path) -> None:
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
                                     "22\t377\t1\t878887116\n")
    log = load_events("movielens-udata", path)
    assert [(e.user, e.item, e.ts) for e in log] == [
        ("22", "377", 878_887_116_000), ("196", "242", 881_250_949_000),
        ("186", "302", 891_717_742_000)]
    assert [e.id for e in log] == ["movielens-udata:3", "movielens-udata:1",
                                   "movielens-udata:2"]


def test_read_movielens_udata_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186 302 3 891717742\n")
    with pytest.raises(DatasetError, match=r"u\.data:2: expected 4 fields"):
        load_events("movielens-udata", path)


def yoochoose_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "yoochoose"
    folder.mkdir()
    write(folder, "clicks_train_full.txt",
          "SessionId\tItemId\tTime\n1\t100\t1396437466.94\n1\t101\t1396437500.5\n"
          "2\t100\t1396437400.001\n")
    write(folder, "clicks_test.txt", "SessionId\tItemId\tTime\n9\t102\t1396437500.5\n")
    return folder


def test_read_yoochoose_directory_reads_train_then_test_by_time(tmp_path: Path) -> None:
    log = load_events("yoochoose", yoochoose_dir(tmp_path))
    assert [(e.user, e.item, e.ts, e.session) for e in log] == [
        ("2", "100", 1_396_437_400_001, "2"), ("1", "100", 1_396_437_466_940, "1"),
        ("1", "101", 1_396_437_500_500, "1"), ("9", "102", 1_396_437_500_500, "9")]
    assert log[0].id == "yoochoose:clicks_train_full:4"
    assert log[-1].id == "yoochoose:clicks_test:2"
    assert len(log.paths) == 2


def test_read_yoochoose_raw_challenge_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "yoochoose-clicks.dat",
                 "1,2014-04-07T10:54:09.868Z,214536500,0\n"
                 "1,2014-04-07T10:51:09.277Z,214536502,0\n")
    log = load_events("yoochoose", path)
    assert [(e.item, e.ts) for e in log] == [("214536502", 1_396_867_869_277),
                                             ("214536500", 1_396_868_049_868)]


def test_read_yoochoose_error_names_file_and_line(tmp_path: Path) -> None:
    folder = yoochoose_dir(tmp_path)
    write(folder, "clicks_test.txt", "SessionId\tItemId\tTime\n9\t102\t1396437500.5\n9\t103\n")
    with pytest.raises(DatasetError) as caught:
        load_events("yoochoose", folder)
    assert caught.value.path.endswith("clicks_test.txt")
    assert caught.value.line == 3


def test_read_sequences_one_line_per_user_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "Beauty.txt", "1 1 2 3\n2 4 1\n")
    log = load_events("sequences", path)
    assert [(e.user, e.item) for e in log] == [("1", "1"), ("1", "2"), ("1", "3"),
                                               ("2", "4"), ("2", "1")]
    assert [e.ts - IMPLICIT_START_MS for e in log] == [0, 1000, 2000, 3000, 4000]
    assert log[1].id == "sequences:1:2"


def test_read_sequences_user_item_pairs_keep_each_users_order(tmp_path: Path) -> None:
    path = write(tmp_path, "pairs.txt", "a x\nb y\na z\n\nb x\n")
    log = read_sequences(path)
    assert [(e.user, e.item) for e in log] == [("a", "x"), ("b", "y"), ("a", "z"), ("b", "x")]
    assert len({e.id for e in log}) == 4


def test_read_sequences_interleave_takes_each_users_nth_item_together(tmp_path: Path) -> None:
    path = write(tmp_path, "seq.txt", "1 a b c\n2 d\n3 e f\n")
    log = read_sequences(path, order="interleave")
    assert [e.item for e in log] == ["a", "d", "e", "b", "f", "c"]


def test_read_sequences_line_without_items_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "seq.txt", "1 a b\n2 c\n3\n")
    with pytest.raises(DatasetError, match=r"seq\.txt:3: expected 'user item \.\.\.'"):
        load_events("sequences", path)


def test_read_csv_maps_named_columns_and_ms(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "when,who,what,where\n1500000000500,u1,i1,s1\n"
                                      "1500000000400,u2,i2,s2\n")
    log = load_events("csv", path, columns="user=who,item=what,ts=when,session=where",
                      ts_unit="ms")
    assert [(e.user, e.item, e.ts, e.session) for e in log] == [
        ("u2", "i2", 1_500_000_000_400, "s2"), ("u1", "i1", 1_500_000_000_500, "s1")]
    assert [e.id for e in log] == ["csv:3", "csv:2"]


def test_read_csv_without_header_uses_indices_and_seconds(tmp_path: Path) -> None:
    path = write(tmp_path, "log.tsv", "u1\ti1\t1500000000.25\nu2\ti2\t1500000000\n")
    log = load_events("csv", path, columns={"user": 0, "item": 1, "ts": 2}, header=False,
                      delimiter="\t")
    assert [e.ts for e in log] == [1_500_000_000_000, 1_500_000_000_250]


def test_read_csv_without_ts_uses_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "u,i\na,x\nb,y\n")
    log = load_events("csv", path, columns="user=u,item=i")
    assert [(e.item, e.ts) for e in log] == [("x", IMPLICIT_START_MS),
                                             ("y", IMPLICIT_START_MS + 1000)]


def test_read_csv_bad_timestamp_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "u,i,t\na,x,1500000000\nb,y,soon\n")
    with pytest.raises(DatasetError, match=r"log\.csv:3: timestamp 'soon' is not a number"):
        load_events("csv", path, columns="user=u,item=i,ts=t")


def test_read_csv_missing_mapped_column_fails_on_header(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "u,i\na,x\n")
    with pytest.raises(DatasetError, match=r":1: header .* lacks columns \['t'\]"):
        load_events("csv", path, columns="user=u,item=i,ts=t")


def test_read_csv_bad_column_spec_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "u,i\na,x\n")
    with pytest.raises(ValueError, match="need user and item"):
        load_events("csv", path, columns="user=u,rating=i")


def test_load_events_unknown_source_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset source 'netflix'.*movielens"):
        load_events("netflix", tmp_path / "x")


def test_count_events_counts_what_load_events_yields(tmp_path: Path) -> None:
    path = write(tmp_path, "seq.txt", "1 a b c\n2 d\n")
    assert count_events("sequences", path) == 4
    assert count_events("movielens", write(tmp_path, "r.csv", RATINGS), min_rating=3.5) == 3


def test_a_real_movielens_slice_yields_one_event_per_data_row() -> None:
    ratings = MOVIELENS_SLICE  # real ratings shipped with the tests (tests/data/README.md)
    with ratings.open(encoding="utf-8") as handle:
        rows = sum(1 for line in handle if line.strip()) - 1  # minus the header
    log = load_events("movielens", ratings)
    assert len(log) == rows == MOVIELENS_SLICE_ROWS
    assert [e.ts for e in log] == sorted(e.ts for e in log)
    assert len({e.id for e in log}) == rows
