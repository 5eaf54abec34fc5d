"""Static key partitioning for Redis, NATS and MQTT: which partition a key goes to, who reads it.

Kafka partitions by key and rebalances by itself; Redis Streams, NATS
JetStream and MQTT share work per entry or message, with no regard for keys.
A sink or source given ``partitions=P`` splits one stream, subject or topic
into ``P`` of them, so that each key stays on one partition and each
partition is read by one worker:

- :func:`partition_of`: a key's partition, ``zlib.crc32(key) % P``: the CRC-32
  of zlib, gzip and PNG (IEEE 802.3, reflected, initial and final XOR
  ``0xFFFFFFFF``), as an unsigned 32-bit number, the same in every language
  (Java's ``java.util.zip.CRC32``, Go's ``hash/crc32.ChecksumIEEE``, Node's
  ``zlib.crc32``). An event without a key goes to partition 0.
- :func:`owned_partitions`: the partitions one worker reads: those listed in
  ``owned_partitions``, else every ``p`` with ``p % N == i`` for worker ``i``
  (``RTINFER_WORKER``) of ``N`` (``RTINFER_WORKERS``), which ``rtinfer run
  --workers N`` sets. The environment is read when a source is built, never
  at import.

The assignment is static: nothing moves a dead worker's partitions to another
(they wait until it restarts), and changing ``P`` or ``N`` needs a drain
(docs/scaling.md).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence

from ..exceptions import ConfigError

__all__ = ["check_partitions", "owned_partitions", "partition_of"]


def partition_of(key: bytes | None, partitions: int) -> int:
    """The partition of ``key``: ``zlib.crc32(key) % partitions``; 0 for no key."""
    if key is None:
        return 0
    return zlib.crc32(key) % partitions


def check_partitions(partitions: int | None) -> None:
    """Refuse a partition count below 1 (``None``: not partitioned)."""
    if partitions is not None and (isinstance(partitions, bool) or partitions < 1):
        raise ConfigError(
            f"partitions must be at least 1 (or unset: one stream, not partitioned), "
            f"got {partitions}"
        )


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def owned_partitions(
    partitions: int,
    owned: Sequence[int] | None = None,
    *,
    what: str,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, ...]:
    """The partitions (sorted) that this worker reads, out of ``partitions``.

    ``owned`` lists them explicitly; without it, worker ``i`` of ``N`` owns every
    ``p`` with ``p % N == i``, ``i`` from ``RTINFER_WORKER`` (default 0) and
    ``N`` from ``RTINFER_WORKERS`` (default 1). A worker left with no partition
    is a :class:`ConfigError` naming the fix (``what`` names the source).
    """
    check_partitions(partitions)
    if owned is not None:
        chosen = sorted(set(owned))
        if len(chosen) != len(owned):
            raise ConfigError(f"{what}: owned_partitions lists a partition twice: {list(owned)}")
        wrong = [p for p in chosen if not 0 <= p < partitions]
        if wrong:
            raise ConfigError(
                f"{what}: owned_partitions {wrong} out of range: there are {partitions} "
                f"partitions, 0 to {partitions - 1}"
            )
        if not chosen:
            raise ConfigError(
                f"{what}: owned_partitions is empty: this worker would read nothing; list at "
                f"least one of 0 to {partitions - 1}, or leave it unset to use RTINFER_WORKER"
            )
        return tuple(chosen)
    env = os.environ if environ is None else environ
    worker = _env_int(env, "RTINFER_WORKER", 0)
    workers = _env_int(env, "RTINFER_WORKERS", 1)
    if workers < 1 or not 0 <= worker < workers:
        raise ConfigError(
            f"{what}: RTINFER_WORKER={worker} is not a worker of RTINFER_WORKERS={workers}; "
            f"workers are numbered 0 to RTINFER_WORKERS - 1"
        )
    chosen = [p for p in range(partitions) if p % workers == worker]
    if not chosen:
        raise ConfigError(
            f"{what}: worker {worker} of {workers} owns no partition: there are more workers "
            f"than partitions ({partitions}); run at most {partitions} workers, or raise "
            "partitions (which needs a drain: docs/scaling.md)"
        )
    return tuple(chosen)
