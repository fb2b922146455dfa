"""The ceilings: bare Tornado HTTPS servers in the same process mode as the
server measured, answering 200 `{}`.

- bare: the handler only takes the body (what the HTTP layer costs).
- durable (`--data DIR`): the essential work of a WS's core path and no
  more. A frame PUT parses the JSON body, base64-decodes its file(s) and
  appends them to the core's file (one per Authorization value, kept
  open); a checkpoint PUT parses the body, writes it to a new file and
  fsyncs that file and its directory once, in a thread pool, and keeps
  it (as our WS keeps each chunk's state files: nothing is deleted while
  a run measures, see docs/benchmarks.md, the slow rep); a heartbeat
  parses the body.
  The frames appended are not fsynced (the page cache holds them until
  writeback), so this ceiling is an upper bound on what a server that
  commits frames at each checkpoint can do.

`python -m bench.ceiling --port P --cert C --key K [--processes N]
[--data DIR] [--disk-threads T]`"""
import argparse
import asyncio
import base64
import concurrent.futures
import json
import os
import signal
import ssl

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.process import fork_processes


def commit_file(folder, path, body):
    """Write `body` to the new file `path` in `folder`, fsync it and the
    folder: a checkpoint's essential disk work."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

class Bare(tornado.web.RequestHandler):
    def _ok(self, *args):
        # the body was read by the server already (request.body)
        self.set_header('Content-Type', 'application/json')
        self.finish(b'{}')

    get = put = post = _ok


class Disk:
    """One process's files under `folder`: an append-only frames file per
    core (open from its first frame to its next checkpoint) and a file
    per checkpoint."""

    def __init__(self, folder, threads):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.frames = {}
        self.count = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)

    def core(self, request):
        """A file-name-safe key of the core sending `request`."""
        token = request.headers.get('Authorization', 'anonymous')
        return base64.urlsafe_b64encode(token.encode()).decode()[:64]

    def append(self, core, files):
        f = self.frames.get(core)
        if f is None:
            f = self.frames[core] = open(
                os.path.join(self.folder, core + '.frames'), 'ab',
                buffering=0)
        for data in files.values():
            f.write(base64.b64decode(data))

    def commit(self, path, body):
        commit_file(self.folder, path, body)

    async def checkpoint(self, core, body):
        # the frames so far are the checkpoint's: their file is closed
        # (and reopened by the next frame), so open files stay bounded by
        # the cores between two checkpoints
        f = self.frames.pop(core, None)
        if f is not None:
            f.close()
        self.count += 1
        path = os.path.join(self.folder, '%s.%d.ckpt' % (core, self.count))
        await asyncio.get_running_loop().run_in_executor(
            self.pool, self.commit, path, body)


class Durable(tornado.web.RequestHandler):
    def initialize(self, disk):
        self.disk = disk

    def _reply(self):
        self.set_header('Content-Type', 'application/json')
        self.finish(b'{}')

    async def put(self, kind):
        body = json.loads(self.request.body)
        core = self.disk.core(self.request)
        if kind == 'frame':
            self.disk.append(core, body['files'])
        elif kind == 'checkpoint':
            await self.disk.checkpoint(core, self.request.body)
        self._reply()

    async def post(self, kind):
        json.loads(self.request.body or b'{}')
        self._reply()

    def get(self, kind=None):
        self._reply()


async def serve(sockets, ctx, data, threads):
    if data:
        disk = Disk(os.path.join(data, str(os.getpid())), threads)
        routes = [(r'/core/(frame|checkpoint|heartbeat)', Durable,
                   {'disk': disk}), (r'/()', Durable, {'disk': disk})]
    else:
        routes = [(r'/.*', Bare)]
    app = tornado.web.Application(routes, log_function=lambda h: None)
    server = HTTPServer(app, ssl_options=ctx, max_body_size=1 << 30)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--port', type=int, required=True)
    p.add_argument('--cert', required=True)
    p.add_argument('--key', required=True)
    p.add_argument('--processes', type=int, default=1)
    p.add_argument('--data', help='durable: keep frames and checkpoints '
                   'under this folder')
    p.add_argument('--disk-threads', type=int, default=4,
                   help='durable: threads of the fsync pool per process')
    args = p.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    sockets = bind_sockets(args.port, '127.0.0.1')
    if args.processes > 1:
        signal.signal(signal.SIGTERM, lambda *a: None)
        fork_processes(args.processes, max_restarts=0)
    asyncio.run(serve(sockets, ctx, args.data, args.disk_threads))


if __name__ == '__main__':
    main()
