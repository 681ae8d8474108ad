"""Settings from the environment: types are cast, bad values name the key and the value."""

from __future__ import annotations

import pytest

from advrec.config import ConfigError, settings_as_dict
from stream_app.settings import load_settings


def test_env_values_are_cast_to_the_field_types() -> None:
    s = load_settings({"ADVREC_PARTITIONS": "8", "ADVREC_READY_WITHOUT_MODEL": "yes",
                       "ADVREC_INGEST_WAIT_S": "0.5"})
    assert (s.partitions, s.ready_without_model, s.ingest_wait_s) == (8, True, 0.5)


def test_flags_override_the_environment() -> None:
    assert load_settings({"ADVREC_WEB_PORT": "7000"}, web_port=7100).web_port == 7100


def test_a_bad_value_names_the_key_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"ADVREC_PARTITIONS='four'"):
        load_settings({"ADVREC_PARTITIONS": "four"})
    with pytest.raises(ConfigError, match="ADVREC_MAX_K"):
        load_settings({"ADVREC_MAX_K": "0"})


def test_secrets_are_redacted_when_settings_are_logged() -> None:
    shown = settings_as_dict(load_settings({"ADVREC_ADMIN_TOKEN": "s3cret"}))
    assert shown["admin_token"] == "***" and "s3cret" not in str(shown)
