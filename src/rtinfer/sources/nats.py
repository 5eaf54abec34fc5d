"""Read a NATS JetStream stream as a pipeline source, through a durable pull consumer.

:class:`NatsSource` pulls from a durable consumer with explicit acks: a
message is acknowledged only when the pipeline calls :meth:`NatsSource.ack`,
which it does after every sink flushed what came from it. A message that is
not acknowledged within ``ack_wait_s`` (the worker died, or is too slow) is
delivered again, to whichever worker of the durable pulls next, up to
``max_deliver`` times in all. Several processes started with the same
``durable`` share the stream's messages (no per-key order then: see
``docs/nats.md``). With ``partitions=P``, the source reads the partition
subjects ``<subject>.<p>`` it owns, one durable ``<durable>-<p>`` each
(:mod:`rtinfer.connectors.partitions`), so each key is read by one worker.

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

from ..connectors.nats import (
    KEY_B64_HEADER,
    KEY_HEADER,
    close_quietly,
    connect,
    partition_subject,
    subject_covers,
)
from ..connectors.partitions import check_partitions
from ..connectors.partitions import owned_partitions as owned_partitions_of

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
    run's batches), so the stream delivers it again after ``fetch_timeout_s``
    (when the pull requests this connection left open on the server have
    expired) rather than after ``ack_wait_s``, then closes the connection. A
    worker that dies without closing leaves its events to be delivered again
    after ``ack_wait_s``.

    **Partitions.** With ``partitions=P`` the source reads the subjects
    ``<subject>.<p>`` of the partitions it owns: ``owned_partitions`` if given,
    else every ``p`` with ``p % N == i`` for worker ``i`` (``RTINFER_WORKER``)
    of ``N`` (``RTINFER_WORKERS``). Each has a durable pull consumer of its own,
    ``<durable>-<p>`` filtering ``<subject>.<p>`` (one consumer with several
    filter subjects needs nats-server 2.10), pulled concurrently. The stream
    must store ``<subject>.*`` (it is created so; an existing stream that does
    not store every partition subject is a :class:`ConfigError`). Positions
    carry the partition: ``Position("nats://<stream>", p, <stream sequence>)``.
    Producers publish key ``k`` to ``<subject>.<crc32(k) % P>``
    (:class:`~rtinfer.sinks.nats.NatsSink` with the same ``partitions`` does).
    """

    __slots__ = (
        "_closed",
        "_fetching",
        "_js",
        "_max_deliver",
        "_nc",
        "_ready",
        "_subs",
        "_unacked",
        "ack_wait_s",
        "connect_timeout_s",
        "create_stream",
        "creds_file",
        "durable",
        "durables",
        "fetch_timeout_s",
        "max_ack_pending",
        "max_deliver",
        "name",
        "owned_partitions",
        "partitions",
        "stream",
        "subject",
        "subjects",
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
        partitions: int | None = None,
        owned_partitions: Sequence[int] | None = None,
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
        check_partitions(partitions)
        self.url = url
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.partitions = partitions
        if partitions is None:
            if owned_partitions is not None:
                raise ConfigError(
                    f"nats://{stream}: owned_partitions needs partitions (how many partition "
                    "subjects there are)"
                )
            self.owned_partitions: tuple[int, ...] = (0,)
            #: The filter subject of each partition read (``{0: subject}`` when not partitioned).
            self.subjects = {0: subject}
            #: The durable consumer of each partition read (``{0: durable}`` when not partitioned).
            self.durables = {0: durable}
        else:
            if subject.endswith(">"):
                raise ConfigError(
                    f"NATS subject {subject!r} ends with '>': partition subjects "
                    f"'<subject>.<p>' need a subject without it (use '*' tokens)"
                )
            self.owned_partitions = owned_partitions_of(
                partitions, owned_partitions, what=f"the NATS source nats://{stream}"
            )
            self.subjects = {p: partition_subject(subject, p) for p in self.owned_partitions}
            self.durables = {p: f"{durable}-{p}" for p in self.owned_partitions}
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
        self._subs: dict[int, JetStreamContext.PullSubscription] = {}
        self._max_deliver = max_deliver
        self._fetching: dict[int, asyncio.Task[list[Msg]]] = {}
        self._ready: list[Event] = []
        self._unacked: dict[int, tuple[Msg, bool]] = {}
        self._closed = False

    async def start(self) -> None:
        """Connect, make sure the stream (if ``create_stream``) and the durable consumer exist."""
        if self._subs:
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
            subs: dict[int, JetStreamContext.PullSubscription] = {}
            for p, durable in self.durables.items():
                config = ConsumerConfig(
                    name=durable,
                    durable_name=durable,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait_s,
                    max_deliver=self.max_deliver,
                    max_ack_pending=self.max_ack_pending,
                    filter_subject=self.subjects[p],
                )
                # Creates the consumer, or updates it to these settings (nats-server >= 2.9).
                info = await js.add_consumer(self.stream, config)
                self._max_deliver = info.config.max_deliver or self.max_deliver
                subs[p] = await js.pull_subscribe_bind(durable, stream=self.stream)
        except BaseException:
            await close_quietly(nc)
            raise
        self._subs = subs
        self._nc, self._js = nc, js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        stored = self.subject if self.partitions is None else partition_subject(self.subject, "*")
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            if not self.create_stream:
                raise ConfigError(
                    f"NATS stream {self.stream!r} does not exist at {self.url}; create it "
                    f"(nats stream add {self.stream} --subjects '{stored}') or set "
                    "create_stream=True"
                ) from None
            await js.add_stream(StreamConfig(name=self.stream, subjects=[stored]))
            logger.info("%s: created stream for subject %r", self.name, stored)
            return
        if self.partitions is None:
            return
        patterns = list(info.config.subjects or ())
        missing = [
            s for s in self.subjects.values() if not any(subject_covers(x, s) for x in patterns)
        ]
        if missing:
            raise ConfigError(
                f"NATS stream {self.stream!r} stores {patterns}, not the partition subjects "
                f"{missing}: with partitions it must store {stored!r} (nats stream edit "
                f"{self.stream} --subjects '{stored}')"
            )

    async def read(self, max_events: int) -> list[Event]:
        """Wait for at least one event and return up to ``max_events``; ``[]`` once closed."""
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        while not self._ready:
            if self._closed:
                return []
            if not self._subs:
                raise RuntimeError(f"{self.name}: call start() before read()")
            fetching = self._fetching
            for p, sub in self._subs.items():  # one pull per partition, each its own task
                if p not in fetching:
                    fetching[p] = asyncio.create_task(self._fetch(sub, max_events))
            # asyncio.wait never cancels the pulls: cancelling this read leaves them
            # running, for the next read. Only aclose cancels them.
            await asyncio.wait(fetching.values(), return_when=asyncio.FIRST_COMPLETED)
            if self._is_closed():  # aclose cancelled the pulls
                return []
            failed: BaseException | None = None
            for p, task in list(fetching.items()):
                if not task.done():
                    continue
                del fetching[p]
                if task.cancelled():
                    continue
                error = task.exception()
                if error is not None:
                    failed = failed or error
                    continue
                self._ready += self._to_events(task.result(), p)
            if failed is not None and not self._ready:
                raise failed
        events = self._ready[:max_events]
        del self._ready[:max_events]
        return events

    def _is_closed(self) -> bool:
        return self._closed

    async def _fetch(self, sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
        """Pull until at least one message arrives (an empty pull just times out)."""
        while True:
            try:
                return await sub.fetch(batch, timeout=self.fetch_timeout_s)
            except TimeoutError:  # nats.errors.TimeoutError and FetchTimeoutError subclass it
                continue

    def _to_events(self, messages: list[Msg], partition: int) -> list[Event]:
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
                    position=Position(source, partition, sequence),
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
        total = 0
        for durable in self.durables.values():
            info = await js.consumer_info(self.stream, durable)
            total += int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return total

    async def aclose(self) -> None:
        """Stop pulling, nak what was read and never acknowledged, close the connection."""
        self._closed = True
        tasks, self._fetching = list(self._fetching.values()), {}
        fetched: list[Msg] = []
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, list):  # pulled for a read that was cancelled
                fetched += outcome
        nc, self._nc, self._js = self._nc, None, None
        subs, self._subs = list(self._subs.values()), {}
        unacked, self._unacked = self._unacked, {}
        self._ready = []
        if nc is None:
            return
        try:
            if nc.is_connected:
                never_acked = [msg for msg, dead in unacked.values() if not dead]
                # A last delivery is not delivered again, nak'ed or not: leave it be.
                # Delayed past fetch_timeout_s (twice it, for the server's and this process's
                # scheduling): a pull request of this connection may still be open on the
                # server (one per partition, each lasting fetch_timeout_s at most), and
                # would take a message nak'ed now to an inbox about to close, where it would
                # wait for ack_wait_s.
                for msg in never_acked + fetched:
                    await msg.nak(delay=2 * self.fetch_timeout_s)
                for sub in subs:
                    await sub.unsubscribe()
                await nc.flush()
        except Exception:  # what was not nak'ed is delivered again after ack_wait_s
            logger.warning("%s: error while closing", self.name, exc_info=True)
        finally:
            await nc.close()

    def __repr__(self) -> str:
        parts = "" if self.partitions is None else f" partitions={list(self.owned_partitions)}"
        return f"<NatsSource {self.name} subject={self.subject!r}{parts} durable={self.durable!r}>"
