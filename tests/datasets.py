"""Real interaction logs and a catalogue shipped with the tests (source and licence:
tests/data/README.md)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
# the 5,001 earliest ratings of MovieLens ml-latest-small, in its own format
MOVIELENS_SLICE = DATA / "ml-latest-small-slice" / "ratings.csv"
MOVIELENS_SLICE_ROWS = 5_001
# the movies of MovieLens ml-latest-small that the ratings slice rates, and 20 it never rates
MOVIELENS_MOVIES_SLICE = DATA / "ml-latest-small-slice" / "movies.csv"
MOVIELENS_MOVIES_RATED = 526
MOVIELENS_MOVIES_UNRATED = 20
