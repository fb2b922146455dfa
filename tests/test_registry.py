"""The CC <-> WS registry with real cc.py / ws.py processes: registration
with cc_pass, probes taking a dead WS offline and a restarted one online,
a restarted CC remembering its WS, and clean shutdowns leaving nothing
behind."""
import os
import unittest

from server import processes, tls
from server.cc import keys
from server.cc.accounts import is_loopback
from server.processes import alive
from tools.testing import (
    CC_PASS,
    ServerProcess,
    command_centers,
    online,
    tmpdir,
    wait_for,
)


def group_members(pgid):
    """Live pids of a process group (a server started its own session)."""
    return processes.live_pids(processes.GROUP, pgid)


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
        s = ServerProcess('ws', command_centers=command_centers(cc, cc_pass),
                          **values)
        self.servers.append(s)
        return s.start()

    def status(self, cc):
        r = cc.request('GET', '/ws/status')
        self.assertEqual(r.status_code, 200)
        return r.json()

    def test_register_probe_restart(self):
        cc = self.cc()
        ws = self.ws(cc)
        wait_for(lambda: online(cc, ws.name), 'registration')
        self.assertEqual(self.status(cc)[ws.name],
                         {'url': '127.0.0.1', 'http_port': ws.port,
                          'online': True, 'draining': False})
        # killed: probes take it offline
        ws.kill()
        wait_for(lambda: online(cc, ws.name, False), 'WS offline')
        # back: online again (probe or re-registration)
        ws.start()
        wait_for(lambda: online(cc, ws.name), 'WS online again')
        # a restarted CC still knows its WS before the WS says anything
        cc.stop()
        cc.start()
        self.assertIn(ws.name, self.status(cc))
        wait_for(lambda: online(cc, ws.name), 'WS online after CC '
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

    def test_cc_verifies_the_ws_certificate(self):
        """A WS whose certificate our CA did not sign can register (it
        verifies the CC fine) but the CC's probes refuse its TLS: it goes
        offline and gets no work."""
        folder = tmpdir('foreign')
        foreign_ca = os.path.join(folder, 'ca.pem')
        cert, key = (os.path.join(folder, n) for n in ('ws.pem', 'ws.key'))
        tls.ensure_dev_certs(cert, key, foreign_ca)
        cc = self.cc()
        ws = ServerProcess('ws', command_centers=command_centers(cc),
                           ssl_certfile=cert, ssl_key=key)
        ws.session.verify = foreign_ca
        self.servers.append(ws)
        ws.start()
        wait_for(lambda: ws.name in self.status(cc), 'registration')
        wait_for(lambda: online(cc, ws.name, False), 'WS offline')
        self.assertIn('CERTIFICATE_VERIFY_FAILED', cc.read_log())

    def test_sigterm_leaves_nothing(self):
        cc = self.cc()
        ws = self.ws(cc)
        wait_for(lambda: online(cc, ws.name), 'registration')
        ws_redis, cc_redis = ws.redis_pid(), cc.redis_pid()
        self.assertTrue(alive(ws_redis) and alive(cc_redis))
        # a clean WS shutdown says goodbye: offline at once
        self.assertEqual(ws.stop(), 0)
        self.assertFalse(online(cc, ws.name))
        self.assertFalse(alive(ws_redis))
        self.assertEqual(group_members(ws.process.pid), [])
        self.assertEqual(cc.stop(), 0)
        self.assertFalse(alive(cc_redis))
        self.assertEqual(group_members(cc.process.pid), [])

    def test_multi_process_cc_stops_cleanly(self):
        cc = self.cc(num_processes=2)
        ws = self.ws(cc)
        wait_for(lambda: online(cc, ws.name), 'registration')
        pid = cc.redis_pid()
        self.assertEqual(cc.stop(), 0)
        self.assertFalse(alive(pid))
        self.assertEqual(group_members(cc.process.pid), [])


class TestBootstrapRefused(unittest.TestCase):
    """Account creation without a token is a loopback-only bootstrap; with
    it off (as for any non-loopback peer) only an admin token will do, and
    no header can make a peer look local. Tests talk to loopback only."""

    def test_no_token_is_401_admin_token_works(self):
        cc = ServerProcess('cc', allow_loopback_bootstrap=False)
        try:
            cc.start()
            body = {'email': 'x@y.org', 'password': 'p', 'role': 'admin'}
            r = cc.request('POST', '/managers', body)
            self.assertEqual(r.status_code, 401, r.text)
            r = cc.request('POST', '/donors', {
                'username': 'd', 'email': 'd@y.org', 'password': 'p'},
                headers={'X-Forwarded-For': '127.0.0.1',
                         'X-Real-Ip': '127.0.0.1'})
            self.assertEqual(r.status_code, 401, r.text)
            self.assertEqual(cc.redis().keys('*'), [keys.JOBS_LEASE])
        finally:
            cc.kill()
        # An admin made while bootstrap was on creates accounts after it is
        # off; a plain manager cannot.
        cc = ServerProcess('cc')
        try:
            cc.start()
            admin = cc.request('POST', '/managers', body).json()['token']
            cc.stop()
            cc.start(extra_args=['--allow_loopback_bootstrap=False'])
            r = cc.request('POST', '/managers', {
                'email': 'm@y.org', 'password': 'p', 'role': 'manager'},
                token=admin)
            self.assertEqual(r.status_code, 200, r.text)
            manager = r.json()['token']
            r = cc.request('POST', '/donors', {
                'username': 'd', 'email': 'd@y.org', 'password': 'p'},
                token=manager)
            self.assertEqual(r.status_code, 403, r.text)
        finally:
            cc.kill()


class TestLoopbackCheck(unittest.TestCase):
    def test_addresses(self):
        for address in ('127.0.0.1', '127.8.9.1', '::1'):
            self.assertTrue(is_loopback(address), address)
        for address in ('192.0.2.7', '10.0.0.1', '::ffff:192.0.2.7', '',
                        'localhost', None):
            self.assertFalse(is_loopback(address), address)
