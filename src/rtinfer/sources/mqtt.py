"""Read an MQTT 5 topic as a pipeline source, acknowledging each message after the sinks flush.

:class:`MqttSource` subscribes at QoS 1 with a persistent session and
**manual acknowledgements**: the PUBACK of a message is sent only when the
pipeline calls :meth:`MqttSource.ack`, which it does after every sink flushed
what came from it. A message read but not acknowledged when the connection
drops or the process dies is delivered again when the same ``client_id``
connects again within ``session_expiry_s`` (the broker keeps the session).
``shared_group`` subscribes to ``$share/<group>/<topic>``: the workers of one
group split the messages between them (no per-key order then). With
``partitions=P`` it subscribes to the partition topics ``<topic>/<p>`` it owns
instead (:mod:`rtinfer.connectors.partitions`), so each key is read by one
worker. What MQTT can and cannot promise is in ``docs/mqtt.md``.

Importing this module needs ``aiomqtt`` (``pip install 'rtinfer[mqtt]'``);
without it the import raises :class:`~rtinfer.exceptions.MissingDependency`.
The connection (:class:`~rtinfer.connectors.mqtt.MqttLink`) and its helpers
are in :mod:`rtinfer.connectors.mqtt`, shared with :mod:`rtinfer.sinks.mqtt`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import ssl
import time
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..exceptions import ConfigError, MissingDependency, RtinferError
from ..types import Event, Position

try:
    import aiomqtt
    import paho.mqtt.client as paho_mqtt
    from paho.mqtt.reasoncodes import ReasonCode
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError as exc:  # the optional extra is not installed
    raise MissingDependency("the MQTT source", "mqtt") from exc

from ..connectors.mqtt import (
    KEY_B64_SUFFIX,
    KEY_PROPERTY,
    MqttLink,
    check_topic,
    parse_url,
    tls_context,
)
from ..connectors.partitions import check_partitions
from ..connectors.partitions import owned_partitions as owned_partitions_of

__all__ = ["TOPIC_HEADER", "MqttSource"]

logger = logging.getLogger(__name__)

#: The header carrying the topic a message was published to (a filter may match many).
TOPIC_HEADER = "mqtt-topic"

_SESSION_EXPIRY_NEVER = 0xFFFFFFFF  # MQTT 5: the session never expires


def _user_properties(properties: Any) -> list[tuple[str, str]]:
    """The user properties of a received packet (paho's ``Properties`` is untyped)."""
    if properties is None:
        return []
    found: list[tuple[str, str]] | None = getattr(properties, "UserProperty", None)
    return found or []


class _Delivery(NamedTuple):
    """A QoS 1 message read and not yet acknowledged: its packet id and connection."""

    mid: int
    link: MqttLink


class MqttSource:
    """Events from an MQTT 5 topic (a filter: ``+`` and ``#`` allowed), acknowledged after flush.

    **Session.** The source connects as ``client_id`` with ``clean_start``
    false and a session that outlives a disconnection by ``session_expiry_s``:
    the broker keeps the subscription, queues messages while the worker is
    away, and delivers again every QoS 1 message that was not acknowledged.
    Give each worker a ``client_id`` of its own (two connections with one id
    take the session from each other) that stays the same across restarts.
    Without one, an id is generated: the session can then only survive
    reconnections within this process, and is ended on :meth:`aclose`.
    ``clean_start`` true starts from a fresh session on the first connection
    (reconnections still resume it).

    **Shared subscriptions.** With ``shared_group``, the source subscribes to
    ``$share/<group>/<topic>``: each message goes to one member of the group.

    **Partitions.** With ``partitions=P`` the source subscribes (QoS ``qos``) to
    the topics ``<topic>/<p>`` of the partitions it owns: ``owned_partitions``
    if given, else every ``p`` with ``p % N == i`` for worker ``i``
    (``RTINFER_WORKER``) of ``N`` (``RTINFER_WORKERS``). Ownership is static, so
    no shared subscription (``shared_group`` is refused with it). An event's
    position carries its partition (the last level of its topic). Producers
    publish key ``k`` to ``<topic>/<crc32(k) % P>`` (:class:`~rtinfer.sinks.mqtt.MqttSink`
    with the same ``partitions`` does).

    **Events.** ``value`` is the payload, ``key`` the user property
    ``key_property`` (UTF-8; ``<key_property>-b64``: base64) or ``None``;
    ``headers`` are the user properties (a repeated name keeps its last
    value) and ``mqtt-topic``, the topic the message was published to.
    ``ingest_time`` is when this process received the message: MQTT carries
    no broker timestamp. ``position`` is ``Position("mqtt://<topic>", 0,
    <packet id>)``: it identifies a *delivery*, not a place in a log (packet
    ids are per connection, reused once acknowledged; QoS 0 messages have 0),
    so nothing can be re-read from a position.

    **Acknowledging.** :meth:`ack` sends the PUBACK of each position read (in
    read order) on the connection it came from. A delivery made on a connection
    that has dropped since is not acknowledged: the broker delivers that
    message again on the new connection, and that delivery is acknowledged
    when the pipeline is done with it.

    **Flow control.** ``receive_maximum`` (MQTT 5 Receive Maximum) is how
    many QoS 1 messages the broker may have delivered and not yet had
    acknowledged. The source also stops reading its socket while
    ``receive_maximum`` messages wait in its buffer (a broker that ignores
    the limit, or QoS 0), and reads again once the pipeline took half of them.

    **Reading.** ``read`` waits for at least one message and returns up to
    ``max_events``; messages wait in the source until read, so a cancelled
    ``read`` loses nothing. The source reconnects by itself after a lost
    connection (the first connection must succeed within ``connect_timeout_s``).
    """

    __slots__ = (
        "_arrived",
        "_buffer",
        "_closed",
        "_link",
        "_lost",
        "_reconnecting",
        "_session_started",
        "_tls",
        "_unacked",
        "ca_certs",
        "certfile",
        "clean_start",
        "client_id",
        "connect_timeout_s",
        "end_session_on_close",
        "keepalive_s",
        "key_property",
        "keyfile",
        "name",
        "owned_partitions",
        "partitions",
        "password",
        "qos",
        "receive_maximum",
        "session_expiry_s",
        "shared_group",
        "subscription",
        "subscriptions",
        "topic",
        "url",
        "username",
    )

    def __init__(
        self,
        url: str,
        topic: str,
        *,
        client_id: str | None = None,
        shared_group: str | None = None,
        qos: int = 1,
        key_property: str = KEY_PROPERTY,
        partitions: int | None = None,
        owned_partitions: Sequence[int] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_certs: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        clean_start: bool = False,
        session_expiry_s: int = 3600,
        end_session_on_close: bool | None = None,
        receive_maximum: int = 1024,
        keepalive_s: int = 60,
        connect_timeout_s: float = 5.0,
    ) -> None:
        check_topic(topic, filter_ok=True)
        if shared_group is not None and (
            not shared_group or any(c in shared_group for c in "/+#\x00")
        ):
            raise ValueError(
                f"MQTT shared_group {shared_group!r} is invalid: it must be non-empty, "
                "without '/', '+' or '#'"
            )
        if qos not in (0, 1):
            raise ValueError(
                f"qos must be 1 (at least once) or 0 (at most once), got {qos}; QoS 2 is "
                "refused: its handshake completes before the sinks flush, so a crash loses "
                "the message, and duplicates are already removed by rtinfer-source-id"
            )
        if not 0 <= session_expiry_s <= _SESSION_EXPIRY_NEVER:
            raise ValueError(
                f"session_expiry_s must be 0 to {_SESSION_EXPIRY_NEVER} (never), "
                f"got {session_expiry_s}"
            )
        if not 1 <= receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be 1 to 65535, got {receive_maximum}")
        if keepalive_s < 1:
            raise ValueError(f"keepalive_s must be at least 1, got {keepalive_s}")
        if not key_property:
            raise ValueError("key_property must be a non-empty user property name")
        if client_id is not None and not client_id:
            raise ValueError("client_id must be non-empty, or None to generate one")
        parse_url(url)  # a wrong URL fails here, not at start
        check_partitions(partitions)
        self.url = url
        self.topic = topic
        self.shared_group = shared_group
        self.subscription = f"$share/{shared_group}/{topic}" if shared_group else topic
        self.partitions = partitions
        if partitions is None:
            if owned_partitions is not None:
                raise ConfigError(
                    f"mqtt://{topic}: owned_partitions needs partitions (how many partition "
                    "topics there are)"
                )
            self.owned_partitions: tuple[int, ...] = (0,)
            #: The topic filters subscribed to: ``subscription``, or the owned partitions'.
            self.subscriptions: tuple[str, ...] = (self.subscription,)
        else:
            if shared_group is not None:
                raise ConfigError(
                    f"mqtt://{topic}: partitions and shared_group exclude each other: each "
                    "partition topic is read by the one worker that owns it; leave out "
                    "shared_group"
                )
            if topic.endswith("#"):
                raise ConfigError(
                    f"MQTT topic filter {topic!r} ends with '#': partition topics "
                    "'<topic>/<p>' need a topic without it (use '+' levels)"
                )
            self.owned_partitions = owned_partitions_of(
                partitions, owned_partitions, what=f"the MQTT source mqtt://{topic}"
            )
            self.subscriptions = tuple(f"{topic}/{p}" for p in self.owned_partitions)
        self.qos = qos
        self.key_property = key_property
        self.client_id = client_id if client_id is not None else f"rtinfer-{uuid.uuid4().hex}"
        self.username = username
        self.password = password
        self.ca_certs = ca_certs
        self.certfile = certfile
        self.keyfile = keyfile
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.end_session_on_close = (
            client_id is None if end_session_on_close is None else end_session_on_close
        )
        self.receive_maximum = receive_maximum
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.name = f"mqtt://{topic}"
        self._tls: ssl.SSLContext | None = None
        self._link: MqttLink | None = None
        self._buffer: collections.deque[tuple[Event, MqttLink | None]] = collections.deque()
        self._unacked: collections.deque[_Delivery] = collections.deque()
        self._arrived = asyncio.Event()
        self._lost = asyncio.Event()
        self._reconnecting: asyncio.Task[None] | None = None
        self._session_started = False
        self._closed = False

    async def start(self) -> None:
        """Connect and subscribe; reconnections after that happen by themselves."""
        if self._link is not None:
            return
        self._closed = False
        if self.ca_certs or self.certfile or self.keyfile:
            self._tls = tls_context(self.ca_certs, self.certfile, self.keyfile)
        if self.end_session_on_close and self.session_expiry_s:
            logger.info(
                "%s: client %s ends its session on close; set a stable client_id to keep it",
                self.name,
                self.client_id,
            )
        await self._connect(clean_start=self.clean_start)
        self._reconnecting = asyncio.create_task(self._keep_connected())

    async def _connect(self, *, clean_start: bool) -> None:
        link = await MqttLink.open(
            self.url,
            client_id=self.client_id,
            clean_start=clean_start,
            session_expiry_s=self.session_expiry_s,
            receive_maximum=self.receive_maximum,
            username=self.username,
            password=self.password,
            tls=self._tls,
            keepalive_s=self.keepalive_s,
            timeout_s=self.connect_timeout_s,
            manual_ack=True,
            on_connect=self._connected,
            on_message=self._received,
            on_lost=self._lost.set,
        )
        try:
            await self._subscribe(link)
        except BaseException:
            await link.close()
            raise
        self._link = link

    async def _subscribe(self, link: MqttLink) -> None:
        # Retained messages only when the subscription is new, not on every reconnection.
        options = SubscribeOptions(
            qos=self.qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
        )
        subscriptions = self.subscriptions
        try:
            if len(subscriptions) == 1:
                granted = await link.client.subscribe(
                    subscriptions[0], options=options, timeout=self.connect_timeout_s
                )
            else:  # one SUBSCRIBE for every partition topic
                granted = await link.client.subscribe(
                    [(s, options) for s in subscriptions], timeout=self.connect_timeout_s
                )
        except aiomqtt.MqttError as exc:
            raise RtinferError(
                f"{self.name}: subscribing to {list(subscriptions)} at {self.url} failed ({exc})"
            ) from exc
        for subscription, code in zip(subscriptions, granted, strict=False):
            if isinstance(code, ReasonCode) and code.is_failure:
                raise ConfigError(
                    f"the MQTT broker at {self.url} refused the subscription to "
                    f"{subscription!r} ({code}); check the topic filter, the ACLs "
                    "and, for shared_group, that the broker supports shared subscriptions"
                )

    def _connected(self, link: MqttLink, session_present: bool) -> None:
        """The CONNACK: runs before any message of the new connection is handled."""
        if self._session_started and session_present:
            # The broker delivers again what it sent and we did not acknowledge: drop our
            # unread copies from the old connection (QoS 0 ones are not sent again).
            buffer = self._buffer  # in place: a waiting read holds this deque
            kept = [(e, old) for e, old in buffer if old is None or old is link]
            if len(kept) < len(buffer):
                buffer.clear()
                buffer.extend(kept)
        elif self._session_started:
            logger.warning(
                "%s: the broker did not resume the session of %s (expired, or the broker "
                "restarted without persistence): messages published meanwhile are lost, and "
                "those in flight are not delivered again",
                self.name,
                self.client_id,
            )
        elif session_present:
            logger.info(
                "%s: resumed the session of %s: unacknowledged messages come again",
                self.name,
                self.client_id,
            )
        self._session_started = True

    def _received(self, link: MqttLink, message: paho_mqtt.MQTTMessage) -> None:
        """A PUBLISH: buffer it as an event (runs on the event loop, inside a socket read)."""
        if self._closed:  # not acknowledged: the broker delivers it again
            return
        now = time.time()
        try:
            topic = message.topic
        except UnicodeDecodeError:  # the broker should never forward such a topic
            topic = "?"
        headers = {name: value.encode() for name, value in _user_properties(message.properties)}
        key = headers.get(self.key_property)
        if key is None:
            b64 = headers.get(self.key_property + KEY_B64_SUFFIX)
            if b64 is not None:
                try:
                    key = base64.b64decode(b64, validate=True)
                except (binascii.Error, ValueError):
                    key = None
        headers[TOPIC_HEADER] = topic.encode()
        partition = 0
        if self.partitions is not None:
            last = topic.rpartition("/")[2]
            partition = int(last) if last.isdigit() else 0
        payload = message.payload
        event = Event(
            payload if type(payload) is bytes else bytes(payload),
            key=key,
            headers=headers,
            ingest_time=now,
            position=Position(self.name, partition, message.mid),
        )
        self._buffer.append((event, link if message.qos == 1 else None))
        self._arrived.set()
        if len(self._buffer) >= self.receive_maximum:
            link.pause_reading()

    async def _keep_connected(self) -> None:
        """Reconnect after each lost connection, backing off up to 5 s between attempts."""
        while not self._closed:
            await self._lost.wait()
            self._lost.clear()
            old, self._link = self._link, None
            if old is not None:
                await old.close()
            delay = 0.1
            while not self._closed:
                self._lost.clear()  # a drop during this attempt fails the attempt itself
                try:
                    await self._connect(clean_start=False)
                except Exception as exc:  # keep trying whatever failed: reading waits on it
                    expected = isinstance(exc, RtinferError)
                    logger.warning(
                        "%s: reconnecting failed (%s); next try in %.1f s",
                        self.name,
                        exc,
                        delay,
                        exc_info=not expected,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                logger.info("%s: reconnected to %s", self.name, self.url)
                break

    @property
    def buffered(self) -> int:
        """How many messages were received and wait to be read."""
        return len(self._buffer)

    async def read(self, max_events: int) -> list[Event]:
        """Wait for at least one event and return up to ``max_events``; ``[]`` once closed."""
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        buffer = self._buffer
        while not buffer:
            if self._closed:
                return []
            if self._reconnecting is None:
                raise RuntimeError(f"{self.name}: call start() before read()")
            self._arrived.clear()
            # Nothing is taken before the wait ends, so cancelling it loses nothing.
            await self._arrived.wait()
        events: list[Event] = []
        unacked = self._unacked
        for _ in range(min(max_events, len(buffer))):
            event, link = buffer.popleft()
            events.append(event)
            if link is not None:
                assert event.position is not None
                offset = event.position.offset
                assert isinstance(offset, int)
                unacked.append(_Delivery(offset, link))
        link = self._link
        if link is not None and len(buffer) <= self.receive_maximum // 2:
            link.resume_reading()
        return events

    async def ack(self, positions: Sequence[Position]) -> None:
        """Send the PUBACK of each position on the connection it came from (in read order).

        Positions of other sources, of QoS 0 messages, or already acknowledged, are
        skipped; so are deliveries of a connection that dropped since (the broker
        delivers those messages again). The PUBACKs are written to the socket
        without waiting: MQTT confirms no acknowledgement, and one lost in a
        disconnection means one delivery more.
        """
        unacked = self._unacked
        name = self.name
        for position in positions:
            mid = position.offset
            if position.source != name or not isinstance(mid, int) or mid == 0:
                continue
            for i, delivery in enumerate(unacked):  # in read order: almost always the first
                if delivery.mid == mid:
                    del unacked[i]
                    if delivery.link is self._link:
                        delivery.link.ack(mid)
                    break

    async def aclose(self) -> None:
        """Stop reconnecting and disconnect; what was not acknowledged stays in the session.

        Before disconnecting, one SUBSCRIBE round trip (the same subscription again:
        no change) makes sure the broker processed every PUBACK sent before it.
        With ``end_session_on_close``, a last connection with a clean start then
        discards the session, and with it what it still held.
        """
        self._closed = True  # from now on, arriving messages are left unacknowledged
        self._arrived.set()
        task, self._reconnecting = self._reconnecting, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        link, self._link = self._link, None
        self._buffer.clear()
        self._unacked.clear()
        if link is None:
            return
        if link.up:
            try:
                await self._subscribe(link)
            except (RtinferError, aiomqtt.MqttError) as exc:
                logger.warning("%s: acknowledgements not confirmed before closing (%s); "
                               "those messages come again", self.name, exc)  # fmt: skip
        await link.close(timeout_s=self.connect_timeout_s)
        if self.end_session_on_close:
            await self._end_session()

    async def _end_session(self) -> None:
        """Connect with a clean start and no session expiry: the broker drops the old session."""
        try:
            link = await MqttLink.open(
                self.url,
                client_id=self.client_id,
                clean_start=True,
                session_expiry_s=0,
                username=self.username,
                password=self.password,
                tls=self._tls,
                keepalive_s=self.keepalive_s,
                timeout_s=self.connect_timeout_s,
            )
        except RtinferError as exc:
            logger.warning("%s: could not end the session of %s (%s); it expires after %d s",
                           self.name, self.client_id, exc, self.session_expiry_s)  # fmt: skip
            return
        await link.close(timeout_s=self.connect_timeout_s)

    def __repr__(self) -> str:
        return (
            f"<MqttSource {self.name} subscription={self.subscription!r} client={self.client_id!r}>"
        )
