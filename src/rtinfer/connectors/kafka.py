"""What the Kafka source and sink share: the extra's import check and client settings.

:func:`client_config` merges librdkafka settings in one order (the connector's
defaults, then the user's ``config``, then the settings a delivery guarantee
depends on), refusing a user setting that would break the guarantee or that the
connector sets itself, with a message naming the setting and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..exceptions import ConfigError, MissingDependency

__all__ = ["client_config", "require_kafka"]


def require_kafka(what: str) -> None:
    """Raise :class:`MissingDependency` naming ``what`` if confluent-kafka is not installed."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(what, "kafka") from exc


def _setting_is(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool):
        return value is wanted or str(value).lower() == str(wanted).lower()
    return str(value).lower() == str(wanted).lower()


def client_config(
    what: str,
    bootstrap_servers: str | Sequence[str],
    config: Mapping[str, Any] | None,
    *,
    defaults: Mapping[str, Any],
    fixed: Mapping[str, Any],
    owned: Mapping[str, str],
) -> dict[str, Any]:
    """The librdkafka configuration of a client: ``defaults``, then ``config``, then ``fixed``.

    A key of ``owned`` in ``config`` is a :class:`ConfigError` (it is set through
    the argument the mapping names), and so is a key of ``fixed`` with another value.
    """
    servers = (
        bootstrap_servers if isinstance(bootstrap_servers, str) else ",".join(bootstrap_servers)
    )
    if not servers.strip():
        raise ConfigError(
            f"{what}: bootstrap_servers is empty; use e.g. 'kafka-1:9092,kafka-2:9092'"
        )
    merged: dict[str, Any] = dict(defaults)
    for key, value in (config or {}).items():
        if key in owned:
            raise ConfigError(f"{what}: {key!r} cannot be set in config; it is set by {owned[key]}")
        if key in fixed and not _setting_is(value, fixed[key]):
            raise ConfigError(
                f"{what}: {key}={value!r} would break at-least-once delivery; rtinfer needs "
                f"{key}={fixed[key]!r} (leave it out of config)"
            )
        merged[key] = value
    merged.update(fixed)
    merged["bootstrap.servers"] = servers
    merged.setdefault("logger", logging.getLogger("rtinfer.librdkafka"))
    return merged
