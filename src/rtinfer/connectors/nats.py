"""The NATS connection shared by the JetStream source and sink: servers, credentials, TLS.

:func:`connect` opens a client (a ``.creds`` file, TLS files) that reconnects
for as long as it lives; :func:`close_quietly` closes one that may never have
connected. :data:`KEY_HEADER` and :data:`KEY_B64_HEADER` carry an event's key:
the sink writes them, the source reads them. Used by
:mod:`rtinfer.sources.nats` and :mod:`rtinfer.sinks.nats`.

Importing this module needs ``nats-py`` (``pip install 'rtinfer[nats]'``);
without it the import raises :class:`~rtinfer.exceptions.MissingDependency`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import ssl

from ..exceptions import ConfigError, MissingDependency, RtinferError

try:
    from nats.aio.client import Client
    from nats.errors import NoServersError
except ImportError as exc:  # the optional extra is not installed
    raise MissingDependency("the NATS connector", "nats") from exc

__all__ = [
    "KEY_B64_HEADER",
    "KEY_HEADER",
    "close_quietly",
    "connect",
    "partition_subject",
    "subject_covers",
]

logger = logging.getLogger(__name__)

#: Header holding an event's key as UTF-8 text (what :class:`~rtinfer.sinks.nats.NatsSink` writes).
KEY_HEADER = "rtinfer-key"
#: Header holding an event's key as base64, for keys that are not header-safe UTF-8 text.
KEY_B64_HEADER = "rtinfer-key-b64"


def partition_subject(subject: str, partition: int | str) -> str:
    """The subject of one partition of ``subject``: ``<subject>.<partition>``."""
    return f"{subject}.{partition}"


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject matching ``subject`` (wildcards allowed) matches ``pattern``.

    NATS wildcards: ``*`` is one token, ``>`` one or more trailing tokens.
    """
    wanted = subject.split(".")
    tokens = pattern.split(".")
    for i, part in enumerate(tokens):
        if part == ">":
            return len(wanted) > i and ">" not in wanted[:i]
        if i >= len(wanted) or wanted[i] == ">":
            return False
        if part not in ("*", wanted[i]):
            return False
    return len(tokens) == len(wanted)


async def connect(
    url: str,
    *,
    name: str,
    creds_file: str | None = None,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    connect_timeout_s: float = 5.0,
) -> Client:
    """Connect to the NATS server(s) at ``url`` (comma-separated for a cluster).

    ``creds_file`` is a NATS ``.creds`` file (JWT and NKey seed; needs the
    ``nkeys`` package, in the ``nats`` extra). TLS is used
    when the URL is ``tls://`` or any ``tls_*`` file is given: ``tls_ca_file``
    verifies the server, ``tls_cert_file`` and ``tls_key_file`` authenticate
    the client. Once connected, the client reconnects for as long as it
    lives; the first connection must succeed within ``connect_timeout_s``,
    else :class:`~rtinfer.exceptions.RtinferError` names the URL.
    """
    if creds_file is not None and importlib.util.find_spec("nkeys") is None:
        raise MissingDependency("NATS credentials (creds_file)", "nats")
    servers = [s.strip() for s in url.split(",") if s.strip()]
    if not servers:
        raise ConfigError(f"no NATS server in url {url!r}; use e.g. nats://127.0.0.1:4222")
    tls: ssl.SSLContext | None = None
    if tls_ca_file or tls_cert_file or tls_key_file:
        tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls_ca_file)
        if tls_cert_file:
            tls.load_cert_chain(tls_cert_file, tls_key_file)
        elif tls_key_file:
            raise ConfigError("tls_key_file needs tls_cert_file (the client certificate)")

    client = Client()

    async def on_error(exc: Exception) -> None:
        logger.warning("NATS %s (%s): %s", url, name, exc)

    async def on_disconnected() -> None:
        if not client.is_closed:  # closing calls this too
            logger.warning("NATS %s (%s): disconnected, reconnecting", url, name)

    async def on_reconnected() -> None:
        logger.info("NATS %s (%s): reconnected", url, name)

    try:
        # nats-py retries a first connection for as long as reconnection is allowed
        # (forever here), so the first connection is bounded from outside.
        await asyncio.wait_for(
            client.connect(
                servers,
                name=name,
                user_credentials=creds_file,
                tls=tls,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                connect_timeout=max(1, round(connect_timeout_s)),
                max_reconnect_attempts=-1,
            ),
            connect_timeout_s,
        )
    except (TimeoutError, OSError, NoServersError) as exc:
        await close_quietly(client)
        raise RtinferError(
            f"cannot connect to NATS at {url} within {connect_timeout_s} s ({exc!r}); "
            "check that the server runs and the URL, credentials and TLS files are right"
        ) from exc
    return client


async def close_quietly(client: Client) -> None:
    """Close ``client``, connected or not; a failure to close is only logged."""
    try:
        await client.close()
    except Exception:  # closing a client that never connected: nothing to release
        logger.debug("closing an unconnected NATS client failed", exc_info=True)
