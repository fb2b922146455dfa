"""The real client address behind a load balancer (issue 22, point 11).

Raw PROXY protocol v1/v2 headers, X-Forwarded-For and garbage sent to a
real cc.py from trusted and untrusted source addresses (distinct loopback
addresses: 127.0.0.x); then Debian's haproxy, configured as in
docs/operations.md (TCP mode, TLS passed through, `send-proxy-v2`), in
front of two cc.py processes sharing one Redis, with clients from two
source addresses: the per-client limits apply per client, and the account
bootstrap is refused through the balancer."""
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import unittest
import uuid

import requests
from requests.adapters import HTTPAdapter

from server import proxy, store
from tools.testing import (
    CC_PASS,
    ServerProcess,
    b64,
    certs,
    free_port,
    tmpdir,
    wait_for,
)

BALANCER = '127.0.0.9'   # the address the balancer connects to CCs from
CLIENTS = ('127.0.0.2', '127.0.0.3')


def v1(ip, port=40000):
    family = 'TCP6' if ':' in ip else 'TCP4'
    other = '::1' if ':' in ip else '127.0.0.1'
    return ('PROXY %s %s %s %d 443\r\n' % (family, ip, other, port)).encode()


def v2(ip=None, port=40000):
    """A v2 header naming `ip` (None: the LOCAL command of a health check),
    with a TLV after the addresses as haproxy may add."""
    if ip is None:
        return proxy.V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack('!H', 0)
    if ':' in ip:
        family, addresses = 0x21, socket.inet_pton(socket.AF_INET6, ip) + \
            socket.inet_pton(socket.AF_INET6, '::1')
    else:
        family, addresses = 0x11, socket.inet_pton(socket.AF_INET, ip) + \
            socket.inet_pton(socket.AF_INET, '127.0.0.1')
    body = addresses + struct.pack('!HH', port, 443) + b'\x04\x00\x01x'
    return proxy.V2_SIGNATURE + bytes([0x21, family]) + \
        struct.pack('!H', len(body)) + body


def exchange(port, source, method, path, body=None, header=b'',
             headers=None):
    """One request over TLS from `source` after `header` (sent in the
    clear, as a balancer does): (status, parsed JSON body), or None if the
    server hung up without an answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect(('127.0.0.1', port))
    try:
        sock.sendall(header)
        ctx = ssl.create_default_context(cafile=certs()['ca'])
        try:
            tls = ctx.wrap_socket(sock, server_hostname='127.0.0.1')
        except (ssl.SSLError, OSError):
            return None
        data = json.dumps(body).encode() if body is not None else b''
        lines = ['%s %s HTTP/1.1' % (method, path), 'Host: 127.0.0.1',
                 'Connection: close', 'Content-Length: %d' % len(data)]
        lines += ['%s: %s' % kv for kv in (headers or {}).items()]
        tls.sendall(('\r\n'.join(lines) + '\r\n\r\n').encode() + data)
        reply = b''
        while True:
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            reply += chunk
        if not reply:
            return None
        head, _, rest = reply.partition(b'\r\n\r\n')
        status = int(head.split(b' ', 2)[1])
        try:
            return status, json.loads(rest) if rest else None
        except ValueError:
            return status, rest
    finally:
        sock.close()


class TestParsing(unittest.TestCase):
    """server/proxy.py alone: what a header or X-Forwarded-For names."""

    def test_headers(self):
        self.assertEqual(proxy.parse_v1(v1('198.51.100.1', 5)),
                         ('198.51.100.1', 5))
        self.assertEqual(proxy.parse_v1(v1('2001:db8::1')),
                         ('2001:db8::1', 40000))
        self.assertIsNone(proxy.parse_v1(b'PROXY UNKNOWN\r\n'))
        for bad in (b'PROXY TCP4 2001:db8::1 ::1 1 2\r\n',
                    b'PROXY TCP4 1.2.3.4 1.2.3.5 70000 2\r\n',
                    b'PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n',
                    b'PROXY UDP4 1.2.3.4 1.2.3.5 1 2\r\n',
                    b'PROXY TCP4 1.2.3.4 1.2.3.5 \xff 2\r\n'):
            with self.assertRaises(proxy.BadHeader, msg=bad):
                proxy.parse_v1(bad)
        self.assertEqual(proxy.parse_v2(v2('198.51.100.1', 7)),
                         ('198.51.100.1', 7))
        self.assertEqual(proxy.parse_v2(v2('2001:db8::2')),
                         ('2001:db8::2', 40000))
        self.assertIsNone(proxy.parse_v2(v2(None)))
        cut = v2('198.51.100.1')
        cut = cut[:14] + struct.pack('!H', 4) + cut[16:20]
        with self.assertRaises(proxy.BadHeader):
            proxy.parse_v2(cut)

    def test_forwarded_for(self):
        nets = proxy.networks(('10.0.0.0/8',))
        self.assertEqual(proxy.forwarded_for('1.2.3.4, 10.0.0.5', nets),
                         '1.2.3.4')
        self.assertEqual(proxy.forwarded_for('6.6.6.6, 1.2.3.4', nets),
                         '1.2.3.4')
        self.assertIsNone(proxy.forwarded_for('1.2.3.4, nonsense', nets))
        self.assertIsNone(proxy.forwarded_for('', nets))
        self.assertTrue(proxy.trusted('::ffff:10.1.2.3', nets))
        self.assertFalse(proxy.trusted('11.0.0.1', nets))


class TestProxyProtocol(unittest.TestCase):
    """One cc.py trusting BALANCER; login failures are counted per
    address (2 at most), which shows which address the CC saw."""

    @classmethod
    def setUpClass(cls):
        cls.cc = ServerProcess('cc', trusted_proxies=[BALANCER + '/32'],
                               login_fails_per_address=2,
                               login_fails_per_account=1000).start()

    @classmethod
    def tearDownClass(cls):
        cls.cc.kill()

    def login(self, source, header=b'', headers=None):
        r = exchange(self.cc.port, source, 'POST', '/managers/auth', {
            'email': uuid.uuid4().hex + '@x.org', 'password': 'guess'},
            header, headers)
        return r and r[0]

    def exhaust(self, source, header=b'', headers=None):
        """Fail logins until the address is at its budget: [statuses]."""
        return [self.login(source, header, headers) for _ in range(3)]

    def test_v1_and_v2_name_the_client(self):
        self.assertEqual(self.exhaust(BALANCER, v1('198.51.100.1')),
                         [401, 401, 429])
        # Another client through the same balancer: its own budget.
        self.assertEqual(self.login(BALANCER, v2('198.51.100.2')), 401)
        self.assertEqual(self.exhaust(BALANCER, v2('198.51.100.2'))[1:],
                         [429, 429])
        self.assertEqual(self.exhaust(BALANCER, v2('2001:db8::7'))[:2],
                         [401, 401])
        self.assertEqual(self.exhaust(BALANCER, v1('2001:db8:0:1::7'))[:2],
                         [401, 401])
        # The balancer's own connection (a health check) works.
        self.assertEqual(exchange(self.cc.port, BALANCER, 'GET', '/',
                                  header=v2(None))[0], 200)
        self.assertEqual(exchange(self.cc.port, BALANCER, 'GET', '/',
                                  header=b'PROXY UNKNOWN\r\n')[0], 200)
        # With a PROXY header, X-Forwarded-For is the client's own word.
        self.assertEqual(self.login(BALANCER, v1('198.51.100.1'), {
            'X-Forwarded-For': '198.51.100.99'}), 429)

    def test_untrusted_headers_and_garbage_are_refused(self):
        for header in (v1('198.51.100.3'), v2('198.51.100.3')):
            self.assertIsNone(exchange(self.cc.port, CLIENTS[0], 'GET', '/',
                                       header=header))
        for garbage in (b'PROXY TCP4 x y 1 2\r\n', b'PROXY ' + b'a' * 200,
                        proxy.V2_SIGNATURE + b'\x99\x11\x00\x00'):
            self.assertIsNone(exchange(self.cc.port, BALANCER, 'GET', '/',
                                       header=garbage))
        self.assertEqual(exchange(self.cc.port, CLIENTS[0], 'GET', '/')[0],
                         200)

    def test_forwarded_for_only_from_the_balancer(self):
        # From the balancer without a PROXY header (it terminated TLS):
        # X-Forwarded-For's rightmost address that is not the balancer's.
        xff = {'X-Forwarded-For': '203.0.113.50, 198.51.100.4, ' + BALANCER}
        self.assertEqual(self.exhaust(BALANCER, headers=xff),
                         [401, 401, 429])
        self.assertEqual(self.login(BALANCER, headers={
            'X-Forwarded-For': '198.51.100.5'}), 401)
        # From anyone else it changes nothing: the source address counts.
        self.assertEqual(self.exhaust(CLIENTS[1], headers={
            'X-Forwarded-For': '198.51.100.20'}), [401, 401, 429])
        self.assertEqual(self.login(CLIENTS[1], headers={
            'X-Forwarded-For': '198.51.100.6'}), 429)

    def test_no_bootstrap_or_loopback_metrics_through_the_balancer(self):
        body = {'email': 'boss@x.org', 'password': 'pw', 'role': 'admin'}
        for header in (v1('127.0.0.1'), v2('127.0.0.1'), b''):
            self.assertEqual(exchange(self.cc.port, BALANCER, 'POST',
                                      '/managers', body, header)[0], 401)
            self.assertEqual(exchange(self.cc.port, BALANCER, 'GET',
                                      '/metrics', header=header)[0], 403)
        self.assertEqual(exchange(self.cc.port, BALANCER, 'POST', '/managers',
                                  body, headers={
                                      'X-Forwarded-For': '127.0.0.1'})[0],
                         401)
        self.assertEqual(exchange(self.cc.port, CLIENTS[0], 'GET',
                                  '/metrics')[0], 200)


def refused(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class Source(HTTPAdapter):
    """A requests adapter whose connections leave from one address."""

    def __init__(self, source):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs['source_address'] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


HAPROXY = '''global
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout check 6s
    retries 3
    option redispatch
frontend siegetank_cc
    bind 127.0.0.1:{port}
    default_backend cc_hosts
backend cc_hosts
    balance leastconn
    source {balancer}
    option httpchk
    http-check send meth GET uri / ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server send-proxy-v2 check check-ssl check-sni localhost \
verify required ca-file {ca} inter 3s fall 4 rise 2
    server cc1 127.0.0.1:{a}
    server cc2 127.0.0.1:{b}
'''


class TestHaproxy(unittest.TestCase):

    def setUp(self):
        self.redis = store.RedisServer(tmpdir('shared-redis'), free_port())
        self.redis.start()
        self.addCleanup(self.redis.stop)
        shared = dict(name='hub', redis_url=self.redis.url,
                      redis_options=None, client_max_held_streams=2,
                      trusted_proxies=[BALANCER + '/32'])
        self.ccs = [ServerProcess('cc', **shared).start() for _ in range(2)]
        for cc in self.ccs:
            self.addCleanup(cc.kill)
        self.ws = ServerProcess('ws', command_centers={'hub': {
            'url': '127.0.0.1:%d' % self.ccs[0].port, 'pass': CC_PASS}},
            pulse_frequency_in_ms=200).start()
        self.addCleanup(self.ws.kill)
        folder = tmpdir('haproxy')
        self.stats = os.path.join(folder, 'stats.sock')
        self.port = free_port()
        conf = os.path.join(folder, 'haproxy.cfg')
        with open(conf, 'w') as f:
            f.write(HAPROXY.format(stats=self.stats, port=self.port,
                                   balancer=BALANCER, ca=certs()['ca'],
                                   a=self.ccs[0].port, b=self.ccs[1].port))
        haproxy = shutil.which('haproxy') or '/usr/sbin/haproxy'
        self.assertTrue(os.path.exists(haproxy), 'haproxy is missing: '
                        'apt-get install haproxy (.ci/run does)')
        self.log = open(os.path.join(folder, 'haproxy.log'), 'wb')
        self.addCleanup(self.log.close)
        self.haproxy = subprocess.Popen(
            [haproxy, '-db', '-f', conf], stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(self.stop_haproxy)
        wait_for(lambda: set(self.up()) == {'cc1', 'cc2'}, 'both CCs up '
                 'in haproxy', timeout=60)

    def stop_haproxy(self):
        if self.haproxy.poll() is None:
            os.killpg(self.haproxy.pid, signal.SIGKILL)
            self.haproxy.wait()

    def up(self):
        """{server: sessions it was given} of the backend's servers that
        haproxy's health checks find up."""
        if self.haproxy.poll() is not None:
            with open(self.log.name) as f:
                raise AssertionError('haproxy exited:\n' + f.read())
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.stats)
        except OSError:
            return set()
        try:
            s.sendall(b'show stat\n')
            data = b''
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        up = {}
        for line in data.decode().splitlines():
            fields = line.split(',')
            if len(fields) > 17 and fields[0] == 'cc_hosts' \
                    and fields[1] != 'BACKEND' and fields[17] == 'UP':
                up[fields[1]] = int(fields[7] or 0)  # stot
        return up

    def session(self, source):
        s = requests.Session()
        s.trust_env = False
        s.verify = certs()['ca']
        s.mount('https://', Source(source))
        return s

    def through(self, source, method, path, body=None, token=None,
                headers=None):
        headers = dict(headers or {})
        if token:
            headers['Authorization'] = token
        return self.session(source).request(
            method, 'https://127.0.0.1:%d%s' % (self.port, path), json=body,
            headers=headers, timeout=30)

    def test_limits_per_client_and_no_bootstrap(self):
        manager = {'email': 'admin@x.org', 'password': 'pw',
                   'role': 'admin'}
        # Through the balancer, even from the balancer's host: refused.
        r = self.through('127.0.0.1', 'POST', '/managers', manager)
        self.assertEqual(r.status_code, 401, r.text)
        # On a CC host itself (not through the balancer): the bootstrap.
        admin = self.ccs[1].request('POST', '/managers',
                                    manager).json()['token']
        wait_for(lambda: self.ccs[0].request('GET', '/ws/status').json()
                 .get(self.ws.name, {}).get('online'), 'the WS online')
        version = uuid.uuid4().hex[:8]
        r = self.through(CLIENTS[0], 'POST', '/targets', {
            'description': 'public', 'engine': 'openmm',
            'engine_versions': [version], 'stage': 'public',
            'files': {'system.xml.b64': b64(b'<System/>')}}, token=admin)
        self.assertEqual(r.status_code, 200, r.text)
        tid = r.json()['target_id']
        for _ in range(5):
            r = self.through(CLIENTS[1], 'POST', '/streams', {
                'target_id': tid, 'files': {'state.xml.b64': b64(b'<S/>')}},
                token=admin)
            self.assertEqual(r.status_code, 200, r.text)
        assign = {'engine': 'openmm', 'engine_version': version}
        # Each client holds at most 2; its X-Forwarded-For changes nothing.
        first = [self.through(CLIENTS[0], 'POST', '/core/assign', assign,
                              headers={'X-Forwarded-For': '198.51.100.%d'
                                       % i}).status_code for i in range(3)]
        self.assertEqual(first, [200, 200, 429])
        # The other client is not held to the first one's limit.
        second = [self.through(CLIENTS[1], 'POST', '/core/assign',
                               assign).status_code for _ in range(3)]
        self.assertEqual(second, [200, 200, 429])
        # Both CCs served clients through the balancer, and stay up.
        sessions = self.up()
        self.assertEqual(set(sessions), {'cc1', 'cc2'})
        self.assertTrue(all(sessions.values()), sessions)
        # A CC killed: once its port refuses connections (its worker gone
        # too), and before its checks fail, the connections haproxy still
        # sends it are refused and redispatched to the other one.
        self.ccs[0].kill()
        wait_for(lambda: refused(self.ccs[0].port), 'the port closed')
        for source in CLIENTS * 3:
            r = self.through(source, 'GET', '/')
            self.assertEqual(r.status_code, 200, r.text)


if __name__ == '__main__':
    unittest.main()
