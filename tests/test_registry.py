"""The CC <-> WS registry with real cc.py / ws.py processes: registration
with cc_pass, probes taking a dead WS offline and a restarted one online,
a restarted CC remembering its WS, and clean shutdowns leaving nothing
behind."""
import os
import time
import unittest

from tests import ServerProcess

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
