"""The test harness, shared by tests/, bench/ and the demo: a generated
test CA, conf files, an embedded Redis per test class (flushed per test),
in-process apps over real HTTPS, real cc.py / ws.py processes on free
loopback ports, and polling helpers. Tornado's own hooks
(tornado.testing) underneath."""
import asyncio
import atexit
import base64
import gzip
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time

import requests
import tornado.testing
from tornado import httputil
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from server import config, httpserver, store, tls, web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TMP = tempfile.mkdtemp(prefix='siegetank-tests-')
atexit.register(shutil.rmtree, _TMP, True)

CC_PASS = 'test-cc-pass'  # the cc_pass of every test CC


def tmpdir(prefix='t'):
    return tempfile.mkdtemp(prefix=prefix + '-', dir=_TMP)


_certs = {}


def certs():
    """{ca, cert, key} of a CA made once per test run and a server
    certificate for localhost/127.0.0.1 signed by it."""
    if not _certs:
        folder = os.path.join(_TMP, 'certs')
        paths = {'ca': os.path.join(folder, 'ca.pem'),
                 'cert': os.path.join(folder, 'server.pem'),
                 'key': os.path.join(folder, 'server.key')}
        tls.ensure_dev_certs(paths['cert'], paths['key'], paths['ca'])
        _certs.update(paths)
    return dict(_certs)


def free_port():
    return store.free_port()


def b64(data):
    return base64.b64encode(data).decode()


def gzb64(data):
    return b64(gzip.compress(data, mtime=0))  # the same bytes every second


async def raw_exchange(port, head, body=b'', timeout=30, host='127.0.0.1'):
    """One request written as given over TLS (a `head` without the blank
    line that ends it, then `body`, which may be partial or never sent),
    for what `requests` cannot send: returns (status, headers, body) of
    the reply, or raises if none comes within `timeout` s. A server that
    hangs up while we still write is fine if it answered first."""
    ctx = ssl.create_default_context(cafile=certs()['ca'])
    stream = await TCPClient().connect(host, port, ssl_options=ctx)
    try:
        try:
            await stream.write(head.encode('latin-1') + b'\r\n\r\n' + body)
        except StreamClosedError:
            pass
        raw = await asyncio.wait_for(stream.read_until(b'\r\n\r\n'),
                                     timeout)
        lines = raw.decode('latin-1').split('\r\n')
        status = int(lines[0].split()[1])
        headers = httputil.HTTPHeaders.parse('\r\n'.join(lines[1:]))
        length = int(headers.get('Content-Length', 0))
        data = await asyncio.wait_for(stream.read_bytes(length), timeout) \
            if length else b''
        return status, headers, data
    finally:
        stream.close()


class TimedOut(AssertionError):
    """wait_for gave up (a test failure)."""


def wait_for(check, what='a condition', timeout=60, errors=(),
             interval=0.05):
    """Poll `check()` until it returns a true value (returned); fail after
    a generous `timeout` so a broken server cannot hang the run. An
    exception of `errors` (a server still starting) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except errors:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimedOut('timed out waiting for ' + what)
        time.sleep(interval)


def stop_core(process, timeout=60):
    """SIGTERM a core process (its clean stop: checkpoints, stops, the
    summary) and wait; killed if it is still running after `timeout`.
    Returns its stderr."""
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return err


def command_centers(cc=None, cc_pass=CC_PASS):
    """A WS's `command_centers` setting: the CC process `cc`, or (None) one
    CC that never answers, for a WS tested alone."""
    if cc is None:
        return {'cc': {'url': '127.0.0.1:9', 'pass': cc_pass}}
    return {cc.name: {'url': '127.0.0.1:%d' % cc.port, 'pass': cc_pass}}


def online(cc, ws_name, value=True):
    """True if the CC process `cc` lists the WS with online == `value`."""
    status = cc.request('GET', '/ws/status').json().get(ws_name)
    return status is not None and status['online'] is value


def write_conf(kind, folder=None, **values):
    """Write a valid .conf for `kind` with test defaults (free ports, test
    certs, embedded Redis) updated by `values`; returns its path."""
    folder = folder or tmpdir(kind)
    c = certs()
    name = values.pop('name', kind + str(free_port()))
    conf = {'name': name, 'internal_http_port': free_port(),
            'ssl_certfile': c['cert'], 'ssl_key': c['key'],
            'ssl_ca_certs': c['ca'],
            'redis_options': {'port': free_port()},
            'data_folder': os.path.join(folder, 'data')}
    if kind == 'cc':
        conf.update(cc_pass=CC_PASS, ws_probe_interval_in_ms=200)
    else:
        conf.update(external_options={'external_url': '127.0.0.1',
                                      'external_http_port':
                                          conf['internal_http_port']},
                    command_centers={}, register_retry_max_in_s=1.0,
                    min_free_disk_in_mb=1)
    conf.update(values)
    if kind == 'ws' and 'external_options' not in values:
        conf['external_options']['external_http_port'] = \
            conf['internal_http_port']
    path = os.path.join(folder, kind + '.conf')
    config.write(path, conf)
    return path


def settings(kind, **values):
    return config.load(write_conf(kind, **values), kind)


class RedisTestCase(tornado.testing.AsyncTestCase):
    """A real embedded Redis per test class, flushed before every test;
    `self.redis` is an asyncio client on this test's loop."""

    @classmethod
    def setUpClass(cls):
        cls.redis_server = store.RedisServer(tmpdir('redis'), free_port())
        cls.redis_server.start()

    @classmethod
    def tearDownClass(cls):
        cls.redis_server.stop()

    def setUp(self):
        sync = store.connect_sync(self.redis_server.url)
        sync.flushall()
        sync.close()
        # Connects lazily, on the loop of whoever awaits it first.
        self.redis = store.connect(self.redis_server.url)
        super().setUp()

    def tearDown(self):
        self.io_loop.run_sync(self.redis.aclose)
        super().tearDown()


class AppTestCase(RedisTestCase, tornado.testing.AsyncHTTPSTestCase):
    """One app in-process over real HTTPS with real Redis. Subclasses set
    `kind` ('cc'/'ws'), `app_class`, and may set `conf` overrides.
    `self.fetch_json(path, method, body, token)` returns (code, dict)."""

    kind = None
    app_class = None
    conf = {}

    def setUp(self):
        self.settings = settings(self.kind, redis_url=self.redis_server.url,
                                 redis_options=None, **self.conf)
        super().setUp()  # RedisTestCase, then AsyncHTTPSTestCase (get_app)

    def get_app(self):
        self.app = self.app_class(self.settings, self.redis, 0)
        return self.app

    def get_ssl_options(self):
        return tls.server_context(self.settings)

    def get_http_server(self):
        """The servers' own HTTPServer (its deadlines, the WS's lean frame
        path), not Tornado's."""
        return httpserver.Server(self._app, ssl_options=self.get_ssl_options(),
                                 **web.http_server_options(self.settings))

    def get_url(self, path):
        return 'https://localhost:%d%s' % (self.get_http_port(), path)

    def fetch(self, path, **kwargs):
        kwargs.setdefault('ca_certs', certs()['ca'])
        kwargs.setdefault('validate_cert', True)
        return super().fetch(path, **kwargs)

    def fetch_json(self, path, method='GET', body=None, token=None,
                   headers=None):
        headers = dict(headers or {})
        if token is not None:
            headers['Authorization'] = token
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if body is None and method in ('PUT', 'POST'):
            body = '{}'
        r = self.fetch(path, method=method, body=body, headers=headers)
        try:
            data = json.loads(r.body) if r.body else None
        except ValueError:
            data = r.body
        return r.code, data


class ServerProcess:
    """A real `cc.py` or `ws.py` process with its own conf and embedded
    Redis. `start()` waits until `GET /` answers over verified HTTPS."""

    def __init__(self, kind, conf_text=None, **values):
        self.kind = kind
        self.folder = tmpdir(kind)
        if conf_text is None:
            self.conf_path = write_conf(kind, folder=self.folder, **values)
        else:   # a given configuration (a restore: another's, edited)
            self.conf_path = os.path.join(self.folder, kind + '.conf')
            with open(self.conf_path, 'w') as f:
                f.write(conf_text)
        self.settings = config.load(self.conf_path, kind)
        self.name = self.settings.name
        self.port = self.settings.internal_http_port
        self.url = 'https://127.0.0.1:%d' % self.port
        self.log_path = os.path.join(self.folder, 'server.log')
        self.process = None
        self.root = ROOT   # the checkout it runs from (an upgrade: another)
        self.session = requests.Session()
        self.session.trust_env = False  # else REQUESTS_CA_BUNDLE wins
        self.session.verify = certs()['ca']

    def start(self, timeout=30, extra_args=()):
        self.log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(self.root, self.kind + '.py'),
             '--config', self.conf_path] + list(extra_args),
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError('%s exited with %d at start:\n%s' % (
                    self.kind, self.process.returncode, self.read_log()))
            try:
                if self.session.get(self.url + '/', timeout=1).status_code \
                        == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError('%s not ready in %ss:\n%s' % (self.kind, timeout,
                                                         self.read_log()))

    def read_log(self):
        with open(self.log_path, 'rb') as f:
            return f.read().decode(errors='replace')

    def redis_pid(self):
        path = os.path.join(self.settings.data_folder, 'redis',
                            'redis.pid')
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def redis(self):
        """A sync client on this server's embedded Redis."""
        return store.connect_sync(store.RedisServer.from_settings(
            self.settings).url)

    def stop(self, timeout=30):
        """SIGTERM and wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process and self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.log.close()

    def kill(self, with_redis=True):
        """SIGKILL the server (and its Redis): a crash."""
        pid = self.redis_pid() if with_redis else None
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            self.log.close()

    def request(self, method, path, body=None, token=None, **kwargs):
        headers = kwargs.pop('headers', {})
        if token is not None:
            headers['Authorization'] = token
        return self.session.request(method, self.url + path, json=body,
                                    headers=headers, timeout=30, **kwargs)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.stop()
