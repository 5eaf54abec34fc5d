"""The MQTT 5 connection shared by the MQTT source and sink: URL, TLS, topics, MqttLink.

:class:`MqttLink` is one connection to the broker (MQTT 5, through aiomqtt),
with manual acknowledgements, the CONNACK's *session present* flag, PUBACK
reason codes and flow control (it stops reading the socket while paused).
Around it: the broker URL (:class:`Broker`, :func:`parse_url`), TLS
(:func:`tls_context`), topic checks (:func:`check_topic`), paho's
``Properties`` (:func:`new_properties`) and the user properties that carry an
event's key (:data:`KEY_PROPERTY`, :data:`KEY_B64_SUFFIX`). Used by
:mod:`rtinfer.sources.mqtt` and :mod:`rtinfer.sinks.mqtt`.

Importing this module needs ``aiomqtt`` (``pip install 'rtinfer[mqtt]'``);
without it the import raises :class:`~rtinfer.exceptions.MissingDependency`.

aiomqtt (2.x) does not expose manual acknowledgements, the CONNACK's
*session present* flag, PUBACK reason codes or a way to stop reading the
socket, so :class:`MqttLink` reaches the paho-mqtt client under it
(``aiomqtt.Client._client``) and chains its own callbacks to aiomqtt's. That
is the only private attribute used, besides ``_disconnected`` (aiomqtt's
disconnection future, read so its exception is not reported as never
retrieved); both are checked when a link opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from ..exceptions import ConfigError, MissingDependency, RtinferError

try:
    import aiomqtt
    import paho.mqtt.client as paho_mqtt
    from aiomqtt.exceptions import MqttConnectError
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
except ImportError as exc:  # the optional extra is not installed
    raise MissingDependency("the MQTT connector", "mqtt") from exc

__all__ = [
    "KEY_B64_SUFFIX",
    "KEY_PROPERTY",
    "Broker",
    "MqttLink",
    "check_topic",
    "new_properties",
    "parse_url",
    "tls_context",
]

logger = logging.getLogger(__name__)

#: The user property holding an event's key as UTF-8 text (what the MQTT sink writes).
KEY_PROPERTY = "rtinfer-key"
#: Appended to the key property's name for a key sent as base64 (a key that is not text).
KEY_B64_SUFFIX = "-b64"


class Broker(NamedTuple):
    """Where and how to connect, from an ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_url(url: str) -> Broker:
    """Split ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS, port 8883)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"MQTT url {url!r} is invalid ({exc}); use mqtt://host:1883") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(
            f"MQTT url {url!r} is invalid: expected mqtt://host[:port] (or mqtts:// for TLS), "
            "with no path; the topic is a separate setting"
        )
    tls = scheme == "mqtts"
    return Broker(
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def tls_context(ca_certs: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """Verify the broker (with ``ca_certs``, else the system's CAs); present a client cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certs)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    elif keyfile:
        raise ConfigError("keyfile needs certfile (the client certificate)")
    return context


def check_topic(topic: str, *, filter_ok: bool) -> None:
    """Refuse a topic (``filter_ok``: a topic filter) that the broker would refuse."""
    if not topic or "\x00" in topic:
        raise ValueError(f"MQTT topic {topic!r} is invalid: it must be non-empty, without NUL")
    if topic.startswith("$share/"):
        raise ValueError(
            f"MQTT topic {topic!r} names a shared subscription: give the topic alone and "
            "the group as shared_group"
        )
    if not filter_ok and ("+" in topic or "#" in topic):
        raise ValueError(f"MQTT topic {topic!r} is invalid for publishing: no wildcards (+, #)")
    if filter_ok:
        levels = topic.split("/")
        for i, level in enumerate(levels):
            if (
                ("+" in level and level != "+")
                or ("#" in level and level != "#")
                or (level == "#" and i != len(levels) - 1)
            ):
                raise ValueError(
                    f"MQTT topic filter {topic!r} is invalid: '+' must be a whole level and "
                    "'#' the whole last level"
                )


def new_properties(packet_type: int) -> Any:
    """An empty paho ``Properties`` for ``packet_type`` (paho types it loosely: ``Any``)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _disconnected(client: aiomqtt.Client) -> asyncio.Future[None]:
    """aiomqtt's disconnection future (private: see the module docstring)."""
    future: asyncio.Future[None] = client._disconnected
    return future


class MqttLink:
    """One connection to the broker: an ``aiomqtt.Client`` with our callbacks chained to it.

    Opened with :meth:`open`, closed once with :meth:`close`; a link that went
    down (``up`` false) is not reused: open a new one (the same client id
    resumes the session). Callbacks run on the event loop (aiomqtt drives
    paho-mqtt from it) and never raise: an exception in a paho callback would
    break the connection.

    - ``on_message(link, message)``: a PUBLISH arrived (with ``manual_ack``, no
      PUBACK is sent until :meth:`ack`);
    - ``on_connect(link, session_present)``: the CONNACK accepted the
      connection, before any message of that connection is handled;
    - ``on_lost()``: the connection dropped without :meth:`close`;
    - ``on_publish(mid, reason)``: the PUBACK of a publish came back.
    """

    __slots__ = (
        "_closing",
        "_down",
        "_loop",
        "_on_lost",
        "_paused",
        "client",
        "paho",
        "up",
    )

    def __init__(
        self,
        client: aiomqtt.Client,
        *,
        manual_ack: bool = False,
        on_message: Callable[[MqttLink, paho_mqtt.MQTTMessage], None] | None = None,
        on_connect: Callable[[MqttLink, bool], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        on_publish: Callable[[int, ReasonCode], None] | None = None,
    ) -> None:
        paho = getattr(client, "_client", None)
        if not isinstance(paho, paho_mqtt.Client) or not isinstance(
            getattr(client, "_disconnected", None), asyncio.Future
        ):
            raise RtinferError(
                f"this aiomqtt version ({getattr(aiomqtt, '__version__', '?')}) is not "
                "supported by rtinfer's MQTT connector; install aiomqtt>=2.0,<3"
            )
        self.client = client
        self.paho = paho
        self.up = False
        self._closing = False
        self._down = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._on_lost = on_lost
        self._paused: Any = None  # the socket whose reading is paused
        paho.manual_ack_set(manual_ack)

        # aiomqtt's own handlers (paho types them as a union of every callback version).
        aiomqtt_on_connect: Any = paho.on_connect
        aiomqtt_on_disconnect: Any = paho.on_disconnect
        aiomqtt_on_publish: Any = paho.on_publish

        def connected(
            c: paho_mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
        ) -> None:
            aiomqtt_on_connect(c, userdata, flags, reason, props)
            if reason.is_failure or self._closing:  # a late CONNACK of a link given up on
                return
            self.up = True
            if on_connect is not None:
                try:
                    on_connect(self, bool(flags.session_present))
                except Exception:  # never break the connection from a callback
                    logger.exception("MQTT on_connect handler failed")

        def disconnected(
            c: paho_mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
        ) -> None:
            aiomqtt_on_disconnect(c, userdata, flags, reason, props)
            was_up, self.up = self.up, False
            self._paused = None
            self._down.set()
            if was_up and not self._closing:
                logger.warning("MQTT connection lost (%s)", reason)
                if self._on_lost is not None:
                    try:
                        self._on_lost()
                    except Exception:
                        logger.exception("MQTT on_lost handler failed")

        def published(
            c: paho_mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
        ) -> None:
            if on_publish is not None:
                try:
                    on_publish(mid, reason)
                except Exception:
                    logger.exception("MQTT on_publish handler failed")
            aiomqtt_on_publish(c, userdata, mid, reason, props)

        def message(c: paho_mqtt.Client, userdata: Any, msg: paho_mqtt.MQTTMessage) -> None:
            if on_message is not None and not self._closing:
                try:
                    on_message(self, msg)
                except Exception:  # not acknowledged: delivered again on the next connection
                    logger.exception("MQTT message handler failed")

        paho.on_connect = connected
        paho.on_disconnect = disconnected
        paho.on_publish = published
        # Replaces aiomqtt's handler (and its unbounded queue): messages go to ``on_message``.
        paho.on_message = message

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        client_id: str,
        clean_start: bool,
        session_expiry_s: int = 0,
        receive_maximum: int | None = None,
        max_inflight: int | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive_s: int = 60,
        timeout_s: float = 5.0,
        manual_ack: bool = False,
        on_message: Callable[[MqttLink, paho_mqtt.MQTTMessage], None] | None = None,
        on_connect: Callable[[MqttLink, bool], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        on_publish: Callable[[int, ReasonCode], None] | None = None,
    ) -> MqttLink:
        """Connect (MQTT 5) to ``url``; raise :class:`RtinferError` naming it if that fails."""
        broker = parse_url(url)
        if tls is None and broker.tls:
            tls = tls_context(None, None, None)
        properties = new_properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry_s
        if receive_maximum is not None:
            properties.ReceiveMaximum = receive_maximum
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            username=username if username is not None else broker.username,
            password=password if password is not None else broker.password,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            # A bool, not aiomqtt's default MQTT_CLEAN_START_FIRST_ONLY: each link is a new
            # client object, so "first only" would wipe the session on every reconnection.
            clean_start=clean_start,
            properties=properties,
            tls_context=tls,
            keepalive=keepalive_s,
            timeout=timeout_s,
            max_inflight_messages=max_inflight,
        )
        link = cls(
            client,
            manual_ack=manual_ack,
            on_message=on_message,
            on_connect=on_connect,
            on_lost=on_lost,
            on_publish=on_publish,
        )
        link.paho.connect_timeout = timeout_s
        try:
            await client.__aenter__()
        except MqttConnectError as exc:
            link.abandon()
            raise RtinferError(
                f"the MQTT broker at {url} refused the connection of client {client_id!r} "
                f"({exc.rc}); check the credentials, the client id and the broker's ACLs"
            ) from exc
        except (aiomqtt.MqttError, OSError) as exc:
            link.abandon()
            raise RtinferError(
                f"cannot connect to the MQTT broker at {url} within {timeout_s} s ({exc}); "
                "check that it runs and the URL, credentials and TLS settings are right"
            ) from exc
        return link

    async def wait_down(self) -> None:
        """Return once the connection is down (closed, lost or never opened)."""
        await self._down.wait()

    def ack(self, mid: int) -> bool:
        """Send the PUBACK of ``mid``; false if the connection is down (nothing was sent)."""
        if not self.up:
            return False
        return self.paho.ack(mid, 1) == paho_mqtt.MQTT_ERR_SUCCESS

    def pause_reading(self) -> None:
        """Stop reading the socket: TCP flow control then holds the broker back."""
        sock: Any = self.paho.socket()
        if self._paused is not None or sock is None or not self.up:
            return
        fd = sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._paused = sock

    def resume_reading(self) -> None:
        """Read the socket again (a no-op if it was not paused, or is closed since)."""
        paused, self._paused = self._paused, None
        sock = self.paho.socket()
        if paused is None or sock is None or sock is not paused:
            return
        fd = sock.fileno()
        if fd < 0:
            return
        self._loop.add_reader(fd, self._readable)
        # Bytes a TLS socket already decrypted do not make it readable again: read them now.
        self._loop.call_soon(self._readable)

    def _readable(self) -> None:
        """Read what the socket holds: what aiomqtt's reader does, but stops when paused."""
        if self._paused is not None or not self.up:
            return
        paho = self.paho
        try:
            while True:
                paho.loop_read()
                sock = paho.socket()
                pending = getattr(sock, "pending", None)  # an SSLSocket's decrypted bytes
                if self._paused is not None or pending is None or pending() <= 0:
                    break
        except Exception as exc:  # a broken socket: fail the connection as aiomqtt does
            logger.warning("MQTT read failed: %r", exc)
            disconnected: asyncio.Future[None] = (
                self.client._disconnected
            )  # private: see the module docstring
            if not disconnected.done():
                disconnected.set_exception(aiomqtt.MqttError(f"read failed: {exc!r}"))
            was_up, self.up = self.up, False
            self._down.set()
            if was_up and self._on_lost is not None:
                self._on_lost()

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Disconnect (DISCONNECT, normal: the session stays for its expiry interval).

        Reading resumes first, so the socket holds no unread bytes when it closes
        (closing over unread bytes sends a TCP reset, and the broker may then drop
        what we sent last, the DISCONNECT included, unread).
        """
        self._closing = True
        self.resume_reading()
        try:
            if self.up and self.paho.disconnect() == paho_mqtt.MQTT_ERR_SUCCESS:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._down.wait(), timeout_s)
            # Returns at once when disconnected; else makes aiomqtt disconnect by itself.
            await asyncio.wait_for(self.client.__aexit__(None, None, None), timeout_s)
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            logger.warning("MQTT: error while disconnecting: %r", exc)
        finally:
            self.forget()

    def abandon(self) -> None:
        """Give up on a link that failed to open: close its socket if one is left."""
        self.forget()
        with contextlib.suppress(Exception):  # whatever state paho is in, it is dropped
            self.paho.disconnect()

    def forget(self) -> None:
        """Mark aiomqtt's disconnection error as seen: this link will not be used again."""
        self.up = False
        self._closing = True
        disconnected = _disconnected(self.client)
        if disconnected.done() and not disconnected.cancelled():
            disconnected.exception()
