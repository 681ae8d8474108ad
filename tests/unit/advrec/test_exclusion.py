"""The exclusion rule: what ADVREC_EXCLUDE accepts and which past items it takes out."""

from __future__ import annotations

import pytest

from advrec.config import ConfigError
from advrec.exclusion import TYPE_CODES, ExclusionRule
from stream_app.settings import load_settings
from trainer.settings import load_trainer_settings


def codes(*names: str) -> bytes:
    return bytes(TYPE_CODES[n] for n in names)


def test_seen_excludes_every_history_item_and_masks_training() -> None:
    rule = ExclusionRule.parse("seen")
    assert rule.everything and rule.mask_history and str(rule) == "seen"
    assert rule.excluded(["a", "b"], None) == ["a", "b"]


def test_none_excludes_nothing_and_trains_without_the_mask() -> None:
    rule = ExclusionRule.parse("none")
    assert rule.nothing and not rule.mask_history and str(rule) == "none"
    assert rule.excluded(["a", "b"], codes("purchase", "click")) == []


def test_types_exclude_only_items_with_events_of_those_types() -> None:
    rule = ExclusionRule.parse("purchase, cart")
    assert not rule.everything and not rule.nothing and not rule.mask_history
    history = ["a", "b", "c", "d"]
    assert rule.excluded(history, codes("click", "purchase", "view", "cart")) == ["b", "d"]


def test_items_older_than_their_type_codes_count_as_clicks() -> None:
    # a state written before the types were kept has fewer codes than items
    rule = ExclusionRule.parse("purchase")
    assert rule.excluded(["old", "new"], codes("purchase")) == ["new"]
    assert ExclusionRule.parse("click").excluded(["old", "new"], codes("purchase")) == ["old"]


@pytest.mark.parametrize("bad", ["purchased", "seen,buy", "clicks"])
def test_an_unknown_rule_is_a_clear_settings_error_on_both_sides(bad: str) -> None:
    with pytest.raises(ValueError, match="event types"):
        ExclusionRule.parse(bad)
    with pytest.raises(ConfigError, match="ADVREC_EXCLUDE"):
        load_settings({"ADVREC_EXCLUDE": bad})
    with pytest.raises(ConfigError, match="ADVREC_EXCLUDE"):
        load_trainer_settings({"ADVREC_EXCLUDE": bad})
