"""A TCP forwarder that can be cut, for "the broker is down" without losing the broker's data.

The embedded broker keeps its log in memory: it cannot be restarted with its topics. Clients that
reach it through this proxy (it is the address the broker advertises) see it go down for real when
the proxy is cut: every open connection is reset and new ones are refused, until it is restored.
The proxy can also refuse writes only (it resets any connection that sends a Produce request),
as a broker does for ``acks=all`` producers when its in-sync replicas are too few, while fetches
and offset commits go on. The test's own traffic (client id ``TRAFFIC_CLIENT``) still gets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from pathlib import Path

from agents.embedded import HOST, EmbeddedBroker, _kafka_ready, free_port


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port`` from a background thread."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self.refuse_writes = False  # reset connections that send a Produce request (not ours)

    def start(self) -> None:
        self._thread.start()
        self._call(self._listen())

    def cut(self) -> None:
        """Reset every connection and refuse new ones."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        self._call(self._listen())

    def stop(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()  # an RST, as when the broker's host goes away
        self._transports.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer.transport, up_writer.transport)
        self._transports.update(pair)
        try:
            await asyncio.gather(self._requests(reader, up_writer), _pump(up_reader, writer))
        except ConnectionResetError:
            pass  # a refused write: both sides are reset below
        finally:
            for transport in pair:
                self._transports.discard(transport)
                transport.abort()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward Kafka requests (size-prefixed frames) to the broker, unless refused."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                size = await reader.readexactly(4)
                frame = await reader.readexactly(struct.unpack(">i", size)[0])
                if self.refuse_writes and _is_refused_write(frame):
                    raise ConnectionResetError("write refused")
                writer.write(size + frame)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()


TRAFFIC_CLIENT = b"chaos-traffic"
"""Client id of the test's producers: their writes are never refused."""

_PRODUCE = 0  # Kafka API key of Produce requests


def _is_refused_write(frame: bytes) -> bool:
    """A Produce request from a client other than the test's traffic."""
    # Request header: api_key int16, api_version int16, correlation_id int32, client_id string.
    api_key, _version, _correlation, length = struct.unpack_from(">hhih", frame)
    return api_key == _PRODUCE and frame[10 : 10 + max(length, 0)] != TRAFFIC_CLIENT


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


class ProxiedBroker(EmbeddedBroker):
    """The embedded broker, advertising the address of a :class:`TcpProxy` in front of it."""

    def __init__(self, log_path: Path | None = None) -> None:
        # An explicit port: the broker must not move to another one behind the proxy's back.
        super().__init__(port=free_port(), log_path=log_path)
        self.proxy = TcpProxy(self.port)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.proxy.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        self.proxy.start()
        super().start(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        self.proxy.stop()

    def _command(self) -> list[str]:
        command = super()._command()
        command[command.index("--advertised-listener-url") + 1] = f"tcp://{self.bootstrap}"
        return command

    def _probe(self, timeout_s: float) -> bool:
        return _kafka_ready(self.proxy.port, timeout_s)  # through the proxy, as clients do
