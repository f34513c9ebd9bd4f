"""The worker's asyncio Redis client, with commands packed in C by hiredis.

redis-py's asyncio connection packs a command argument by argument in Python, re-joining a
growing buffer each time: about 1.4 µs per argument here. The store's scripts name every shard
they touch in ``KEYS`` (thousands per batch, see :mod:`agents.redis_store`), which made packing
about 8 % of the worker's time in the envelope benchmark. ``hiredis.pack_command`` (the packer
redis-py's synchronous client already uses) does the same in C: about 0.05 µs per argument,
byte for byte the same output.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.typing import EncodableT


class HiredisPackConnection(Connection):
    """An asyncio connection whose commands are packed by ``hiredis.pack_command``."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        """Pack one command; anything hiredis does not take is left to redis-py (its errors)."""
        command: tuple[Any, ...] = args
        if isinstance(command[0], str):
            command = tuple(command[0].encode().split()) + command[1:]
        elif isinstance(command[0], bytes) and b" " in command[0]:
            command = tuple(command[0].split()) + command[1:]
        try:
            return [hiredis.pack_command(command)]
        except TypeError:  # e.g. a memoryview, a bool or None
            return super().pack_command(*args)


def connect(url: str, **kwargs: Any) -> Redis:
    """An asyncio client for ``url``, packing commands with hiredis over plain TCP.

    Args:
        url: The Redis URL. ``rediss://`` (TLS) and ``unix://`` keep redis-py's own connections.
        **kwargs: Passed to :meth:`redis.asyncio.Redis.from_url` (timeouts, ...).
    """
    if url.startswith("redis://"):
        kwargs.setdefault("connection_class", HiredisPackConnection)
    return Redis.from_url(url, **kwargs)
