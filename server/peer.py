"""HTTPS calls from one server to another (CC <-> WS): non-blocking, bounded
in time, the peer's certificate verified against our CA bundle, over
keep-alive connections.

Tornado's AsyncHTTPClient opens a new TLS connection per request, so every
assignment cost a full handshake on both sides. Here each process keeps the
idle connections it opened, per event loop and per (host, port, SSL
context), and reuses them. Pools are made lazily on first use, so a forked
worker never shares a socket with its parent.

A pooled connection may have been closed by the peer meanwhile (a restart,
its idle timeout): one that shows anything to read while idle (EOF, a TLS
close alert) is dropped when taken, idle connections expire after
`IDLE_TTL`, and a request whose reused connection turns out closed before
any reply arrived is sent once more on a new connection: the peer closed
that connection while it was idle, before reading the request (a peer
that dies while handling a request could in principle get it twice; both
CC -> WS writes that matter, activate and place, then leave at worst a
stream unused until its heartbeat expires). Nothing else is retried: not
a timeout, not a refusal, not a failure on a new connection.
"""
from __future__ import annotations

import asyncio
import json
import select
import socket
import ssl
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tornado import httputil, netutil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

T = TypeVar('T')

IDLE_MAX = 64      # idle connections kept per peer and process
IDLE_TTL = 30.0    # seconds; under the peers' idle timeout (60 s default)
MAX_BODY = 256 * 1024 * 1024

_PARAMS = HTTP1ConnectionParameters(no_keep_alive=False, decompress=True,
                                    max_body_size=MAX_BODY)


class PeerError(Exception):
    """The peer could not be reached or did not answer in time (it counts
    as a failure of that peer), or answered with something that is not
    JSON."""


class PeerReply:
    def __init__(self, code: int, body: Any,
                 headers: httputil.HTTPHeaders | None = None) -> None:
        self.code = code
        self.body = body
        self.headers = headers or httputil.HTTPHeaders()

    @property
    def error(self) -> str:
        if isinstance(self.body, dict):
            return self.body.get('error', '')
        return ''


class _Response(httputil.HTTPMessageDelegate):
    """Collects one response; `started` tells whether the peer answered."""

    def __init__(self) -> None:
        self.start_line: httputil.ResponseStartLine | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.chunks: list[bytes] = []
        self.complete = False

    def headers_received(self, start_line: Any,
                         headers: httputil.HTTPHeaders) -> None:
        self.start_line = start_line
        self.headers = headers

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.complete = True

    def on_connection_close(self) -> None:
        pass

    def reusable(self) -> bool:
        """The peer framed the body and did not ask to close."""
        if self.start_line is None or self.headers is None:
            return False
        h, code = self.headers, self.start_line.code
        return (self.start_line.version == 'HTTP/1.1'
                and h.get('Connection', '').lower() != 'close'
                and ('Content-Length' in h
                     or h.get('Transfer-Encoding', '').lower() == 'chunked'
                     or code in (204, 304)))


def _readable(stream: IOStream) -> bool:
    """An idle connection has nothing to read; anything (EOF, a TLS alert)
    means the peer closed it."""
    try:
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return True


class _Resolved(netutil.Resolver):
    """The addresses a lookup already found, for TCPClient."""

    def initialize(self, found: Iterable[tuple[Any, ...]]) -> None:
        self.found = [(family, address) for family, _, _, _, address in found]

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC
                      ) -> list[tuple[int, Any]]:
        return [(f, a) for f, a in self.found
                if family == socket.AF_UNSPEC or f == family]


class _Pool:
    """Idle keep-alive connections to one peer, most recent last."""

    def __init__(self, host: str, port: int,
                 ssl_ctx: ssl.SSLContext | None) -> None:
        self.host, self.port, self.ssl_ctx = host, port, ssl_ctx
        self.idle: list[tuple[IOStream, float]] = []
        self.opened = 0  # connections ever opened (tests and benchmarks)

    def take(self) -> IOStream | None:
        """A live idle connection, or None."""
        now = time.monotonic()
        while self.idle:
            stream, since = self.idle.pop()
            if stream.closed() or now - since > IDLE_TTL \
                    or _readable(stream):
                stream.close()
                continue
            return stream
        return None

    async def connect(self, timeout: float) -> IOStream:
        # The name is resolved here, under the caller's time bound: given a
        # timeout, TCPClient resolves under its own, and a lookup failing
        # after it (a name that does not resolve, slowly) is logged as an
        # unhandled exception instead of being this peer's failure.
        found = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM)
        # TCPClient checks the certificate against `host` (name or IP).
        stream = await TCPClient(resolver=_Resolved(found)).connect(
            self.host, self.port, ssl_options=self.ssl_ctx, timeout=timeout,
            max_buffer_size=MAX_BODY)
        stream.set_nodelay(True)
        self.opened += 1
        return stream

    def give_back(self, stream: IOStream) -> None:
        if stream.closed():
            return
        if len(self.idle) >= IDLE_MAX:
            stream.close()
            return
        self.idle.append((stream, time.monotonic()))

    def close(self) -> None:
        for stream, _ in self.idle:
            stream.close()
        self.idle = []


# event loop -> {(host, port, ssl context): _Pool}
_pools: dict[asyncio.AbstractEventLoop,
             dict[tuple[str, int, ssl.SSLContext | None], _Pool]] = {}


def _drop(loop: asyncio.AbstractEventLoop) -> None:
    """Forget the pools of a loop that is gone (tests run one per test);
    its sockets are closed directly, the loop cannot do it any more."""
    for pool in _pools.pop(loop).values():
        for stream, _ in pool.idle:
            try:
                stream.socket.close()
            except (OSError, AttributeError):
                pass


def pool(host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> _Pool:
    """This loop's pool for a peer, made on first use."""
    loop = asyncio.get_running_loop()
    pools = _pools.get(loop)
    if pools is None:
        for other in [lp for lp in _pools if lp.is_closed()]:
            _drop(other)
        pools = _pools[loop] = {}
    key = (host, port, ssl_ctx)
    p = pools.get(key)
    if p is None:
        p = pools[key] = _Pool(host, port, ssl_ctx)
    return p


def close_idle() -> None:
    """Close every idle connection of the running loop (on shutdown)."""
    for p in _pools.pop(asyncio.get_running_loop(), {}).values():
        p.close()


async def _bounded(coro: Awaitable[T], timeout: float) -> T:
    """`await coro` within `timeout` s (no extra task, unlike wait_for)."""
    async with asyncio.timeout(timeout):
        return await coro


def _describe(e: BaseException) -> str:
    """What went wrong, rather than Tornado's bare 'Stream is closed'."""
    real = getattr(e, 'real_error', None)
    return str(real or e) or type(e).__name__


async def _exchange(stream: IOStream, start_line: httputil.RequestStartLine,
                    headers: httputil.HTTPHeaders, data: bytes | None,
                    response: _Response) -> None:
    conn = HTTP1Connection(stream, True, _PARAMS)
    conn.write_headers(start_line, headers, data)
    conn.finish()
    await conn.read_response(response)
    if not response.complete:
        raise StreamClosedError()


async def _fetch(p: _Pool, start_line: httputil.RequestStartLine,
                 headers: httputil.HTTPHeaders, data: bytes | None,
                 timeout: float) -> _Response:
    """The response, over a pooled or a new connection; a reused
    connection found closed before any reply is replaced once."""
    stream = p.take()
    reused = stream is not None
    while True:
        if stream is None:
            stream = await p.connect(timeout)
        response = _Response()
        try:
            await _exchange(stream, start_line, headers, data, response)
        except (StreamClosedError, ConnectionError) as e:
            stream.close()
            if reused and response.start_line is None:
                stream, reused = None, False
                continue
            raise PeerError('connection closed: %s' % _describe(e)) from e
        except BaseException:  # cancelled by the timeout, bad framing
            stream.close()
            raise
        if response.reusable() and not stream.closed():
            p.give_back(stream)
        else:
            stream.close()
        return response


async def call(ssl_ctx: ssl.SSLContext | None, method: str, url: str,
               body: Any = None, auth: str | None = None,
               timeout: float = 10.0, raw: bool = False) -> PeerReply:
    """`method` `url` with a JSON body; returns a PeerReply (any HTTP status).
    Raises PeerError when the peer is unreachable or does not answer within
    `timeout` seconds (connecting included)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == 'https' else 80)
    except ValueError as e:  # a registration we could not have accepted
        raise PeerError('%s %s: bad URL: %s' % (method, url, e)) from e
    if not parts.hostname:
        raise PeerError('%s %s: bad URL: no host' % (method, url))
    path = (parts.path or '/') + ('?' + parts.query if parts.query else '')
    headers = httputil.HTTPHeaders({'Host': parts.netloc,
                                    'Content-Type': 'application/json'})
    if auth is not None:
        headers['Authorization'] = auth
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    elif method in ('PUT', 'POST'):
        data = b'{}'
    if data is not None:
        headers['Content-Length'] = str(len(data))
    p = pool(parts.hostname, port,
             ssl_ctx if parts.scheme == 'https' else None)
    start_line = httputil.RequestStartLine(method, path, 'HTTP/1.1')
    try:
        response = await _bounded(
            _fetch(p, start_line, headers, data, timeout), timeout)
    except PeerError as e:
        raise PeerError('%s %s: %s' % (method, url, e)) from e
    except TimeoutError:
        raise PeerError('%s %s: no answer in %gs'
                        % (method, url, timeout)) from None
    except Exception as e:  # refused, TLS failure, DNS, malformed reply
        raise PeerError('%s %s: %s' % (method, url, _describe(e))) from e
    content = b''.join(response.chunks)
    assert response.start_line is not None  # complete: it was read
    code = response.start_line.code
    if raw:
        return PeerReply(code, content, response.headers)
    try:
        parsed = json.loads(content) if content else {}
    except ValueError:
        raise PeerError('%s %s: reply is not JSON (HTTP %d)'
                        % (method, url, code)) from None
    return PeerReply(code, parsed, response.headers)
