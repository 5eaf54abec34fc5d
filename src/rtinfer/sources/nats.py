"""Read a NATS JetStream stream as a pipeline source, through a durable pull consumer.

:class:`NatsSource` pulls from a durable consumer with explicit acks: a
message is acknowledged only when the pipeline calls :meth:`NatsSource.ack`,
which it does after every sink flushed what came from it. A message that is
not acknowledged within ``ack_wait_s`` (the worker died, or is too slow) is
delivered again, to whichever worker of the durable pulls next, up to
``max_deliver`` times in all. Several processes started with the same
``durable`` share the stream's messages (no per-key order then: see
``docs/nats.md``).

Importing this module needs ``nats-py`` (``pip install 'rtinfer[nats]'``);
without it the import raises :class:`~rtinfer.exceptions.MissingDependency`.
The connection (:func:`~rtinfer.connectors.nats.connect`) is in
:mod:`rtinfer.connectors.nats`, shared with :mod:`rtinfer.sinks.nats`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Sequence

from ..exceptions import ConfigError, MissingDependency
from ..types import DEAD_REASON_HEADER, Event, Position

try:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.errors import FlushTimeoutError
    from nats.js import JetStreamContext
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
    from nats.js.errors import NotFoundError
except ImportError as exc:  # the optional extra is not installed
    raise MissingDependency("the NATS JetStream source", "nats") from exc

from ..connectors.nats import KEY_B64_HEADER, KEY_HEADER, close_quietly, connect

__all__ = ["DEAD_REASON_HEADER", "NatsSource"]

logger = logging.getLogger(__name__)


class NatsSource:
    """Events from ``subject`` (a filter, wildcards allowed) of JetStream ``stream``.

    **Consumer.** ``start`` connects, creates the stream (``subjects=[subject]``)
    if it does not exist and ``create_stream`` is true, then creates or updates
    the durable pull consumer ``durable`` (explicit ack, deliver all, the given
    ``ack_wait_s``, ``max_deliver`` and ``max_ack_pending``): the settings given
    here are the ones in force, so every worker sharing a durable must be
    started with the same ones. ``ack_wait_s`` must exceed the p99 time from
    reading an event to acknowledging it: processing plus the pipeline's
    ``flush_interval`` plus the sinks' flush time, with margin; below that,
    events are redelivered while still being processed (duplicates, never
    loss), and each such redelivery uses up one of ``max_deliver``.
    ``max_ack_pending`` (``None``: the server's default, 1000) should be at
    least ``read_size * max_in_flight`` of the pipeline, else reading waits
    for acknowledgements and throughput is capped.

    **Events.** ``value`` is the message payload; ``key`` the header
    ``rtinfer-key`` (UTF-8) or ``rtinfer-key-b64`` (base64) when present, else
    ``None``: the subject is *not* taken as the key (a subject names a route,
    and is often shared by many keys). ``headers`` are the message headers,
    values encoded as UTF-8. ``ingest_time`` is the JetStream timestamp of the
    message (when the stream stored it), ``position`` is
    ``Position("nats://<stream>", 0, <stream sequence>)``.

    **Last delivery (contract with the pipeline).** An event whose delivery
    count reached the consumer's ``max_deliver`` carries the header
    ``rtinfer-dead-reason: delivered N times``: the pipeline dead-letters such
    an event instead of processing it, since the broker will not deliver it
    again. Acknowledging it sends ``term`` (not ``ack``), so the server emits a
    *terminated* advisory and monitoring can count what was given up on.

    **Reading.** ``read`` pulls up to ``max_events`` in requests of
    ``fetch_timeout_s`` seconds, pulling again until something arrives or the
    source is closed. The pull runs as its own task: a cancelled ``read``
    leaves it running, and the next ``read`` returns what it brought.

    **Acknowledging.** ``ack`` sends an ack (or ``term``) per position, then
    one ping round trip (``flush``): when it returns, the server has received
    every ack (if the connection is down, a warning is logged and the client
    sends them once it reconnects). It does not wait for each ack to be confirmed (``ack_sync``
    costs one round trip per message, and at-least-once needs the ack only
    eventually: a lost ack means one redelivery, never a loss).

    **Closing.** ``aclose`` naks what was read but never acknowledged (a failed
    run's batches), so the stream delivers it again at once rather than after
    ``ack_wait_s``, then closes the connection. A worker that dies without
    closing leaves its events to be delivered again after ``ack_wait_s``.
    """

    __slots__ = (
        "_closed",
        "_fetching",
        "_js",
        "_max_deliver",
        "_nc",
        "_ready",
        "_sub",
        "_unacked",
        "ack_wait_s",
        "connect_timeout_s",
        "create_stream",
        "creds_file",
        "durable",
        "fetch_timeout_s",
        "max_ack_pending",
        "max_deliver",
        "name",
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
        stream: str,
        subject: str,
        *,
        durable: str = "rtinfer",
        ack_wait_s: float = 30.0,
        max_deliver: int = 5,
        max_ack_pending: int | None = None,
        fetch_timeout_s: float = 5.0,
        create_stream: bool = True,
        creds_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if ack_wait_s <= 0:
            raise ValueError(
                f"ack_wait_s must be above 0 (and above the p99 processing time), got {ack_wait_s}"
            )
        if max_deliver < 1 and max_deliver != -1:
            raise ValueError(
                f"max_deliver must be at least 1, or -1 for no limit, got {max_deliver}"
            )
        if fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be above 0, got {fetch_timeout_s}")
        if max_ack_pending is not None and max_ack_pending < 1:
            raise ValueError(f"max_ack_pending must be at least 1, got {max_ack_pending}")
        for label, value in (("stream", stream), ("durable", durable)):
            if not value or any(c in value for c in " .*>\t\r\n"):
                raise ValueError(
                    f"NATS {label} name {value!r} is invalid: it must be non-empty, without "
                    "spaces, '.', '*' or '>'"
                )
        self.url = url
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.max_ack_pending = max_ack_pending
        self.fetch_timeout_s = fetch_timeout_s
        self.create_stream = create_stream
        self.creds_file = creds_file
        self.tls_ca_file = tls_ca_file
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self.connect_timeout_s = connect_timeout_s
        self.name = f"nats://{stream}"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._max_deliver = max_deliver
        self._fetching: asyncio.Task[list[Msg]] | None = None
        self._ready: list[Event] = []
        self._unacked: dict[int, tuple[Msg, bool]] = {}
        self._closed = False

    async def start(self) -> None:
        """Connect, make sure the stream (if ``create_stream``) and the durable consumer exist."""
        if self._sub is not None:
            return
        self._closed = False
        nc = await connect(
            self.url,
            name=f"rtinfer source {self.stream}/{self.durable}",
            creds_file=self.creds_file,
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            connect_timeout_s=self.connect_timeout_s,
        )
        try:
            js = nc.jetstream()
            await self._ensure_stream(js)
            config = ConsumerConfig(
                name=self.durable,
                durable_name=self.durable,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait_s,
                max_deliver=self.max_deliver,
                max_ack_pending=self.max_ack_pending,
                filter_subject=self.subject,
            )
            # Creates the consumer, or updates it to these settings (nats-server >= 2.9).
            info = await js.add_consumer(self.stream, config)
            self._max_deliver = info.config.max_deliver or self.max_deliver
            self._sub = await js.pull_subscribe_bind(self.durable, stream=self.stream)
        except BaseException:
            await close_quietly(nc)
            raise
        self._nc, self._js = nc, js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            if not self.create_stream:
                raise ConfigError(
                    f"NATS stream {self.stream!r} does not exist at {self.url}; create it "
                    f"(nats stream add {self.stream} --subjects '{self.subject}') or set "
                    "create_stream=True"
                ) from None
            await js.add_stream(StreamConfig(name=self.stream, subjects=[self.subject]))
            logger.info("%s: created stream for subject %r", self.name, self.subject)

    async def read(self, max_events: int) -> list[Event]:
        """Wait for at least one event and return up to ``max_events``; ``[]`` once closed."""
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        while not self._ready:
            if self._closed:
                return []
            sub = self._sub
            if sub is None:
                raise RuntimeError(f"{self.name}: call start() before read()")
            task = self._fetching
            if task is None:
                task = self._fetching = asyncio.create_task(self._fetch(sub, max_events))
            try:
                # Shielded: cancelling this read leaves the pull running, for the next read.
                messages = await asyncio.shield(task)
            except asyncio.CancelledError:
                # Only aclose cancels the pull: if this read itself is not being
                # cancelled, the source was closed while it waited.
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    return []
                raise
            finally:
                if task.done() and self._fetching is task:
                    self._fetching = None
            self._ready = self._to_events(messages)
        events = self._ready[:max_events]
        del self._ready[:max_events]
        return events

    async def _fetch(self, sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
        """Pull until at least one message arrives (an empty pull just times out)."""
        while True:
            try:
                return await sub.fetch(batch, timeout=self.fetch_timeout_s)
            except TimeoutError:  # nats.errors.TimeoutError and FetchTimeoutError subclass it
                continue

    def _to_events(self, messages: list[Msg]) -> list[Event]:
        events: list[Event] = []
        source = self.name
        last = self._max_deliver
        unacked = self._unacked
        for msg in messages:
            meta = msg.metadata
            sequence = meta.sequence.stream
            dead = last > 0 and meta.num_delivered >= last
            previous = unacked.get(sequence)
            if previous is not None:
                # Redelivered (AckWait passed) while the pipeline still has it: not handed
                # out twice; the latest delivery is the one acknowledged, as the server expects.
                unacked[sequence] = (msg, previous[1] or dead)
                continue
            raw = msg.headers
            headers = {k: v.encode() for k, v in raw.items()} if raw else {}
            key: bytes | None = None
            if raw:
                text = raw.get(KEY_HEADER)
                if text is not None:
                    key = text.encode()
                else:
                    b64 = raw.get(KEY_B64_HEADER)
                    if b64 is not None:
                        try:
                            key = base64.b64decode(b64, validate=True)
                        except (binascii.Error, ValueError):  # a bad header loses the key only
                            key = None
            if dead:
                headers[DEAD_REASON_HEADER] = f"delivered {meta.num_delivered} times".encode()
            events.append(
                Event(
                    msg.data,
                    key=key,
                    headers=headers or None,
                    ingest_time=meta.timestamp.timestamp(),
                    position=Position(source, 0, sequence),
                )
            )
            unacked[sequence] = (msg, dead)
        return events

    async def ack(self, positions: Sequence[Position]) -> None:
        """Acknowledge (``term`` on a last delivery) each position, then one ping round trip.

        Positions not read by this source, or already acknowledged, are skipped.
        """
        nc = self._nc
        if nc is None or not positions:
            return
        unacked = self._unacked
        sent = 0
        for position in positions:
            offset = position.offset
            if not isinstance(offset, int):
                raise TypeError(f"{self.name}: cannot ack {position!r}, its offset is not an int")
            entry = unacked.pop(offset, None)
            if entry is None:
                continue
            msg, dead = entry
            if dead:
                await msg.term()
            else:
                await msg.ack()
            sent += 1
        if sent:
            try:
                await nc.flush()
            except FlushTimeoutError:  # disconnected: the client sends them on reconnecting
                logger.warning(
                    "%s: %d acks not confirmed (disconnected?); they are sent once the "
                    "connection is back, else the events are delivered again",
                    self.name,
                    sent,
                )

    async def lag(self) -> int | None:
        """Messages the durable consumer has not finished: not yet delivered, or unacknowledged."""
        js = self._js
        if js is None:
            return None
        info = await js.consumer_info(self.stream, self.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def aclose(self) -> None:
        """Stop pulling, nak what was read and never acknowledged, close the connection."""
        self._closed = True
        task, self._fetching = self._fetching, None
        fetched: list[Msg] = []
        if task is not None:
            task.cancel()
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            if isinstance(outcome, list):  # pulled for a read that was cancelled
                fetched = outcome
        nc, self._nc, self._js = self._nc, None, None
        sub, self._sub = self._sub, None
        unacked, self._unacked = self._unacked, {}
        self._ready = []
        if nc is None:
            return
        try:
            if nc.is_connected:
                never_acked = [msg for msg, dead in unacked.values() if not dead]
                # A last delivery is not delivered again, nak'ed or not: leave it be.
                for msg in never_acked + fetched:
                    await msg.nak()
                if sub is not None:
                    await sub.unsubscribe()
                await nc.flush()
        except Exception:  # what was not nak'ed is delivered again after ack_wait_s
            logger.warning("%s: error while closing", self.name, exc_info=True)
        finally:
            await nc.close()

    def __repr__(self) -> str:
        return f"<NatsSource {self.name} subject={self.subject!r} durable={self.durable!r}>"
