"""Static key partitioning (``rtinfer.connectors.partitions``) and its configuration keys."""

from __future__ import annotations

import zlib

import msgspec
import pytest

from rtinfer.config import (
    MqttSinkConfig,
    MqttSourceConfig,
    NatsSinkConfig,
    NatsSourceConfig,
    RedisSinkConfig,
    RedisSourceConfig,
)
from rtinfer.connectors.partitions import check_partitions, owned_partitions, partition_of
from rtinfer.exceptions import ConfigError


def test_a_key_goes_to_its_crc32_modulo_the_partition_count() -> None:
    # Fixed values: what a producer in any language must compute (CRC-32 of zlib/IEEE).
    assert zlib.crc32(b"card-1") == 0x64ECD394
    assert partition_of(b"card-1", 4) == 0x64ECD394 % 4
    assert partition_of(b"123456789", 1000) == 0xCBF43926 % 1000  # the CRC-32 check value
    for key in (b"", b"a", "kart\u00e9".encode(), bytes(range(256))):
        assert partition_of(key, 7) == zlib.crc32(key) % 7
    assert partition_of(None, 4) == 0  # no key: partition 0
    assert {partition_of(b"k%d" % i, 4) for i in range(100)} == {0, 1, 2, 3}


def test_workers_split_the_partitions_round_robin() -> None:
    env = {"RTINFER_WORKER": "1", "RTINFER_WORKERS": "3"}
    assert owned_partitions(8, what="s", environ=env) == (1, 4, 7)
    assert owned_partitions(8, what="s", environ={}) == tuple(range(8))  # one worker: all
    split = [
        owned_partitions(8, what="s", environ={"RTINFER_WORKER": str(i), "RTINFER_WORKERS": "3"})
        for i in range(3)
    ]
    assert sorted(p for owned in split for p in owned) == list(range(8))  # none missed, no overlap


def test_explicit_owned_partitions_win_over_the_environment() -> None:
    env = {"RTINFER_WORKER": "0", "RTINFER_WORKERS": "2"}
    assert owned_partitions(4, [3, 1], what="s", environ=env) == (1, 3)


@pytest.mark.parametrize(
    ("partitions", "owned", "env", "message"),
    [
        (4, None, {"RTINFER_WORKER": "4", "RTINFER_WORKERS": "6"}, "more workers than partitions"),
        (4, None, {"RTINFER_WORKER": "2", "RTINFER_WORKERS": "2"}, "is not a worker of"),
        (4, None, {"RTINFER_WORKER": "x"}, "must be an integer"),
        (4, [4], {}, "out of range"),
        (4, [1, 1], {}, "twice"),
        (4, [], {}, "is empty"),
        (0, None, {}, "at least 1"),
    ],
)
def test_a_worker_without_partitions_is_a_config_error(
    partitions: int, owned: list[int] | None, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        owned_partitions(partitions, owned, what="the source", environ=env)


def test_check_partitions() -> None:
    check_partitions(None)
    check_partitions(1)
    with pytest.raises(ConfigError, match="at least 1"):
        check_partitions(-2)


@pytest.mark.parametrize(
    ("config", "fields"),
    [
        (RedisSourceConfig, {"url": "redis://h", "stream": "s"}),
        (NatsSourceConfig, {"url": "nats://h", "stream": "S", "subject": "s"}),
        (MqttSourceConfig, {"url": "mqtt://h", "topic": "t"}),
    ],
)
def test_source_configs_take_partitions_and_owned_partitions(
    config: type[msgspec.Struct], fields: dict[str, str]
) -> None:
    raw = msgspec.json.encode({**fields, "type": config.__struct_config__.tag, "partitions": 4,
                               "owned_partitions": [0, 2]})  # fmt: skip
    parsed = msgspec.json.decode(raw, type=config)
    assert msgspec.structs.asdict(parsed)["partitions"] == 4
    assert msgspec.structs.asdict(parsed)["owned_partitions"] == [0, 2]


@pytest.mark.parametrize(
    ("config", "fields"),
    [
        (RedisSinkConfig, {"url": "redis://h", "stream": "s"}),
        (NatsSinkConfig, {"url": "nats://h", "subject": "s"}),
        (MqttSinkConfig, {"url": "mqtt://h", "topic": "t"}),
    ],
)
def test_sink_configs_take_partitions(config: type[msgspec.Struct], fields: dict[str, str]) -> None:
    raw = msgspec.json.encode({**fields, "type": config.__struct_config__.tag, "partitions": 4})
    assert msgspec.structs.asdict(msgspec.json.decode(raw, type=config))["partitions"] == 4
    assert msgspec.structs.asdict(msgspec.json.decode(
        msgspec.json.encode({**fields, "type": config.__struct_config__.tag}), type=config
    ))["partitions"] is None  # fmt: skip
