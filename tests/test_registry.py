"""The CC <-> WS registry with real cc.py / ws.py processes: registration
with cc_pass, probes taking a dead WS offline and a restarted one online,
a restarted CC remembering its WS, and clean shutdowns leaving nothing
behind."""
import ipaddress
import os
import socket
import time
import unittest

from server import tls
from tests import ServerProcess, certs, tmpdir

CC_PASS = 'test-cc-pass'


def wait_for(check, what, timeout=60):
    """Poll `check()` until it returns a true value (returned); fail after
    a generous `timeout` so a broken server cannot hang the run."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for ' + what)
        time.sleep(0.1)


def alive(pid):
    return pid is not None and os.path.exists('/proc/%d' % pid) and \
        'Z' not in _state(pid)


def _state(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return 'Z'


def group_members(pgid):
    """Live pids of a process group (a server started its own session)."""
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != 'Z':
            pids.append(int(entry))
    return pids


class TestRegistry(unittest.TestCase):

    def setUp(self):
        self.servers = []

    def tearDown(self):
        for s in reversed(self.servers):
            s.kill()

    def cc(self, **values):
        s = ServerProcess('cc', **values)
        self.servers.append(s)
        return s.start()

    def ws(self, cc, cc_pass=CC_PASS, **values):
        s = ServerProcess('ws', command_centers={cc.name: {
            'url': '127.0.0.1:%d' % cc.port, 'pass': cc_pass}}, **values)
        self.servers.append(s)
        return s.start()

    def status(self, cc):
        r = cc.request('GET', '/ws/status')
        self.assertEqual(r.status_code, 200)
        return r.json()

    def online(self, cc, name, value=True):
        s = self.status(cc).get(name)
        return s is not None and s['online'] is value

    def test_register_probe_restart(self):
        cc = self.cc()
        ws = self.ws(cc)
        wait_for(lambda: self.online(cc, ws.name), 'registration')
        self.assertEqual(self.status(cc)[ws.name],
                         {'url': '127.0.0.1', 'http_port': ws.port,
                          'online': True})
        # killed: probes take it offline
        ws.kill()
        wait_for(lambda: self.online(cc, ws.name, False), 'WS offline')
        # back: online again (probe or re-registration)
        ws.start()
        wait_for(lambda: self.online(cc, ws.name), 'WS online again')
        # a restarted CC still knows its WS before the WS says anything
        cc.stop()
        cc.start()
        self.assertIn(ws.name, self.status(cc))
        wait_for(lambda: self.online(cc, ws.name), 'WS online after CC '
                 'restart')

    def test_wrong_pass_refused(self):
        cc = self.cc()
        before = self.status(cc)
        r = cc.request('PUT', '/ws/register', {
            'name': 'intruder', 'url': '127.0.0.1', 'http_port': 1},
            token='wrong')
        self.assertEqual(r.status_code, 401)
        self.assertIn('error', r.json())
        r = cc.request('PUT', '/ws/register', {
            'name': 'intruder', 'url': '127.0.0.1', 'http_port': 1})
        self.assertEqual(r.status_code, 401)
        r = cc.request('PUT', '/ws/disconnect', {'name': 'x'}, token='wrong')
        self.assertEqual(r.status_code, 401)
        ws = self.ws(cc, cc_pass='not-the-pass')
        wait_for(lambda: 'refused registration' in ws.read_log(),
                 'the WS to be refused')
        self.assertEqual(self.status(cc), before)
        for body in ({}, {'name': 'a b', 'url': 'x', 'http_port': 1},
                     {'name': 'a', 'url': 'x', 'http_port': 0},
                     {'name': 'a', 'url': 'x/y', 'http_port': 1},
                     {'name': 'a', 'url': 'x', 'http_port': 'http'}):
            r = cc.request('PUT', '/ws/register', body, token=CC_PASS)
            self.assertEqual(r.status_code, 400, body)
            self.assertIn('error', r.json())
        self.assertEqual(self.status(cc), before)

    def test_sigterm_leaves_nothing(self):
        cc = self.cc()
        ws = self.ws(cc)
        wait_for(lambda: self.online(cc, ws.name), 'registration')
        ws_redis, cc_redis = ws.redis_pid(), cc.redis_pid()
        self.assertTrue(alive(ws_redis) and alive(cc_redis))
        # a clean WS shutdown says goodbye: offline at once
        self.assertEqual(ws.stop(), 0)
        self.assertFalse(self.online(cc, ws.name))
        self.assertFalse(alive(ws_redis))
        self.assertEqual(group_members(ws.process.pid), [])
        self.assertEqual(cc.stop(), 0)
        self.assertFalse(alive(cc_redis))
        self.assertEqual(group_members(cc.process.pid), [])

    def test_multi_process_cc_stops_cleanly(self):
        cc = self.cc(num_processes=2)
        ws = self.ws(cc)
        wait_for(lambda: self.online(cc, ws.name), 'registration')
        pid = cc.redis_pid()
        self.assertEqual(cc.stop(), 0)
        self.assertFalse(alive(pid))
        self.assertEqual(group_members(cc.process.pid), [])


def outside_address():
    """A non-loopback IPv4 address of this host, or None."""
    found = []
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(('198.51.100.1', 9))  # UDP connect sends no packet
        found.append(s.getsockname()[0])
    except OSError:
        pass
    finally:
        s.close()
    try:
        found += [i[4][0] for i in socket.getaddrinfo(
            socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    for address in found:
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


class TestBootstrapFromOutside(unittest.TestCase):
    """Account creation without a token only from loopback: a CC process
    (listening on every interface) reached at this host's outside
    address sees a non-loopback peer."""

    def test_no_token_from_outside_is_401_admin_token_works(self):
        address = outside_address()
        self.assertIsNotNone(address, 'this test needs a non-loopback '
                             'interface')
        c = certs()
        folder = tmpdir('outside-cert')
        cert, key = os.path.join(folder, 'cc.pem'), os.path.join(folder,
                                                                   'cc.key')
        tls.make_server_cert(cert, key, c['ca'],
                             os.path.splitext(c['ca'])[0] + '.key',
                             ['localhost', '127.0.0.1', address])
        cc = ServerProcess('cc', ssl_certfile=cert, ssl_key=key)
        try:
            cc.start()
            outside = 'https://%s:%d' % (address, cc.port)
            body = {'email': 'x@y.org', 'password': 'p', 'role': 'admin'}
            r = cc.session.post(outside + '/managers', json=body, timeout=30)
            self.assertEqual(r.status_code, 401, r.text)
            r = cc.session.post(outside + '/donors', json={
                'username': 'd', 'email': 'd@y.org', 'password': 'p'},
                timeout=30)
            self.assertEqual(r.status_code, 401, r.text)
            admin = cc.request('POST', '/managers', body).json()['token']
            r = cc.session.post(outside + '/managers', json={
                'email': 'm@y.org', 'password': 'p', 'role': 'manager'},
                headers={'Authorization': admin}, timeout=30)
            self.assertEqual(r.status_code, 200, r.text)
            manager = r.json()['token']
            r = cc.session.post(outside + '/donors', json={
                'username': 'd', 'email': 'd@y.org', 'password': 'p'},
                headers={'Authorization': manager}, timeout=30)
            self.assertEqual(r.status_code, 403, r.text)
            r = cc.session.post(outside + '/managers', json={
                'email': 'n@y.org', 'password': 'p', 'role': 'manager'},
                headers={'Authorization': manager,
                         'X-Forwarded-For': '127.0.0.1'}, timeout=30)
            self.assertEqual(r.status_code, 403, r.text)
            r = cc.session.post(outside + '/donors', json={
                'username': 'd', 'email': 'd@y.org', 'password': 'p'},
                headers={'X-Forwarded-For': '127.0.0.1'}, timeout=30)
            self.assertEqual(r.status_code, 401, r.text)
        finally:
            cc.kill()
