"""The Redis connection shared by the Redis Streams source and sink: client, credentials, retries.

:func:`connect` builds the asyncio client from a URL, credentials and TLS
files; :func:`retrying` runs an operation again while Redis is unreachable;
:func:`require_redis` names the extra to install when redis-py is missing.
Used by :mod:`rtinfer.sources.redis` and :mod:`rtinfer.sinks.redis`. ``redis``
is imported when a client is built, not when this module is, so ``rtinfer``
imports without the ``redis`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ..exceptions import ConfigError, MissingDependency

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["connect", "require_redis", "retrying"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The replies the source parses itself, the same with every redis-py version:
# redis-py's own parsing of these commands differs between its versions and protocols.
_RAW_COMMANDS = ("XREADGROUP", "XAUTOCLAIM", "XPENDING")


def _raw(response: Any, **options: Any) -> Any:
    return response


def require_redis(what: str) -> None:
    """Raise :class:`MissingDependency` naming ``what`` if redis-py is not installed."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(what, "redis") from exc


def connect(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ssl_ca_certs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> Redis:
    """An asyncio Redis client for ``url`` (``redis://`` or, for TLS, ``rediss://``).

    Credentials go in the URL (``redis://user:secret@host:6379/0``) or in
    ``username``/``password``, not both. The ``ssl_*`` files (PEM paths) need a
    ``rediss://`` URL. redis-py uses the hiredis parser when it is installed.
    No connection is made until the first command.
    """
    from redis.asyncio import Redis

    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"Redis URL {url!r} has scheme {parts.scheme!r}; use redis://, rediss:// (TLS) "
            "or unix://"
        )
    if (username is not None and parts.username) or (password is not None and parts.password):
        raise ConfigError(
            "Redis credentials were given both in the URL and as arguments; give them once"
        )
    tls = {"ssl_ca_certs": ssl_ca_certs, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    options: dict[str, Any] = {k: v for k, v in tls.items() if v is not None}
    if options and parts.scheme != "rediss":
        raise ConfigError(
            f"{', '.join(sorted(options))} need a TLS connection: use a rediss:// URL, "
            f"got {parts.scheme}://"
        )
    if username is not None:
        options["username"] = username
    if password is not None:
        options["password"] = password
    client: Redis = Redis.from_url(url, **options)
    for command in _RAW_COMMANDS:
        client.set_response_callback(command, _raw)
    return client


async def retrying(
    what: str,
    operation: Callable[[], Awaitable[T]],
    *,
    give_up_after: float,
    closed: Callable[[], bool] = lambda: False,
) -> T:
    """Run ``operation``, again and again while Redis is unreachable, for ``give_up_after`` s.

    redis-py reconnects on the next command; this waits between tries (50 ms,
    doubling to 2 s) and logs each outage once per try. After ``give_up_after``
    seconds (or once ``closed()``) the connection error is raised.
    """
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    delay = 0.05
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            return await operation()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancelled command (the pipeline stopping) can surface as a connection
                # error from redis-py: the cancellation must win, never a retry.
                raise asyncio.CancelledError from exc
            if closed() or time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: Redis unreachable (%s); trying again in %.2f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
