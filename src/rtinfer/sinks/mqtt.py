"""Publish results to an MQTT 5 topic at QoS 1, each flush confirmed by the broker.

:class:`MqttSink` buffers what the pipeline writes and publishes it on
``flush``, returning once the broker acknowledged (PUBACK) every message
and refused none. Each message carries the user property
``rtinfer-source-id`` (the event's id), so consumers can drop the duplicates
that at-least-once delivery brings: MQTT itself never de-duplicates. With
``partitions=P`` a result goes to the topic ``<topic>/<p>``, ``p = crc32(key) % P``
(:mod:`rtinfer.connectors.partitions`).

Importing this module needs ``aiomqtt`` (``pip install 'rtinfer[mqtt]'``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

from ..exceptions import MissingDependency, RtinferError
from ..types import Event
from .ids import source_id

try:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode
except ImportError as exc:  # the optional extra is not installed
    raise MissingDependency("the MQTT sink", "mqtt") from exc

from ..connectors.mqtt import (
    KEY_B64_SUFFIX,
    KEY_PROPERTY,
    MqttLink,
    check_topic,
    new_properties,
    parse_url,
    tls_context,
)
from ..connectors.partitions import check_partitions, partition_of

__all__ = ["NO_MATCHING_SUBSCRIBERS", "SOURCE_ID_PROPERTY", "MqttSink"]

logger = logging.getLogger(__name__)

#: The user property carrying the id of the event a result was derived from.
SOURCE_ID_PROPERTY = "rtinfer-source-id"
#: PUBACK reason code 0x10: accepted, but no subscription matched (the message is gone).
NO_MATCHING_SUBSCRIBERS = 0x10

_encode = msgspec.json.Encoder().encode

_Message = tuple[str, bytes, Any]  # topic, payload, paho Properties


def key_property(name: str, key: bytes) -> tuple[str, str]:
    """The user property carrying ``key``: as text when it survives unchanged, else base64."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable() and text == text.strip():
        return (name, text)
    return (name + KEY_B64_SUFFIX, base64.b64encode(key).decode("ascii"))


class MqttSink:
    """Publishes each event's ``result`` to ``topic`` (MQTT 5).

    A ``bytes`` result is published as it is; anything else as JSON (msgspec),
    with the content type ``application/json``. User properties:
    ``rtinfer-source-id`` (see :func:`source_id`) and the event's key under
    ``key_property`` (``<key_property>-b64``, base64, when the key is not
    printable UTF-8). ``message_expiry_s`` sets the MQTT 5 message expiry: a
    result not delivered by then is dropped by the broker (``None``: never).

    ``write`` only buffers. ``flush`` publishes the buffer (at most
    ``max_pending`` publishes awaiting their PUBACK at once; the client keeps
    at most ``max_inflight`` of them on the wire) and returns when each was
    acknowledged. A refusal (PUBACK reason code 0x80 or above: not authorised,
    quota exceeded, topic invalid...) or a timeout (``publish_timeout_s``)
    raises and keeps the whole buffer: the next flush publishes it all again,
    duplicates included. A lost connection is re-opened once and the buffer
    published again within the same flush. With ``require_subscribers``, a
    PUBACK saying that no subscription matched (0x10: the broker kept nothing)
    also fails the flush: results are never acknowledged into the void.

    QoS 1 (the default) is at least once up to the broker; QoS 0 is fire and
    forget (``flush`` returns once the bytes are written); QoS 2 adds a second
    round trip for nothing here: the pipeline redelivers anyway on a crash.

    ``partitions=P`` publishes each result to ``<topic>/<p>`` with ``p =
    zlib.crc32(key) % P`` (partition 0 for an event without a key), for a
    partitioned :class:`~rtinfer.sources.mqtt.MqttSource`.
    """

    __slots__ = (
        "_buffer",
        "_link",
        "_refused",
        "_started",
        "_tls",
        "ca_certs",
        "certfile",
        "client_id",
        "connect_timeout_s",
        "keepalive_s",
        "key_property",
        "keyfile",
        "max_inflight",
        "max_pending",
        "message_expiry_s",
        "name",
        "partitions",
        "password",
        "publish_timeout_s",
        "qos",
        "require_subscribers",
        "retain",
        "topic",
        "url",
        "username",
    )

    def __init__(
        self,
        url: str,
        topic: str,
        *,
        qos: int = 1,
        retain: bool = False,
        client_id: str | None = None,
        key_property: str = KEY_PROPERTY,
        message_expiry_s: int | None = None,
        require_subscribers: bool = False,
        partitions: int | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_certs: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        max_pending: int = 1024,
        max_inflight: int = 20,
        publish_timeout_s: float = 10.0,
        keepalive_s: int = 60,
        connect_timeout_s: float = 5.0,
    ) -> None:
        check_topic(topic, filter_ok=False)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if not 1 <= max_inflight <= 65535:
            raise ValueError(f"max_inflight must be 1 to 65535, got {max_inflight}")
        if publish_timeout_s <= 0:
            raise ValueError(f"publish_timeout_s must be above 0, got {publish_timeout_s}")
        if message_expiry_s is not None and not 1 <= message_expiry_s <= 0xFFFFFFFF:
            raise ValueError(f"message_expiry_s must be 1 to 4294967295, got {message_expiry_s}")
        if not key_property:
            raise ValueError("key_property must be a non-empty user property name")
        parse_url(url)  # a wrong URL fails here, not at start
        check_partitions(partitions)
        self.partitions = partitions
        self.url = url
        self.topic = topic
        self.qos = qos
        self.retain = retain
        self.client_id = client_id if client_id is not None else f"rtinfer-sink-{uuid.uuid4().hex}"
        self.key_property = key_property
        self.message_expiry_s = message_expiry_s
        self.require_subscribers = require_subscribers
        self.username = username
        self.password = password
        self.ca_certs = ca_certs
        self.certfile = certfile
        self.keyfile = keyfile
        self.max_pending = max_pending
        self.max_inflight = max_inflight
        self.publish_timeout_s = publish_timeout_s
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.name = f"mqtt://{topic}"
        self._tls: ssl.SSLContext | None = None
        self._link: MqttLink | None = None
        self._buffer: list[_Message] = []
        self._refused: list[ReasonCode] = []
        self._started = False

    async def start(self) -> None:
        """Connect (a clean session: a publisher needs none)."""
        if self._link is not None:
            return
        if self.ca_certs or self.certfile or self.keyfile:
            self._tls = tls_context(self.ca_certs, self.certfile, self.keyfile)
        await self._connect()
        self._started = True

    async def _connect(self) -> MqttLink:
        link = await MqttLink.open(
            self.url,
            client_id=self.client_id,
            clean_start=True,
            session_expiry_s=0,
            max_inflight=self.max_inflight,
            username=self.username,
            password=self.password,
            tls=self._tls,
            keepalive_s=self.keepalive_s,
            timeout_s=self.connect_timeout_s,
            on_publish=self._published,
        )
        # aiomqtt logs a warning for every publish beyond this many awaiting their PUBACK.
        link.client.pending_calls_threshold = self.max_pending + 1
        self._link = link
        return link

    def _published(self, mid: int, reason: ReasonCode) -> None:
        if reason.is_failure or (
            self.require_subscribers and reason.value == NO_MATCHING_SUBSCRIBERS
        ):
            self._refused.append(reason)

    @property
    def connected(self) -> bool:
        """Whether the connection is up (if not, the next flush connects again)."""
        return self._link is not None and self._link.up

    @property
    def pending(self) -> int:
        """How many results were written and not yet flushed."""
        return len(self._buffer)

    async def write(self, events: Sequence[Event]) -> None:
        """Buffer each event's result with its properties; nothing is sent until ``flush``."""
        append = self._buffer.append
        key_name = self.key_property
        expiry = self.message_expiry_s
        topic, partitions = self.topic, self.partitions
        for event in events:
            result = event.result
            properties = new_properties(PacketTypes.PUBLISH)
            if type(result) is bytes:
                payload = result
            else:
                payload = _encode(result)
                properties.ContentType = "application/json"
            ident = source_id(event)
            if ident is not None:
                properties.UserProperty = (SOURCE_ID_PROPERTY, ident)
            if event.key is not None:
                properties.UserProperty = key_property(key_name, event.key)
            if expiry is not None:
                properties.MessageExpiryInterval = expiry
            if partitions is None:
                append((topic, payload, properties))
            else:
                append((f"{topic}/{partition_of(event.key, partitions)}", payload, properties))

    async def flush(self) -> None:
        """Publish the buffer; return once the broker acknowledged every message, else raise."""
        if not self._buffer:
            return
        if not self._started:
            raise RuntimeError(f"{self.name}: call start() before flush()")
        for attempt in (1, 2):
            link = self._link
            if link is None or not link.up:  # lost: connect again (raises if that fails)
                self._link = None
                if link is not None:
                    await link.close()
                link = await self._connect()
            try:
                await self._publish_all(link)
            except aiomqtt.MqttError as exc:
                if link.up or attempt == 2:
                    raise RtinferError(
                        f"{self.name}: publishing {len(self._buffer)} results to {self.url} "
                        f"failed ({exc}); they are kept and published again on the next flush"
                    ) from exc
                logger.warning(
                    "%s: connection lost during a flush; publishing %d results again",
                    self.name,
                    len(self._buffer),
                )
                continue
            self._buffer = []
            return

    async def _publish_all(self, link: MqttLink) -> None:
        client, qos, retain = link.client, self.qos, self.retain
        timeout = self.publish_timeout_s
        buffer = self._buffer
        self._refused = []
        step = self.max_pending
        down = asyncio.ensure_future(link.wait_down())
        try:
            for begin in range(0, len(buffer), step):
                publishing = asyncio.gather(
                    *(
                        client.publish(
                            topic, payload, qos, retain, properties=properties, timeout=timeout
                        )
                        for topic, payload, properties in buffer[begin : begin + step]
                    ),
                    return_exceptions=True,
                )
                # aiomqtt leaves a publish waiting for its PUBACK until the timeout even when
                # the connection drops: stop waiting as soon as it does.
                await asyncio.wait((publishing, down), return_when=asyncio.FIRST_COMPLETED)
                if not publishing.done():
                    publishing.cancel()
                    await asyncio.gather(publishing, return_exceptions=True)
                    raise aiomqtt.MqttError("the connection was lost during the flush")
                self._check(publishing.result(), len(buffer))
        finally:
            down.cancel()

    def _check(self, outcomes: list[Any], total: int) -> None:
        """Raise the first failed publish, or a refusal any PUBACK reported."""
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if self._refused:
            reasons = sorted({str(r) for r in self._refused})
            raise RtinferError(
                f"{self.name}: the broker at {self.url} refused {len(self._refused)} of "
                f"{total} results ({', '.join(reasons)}); check the topic and the ACLs (or "
                "that a consumer subscribed, with require_subscribers); the results are kept "
                "and published again on the next flush"
            )

    async def aclose(self) -> None:
        """Disconnect; results written but not flushed are dropped (never acked)."""
        link, self._link = self._link, None
        self._started = False
        if self._buffer:
            logger.warning(
                "%s: closing with %d unflushed results; their inputs were not acknowledged "
                "and will be delivered again",
                self.name,
                len(self._buffer),
            )
            self._buffer = []
        if link is not None:
            await link.close(timeout_s=self.connect_timeout_s)

    def __repr__(self) -> str:
        return f"<MqttSink {self.name} qos={self.qos} client={self.client_id!r}>"
