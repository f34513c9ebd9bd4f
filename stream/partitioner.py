"""Kafka's default partitioner (murmur2 of the key), so the worker knows a visitor's partition.

The worker processes a visitor's events on the partition that Kafka's default partitioner gives
the UTF-8 ``visitor_id`` key (the same function in the Java client, librdkafka's
``murmur2_random`` and aiokafka's ``DefaultPartitioner``). Events that arrive elsewhere (records
without a key, or with another key) are re-keyed to it.

:func:`partitions_for` computes many keys at once, in numpy: a step's new visitors cost a fraction
of a microsecond each instead of two or more (the hash in Python is a dozen integer operations
per 4 bytes of key, each allocating).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import numpy as np

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


def partitions_for(keys: Sequence[str], partitions: int) -> list[int]:
    """:func:`partition_for` of each of ``keys``, computed together (numpy, per key length)."""
    out = [0] * len(keys)
    by_length: dict[int, tuple[list[int], list[bytes]]] = {}
    for i, key in enumerate(keys):
        data = key.encode()
        group = by_length.get(len(data))
        if group is None:
            by_length[len(data)] = ([i], [data])
        else:
            group[0].append(i)
            group[1].append(data)
    for length, (at, same) in by_length.items():
        hashes = _murmur2_rows(b"".join(same), len(same), length)
        for i, partition in zip(at, ((hashes & 0x7FFFFFFF) % partitions).tolist(), strict=True):
            out[i] = partition
    return out


def _murmur2_rows(data: bytes, rows: int, length: int) -> np.ndarray:
    """:func:`murmur2` (unsigned) of ``rows`` keys of ``length`` bytes each, laid end to end.

    uint32 arithmetic wraps modulo 2**32, as the hash's Java ``int`` arithmetic does.
    """
    m = np.uint32(_M)
    keys = np.frombuffer(data, dtype=np.uint8).reshape(rows, length)
    h = np.full(rows, (0x9747B28C ^ length) & _MASK, dtype=np.uint32)
    words = length >> 2
    if words:
        packed = np.ascontiguousarray(keys[:, : words * 4]).view("<u4")  # (rows, words)
        for i in range(words):
            k = packed[:, i] * m
            k ^= k >> 24
            k *= m
            h *= m
            h ^= k
    end = words << 2
    rest = length & 3
    if rest == 3:
        h ^= keys[:, end + 2].astype(np.uint32) << 16
    if rest >= 2:
        h ^= keys[:, end + 1].astype(np.uint32) << 8
    if rest >= 1:
        h ^= keys[:, end].astype(np.uint32)
        h *= m
    h ^= h >> 13
    h *= m
    h ^= h >> 15
    return h
