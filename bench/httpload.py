"""A small keep-alive HTTPS/1.1 load generator on asyncio.

Each simulated core holds one TLS connection and sends its requests in
order, as a real core does. The same client drives our servers and the bare
ceiling, so its own cost cancels out of the ratios."""
import asyncio
import json
import socket
import time


class HTTPError(Exception):
    pass


class Connection:
    """One keep-alive connection; `request` returns (status, body)."""

    def __init__(self, host, port, ssl_ctx):
        self.host, self.port, self.ssl_ctx = host, port, ssl_ctx
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl_ctx,
            server_hostname='localhost' if self.ssl_ctx else None,
            limit=1 << 20)
        return self

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def request(self, method, path, body=b'', headers=None,
                      sink=False):
        """With `sink`, the body is read and counted, not kept: returns
        (status, number of body bytes)."""
        if self.writer is None:
            await self.open()
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        lines = ['%s %s HTTP/1.1' % (method, path), 'Host: %s' % self.host,
                 'Content-Length: %d' % len(body)]
        for k, v in (headers or {}).items():
            lines.append('%s: %s' % (k, v))
        self.writer.write(('\r\n'.join(lines) + '\r\n\r\n').encode() + body)
        head = await self.reader.readuntil(b'\r\n\r\n')
        status_line, *header_lines = head.decode('latin-1').split('\r\n')
        status = int(status_line.split(' ', 2)[1])
        hdrs = {}
        for line in header_lines:
            if ':' in line:
                k, v = line.split(':', 1)
                hdrs[k.strip().lower()] = v.strip()
        if 'content-length' in hdrs:
            n = int(hdrs['content-length'])
            data = await self._read(n, sink)
        elif hdrs.get('transfer-encoding') == 'chunked':
            data = await self._read_chunked(sink)
        else:
            data = b'' if not sink else 0
        if hdrs.get('connection', '').lower() == 'close':
            await self.close()
            self.writer = None
        return status, data

    async def _read(self, n, sink):
        if not sink:
            return await self.reader.readexactly(n)
        left = n
        while left:
            chunk = await self.reader.read(min(left, 1 << 20))
            if not chunk:
                raise HTTPError('connection closed mid-body')
            left -= len(chunk)
        return n

    async def _read_chunked(self, sink):
        parts, total = [], 0
        while True:
            size = int((await self.reader.readuntil(b'\r\n')).split(b';')[0],
                       16)
            if size == 0:
                await self.reader.readuntil(b'\r\n')
                break
            data = await self._read(size, sink)
            total += size
            if not sink:
                parts.append(data)
            await self.reader.readexactly(2)
        return total if sink else b''.join(parts)


class Recorder:
    """Latencies and errors of one run, each request of a `kind` (e.g.
    'checkpoints'); `summary` can limit what counts to a time span (e.g.
    during a sweep) or to one kind."""

    def __init__(self):
        self.latencies = []
        self.stamps = []
        self.kinds = []
        self.errors = []

    def add(self, started, status, ok=(200,), kind=None):
        now = time.perf_counter()
        self.latencies.append(now - started)
        self.stamps.append(now)
        self.kinds.append(kind)
        if status not in ok:
            self.errors.append(status)

    def summary(self, elapsed, since=None, until=None, kind=None):
        lat = [lt for lt, t, k in zip(self.latencies, self.stamps,
                                           self.kinds, strict=True)
               if (since is None or t >= since)
               and (until is None or t <= until)
               and (kind is None or k == kind)]
        lat.sort()

        def pct(p):
            return 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat \
                else None
        return {'requests': len(lat), 'rate': len(lat) / elapsed if elapsed
                else 0, 'p50_ms': pct(0.5), 'p99_ms': pct(0.99),
                'errors': len(self.errors)}


async def run_cores(n, core, duration):
    """Run `core(i, deadline, recorder)` coroutines concurrently until the
    deadline; returns (recorder, elapsed seconds)."""
    rec = Recorder()
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(*(core(i, deadline, rec) for i in range(n)))
    return rec, time.perf_counter() - start


def sink_get(host, port, ssl_ctx, path, headers=None, bufsize=4 << 20):
    """One GET on a blocking TLS socket, its body read into one reused
    buffer and counted. For downloads: asyncio's TLS reader tops out near
    250 MB/s here and would measure the client, not the server. Returns
    (status, body bytes)."""
    raw = socket.create_connection((host, port))
    sock = ssl_ctx.wrap_socket(raw, server_hostname='localhost')
    try:
        lines = ['GET %s HTTP/1.1' % path, 'Host: %s' % host,
                 'Connection: close']
        lines += ['%s: %s' % kv for kv in (headers or {}).items()]
        sock.sendall(('\r\n'.join(lines) + '\r\n\r\n').encode())
        buf = bytearray(bufsize)
        view = memoryview(buf)
        head = b''
        while b'\r\n\r\n' not in head:
            n = sock.recv_into(view)
            if not n:
                raise HTTPError('connection closed in the headers')
            head += bytes(view[:n])
        head, body = head.split(b'\r\n\r\n', 1)
        status_line, *header_lines = head.decode('latin-1').split('\r\n')
        status = int(status_line.split(' ', 2)[1])
        hdrs = dict((k.strip().lower(), v.strip()) for k, v in
                    (line.split(':', 1) for line in header_lines
                     if ':' in line))
        left = int(hdrs.get('content-length', 0)) - len(body)
        got = len(body)
        while left > 0:
            n = sock.recv_into(view, min(left, bufsize))
            if not n:
                raise HTTPError('connection closed mid-body')
            left -= n
            got += n
        return status, got
    finally:
        sock.close()
