"""Start a server process tree: config, certs, embedded Redis, bind, fork,
serve; on SIGTERM/SIGINT stop in order (workers, then Redis) and exit 0.

The master binds the sockets and owns Redis; `num_processes` workers are
forked after that and each makes its own Redis connections. Worker 0 runs
the periodic jobs (`App.on_start`); a worker that dies is restarted.
"""
import asyncio
import logging
import os
import signal
import sys

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from server import config, store, tls, web

log = logging.getLogger('siegetank')

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def setup_logging(level):
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format='%(asctime)s %(levelname).1s %(process)d %(name)s: %(message)s')


async def _serve(settings, app_class, sockets, ssl_ctx, redis_url, task_id):
    redis = store.connect(redis_url)
    app = app_class(settings, redis, task_id)
    server = HTTPServer(app, ssl_options=ssl_ctx,
                        **web.http_server_options(settings))
    server.add_sockets(sockets)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    if task_id == 0:
        await app.on_start()
    log.info('%s %s worker %d serving https on port %d', settings['kind'],
             settings['name'], task_id, settings['internal_http_port'])
    await stopping.wait()
    server.stop()
    if task_id == 0:
        await app.on_stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        pass
    await app.close()
    await redis.aclose()


def _worker(settings, app_class, sockets, ssl_ctx, redis_url, task_id):
    asyncio.run(_serve(settings, app_class, sockets, ssl_ctx, redis_url,
                       task_id))


def _supervise(n, start_child):
    """Fork n workers, restart any that dies abnormally, forward stop
    signals and return when all have exited."""
    children = {}
    stopping = []

    def spawn(i):
        pid = os.fork()
        if pid == 0:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                start_child(i)
            except BaseException:
                log.exception('worker %d failed', i)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = i

    def forward(sig, frame):
        stopping.append(sig)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    for i in range(n):
        spawn(i)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        i = children.pop(pid, None)
        if i is None:
            continue
        if not stopping and status != 0:
            log.warning('worker %d (pid %d) died (status %d), restarting',
                        i, pid, status)
            spawn(i)


def main(kind, app_class, argv=None):
    try:
        settings = config.parse_args(kind, argv)
    except config.ConfigError as e:
        print('config error: %s' % e, file=sys.stderr)
        return 2
    setup_logging(settings['log_level'])
    if tls.ensure_for_settings(settings):
        log.info('generated dev certificates in %s',
                 os.path.dirname(settings['ssl_certfile']))
    ssl_ctx = tls.server_context(settings)
    os.makedirs(settings['data_folder'], exist_ok=True)
    sockets = bind_sockets(settings['internal_http_port'], reuse_port=False)
    embedded = store.start_embedded(settings)
    redis_url = store.redis_url(settings, embedded)
    try:
        app_class.prepare(settings, redis_url)  # e.g. the WS's recovery

        def start_child(i):
            _worker(settings, app_class, sockets, ssl_ctx, redis_url, i)
        if settings['num_processes'] == 1:
            start_child(0)
        else:
            _supervise(settings['num_processes'], start_child)
    finally:
        if embedded is not None:
            embedded.stop()
        log.info('%s %s stopped', kind, settings['name'])
    return 0
