"""Type aliases shared by every advrec package."""

from typing import TypeAlias

UserId: TypeAlias = str
ItemId: TypeAlias = str
ItemIndex: TypeAlias = int  # row in the embedding table; 0 is padding
TimestampMs: TypeAlias = int  # unix time in milliseconds
