"""Kafka's default partitioner (murmur2 of the key), so the worker knows a visitor's partition.

The worker processes a visitor's events on the partition that Kafka's default partitioner gives
the UTF-8 ``visitor_id`` key (the same function in the Java client, librdkafka's
``murmur2_random`` and aiokafka's ``DefaultPartitioner``). Events that arrive elsewhere (records
without a key, or with another key) are re-keyed to it.
"""

from __future__ import annotations

import struct
from typing import Final

_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 hash (seed 0x9747b28c), as a signed 32-bit integer."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    words = length >> 2
    if words:  # the little-endian 32-bit words, unpacked in C
        for k in struct.unpack_from(f"<{words}I", data):
            k = (k * _M) & _MASK
            k ^= k >> 24
            h = ((h * _M) ^ (k * _M)) & _MASK  # the low 32 bits of each product, XORed
    end = words << 2
    rest = length & 3
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` among ``partitions``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions
