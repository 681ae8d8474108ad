"""Which of a user's past items the served list leaves out: the one exclusion rule.

``ADVREC_EXCLUDE`` (read by the worker and the trainer alike):

- ``seen`` (default): every item of the user's kept history (variant A of the reports);
- ``none``: nothing; a re-click can be recommended (variant B), as session streams want,
  where a third of the next clicks return to an item of the session;
- a comma-separated list of event types (``purchase`` or ``cart,purchase``): only items
  the user had an event of those types on, e.g. what was bought.

The trainer trains the generator for the rule in force: under ``seen`` the history's items
(but the target) leave the training softmax, as they leave the list; under the other rules
they stay, since the list may show them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from advrec.contract import EVENT_TYPES
from advrec.types import ItemId

__all__ = ["TYPE_CODES", "ExclusionRule"]

TYPE_CODES = {name: code for code, name in enumerate(EVENT_TYPES)}  # one byte per history item


@dataclass(frozen=True)
class ExclusionRule:
    """``types`` None: every seen item leaves the list; otherwise items of those event types."""

    types: frozenset[str] | None = None

    @classmethod
    def parse(cls, text: str) -> ExclusionRule:
        """Read ``seen``, ``none`` or a comma-separated list of event types; ValueError else."""
        value = text.strip().lower()
        if value in ("seen", "all", ""):
            return cls(None)
        if value == "none":
            return cls(frozenset())
        names = frozenset(part.strip() for part in value.split(",") if part.strip())
        unknown = sorted(names - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"{text!r}: not seen, none, or event types among {EVENT_TYPES} "
                             f"(unknown: {', '.join(unknown)})")
        return cls(names)

    @property
    def everything(self) -> bool:
        """True when every seen item leaves the list (the default)."""
        return self.types is None

    @property
    def nothing(self) -> bool:
        """True when nothing leaves the list."""
        return self.types == frozenset()

    @property
    def mask_history(self) -> bool:
        """Whether the trainer leaves history items out of the training softmax."""
        return self.everything

    def excluded(self, history: Sequence[ItemId], types: bytes | None) -> list[ItemId]:
        """Return the items of ``history`` that leave the list; ``types`` holds one event-type
        code per history item (``TYPE_CODES``; None or short: the missing ones are clicks)."""
        if self.types is None:
            return list(history)
        if not self.types:
            return []
        codes = {TYPE_CODES[name] for name in self.types}
        types = types or b""
        pad = len(history) - len(types)  # states written before the types were kept
        return [item for n, item in enumerate(history)
                if (types[n - pad] if n >= pad else 0) in codes]

    def __str__(self) -> str:
        if self.types is None:
            return "seen"
        return ",".join(sorted(self.types)) or "none"
