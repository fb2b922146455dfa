"""The lean HTTP layer of the WS: a keep-alive connection that reads each
request's head itself and serves a core's frames, checkpoints and
heartbeats (PUT /core/frame, PUT /core/checkpoint, POST /core/heartbeat)
with a token this worker saw live lately (core.LiveTokens) without
Tornado's HTTP1Connection, its RequestHandler, header objects or
per-request futures and epoll changes (most of a frame's CPU past the
work itself, bench/profile.py).

A request takes this path when its head is plain: one of those request
lines with HTTP/1.1, every header line well formed and named once, a
Content-Length within the endpoint's limit, no Transfer-Encoding, Expect
or Content-Encoding, a Connection header (if any) of keep-alive or close,
and a live token. Every other request -- the first frame of an
activation, a missing or unknown token, a body declared too large, every
other endpoint, a balancer's X-Forwarded-For -- has its head put back
into the stream and is read by Tornado's HTTP1Connection and served by
the Application as before, so its refusals (401/413 before the body,
JSON errors) are web.APIHandler's. Both paths run the same functions
(core.store_frame, core.store_checkpoint, core.live_hashed) and answer
alike: JSON errors (web.error_reply), the Content-MD5 check, the access
log line and metrics of the route (web.log_line), the deadlines of
server/httpserver.py (header timeout, body timeout and minimum body
rate). A token that died since it was seen is a 401 once the body is in
(the Redis step of each checks it)."""
import asyncio
import json
import logging
import re
import time
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError

from server import store
from server.web import (
    checked_md5,
    credential,
    error_reply,
    http_date,
    log_line,
    parse_body,
)
from server.ws import core

log = logging.getLogger('siegetank.ws.frame_path')

# request line -> (method, path, handler of the Application's path)
ROUTES = {b'PUT /core/frame': ('PUT', '/core/frame', core.FrameHandler),
          b'PUT /core/checkpoint': ('PUT', '/core/checkpoint',
                                    core.CheckpointHandler),
          b'POST /core/heartbeat': ('POST', '/core/heartbeat',
                                    core.HeartbeatHandler)}
# A head the lean path may take: its request line, then header lines of
# a token name and a value of visible characters, spaces and tabs.
_HEAD = re.compile(rb'(PUT /core/frame|PUT /core/checkpoint|'
                   rb'POST /core/heartbeat) HTTP/1\.1\r\n'
                   rb'((?:[!#$%&\'*+.^_`|~0-9A-Za-z-]+:'
                   rb'[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n')
_TORNADO = (b'transfer-encoding', b'expect', b'content-encoding')
_HEAD_END = re.compile(rb'\r?\n\r?\n')  # as HTTP1Connection finds it
READ_SIZE = 65536  # what a read for a head asks the stream for, at most


def _unread(stream: Any, head: bytes) -> None:
    """Put a request's head back in front of what the stream has read, for
    HTTP1Connection to read it again (Tornado's IOStream keeps what it
    read in `_read_buffer`, consumed from the front; older releases kept a
    `_read_buffer_pos` instead of deleting). tests/test_ws.py
    TestFramePath fails if a Tornado release changes this."""
    pos = getattr(stream, '_read_buffer_pos', 0)
    if pos:
        del stream._read_buffer[:pos]
        stream._read_buffer_pos = 0
    stream._read_buffer[:0] = head
    stream._read_buffer_size += len(head)


def _after(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


class Connection(HTTP1ServerConnection):
    """One client connection (httpserver.Server makes them): its core
    requests of a known token served here, the others one at a time by
    HTTP1Connection."""

    auth, hashed = b'', ''  # the last token seen and its hash

    async def _server_request_loop(self, delegate: Any) -> None:
        server, stream = delegate, self.stream
        app = server.request_callback
        peer: Any = getattr(self.context, 'address', None)
        # A balancer that terminated TLS names the client per request
        # (X-Forwarded-For): Tornado's path reads it.
        lean = not (getattr(peer, 'proxy', None) and not peer.declared)
        buf = bytearray()  # read from the stream, not used yet
        try:
            while True:
                server.deadlines[self] = _after(server.header_timeout)
                end = await self._head_end(buf)
                if end is None:
                    stream.close()  # no head within the limit: as Tornado
                    return
                taken = self._lean(app, bytes(buf[:end])) if lean else None
                if taken is None:
                    _unread(stream, bytes(buf))
                    buf.clear()
                    conn = HTTP1Connection(stream, False, self.params,
                                           self.context)
                    if not await conn.read_response(
                            delegate.start_request(self, conn)):
                        return
                    await asyncio.sleep(0)  # as Tornado: others' turn
                    continue
                del buf[:end]
                if not await self._serve(server, app, buf, *taken):
                    return
                if buf:  # pipelined requests are in: others' turn first
                    await asyncio.sleep(0)
        except (StreamClosedError, asyncio.CancelledError):
            return
        except Exception:
            log.error('uncaught exception on a connection', exc_info=True)
            stream.close()
        finally:
            server.deadlines.pop(self, None)
            delegate.on_close(self)

    async def _more(self, buf: bytearray, want: int = READ_SIZE) -> None:
        """Add what the stream has, up to `want` bytes (the rest of a body:
        no read past it), to `buf`, waiting for a byte at least. Each
        read takes what the stream holds, so between requests the stream
        is idle and keeps its interest in reads: no epoll change per
        request (read_until_regex then read_bytes leave a body's start in
        the stream, which drops that interest and adds it again)."""
        buf += await self.stream.read_bytes(want, partial=True)

    async def _head_end(self, buf: bytearray) -> int | None:
        """Where the request head at the front of `buf` ends (reading more
        as needed); None if not within the header size limit."""
        limit = self.params.max_header_size
        start = 0
        while True:
            m = _HEAD_END.search(buf, start)
            if m is not None:
                return m.end() if m.end() <= limit else None
            if len(buf) >= limit:
                return None
            start = max(len(buf) - 3, 0)
            await self._more(buf)

    async def _read_body(self, server: Any, buf: bytearray,
                         length: int) -> bytes:
        """The body (from the front of `buf`, reading the rest), within
        the body timeout and at the minimum rate after the grace; then no
        deadline while the request is served (server/httpserver.py)."""
        if len(buf) < length:
            last = _after(server.body_timeout)
            grace = _after(server.body_grace)
            if grace is not None and last is not None and last < grace:
                grace = last
            deadlines, per_byte = server.deadlines, server.per_byte
            deadlines[self] = grace if per_byte else last
            while len(buf) < length:
                had = len(buf)
                await self._more(buf, length - had)
                if per_byte and len(buf) < length:
                    deadline = deadlines.get(self)
                    if deadline is not None:
                        deadline += (len(buf) - had) * per_byte
                        deadlines[self] = deadline if last is None \
                            or deadline < last else last
        server.deadlines[self] = None
        body = bytes(memoryview(buf)[:length])
        del buf[:length]
        return body

    async def _serve(self, server: Any, app: Any, buf: bytearray,
                     route: bytes, sid: str, hashed: str, length: int,
                     md5: bytes | None, keep: bool) -> bool:
        """Read (from `buf` first), store and answer one request; False if
        the connection is closed (asked by the client, or gone)."""
        start = time.monotonic()
        raw = await self._read_body(server, buf, length)
        status, reply, extra = 200, b'{}', {}
        message = ''
        method, path, handler = ROUTES[route]
        try:
            await _store(app, handler, sid, hashed, raw, md5)
            # Redis found the token live: trusted for another while, so a
            # core that keeps sending stays on this path.
            core.live_tokens(app).add(hashed, sid)
        except Exception as e:
            status, message, extra, fields = error_reply(e)
            reply = json.dumps(dict(fields, error=message)).encode()
            if not isinstance(e, (HTTPError, store.DOWN)) \
                    and not store.full(e):
                log.error('uncaught exception in %s %s', method, path,
                          exc_info=True)
        lines = [b'HTTP/1.1 %d %s' % (status, httputil.responses.get(
                     status, 'Unknown').encode()),
                 b'Content-Type: application/json; charset=UTF-8',
                 b'Date: ' + http_date().encode(),
                 b'Content-Length: %d' % len(reply)]
        lines += [('%s: %s' % kv).encode('latin-1') for kv in extra.items()]
        if not keep:
            lines.append(b'Connection: close')
        lines += [b'', reply]
        log_line(app.route_names.get(handler, path), method, path, status,
                 time.monotonic() - start, message)
        try:
            written = self.stream.write(b'\r\n'.join(lines))
            if not keep:
                await written
                self.stream.close()
        except StreamClosedError:
            return False  # the client is gone; what was stored stays
        return keep

    def _lean(self, app: Any, head: bytes) \
            -> tuple[bytes, str, str, int, bytes | None, bool] | None:
        """(request line, stream id, token hash, Content-Length, Content-MD5,
        keep-alive) of a request the lean path takes, else None."""
        m = _HEAD.fullmatch(head)
        if m is None:
            return None
        fields: dict[bytes, bytes] = {}
        for line in m.group(2).split(b'\r\n')[:-1]:
            name, _, value = line.partition(b':')
            name = name.lower()
            if name in fields:
                return None  # named twice: Tornado's rules
            fields[name] = value.strip()
        route = m.group(1)
        limit = getattr(app.config, ROUTES[route][2].body_limit)
        length = fields.get(b'content-length', b'')
        if not length.isdigit() or len(length) > 18 or int(length) > limit:
            return None
        keep = fields.get(b'connection', b'keep-alive').lower()
        if any(name in fields for name in _TORNADO) \
                or keep not in (b'keep-alive', b'close'):
            return None
        auth = fields.get(b'authorization', b'')
        if auth == self.auth:  # a core's connection: the same token
            hashed = self.hashed
        else:
            token = credential({'Authorization': auth.decode('latin-1')})
            if not token:
                return None
            hashed = core.token_hash(token)
            self.auth, self.hashed = auth, hashed
        sid = core.live_tokens(app).get(hashed)
        if sid is None:
            return None
        return route, sid, hashed, int(length), fields.get(b'content-md5'), \
            keep == b'keep-alive'


async def _store(app: Any, handler: type, sid: str, hashed: str,
                 raw: bytes, md5: bytes | None) -> None:
    """What the handler of the Application's path does with the body."""
    digest = checked_md5(
        {} if md5 is None else {'Content-MD5': md5.decode('latin-1')}, raw)
    body = parse_body(raw)
    if handler is core.FrameHandler:
        await core.store_frame(app, sid, hashed, body,
                               core.frame_digest(digest, raw))
    elif handler is core.CheckpointHandler:
        await core.store_checkpoint(app, await core.hold(app, hashed), body)
    else:
        await core.live_hashed(app, hashed,
                               app.config.heartbeat_increment_in_s)
