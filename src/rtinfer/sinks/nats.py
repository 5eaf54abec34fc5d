"""Publish results to a NATS JetStream subject, de-duplicated by message id.

:class:`NatsSink` buffers what the pipeline writes and publishes it on
``flush``, all at once, returning when JetStream has acknowledged (stored)
every message. Each message carries a ``Nats-Msg-Id`` derived from its
event, so JetStream drops a result published again within the stream's
duplicate window (a redelivered input, a retried flush): at-least-once in,
once in the stream. With ``partitions=P`` a result goes to the subject
``<subject>.<p>``, ``p = crc32(key) % P`` (:mod:`rtinfer.connectors.partitions`).

Importing this module needs ``nats-py`` (``pip install 'rtinfer[nats]'``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence

import msgspec

from ..exceptions import ConfigError, MissingDependency
from ..types import Event
from .ids import source_id

try:
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.errors import NotFoundError
except ImportError as exc:  # the optional extra is not installed
    raise MissingDependency("the NATS JetStream sink", "nats") from exc

from ..connectors.nats import (
    KEY_B64_HEADER,
    KEY_HEADER,
    connect,
    partition_subject,
    subject_covers,
)
from ..connectors.partitions import check_partitions, partition_of

__all__ = ["MSG_ID_HEADER", "NatsSink"]

logger = logging.getLogger(__name__)

#: The JetStream header that de-duplicates messages within a stream's duplicate window.
MSG_ID_HEADER = "Nats-Msg-Id"

_encode = msgspec.json.Encoder().encode

_Message = tuple[str, bytes, dict[str, str]]  # subject, payload, headers


def key_headers(key: bytes) -> dict[str, str]:
    """The header carrying ``key``: as text when it survives a header unchanged, else base64."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable() and text == text.strip():
        return {KEY_HEADER: text}
    return {KEY_B64_HEADER: base64.b64encode(key).decode("ascii")}


class NatsSink:
    """Publishes each event's ``result`` to ``subject`` through JetStream.

    A ``bytes`` result is published as it is; anything else as JSON (msgspec).
    Headers: ``rtinfer-key`` with the event's key (``rtinfer-key-b64`` when the
    key is not printable UTF-8), and ``Nats-Msg-Id`` =
    ``<msg_id_prefix><event id>`` (the prefix defaults to ``"<subject>:"``, so
    one event's results on two subjects of one stream are not mistaken for
    duplicates); without an id, the event's position
    (``<source>/<partition>/<offset>``) stands for it; with neither, no
    message id is set and nothing is de-duplicated. Two pipelines writing
    results for the same event ids to one subject need distinct prefixes.

    **De-duplication** holds within the stream's ``duplicate_window`` (two
    minutes by default; :attr:`duplicate_window_s` once started, when
    ``stream`` is given): a result published again later is stored again.
    Size the window above the longest outage after which inputs may be
    redelivered (at least ``ack_wait_s`` of the source, plus a restart).

    ``write`` only buffers. ``flush`` publishes the buffer, at most
    ``max_pending`` messages awaiting their acknowledgement at once, and
    returns when every one is stored; if any publish fails it raises and
    keeps the whole buffer, so a later flush publishes it again (what was
    stored is then dropped as a duplicate). ``stream`` names the stream
    expected to store ``subject``: ``start`` checks it exists, and a publish
    that another stream (or none) would store is refused. The stream must
    exist; this sink never creates one.

    ``partitions=P`` publishes each result to ``<subject>.<p>`` with ``p =
    zlib.crc32(key) % P`` (partition 0 for an event without a key), for a
    partitioned :class:`~rtinfer.sources.nats.NatsSource`. The stream must store
    ``<subject>.*``: with ``stream`` given, ``start`` checks that it stores
    every partition subject (:class:`ConfigError` if not).
    """

    __slots__ = (
        "_buffer",
        "_js",
        "_nc",
        "connect_timeout_s",
        "creds_file",
        "duplicate_window_s",
        "max_pending",
        "msg_id_prefix",
        "name",
        "partitions",
        "publish_timeout_s",
        "stream",
        "subject",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "url",
    )

    def __init__(
        self,
        url: str,
        subject: str,
        *,
        stream: str | None = None,
        msg_id_prefix: str | None = None,
        max_pending: int = 1024,
        publish_timeout_s: float = 5.0,
        partitions: int | None = None,
        creds_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not subject or any(c in subject for c in " *>\t\r\n"):
            raise ValueError(
                f"NATS subject {subject!r} is invalid for publishing: it must be non-empty, "
                "without spaces or wildcards"
            )
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if publish_timeout_s <= 0:
            raise ValueError(f"publish_timeout_s must be above 0, got {publish_timeout_s}")
        check_partitions(partitions)
        self.partitions = partitions
        self.url = url
        self.subject = subject
        self.stream = stream
        self.msg_id_prefix = f"{subject}:" if msg_id_prefix is None else msg_id_prefix
        self.max_pending = max_pending
        self.publish_timeout_s = publish_timeout_s
        self.creds_file = creds_file
        self.tls_ca_file = tls_ca_file
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self.connect_timeout_s = connect_timeout_s
        self.name = f"nats://{subject}"
        #: The stream's duplicate window in seconds, known after ``start`` when ``stream`` is set.
        self.duplicate_window_s: float | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._buffer: list[_Message] = []

    async def start(self) -> None:
        """Connect; with ``stream`` set, check it exists and read its duplicate window."""
        if self._nc is not None:
            return
        nc = await connect(
            self.url,
            name=f"rtinfer sink {self.subject}",
            creds_file=self.creds_file,
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            connect_timeout_s=self.connect_timeout_s,
        )
        js = nc.jetstream()
        if self.stream is not None:
            try:
                info = await js.stream_info(self.stream)
            except NotFoundError:
                await nc.close()
                raise ConfigError(
                    f"NATS stream {self.stream!r} does not exist at {self.url}; create it "
                    f"with a subject matching {self.subject!r} (nats stream add {self.stream} "
                    f"--subjects '{self.subject}'), or leave stream unset"
                ) from None
            except BaseException:
                await nc.close()
                raise
            self.duplicate_window_s = info.config.duplicate_window
            if self.partitions is not None:
                patterns = list(info.config.subjects or ())
                subjects = [partition_subject(self.subject, p) for p in range(self.partitions)]
                missing = [s for s in subjects if not any(subject_covers(x, s) for x in patterns)]
                if missing:
                    await nc.close()
                    wanted = partition_subject(self.subject, "*")
                    raise ConfigError(
                        f"NATS stream {self.stream!r} stores {patterns}, not the partition "
                        f"subjects {missing}: with partitions it must store {wanted!r} (nats "
                        f"stream edit {self.stream} --subjects '{wanted}')"
                    )
        self._nc, self._js = nc, js

    async def write(self, events: Sequence[Event]) -> None:
        """Buffer each event's result with its headers; nothing is sent until ``flush``."""
        prefix = self.msg_id_prefix
        append = self._buffer.append
        subject, partitions = self.subject, self.partitions
        for event in events:
            result = event.result
            payload = result if type(result) is bytes else _encode(result)
            headers = key_headers(event.key) if event.key is not None else {}
            ident = source_id(event)
            if ident is not None:
                headers[MSG_ID_HEADER] = prefix + ident
            if partitions is None:
                append((subject, payload, headers))
            else:
                append((f"{subject}.{partition_of(event.key, partitions)}", payload, headers))

    async def flush(self) -> None:
        """Publish the buffer and return once JetStream stored every message; raise if not."""
        if not self._buffer:
            return
        js = self._js
        if js is None:
            raise RuntimeError(f"{self.name}: call start() before flush()")
        buffer = self._buffer
        stream, timeout = self.stream, self.publish_timeout_s
        step = self.max_pending
        for begin in range(0, len(buffer), step):
            outcomes = await asyncio.gather(
                *(
                    js.publish(
                        subject, payload, timeout=timeout, stream=stream, headers=headers or None
                    )
                    for subject, payload, headers in buffer[begin : begin + step]
                ),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    # The buffer is kept whole: publishing it again stores only what is missing.
                    raise outcome
        self._buffer = []

    async def aclose(self) -> None:
        """Close the connection; results written but not flushed are dropped (never acked)."""
        nc, self._nc, self._js = self._nc, None, None
        if self._buffer:
            logger.warning(
                "%s: closing with %d unflushed results; their inputs were not acknowledged "
                "and will be delivered again",
                self.name,
                len(self._buffer),
            )
            self._buffer = []
        if nc is not None:
            await nc.close()

    def __repr__(self) -> str:
        return f"<NatsSink {self.name} stream={self.stream!r}>"
