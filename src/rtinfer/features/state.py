"""Durable feature state: frames of changed keys, committed with the offsets they cover.

After each batch the stage encodes a :class:`Frame` per partition: the keys the
batch changed (their whole buffers), the keys it evicted, the partition's latest
event time, and the highest source offset the batch held. A frame waits in
memory until the pipeline acknowledges that offset (see
:meth:`~.stage.FeatureStage.checkpoint`), and is then committed to a store in
the same call: the state and the offsets it covers are durable together. On
restart the frames are read back and merged; events at or below the merged
offset were already applied (and their results flushed), so they are skipped:
nothing is lost and nothing counted twice.

Stores (:func:`open_store`):

- :class:`FileStore` (``file://DIR`` or a path), the embedded default: one
  append-only log per partition, length- and CRC-framed, fsynced on commit; a
  torn last frame (a crash mid-write) is ignored; the log is compacted (its
  frames merged into one, written aside, then renamed over it) when it grows
  past four times its last compacted size.
- :class:`RedisStore` (``redis://HOST:PORT/DB``): one hash per partition, a field
  per key plus one for the offsets, written in one ``MULTI``/``EXEC``
  transaction; a compacted changelog by construction.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ..exceptions import ConfigError, MissingDependency

__all__ = [
    "FileStore",
    "Frame",
    "RedisStore",
    "StateStore",
    "encode_frame",
    "merge_frames",
    "open_store",
]


class Frame(msgspec.Struct, array_like=True):
    """Changes to one partition's state: buffers set, keys deleted, latest time, offset."""

    max_time: float
    applied: Any
    set: list[tuple[Any, list[list[Any]]]]
    deleted: list[Any]


_encode = msgspec.msgpack.Encoder().encode
_decode_frame = msgspec.msgpack.Decoder(Frame).decode
_decode_any = msgspec.msgpack.Decoder().decode


def merge_frames(frames: Sequence[Frame]) -> Frame:
    """One frame equivalent to applying ``frames`` in order."""
    keys: dict[Any, list[list[Any]] | None] = {}
    for frame in frames:
        for key in frame.deleted:
            keys[_hashable(key)] = None
        for key, buffer in frame.set:
            keys[_hashable(key)] = buffer
    last = frames[-1]
    return Frame(
        last.max_time,
        last.applied,
        [(k, b) for k, b in keys.items() if b is not None],
        [k for k, b in keys.items() if b is None],
    )


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def encode_frame(frame: Frame) -> bytes:
    """A frame's bytes, made on the loop when its batch is done (the state moves on after)."""
    return _encode(frame)


class StateStore(Protocol):
    """Where partitions' frames are kept. Calls block: the stage runs :meth:`commit` on a
    thread, and :meth:`load` on the loop, once when a partition first appears."""

    def load(self, namespace: str) -> Frame | None: ...

    def commit(self, namespace: str, frames: Sequence[bytes]) -> None: ...

    def close(self) -> None: ...


_HEADER = struct.Struct("<II")  # length, crc32 of the payload
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class FileStore:
    """One append-only, fsynced log of frames per partition under ``directory``."""

    def __init__(self, directory: str | Path, *, compact_min_bytes: int = 1 << 20) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.compact_min_bytes = compact_min_bytes
        self._compacted: dict[str, int] = {}

    def path(self, namespace: str) -> Path:
        return self.directory / (_SAFE.sub("_", namespace) + ".log")

    def _read(self, path: Path) -> tuple[list[Frame], int]:
        """The whole frames of the log, and the byte length they take (a torn tail excluded)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return [], 0
        frames: list[Frame] = []
        at = 0
        while at + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, at)
            payload = data[at + _HEADER.size : at + _HEADER.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                break  # torn by a crash mid-write: never committed
            frames.append(_decode_frame(payload))
            at += _HEADER.size + length
        return frames, at

    def load(self, namespace: str) -> Frame | None:
        path = self.path(namespace)
        frames, good = self._read(path)
        if good and good < path.stat().st_size:
            with path.open("r+b") as file:  # drop the torn tail before appending after it
                file.truncate(good)
        self._compacted[namespace] = good
        return merge_frames(frames) if frames else None

    def commit(self, namespace: str, frames: Sequence[bytes]) -> None:
        if not frames:
            return
        path = self.path(namespace)
        chunks = [_HEADER.pack(len(p), zlib.crc32(p)) + p for p in frames]
        with path.open("ab") as file:
            file.write(b"".join(chunks))
            file.flush()
            os.fsync(file.fileno())
            size = file.tell()
        if size > max(self.compact_min_bytes, 4 * self._compacted.get(namespace, 0)):
            self._compact(namespace, path)

    def _compact(self, namespace: str, path: Path) -> None:
        frames, _ = self._read(path)
        payload = _encode(merge_frames(frames))
        aside = path.with_suffix(".compacting")
        with aside.open("wb") as file:
            file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(aside, path)
        self._compacted[namespace] = _HEADER.size + len(payload)

    def close(self) -> None:
        pass


class RedisStore:
    """One hash per partition in Redis: a field per key, and one for the offsets."""

    _META = b""  # no encoded key is empty

    def __init__(self, url: str, *, prefix: str = "rtinfer:features:") -> None:
        try:
            import redis
        except ImportError as exc:
            raise MissingDependency("keeping feature state in Redis", "redis") from exc
        self.url = url
        self.prefix = prefix
        self._client = redis.Redis.from_url(url)

    def _hash(self, namespace: str) -> str:
        return self.prefix + namespace

    def load(self, namespace: str) -> Frame | None:
        fields: dict[Any, Any] = self._client.hgetall(self._hash(namespace))
        meta = fields.pop(self._META, None)
        if meta is None:
            return None
        max_time, applied = _decode_any(meta)
        return Frame(
            max_time,
            applied,
            [(_hashable(_decode_any(k)), _decode_any(v)) for k, v in fields.items()],
            [],
        )

    def commit(self, namespace: str, frames: Sequence[bytes]) -> None:
        if not frames:
            return
        frame = merge_frames([_decode_frame(f) for f in frames])
        name = self._hash(namespace)
        with self._client.pipeline(transaction=True) as tx:
            if frame.deleted:
                tx.hdel(name, *[_encode(k) for k in frame.deleted])
            mapping: dict[Any, Any] = {_encode(k): _encode(b) for k, b in frame.set}
            mapping[self._META] = _encode([frame.max_time, frame.applied])
            tx.hset(name, mapping=mapping)
            tx.execute()

    def clear(self, namespace: str) -> None:
        """Delete a partition's state (tests, resets)."""
        self._client.delete(self._hash(namespace))

    def close(self) -> None:
        self._client.close()


def open_store(spec: str | StateStore | None) -> StateStore | None:
    """A store from ``file://DIR`` (or a plain path), ``redis://...``, an instance, or ``None``."""
    if spec is None or not isinstance(spec, str):
        return spec
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec)
    if spec.startswith("file://"):
        return FileStore(spec.removeprefix("file://"))
    if "://" in spec:
        raise ConfigError(
            f"unknown state store {spec!r}; use file://DIR (or a path) or redis://HOST:PORT/DB",
            key="store",
        )
    return FileStore(spec)
