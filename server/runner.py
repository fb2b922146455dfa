"""Start a server process tree: config, certs, embedded Redis, bind, fork,
serve; on SIGTERM/SIGINT stop in order (workers, then Redis) and exit 0.

The master binds the sockets and owns Redis; `num_processes` workers are
forked after that (one at least: the master only supervises) and each
makes its own Redis connections. Worker 0 runs the periodic jobs
(`App.on_start`). The master restarts what dies: a worker (after
`App.worker_died` has freed what it held, e.g. its locks) and the
embedded Redis (from its AOF; the workers' clients connect again by
themselves).
"""
import asyncio
import logging
import os
import signal
import sys
import time

from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from server import config, httpserver, metrics, store, tls, web

log = logging.getLogger('siegetank')

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def setup_logging(level):
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format='%(asctime)s %(levelname).1s %(process)d %(name)s: %(message)s')


async def _serve(settings, app_class, sockets, ssl_ctx, redis_url, task_id,
                 generation):
    connect_timeout, timeout = store.timeouts(settings)
    redis = store.connect(redis_url, connect_timeout=connect_timeout,
                          timeout=timeout)
    app = app_class(settings, redis, task_id)
    app.holder = holder_prefix(os.getpid(), generation)
    server = httpserver.Server(app, ssl_options=ssl_ctx,
                               **web.http_server_options(settings))
    server.add_sockets(sockets)
    flusher = PeriodicCallback(metrics.get().flush, metrics.FLUSH_MS)
    flusher.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    if task_id == 0:
        await app.on_start()
    log.info('%s %s worker %d serving https on port %d', settings.kind,
             settings.name, task_id, settings.internal_http_port)
    await stopping.wait()
    server.stop()
    if task_id == 0:
        await app.on_stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except TimeoutError:
        pass
    await app.close()
    await redis.aclose()
    flusher.stop()
    metrics.get().flush()


def holder_prefix(pid, generation):
    """How a worker marks what it holds in Redis (locks): its pid and the
    master's spawn count, so the master can free exactly a dead worker's
    holds, even if its pid is used again later."""
    return '%d.%d.' % (pid, generation)


def _worker(settings, app_class, sockets, ssl_ctx, redis_url, task_id,
            generation):
    asyncio.run(_serve(settings, app_class, sockets, ssl_ctx, redis_url,
                       task_id, generation))


def _restart_redis(embedded, stopping):
    """Start the embedded Redis again from its AOF; retried every second
    (e.g. its port not free yet) until it runs or we are stopping."""
    while not stopping:
        try:
            embedded.start()
            log.warning('redis-server restarted from its AOF (pid %d)',
                        embedded.process.pid)
            return
        except RuntimeError as e:
            log.error('redis-server restart failed: %s; retrying', e)
            time.sleep(1)


# How long the master keeps trying to free a dead worker's holds while the
# store does not answer (then their TTLs free them).
FREE_RETRY_S = 300.0


def _supervise(n, start_child, embedded=None, worker_died=None):
    """Fork n workers, restart any that dies abnormally (`worker_died`
    (its holder prefix) first), restart the embedded Redis if it dies,
    forward stop signals and return when all workers have exited. A dead
    worker's holds that cannot be freed at once (its Redis died too, and
    is being restarted by this very loop) are tried again every
    quarter second meanwhile."""
    children = {}
    stopping: list[int] = []  # the signal that stops us, once received
    generation = [0]
    unfreed = {}  # holder prefix of a dead worker -> first try (monotonic)

    def free(prefix):
        """Free a dead worker's holds; False if the store failed."""
        try:
            worker_died(prefix)
        except Exception as e:  # e.g. Redis down: try again soon
            if prefix not in unfreed:
                log.warning('freeing what %s held failed (%s); trying '
                            'again', prefix, e)
                unfreed[prefix] = time.monotonic()
            elif time.monotonic() - unfreed[prefix] > FREE_RETRY_S:
                log.error('gave up freeing what %s held: its locks expire '
                          'with their TTL', prefix)
                del unfreed[prefix]
            return False
        if unfreed.pop(prefix, None) is not None:
            log.warning('freed what %s held, at last', prefix)
        return True

    def wait_child():
        """os.wait(), but with holds left to free: poll, retrying them."""
        while unfreed and not stopping:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                return pid, status
            time.sleep(0.25)
            for prefix in list(unfreed):
                free(prefix)
        return os.wait()

    def spawn(i):
        generation[0] += 1
        pid = os.fork()
        if pid == 0:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                start_child(i, generation[0])
            except BaseException:
                log.exception('worker %d failed', i)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (i, generation[0])

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
            pid, status = wait_child()
        except ChildProcessError:
            break
        if embedded is not None and embedded.process is not None \
                and pid == embedded.process.pid:
            embedded.reaped(status)
            if not stopping:
                log.warning('redis-server (pid %d) died (status %d), '
                            'restarting it', pid, status)
                _restart_redis(embedded, stopping)
            continue
        found = children.pop(pid, None)
        if found is None:
            continue
        i, gen = found
        metrics.worker_died(pid)
        if not stopping and status != 0:
            log.warning('worker %d (pid %d) died (status %d), restarting',
                        i, pid, status)
            if worker_died is not None:
                free(holder_prefix(pid, gen))
            if not stopping:  # a stop signal may have come meanwhile
                spawn(i)


def main(kind, app_class, argv=None):
    try:
        settings = config.parse_args(kind, argv)
    except config.ConfigError as e:
        print('config error: %s' % e, file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    # Everything this server and its Redis write (AOF, password, streams,
    # targets, dev keys) is for this user alone: 0600 files, 0700 folders.
    os.umask(0o077)
    if tls.ensure_for_settings(settings):
        log.info('generated dev certificates in %s',
                 os.path.dirname(settings.ssl_certfile))
    ssl_ctx = tls.server_context(settings)
    os.makedirs(settings.data_folder, exist_ok=True)
    os.chmod(settings.data_folder, 0o700)
    metrics.prepare(settings)
    sockets = bind_sockets(settings.internal_http_port,
                           settings.bind_address or None,
                           reuse_port=False)
    embedded = store.start_embedded(settings)
    redis_url = store.redis_url(settings, embedded)
    try:
        app_class.prepare(settings, redis_url)  # e.g. the WS's recovery

        def start_child(i, generation):
            _worker(settings, app_class, sockets, ssl_ctx, redis_url, i,
                    generation)

        def worker_died(prefix):
            app_class.worker_died(settings, redis_url, prefix)
        _supervise(settings.num_processes, start_child, embedded,
                   worker_died)
    finally:
        if embedded is not None:
            embedded.stop()
        log.info('%s %s stopped', kind, settings.name)
    return 0
