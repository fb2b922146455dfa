"""A minimal Redis protocol (RESP2) client for the hot paths: the Lua
scripts of the WS's frames, checkpoints, heartbeats and activations and of
the CC's assignments run over one multiplexed Redis connection per process
(`app.fastredis`, see `hot_path`).

Why not redis-py for these: it spends about 150 us of CPU per command here
(pool checkout, retry and timeout wrappers, connection bookkeeping), twice
per frame, a quarter of a frame's whole cost. Every request of the process
writes its command to one shared socket and awaits its reply; Redis
answers in order, so replies are matched first in, first out. A lost
connection fails the commands in flight (ConnectionError: the request
fails and the core retries it, as with redis-py without retries) and the
next command connects again. Connecting and every command are bounded in
time like the redis-py pools: a command without a reply in time means
Redis is stuck, so the connection is dropped (TimeoutError for everything
in flight; a 503 to the client). It connects wherever the app's redis-py
client does (host and port or unix socket, TLS, user, password, db).
Scripts run by SHA1 and are loaded again if Redis lost its script cache.
Everything else uses the app's redis-py client.
"""
from __future__ import annotations

import asyncio
import builtins
import collections
import ssl as ssl_module
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from server import store

# A timer, not a task (Python 3.11+).
_bounded = asyncio.timeout


def encode(args: Sequence[Any]) -> bytes:
    out = [b'*%d\r\n' % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode('utf-8')
        out.append(b'$%d\r\n%s\r\n' % (len(a), a))
    return b''.join(out)


class _Incomplete(Exception):
    pass


def parse(buf: bytearray | bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from `buf` at `pos`: (value, next pos); raises
    _Incomplete if more bytes are needed. Error replies are returned as
    exception instances (a Redis loading its data or read-only as the
    store-down errors of redis-py), bulk strings decoded as UTF-8."""
    end = buf.find(b'\r\n', pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    pos = end + 2
    if kind == b'$':
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + n]).decode('utf-8'), pos + n + 2
    if kind == b':':
        return int(line), pos
    if kind == b'+':
        return line.decode('utf-8'), pos
    if kind == b'*':
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            value, pos = parse(buf, pos)
            items.append(value)
        return items, pos
    if kind == b'-':
        message = line.decode('utf-8', errors='replace')
        if message.startswith('NOSCRIPT'):
            return NoScriptError(message), pos
        # A Redis loading its AOF after a restart, or a replica: the store
        # is down for now (a 503), as redis-py has it.
        if message.startswith('LOADING'):
            return BusyLoadingError(message), pos
        if message.startswith('READONLY'):
            return ReadOnlyError(message), pos
        if message.startswith('OOM'):  # at maxmemory: a 507
            return OutOfMemoryError(message), pos
        return ResponseError(message), pos
    raise ConnectionError('unexpected reply from Redis: %r' % kind)


class _Protocol(asyncio.Protocol):
    """`waiters` (futures of the commands in flight, in order) and `sent`
    (when each was sent, loop time): one watchdog per connection, not a
    timer per command, fails them all once the oldest has waited past
    `timeout` (a timer per command was a twentieth of a frame's CPU)."""

    def __init__(self, timeout: float | None = None) -> None:
        self.transport: Any = None  # an asyncio.Transport once connected
        self.waiters: collections.deque[asyncio.Future[Any]] = \
            collections.deque()
        self.sent: collections.deque[float] = collections.deque()
        self.buf = bytearray()
        self.out: list[bytes] = []  # commands to send at the loop's turn
        self.closed = False
        self.timeout = timeout
        self.watchdog: asyncio.TimerHandle | None = None
        self.loop: Any = None  # once connected

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # its loop, kept: get_running_loop costs a getpid() system call
        self.loop = asyncio.get_running_loop()
        if self.timeout:
            self._watch()

    def _watch(self) -> None:
        assert self.timeout
        loop = asyncio.get_running_loop()
        self.watchdog = loop.call_later(self.timeout / 4, self._check)

    def _check(self) -> None:
        assert self.timeout
        if self.closed:
            return
        if self.sent and asyncio.get_running_loop().time() - self.sent[0] \
                >= self.timeout:
            # Redis is stuck (paused, swapping): drop the connection, so
            # every command in flight fails now and the next connects anew.
            self.transport.abort()
            self._fail(TimeoutError('no reply from Redis in %gs'
                                    % self.timeout))
            return
        self._watch()

    def send(self, command: bytes) -> None:
        """Queue `command`; the commands of one turn of the event loop go
        out in one write (one system call here, one read for Redis)."""
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(command)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b''.join(out))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        try:
            while pos < len(self.buf):
                value, pos = parse(self.buf, pos)
                waiter = self.waiters.popleft()
                self.sent.popleft()
                if waiter.done():  # its request was cancelled meanwhile
                    continue
                if isinstance(value, Exception):  # an error reply
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        except _Incomplete:
            pass
        except (ValueError, IndexError, ConnectionError) as e:
            self.transport.close()
            self._fail(ConnectionError('bad reply from Redis: %s' % e))
        del self.buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError('connection to Redis lost: %s' % exc))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.sent.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


class Multiplexed:
    """One Redis connection shared by every request of a process (and
    event loop). Made lazily on the first command."""

    def __init__(self, host: str = '127.0.0.1', port: int = 6379,
                 password: str | None = None, username: str | None = None,
                 db: int = 0, path: str | None = None,
                 ssl: ssl_module.SSLContext | None = None,
                 connect_timeout: float = store.CONNECT_TIMEOUT,
                 timeout: float = store.COMMAND_TIMEOUT) -> None:
        self.host, self.port, self.path, self.ssl = host, port, path, ssl
        self.db, self.username, self.password = db, username, password
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self.protocol: _Protocol | None = None
        self.connecting: asyncio.Future[_Protocol] | None = None

    @classmethod
    def like(cls, redis: Any) -> Multiplexed:
        """Connect where and as the redis-py client `redis` connects, with
        its timeouts."""
        pool = redis.connection_pool
        kw = pool.connection_kwargs
        ssl = None
        if issubclass(pool.connection_class, SSLConnection):
            ssl = pool.connection_class(**kw).ssl_context.get()
        return cls(kw.get('host', '127.0.0.1'), kw.get('port', 6379),
                   kw.get('password'), kw.get('username'), kw.get('db', 0),
                   path=kw.get('path'), ssl=ssl,
                   connect_timeout=kw.get('socket_connect_timeout')
                   or store.CONNECT_TIMEOUT,
                   timeout=kw.get('socket_timeout') or store.COMMAND_TIMEOUT)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol = None

        def made() -> _Protocol:
            return _Protocol(self.timeout)
        try:
            async with _bounded(self.connect_timeout):
                if self.path:
                    _, protocol = await loop.create_unix_connection(
                        made, self.path)
                else:
                    _, protocol = await loop.create_connection(
                        made, self.host, self.port, ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None)
                hello: list[tuple[Any, ...]] = []
                if self.password:
                    hello.append(('AUTH', self.username, self.password)
                                 if self.username else ('AUTH', self.password))
                if self.db:
                    hello.append(('SELECT', self.db))
                for command in hello:
                    await self._send(protocol, command)
        except (builtins.TimeoutError, ResponseError) as e:
            if protocol is not None:
                protocol.transport.abort()
            if isinstance(e, ResponseError):
                raise ConnectionError('Redis refused us: %s' % e) from e
            raise TimeoutError('no connection to Redis in %gs'
                               % self.connect_timeout) from e
        self.protocol = protocol
        return protocol

    async def _protocol(self) -> _Protocol:
        if self.protocol is not None and not self.protocol.closed:
            return self.protocol
        if self.connecting is None or self.connecting.done():
            self.connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self.connecting)
        except OSError as e:
            raise ConnectionError('cannot connect to Redis: %s' % e) from e

    @staticmethod
    def _send(protocol: _Protocol,
              args: Sequence[Any]) -> asyncio.Future[Any]:
        waiter = protocol.loop.create_future()
        protocol.waiters.append(waiter)
        protocol.sent.append(protocol.loop.time())
        protocol.send(encode(args))
        return waiter

    async def execute(self, *args: Any) -> Any:
        """The reply; TimeoutError once the connection's watchdog finds a
        command unanswered past the timeout (see _Protocol)."""
        protocol = await self._protocol()
        if protocol.closed:
            raise ConnectionError('connection to Redis lost')
        return await self._send(protocol, args)

    async def evalsha(self, sha: str, numkeys: int, *rest: Any) -> Any:
        return await self.execute('EVALSHA', sha, numkeys, *rest)

    async def eval(self, source: str, numkeys: int, *rest: Any) -> Any:
        return await self.execute('EVAL', source, numkeys, *rest)

    def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None


def hot_path(redis: Any) -> Any:
    """The connection for a process's hot-path scripts: a Multiplexed one
    to where the redis-py client `redis` connects; behind Sentinel the
    client itself (the primary moves, and redis-py asks the sentinels)."""
    if isinstance(redis.connection_pool, SentinelConnectionPool):
        return redis
    return Multiplexed.like(redis)


async def close(redis: Any, hot: Any) -> None:
    """Close a connection `hot_path(redis)` made."""
    if hot is not redis:
        hot.close()
