"""The ceiling: a bare Tornado HTTPS server whose handlers only take the
body and answer 200 `{}`, in the same process mode as the server measured.
`python -m bench.ceiling --port P --cert C --key K [--processes N]`"""
import argparse
import asyncio
import signal
import ssl

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.process import fork_processes


class Bare(tornado.web.RequestHandler):
    def _ok(self, *args):
        # the body was read by the server already (request.body)
        self.set_header('Content-Type', 'application/json')
        self.finish(b'{}')

    get = put = post = _ok


async def serve(sockets, ctx):
    app = tornado.web.Application([(r'/.*', Bare)], log_function=lambda h:
                                  None)
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
    args = p.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    sockets = bind_sockets(args.port, '127.0.0.1')
    if args.processes > 1:
        signal.signal(signal.SIGTERM, lambda *a: None)
        fork_processes(args.processes, max_restarts=0)
    asyncio.run(serve(sockets, ctx))


if __name__ == '__main__':
    main()
