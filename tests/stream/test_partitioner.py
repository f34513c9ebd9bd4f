"""Tests of :mod:`stream.partitioner`: Kafka's default partitioner, bit for bit."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.partitioner import murmur2, partition_for, partitions_for


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # The vectors of Kafka's own UtilsTest.testMurmur2 (Java, signed 32-bit).
        pytest.param(b"21", -973932308, id="2-bytes"),
        pytest.param(b"foobar", -790332482, id="6-bytes"),
        pytest.param(b"a-little-bit-long-string", -985981536, id="24-bytes"),
        pytest.param(b"a-little-bit-longer-string", -1486304829, id="26-bytes"),
        pytest.param(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971, id="48-bytes"),
        pytest.param(b"abc", 479470107, id="3-bytes"),
    ],
)
def test_kafka_reference_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_murmur2_equals_aiokafka(data: bytes) -> None:
    ours = murmur2(data)
    assert -(2**31) <= ours < 2**31  # Java's signed int
    assert ours & 0xFFFFFFFF == aiokafka_murmur2(data)  # aiokafka returns it unsigned


@given(st.text(max_size=40), st.integers(min_value=1, max_value=256))
@settings(max_examples=500, deadline=None)
def test_partition_for_equals_aiokafka_default_partitioner(key: str, partitions: int) -> None:
    all_partitions = list(range(partitions))
    expected = DefaultPartitioner()(key.encode(), all_partitions, all_partitions)
    assert partition_for(key, partitions) == expected


@pytest.mark.parametrize(
    "partitions",
    [
        pytest.param(1, id="one-partition"),
        pytest.param(8, id="default-8"),
        pytest.param(7, id="prime"),
    ],
)
def test_partition_for_is_in_range_and_stable(partitions: int) -> None:
    keys = [f"visitor-{i}" for i in range(200)] + ["", "é", "🙂"]
    got = [partition_for(k, partitions) for k in keys]
    assert all(0 <= p < partitions for p in got)
    assert got == [partition_for(k, partitions) for k in keys]
    if partitions > 1:
        assert len(set(got)) == partitions  # 200 keys spread over every partition


@given(st.lists(st.text(max_size=48), max_size=60), st.integers(min_value=1, max_value=256))
@settings(max_examples=300, deadline=None)
def test_partitions_for_equals_partition_for_of_each(keys: list[str], partitions: int) -> None:
    # Keys of every length class (words and 0-3 trailing bytes), several of one length, non-ASCII.
    assert partitions_for(keys, partitions) == [partition_for(k, partitions) for k in keys]


def test_partitions_for_long_and_many_keys() -> None:
    keys = [f"{i:08x}-5b1e-4d2a-9c3f-{i * 7919:012x}" for i in range(2000)]  # UUID-shaped
    keys += ["", "é" * 100, "🙂" * 33]
    assert partitions_for(keys, 12) == [partition_for(k, 12) for k in keys]
