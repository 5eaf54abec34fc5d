"""The in-process broker keeps Kafka's promises: partitioning, groups, commits, redelivery."""

from __future__ import annotations

import asyncio
import zlib
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtinfer.broker import Broker, Consumer, Record
from rtinfer.exceptions import Closed

SAFETY = 5.0  # seconds: a safety net against a hang, never a timing assertion


def owners(consumers: list[Consumer]) -> dict[tuple[str, int], str]:
    """Map each owned partition to its owner, asserting that no partition has two."""
    owned: dict[tuple[str, int], str] = {}
    for c in consumers:
        for tp in c.assignment():
            assert tp not in owned, f"{tp} owned by {owned[tp]} and {c.name}"
            owned[tp] = c.name
    return owned


def offsets(records: list[Record]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


# -- producing --------------------------------------------------------------------------


def test_keyed_partitioning_is_stable_and_keeps_per_key_order() -> None:
    broker = Broker(default_partitions=4)
    keys = [f"card-{i}".encode() for i in range(20)]
    placed: dict[bytes, set[int]] = defaultdict(set)
    for seq in range(10):
        for key in keys:
            partition, _ = broker.publish("t", b"%d" % seq, key=key)
            placed[key].add(partition)
    for key, partitions in placed.items():
        assert partitions == {zlib.crc32(key) % 4}
    consumer = broker.consumer("t", "g")
    records = consumer.fetch_nowait(1000)
    assert len(records) == 200
    by_key: dict[bytes | None, list[bytes]] = defaultdict(list)
    for r in records:
        by_key[r.key].append(r.value)
    for key in keys:
        assert by_key[key] == [b"%d" % seq for seq in range(10)]


def test_unkeyed_records_go_round_robin_and_offsets_count_per_partition() -> None:
    broker = Broker(default_partitions=3)
    placed = [broker.publish("t", b"x") for _ in range(6)]
    assert placed == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert broker.end_offsets("t") == [2, 2, 2]
    assert broker.publish("t", b"x", partition=2) == (2, 2)
    with pytest.raises(ValueError, match="partitions 0 to 2, got partition 3"):
        broker.publish("t", b"x", partition=3)


def test_publish_many_matches_publish() -> None:
    one, many = Broker(default_partitions=3), Broker(default_partitions=3)
    values = [b"v%d" % i for i in range(50)]
    keys = [None if i % 3 == 0 else b"k%d" % (i % 7) for i in range(50)]
    for value, key in zip(values, keys, strict=True):
        one.publish("t", value, key=key, timestamp=1.0)
    many.publish_many("t", values[:20], keys=keys[:20], timestamps=[1.0] * 20)
    many.publish_many("t", values[20:], keys=keys[20:], timestamps=[1.0] * 30)
    got_one = one.consumer("t", "g").fetch_nowait(100)
    got_many = many.consumer("t", "g").fetch_nowait(100)
    assert sorted(got_one) == sorted(got_many)
    # Unkeyed bulk publishing continues the round-robin where it stopped.
    rr = Broker(default_partitions=3)
    rr.publish("t", b"a")
    rr.publish_many("t", [b"b", b"c", b"d", b"e"])
    assert rr.end_offsets("t") == [2, 2, 1]


def test_publish_defaults_and_errors() -> None:
    broker = Broker()
    broker.publish("auto", b"x", headers={"h": b"1"})
    assert broker.topics() == ["auto"]
    [record] = broker.consumer("auto", "g").fetch_nowait(10)
    assert record.headers == {"h": b"1"}
    assert record.timestamp > 1e9  # seconds since the epoch
    with pytest.raises(TypeError, match="must be bytes, got str"):
        broker.publish("auto", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be bytes, got int"):
        broker.publish_many("auto", [b"ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="got 2 values but 1 keys"):
        broker.publish_many("auto", [b"a", b"b"], keys=[b"k"])
    with pytest.raises(ValueError, match="unknown topic 'nope'"):
        broker.end_offsets("nope")
    broker.create_topic("four", partitions=4)
    broker.create_topic("four", partitions=4)  # the same again: nothing to do
    with pytest.raises(ValueError, match="already exists with 4 partitions"):
        broker.create_topic("four", partitions=2)


def test_retention_trims_old_records_and_moves_readers_to_the_earliest_kept() -> None:
    broker = Broker(retention=5)
    broker.publish_many("t", [b"%d" % i for i in range(3)])
    early = broker.consumer("t", "early")
    assert [r.offset for r in early.fetch_nowait(2)] == [0, 1]
    for i in range(3, 3000):  # enough to trigger the bulk reclaim, several times
        broker.publish("t", b"%d" % i)
    assert broker.beginning_offsets("t") == [2995]
    assert broker.end_offsets("t") == [3000]
    records = early.fetch_nowait(100)
    assert [r.offset for r in records] == [2995, 2996, 2997, 2998, 2999]
    assert [r.value for r in records] == [b"2995", b"2996", b"2997", b"2998", b"2999"]
    assert broker.lag("late", "t") == 5
    broker.publish_many("t", [b"x"] * 10_000)
    assert broker.beginning_offsets("t") == [12995]
    assert broker.committed("late", "t") == [12995]


# -- consumer groups --------------------------------------------------------------------


def test_each_partition_has_one_owner_and_groups_rebalance_on_join_and_leave() -> None:
    broker = Broker()
    broker.create_topic("a", partitions=4)
    broker.create_topic("b", partitions=2)
    all_partitions = {("a", p) for p in range(4)} | {("b", p) for p in range(2)}
    first = broker.consumer(["a", "b"], "g", name="first")
    assert set(owners([first])) == all_partitions
    second = broker.consumer(["a", "b"], "g", name="second")
    assert set(owners([first, second])) == all_partitions
    assert first.assignment() == [("a", 0), ("a", 1), ("b", 0)]
    assert second.assignment() == [("a", 2), ("a", 3), ("b", 1)]
    only_a = broker.consumer("a", "g", name="third")
    members = [first, second, only_a]
    assert set(owners(members)) == all_partitions
    assert all(t == "a" for t, _ in only_a.assignment())
    second.close()
    assert second.assignment() == []
    assert set(owners([first, only_a])) == all_partitions
    other_group = broker.consumer("a", "h")  # another group reads everything on its own
    assert len(other_group.assignment()) == 4
    with pytest.raises(ValueError, match="already has a member named 'first'"):
        broker.consumer("a", "g", name="first")


async def test_a_member_with_no_partition_idles_until_one_is_free() -> None:
    broker = Broker()
    broker.publish("t", b"x")
    busy = broker.consumer("t", "g")
    idle = broker.consumer("t", "g")
    assert idle.assignment() == []
    waiting = asyncio.ensure_future(idle.fetch(10))
    await asyncio.sleep(0)
    assert not waiting.done()
    busy.close()
    records = await asyncio.wait_for(waiting, SAFETY)
    assert [r.value for r in records] == [b"x"]


async def test_fetch_waits_and_wakes_on_publish() -> None:
    broker = Broker(default_partitions=2)
    consumer = broker.consumer("t", "g")
    waiting = asyncio.ensure_future(consumer.fetch(10))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()
    broker.publish("t", b"hello", partition=1)
    records = await asyncio.wait_for(waiting, SAFETY)
    assert offsets(records) == [(1, 0)]
    assert records[0].value == b"hello"


async def test_one_fetch_at_a_time_per_consumer() -> None:
    broker = Broker()
    consumer = broker.consumer("t", "g")
    waiting = asyncio.ensure_future(consumer.fetch(10))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already fetching"):
        await consumer.fetch(10)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    broker.publish("t", b"x")  # the cancelled fetch left nothing behind
    assert len(await asyncio.wait_for(consumer.fetch(10), SAFETY)) == 1


def test_fetch_is_fair_across_partitions_and_ordered_within_each() -> None:
    broker = Broker()
    broker.create_topic("t", partitions=3)
    for p, n in ((0, 100), (1, 2), (2, 100)):
        for i in range(n):
            broker.publish("t", b"%d" % i, partition=p)
    consumer = broker.consumer("t", "g")
    records = consumer.fetch_nowait(10)
    per_partition: dict[int, list[int]] = defaultdict(list)
    for r in records:
        per_partition[r.partition].append(r.offset)
    assert len(records) == 10
    assert per_partition[1] == [0, 1]  # what partition 1 lacks, the others share
    assert sorted(len(v) for p, v in per_partition.items() if p != 1) == [4, 4]
    for got in per_partition.values():
        assert got == list(range(len(got)))
    assert len(consumer.fetch_nowait(1000)) == 202 - 10


# -- commits and redelivery -------------------------------------------------------------


def test_commit_semantics_and_resume_from_the_committed_offset() -> None:
    broker = Broker()
    broker.publish_many("t", [b"%d" % i for i in range(10)])
    first = broker.consumer("t", "g")
    assert broker.committed("g", "t") == [0]
    assert len(first.fetch_nowait(6)) == 6
    assert first.commit({("t", 0): 4}) == set()
    assert broker.committed("g", "t") == [4]
    assert broker.lag("g", "t") == 6
    with pytest.raises(ValueError, match="cannot commit offset 11"):
        first.commit({("t", 0): 11})
    first.close()
    again = broker.consumer("t", "g")
    assert [r.offset for r in again.fetch_nowait(100)] == list(range(4, 10))


def test_unacknowledged_records_are_redelivered_when_a_member_leaves() -> None:
    broker = Broker(default_partitions=2)
    broker.publish_many("t", [b"%d" % i for i in range(20)])  # 10 per partition
    leaver = broker.consumer("t", "g", name="leaver")
    stayer = broker.consumer("t", "g", name="stayer")
    assert leaver.assignment() == [("t", 0)]
    got = leaver.fetch_nowait(100)
    assert offsets(got) == [(0, i) for i in range(10)]
    leaver.commit({("t", 0): 7})  # acknowledged 0..6, not 7..9
    leaver.close()
    assert stayer.assignment() == [("t", 0), ("t", 1)]
    rest = [(p, o) for p, o in offsets(stayer.fetch_nowait(100)) if p == 0]
    assert rest == [(0, 7), (0, 8), (0, 9)]


def test_commit_is_refused_after_losing_the_partition() -> None:
    broker = Broker()
    broker.publish_many("t", [b"a", b"b", b"c"])
    first = broker.consumer("t", "g", name="first")
    assert len(first.fetch_nowait(10)) == 3
    first.commit({("t", 0): 1})
    # A newcomer does not take the only partition (range assignment, join order);
    # the first member leaving hands it over.
    second = broker.consumer("t", "g", name="second")
    assert first.assignment() == [("t", 0)]
    assert second.assignment() == []
    first.close()
    assert first.commit({("t", 0): 3}) == {("t", 0)}
    assert broker.committed("g", "t") == [1]
    assert [r.value for r in second.fetch_nowait(10)] == [b"b", b"c"]


def test_a_kept_partition_keeps_its_position_through_a_rebalance() -> None:
    broker = Broker(default_partitions=2)
    broker.publish_many("t", [b"%d" % i for i in range(8)])
    first = broker.consumer("t", "g")
    assert len(first.fetch_nowait(100)) == 8
    second = broker.consumer("t", "g")  # takes partition 1 from the first member
    assert first.assignment() == [("t", 0)]
    assert first.position("t", 0) == 4
    assert first.fetch_nowait(10) == []
    assert first.commit({("t", 1): 4}) == {("t", 1)}
    assert [r.offset for r in second.fetch_nowait(10)] == [0, 1, 2, 3]


# -- end of stream and close ------------------------------------------------------------


async def test_end_topic_ends_fetches_after_the_last_record() -> None:
    broker = Broker(default_partitions=2)
    broker.publish_many("t", [b"a", b"b", b"c"])
    consumer = broker.consumer("t", "g")
    waiting: asyncio.Future[list[Record]]
    assert len(await consumer.fetch(10)) == 3
    waiting = asyncio.ensure_future(consumer.fetch(10))
    await asyncio.sleep(0)
    assert not waiting.done()
    broker.end_topic("t")
    assert await asyncio.wait_for(waiting, SAFETY) == []
    assert await consumer.fetch(10) == []
    with pytest.raises(Closed, match="ended by end_topic"):
        broker.publish("t", b"late")
    late = broker.consumer("t", "late")  # a new group still reads all, then ends
    assert len(await late.fetch(10)) == 3
    assert await late.fetch(10) == []


async def test_close_wakes_a_pending_fetch_with_nothing() -> None:
    broker = Broker()
    consumer = broker.consumer("t", "g")
    waiting = asyncio.ensure_future(consumer.fetch(10))
    await asyncio.sleep(0)
    consumer.close()
    assert await asyncio.wait_for(waiting, SAFETY) == []
    broker.publish("t", b"x")
    assert await consumer.fetch(10) == []
    assert consumer.closed
    consumer.close()  # idempotent


# -- the at-least-once property ---------------------------------------------------------

publish_op = st.tuples(st.just("publish"), st.integers(0, 5), st.integers(1, 6))
fetch_op = st.tuples(st.just("fetch"), st.integers(0, 3), st.integers(1, 8))
ack_op = st.tuples(st.just("ack"), st.integers(0, 3), st.integers(0, 8))
join_op = st.tuples(st.just("join"), st.just(0), st.just(0))
leave_op = st.tuples(st.just("leave"), st.integers(0, 3), st.just(0))
operations = st.lists(
    st.one_of(publish_op, fetch_op, ack_op, join_op, leave_op), min_size=1, max_size=60
)


@settings(max_examples=150, deadline=None)
@given(partitions=st.integers(1, 4), ops=operations)
def test_every_record_is_delivered_and_committed_at_least_once(
    partitions: int, ops: list[tuple[str, int, int]]
) -> None:
    """Any interleaving of publishes, fetches, partial acks, joins and leaves loses nothing.

    Acks follow the pipeline's rule: a member acknowledges a prefix of what it
    fetched, in fetch order, committing per partition the highest offset plus one.
    """
    broker = Broker(default_partitions=partitions)
    topic = "t"
    broker.create_topic(topic)
    published: dict[tuple[int, int], bytes] = {}
    acked: set[tuple[int, int]] = set()
    members: list[Consumer] = [broker.consumer(topic, "g")]
    pending: dict[str, list[Record]] = {members[0].name: []}
    sequence = 0

    def deliver(member: Consumer, records: list[Record]) -> None:
        seen: dict[bytes | None, int] = {}
        for r in records:
            assert published[(r.partition, r.offset)] == r.value
            seq = int(r.value.split(b":")[1])
            assert seen.get(r.key, -1) < seq, "per-key order broken within a fetch"
            seen[r.key] = seq
        pending[member.name].extend(records)

    def ack(member: Consumer, count: int) -> None:
        done, pending[member.name] = pending[member.name][:count], pending[member.name][count:]
        highest: dict[tuple[str, int], int] = {}
        for r in done:
            acked.add((r.partition, r.offset))
            highest[(r.topic, r.partition)] = max(highest.get((r.topic, r.partition), -1), r.offset)
        member.commit({tp: o + 1 for tp, o in highest.items()})

    def check() -> None:
        live = [m for m in members if not m.closed]
        owned = owners(live)
        if live:
            assert set(owned) == {(topic, p) for p in range(partitions)}
        for p, committed in enumerate(broker.committed("g", topic)):
            missing = [o for o in range(committed) if (p, o) not in acked]
            assert not missing, f"partition {p}: committed {committed} but never acked {missing}"

    for op, who, n in ops:
        live = [m for m in members if not m.closed]
        if op == "publish":
            key = b"k%d" % who
            for _ in range(n):
                partition, offset = broker.publish(topic, b"%b:%d" % (key, sequence), key=key)
                published[(partition, offset)] = b"%b:%d" % (key, sequence)
                sequence += 1
        elif op == "join" and len(live) < 4:
            member = broker.consumer(topic, "g")
            members.append(member)
            pending[member.name] = []
        elif live and op == "fetch":
            member = live[who % len(live)]
            deliver(member, member.fetch_nowait(n))
        elif live and op == "ack":
            ack(live[who % len(live)], n)
        elif live and op == "leave":
            live[who % len(live)].close()
        check()

    # Drain: the survivors stop, one fresh member reads everything left and commits it.
    for member in members:
        member.close()
    last = broker.consumer(topic, "g")
    pending[last.name] = []
    broker.end_topic(topic)

    async def drain() -> None:
        while records := await asyncio.wait_for(last.fetch(5), SAFETY):
            deliver(last, records)
            ack(last, len(records))

    asyncio.run(drain())
    check()
    assert broker.committed("g", topic) == broker.end_offsets(topic)
    assert broker.lag("g", topic) == 0
    assert acked == set(published)
