"""Read typed settings from an environment mapping, failing with the key and the value."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, TypeVar, get_type_hints

__all__ = ["ConfigError", "bootstrap_servers", "from_env", "settings_as_dict"]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


def bootstrap_servers(broker: str) -> str:
    """Turn Faust's broker URLs (``kafka://a:1;kafka://b:2``) into the host:port list plain
    aiokafka clients take (``a:1,b:2``)."""
    return ",".join(u.split("://", 1)[-1] for u in broker.split(";"))


def _cast(key: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind in (str, "str"):
            return raw
        if kind in (tuple[str, ...],):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"setting {key}={raw!r} is invalid: {exc}") from None
    raise ConfigError(f"setting {key} has an unsupported type {kind!r}")


def from_env(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None,
             **overrides: Any) -> T:
    """Build the frozen settings dataclass ``cls`` from ``PREFIX_FIELD`` variables.

    Explicit ``overrides`` (e.g. from command-line flags; ``None`` means "not given") win
    over the environment, which wins over the dataclass defaults. ``__post_init__``
    validation of ``cls`` runs on the result.
    """
    environ = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{prefix}{field.name.upper()}"
        if overrides.get(field.name) is not None:
            values[field.name] = overrides[field.name]
        elif key in environ:
            values[field.name] = _cast(key, environ[key], hints[field.name])
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    assert not unknown, f"unknown settings {sorted(unknown)}"
    return cls(**values)


def settings_as_dict(settings: Any, redact: tuple[str, ...] = ("token", "secret")) -> dict:
    """Return settings as a plain dict for logs, checkpoints and meta.json (secrets hidden)."""
    out = {}
    for key, value in dataclasses.asdict(settings).items():
        if any(word in key for word in redact):
            value = "***" if value else ""
        out[key] = value
    return out
