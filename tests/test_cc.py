"""The command center in-process, over real HTTPS with a real Redis:
accounts, targets, ownership on every manager endpoint, bad input, and
stream placement / assignment against real workservers in the same loop
(tests/inprocess_ws.py); tests check what the CC's calls did to them."""
import asyncio
import base64
import gzip
import json
import os
import time
import uuid
from unittest import mock

from tornado.httpclient import AsyncHTTPClient

from server import store
from server.cc import accounts, collect, keys, reconcile, workservers
from server.cc.app import CommandCenter
from server.lua import Script
from server.ws import sessions as ws_sessions
from server.ws import streams as ws_streams
from tests.inprocess_ws import InProcessWS
from tools.testing import CC_PASS, AppTestCase, RedisTestCase, certs

B64 = base64.b64encode(b'<System/>').decode()
GZB64 = base64.b64encode(gzip.compress(b'<Integrator/>')).decode()
TARGET_FILES = {'system.xml.b64': B64, 'integrator.xml.gz.b64': GZB64}


class CCTestCase(AppTestCase):
    kind = 'cc'
    app_class = CommandCenter

    def setUp(self):
        super().setUp()
        self.workservers = []
        # This CC holds the jobs lease for the whole test; the tests run
        # the jobs (probes) themselves.
        self.app.lease.ttl_ms = 3600 * 1000
        self.assertTrue(self.io_loop.run_sync(self.app.lease.refresh))

    def tearDown(self):
        for ws in self.workservers:
            ws.stop()
        super().tearDown()

    def sync(self, coro_fn):
        return self.io_loop.run_sync(coro_fn)

    # helpers

    def add_manager(self, email='joe@x.org', role='manager', token=None,
                    code=200, password='riesling'):
        c, body = self.fetch_json('/managers', 'POST', {
            'email': email, 'password': password, 'role': role},
            token=token)
        self.assertEqual(c, code, body)
        return body.get('token')

    def add_donor(self, username='jesse', email='jv@x.org', code=200,
                  token=None):
        c, body = self.fetch_json('/donors', 'POST', {
            'username': username, 'email': email, 'password': 'pw'},
            token=token)
        self.assertEqual(c, code, body)
        return body.get('token')

    def post_target(self, token, code=200, **fields):
        body = {'description': 'top secret', 'engine': 'openmm',
                'engine_versions': ['6.0'],
                'files': {'system.xml.b64': B64,
                          'integrator.xml.gz.b64': GZB64},
                'options': {'steps_per_frame': 50000}}
        body.update(fields)
        c, reply = self.fetch_json('/targets', 'POST', body, token=token)
        self.assertEqual(c, code, reply)
        return reply.get('target_id')

    def info(self, target_id, token=None):
        c, body = self.fetch_json('/targets/info/' + target_id, token=token)
        self.assertEqual(c, 200, body)
        return body

    def add_ws(self, name):
        """A real WS, started and registered with this CC."""
        ws = InProcessWS(name, self.redis_server.url, self.io_loop,
                         self.settings.name, self.get_http_port())
        self.workservers.append(ws.start())
        c, body = self.fetch_json('/ws/register', 'PUT', ws.register_body(),
                                  token=CC_PASS)
        self.assertEqual(c, 200, body)
        return ws

    def ws_json(self, ws, path):
        """GET `path` on the WS itself, as a CC: (code, dict)."""
        r = self.fetch('https://127.0.0.1:%d%s' % (ws.port, path),
                       headers={'Authorization': CC_PASS})
        return r.code, json.loads(r.body)

    def register_dead_ws(self, name):
        """A WS that is registered but never answers (closed port)."""
        c, _ = self.fetch_json('/ws/register', 'PUT', {
            'name': name, 'url': '127.0.0.1', 'http_port': 1},
            token=CC_PASS)
        self.assertEqual(c, 200)

    def assertError(self, code, expected, body):
        self.assertEqual(code, expected, body)
        self.assertIsInstance(body, dict)
        self.assertIsInstance(body.get('error'), str)


class TestScripts(RedisTestCase):

    def test_script_survives_a_script_flush(self):
        """Called by SHA; a Redis that lost its script cache (restart,
        SCRIPT FLUSH) gets the text again."""
        script = Script("return {k, a}", keys=('k',), args=('a',))

        async def run():
            first = await script(self.redis, k='k', a='a')
            await self.redis.script_flush()
            return first, await script(self.redis, k='k', a='b')
        self.assertEqual(self.io_loop.run_sync(run), (['k', 'a'],
                                                      ['k', 'b']))


class TestAccounts(CCTestCase):

    def test_add_manager_auth_and_rotation(self):
        token = self.add_manager()
        self.add_manager(code=409)
        self.add_manager(email='JOE@x.org', code=409)
        c, _ = self.fetch_json('/targets', token=token)
        self.assertEqual(c, 200)
        c, body = self.fetch_json('/managers/auth', 'POST', {
            'email': 'joe@x.org', 'password': 'riesling'})
        self.assertEqual(c, 200)
        new = body['token']
        self.assertNotEqual(new, token)
        self.assertEqual(self.fetch_json('/targets', token=token)[0], 401)
        self.assertEqual(self.fetch_json('/targets', token=new)[0], 200)
        self.assertEqual(self.fetch_json('/targets', token='Bearer ' + new)[0],
                         200)
        c, body = self.fetch_json('/managers/auth', 'POST', {
            'email': 'joe@x.org', 'password': 'wrong'})
        self.assertError(c, 401, body)
        c, body = self.fetch_json('/managers/auth', 'POST', {
            'email': 'nobody@x.org', 'password': 'riesling'})
        self.assertError(c, 401, body)
        self.assertEqual(self.fetch_json('/targets', token=new)[0], 200)

    def test_secrets_not_stored(self):
        token = self.add_manager()
        donor = self.add_donor()

        async def dump():
            out = []
            for key in await self.redis.keys('*'):
                t = await self.redis.type(key)
                if t == 'hash':
                    out.append(json.dumps(await self.redis.hgetall(key)))
                elif t == 'string':
                    out.append(await self.redis.get(key))
                out.append(key)
            return '\n'.join(out)
        everything = self.sync(dump)
        for secret in (token, donor, 'riesling'):
            self.assertNotIn(secret, everything)
        stored = self.sync(lambda: self.redis.hget(keys.manager('joe@x.org'),
                                                  'password'))
        self.assertTrue(stored.startswith('scrypt$16384$8$1$'))
        self.assertTrue(self.sync(lambda: accounts.check_password(
            'riesling', stored)))
        self.assertFalse(self.sync(lambda: accounts.check_password(
            'Riesling', stored)))

    def test_who_may_create_accounts(self):
        admin = self.add_manager('root@x.org', role='admin')
        manager = self.add_manager('m@x.org', token=admin)
        self.add_manager('a2@x.org', role='admin', token=admin)
        c, body = self.fetch_json('/managers', 'POST', {
            'email': 'z@x.org', 'password': 'p', 'role': 'manager'},
            token=manager)
        self.assertError(c, 403, body)
        c, body = self.fetch_json('/managers', 'POST', {
            'email': 'z@x.org', 'password': 'p', 'role': 'manager'},
            token='not-a-token')
        self.assertError(c, 401, body)
        self.add_donor(token=admin)
        c, body = self.fetch_json('/donors', 'POST', {
            'username': 'u2', 'email': 'u2@x.org', 'password': 'p'},
            token=manager)
        self.assertError(c, 403, body)

    def test_donors(self):
        token = self.add_donor()
        self.add_donor(email='other@x.org', code=409)
        self.add_donor(username='other', code=409)
        c, body = self.fetch_json('/donors/auth', 'POST', {
            'username': 'jesse', 'password': 'pw'})
        self.assertEqual(c, 200)
        self.assertNotEqual(body['token'], token)
        self.assertIsNone(self.sync(lambda: accounts.donor_of(self.app,
                                                             token)))
        self.assertEqual(self.sync(lambda: accounts.donor_of(
            self.app, body['token'])), 'jesse')
        c, body = self.fetch_json('/donors/auth', 'POST', {
            'username': 'jesse', 'password': 'nope'})
        self.assertError(c, 401, body)
        # a donor token is no manager token
        c, body = self.fetch_json('/targets', token=token)
        self.assertError(c, 401, body)

    def test_bad_account_input(self):
        bad = [
            ('/managers', '{not json'),
            ('/managers', '[1, 2]'),
            ('/managers', {}),
            ('/managers', {'email': 'a@b', 'password': 'p'}),
            ('/managers', {'email': 'a@b', 'password': 'p', 'role': 'god'}),
            ('/managers', {'email': 'nope', 'password': 'p',
                           'role': 'manager'}),
            ('/managers', {'email': 5, 'password': 'p', 'role': 'manager'}),
            ('/managers', {'email': 'a@b', 'password': '',
                           'role': 'manager'}),
            ('/managers', {'email': 'a@b', 'password': ['p'],
                           'role': 'manager'}),
            ('/managers', {'email': 'a@b', 'password': 'p',
                           'role': 'manager', 'weight': -1}),
            ('/managers', {'email': 'a@b', 'password': 'p',
                           'role': 'manager', 'weight': 10 ** 400}),
            ('/managers', {'email': 'a@b', 'password': 'p',
                           'role': 'manager', 'weight': True}),
            ('/managers', {'email': 'a@b', 'password': 'x' * 2000,
                           'role': 'manager'}),
            ('/managers/auth', {'email': 'a@b'}),
            ('/managers/auth', {'email': None, 'password': 'p'}),
            ('/donors', {'username': 'a b', 'email': 'a@b',
                         'password': 'p'}),
            ('/donors', {'username': 'ab', 'password': 'p'}),
            ('/donors/auth', {'username': {}, 'password': 'p'}),
        ]
        for path, body in bad:
            c, reply = self.fetch_json(path, 'POST', body)
            self.assertError(c, 400, reply)
        for raw in (b'{"email": "a\\ud800@b", "password": "p", '
                    b'"role": "admin"}',
                    b'{"email": "a@b", "password": "p", "role": "admin", '
                    b'"weight": NaN}',
                    b'{"a": Infinity}', b'[' * 8000 + b']' * 8000):
            c, reply = self.fetch_json('/managers', 'POST', raw)
            self.assertError(c, 400, reply)
        c, reply = self.fetch_json('/managers', 'POST', b'{}',
                                   headers={'Content-MD5': 'ab' * 16})
        self.assertError(c, 400, reply)
        self.assertEqual(self.sync(lambda: self.redis.keys('*')),
                         [keys.JOBS_LEASE])


class TestNoBootstrap(CCTestCase):
    conf = {'allow_loopback_bootstrap': False}

    def test_loopback_bootstrap_off(self):
        c, body = self.fetch_json('/managers', 'POST', {
            'email': 'a@x.org', 'password': 'p', 'role': 'admin'})
        self.assertError(c, 401, body)
        c, body = self.fetch_json('/donors', 'POST', {
            'username': 'd', 'email': 'd@x.org', 'password': 'p'})
        self.assertError(c, 401, body)
        admin = self.sync(lambda: accounts.create_manager(
            self.app, 'root@x.org', 'pw', 'admin', 1))
        self.add_manager('m@x.org', token=admin)
        self.add_donor(token=admin)

    def test_loopback_detection(self):
        self.assertTrue(accounts.is_loopback('127.0.0.1'))
        self.assertTrue(accounts.is_loopback('::1'))
        self.assertFalse(accounts.is_loopback('10.1.2.3'))
        self.assertFalse(accounts.is_loopback('not an ip'))


class TestLogin(CCTestCase):
    conf = {'login_fails_per_account': 3, 'login_fails_per_address': 5}

    def login(self, email, password, path='/managers/auth'):
        field = 'email' if path == '/managers/auth' else 'username'
        r = self.fetch(path, method='POST', body=json.dumps({
            field: email, 'password': password}))
        return r.code, json.loads(r.body), r.headers.get('Retry-After')

    def test_unknown_and_known_accounts_cost_one_scrypt(self):
        """Timing tells nothing: an unknown account is checked against a
        dummy hash with the same parameters as a real one."""
        self.add_manager('joe@x.org')
        self.add_donor()
        calls = []
        real = accounts._scrypt

        def counted(password, salt, n, r, p):
            calls.append((n, r, p))
            return real(password, salt, n, r, p)
        accounts._scrypt = counted
        self.addCleanup(setattr, accounts, '_scrypt', real)
        params = (accounts.SCRYPT['n'], accounts.SCRYPT['r'],
                  accounts.SCRYPT['p'])
        for path, name in (('/managers/auth', 'joe@x.org'),
                           ('/managers/auth', 'nobody@x.org'),
                           ('/donors/auth', 'jesse'),
                           ('/donors/auth', 'nobody')):
            del calls[:]
            code, body, _ = self.login(name, 'wrong', path)
            self.assertEqual(code, 401, body)
            self.assertEqual(calls, [params], (path, name))

    def test_failure_budgets(self):
        self.add_manager('joe@x.org')
        for _ in range(3):
            self.assertEqual(self.login('joe@x.org', 'guess')[0], 401)
        for password in ('guess', 'riesling'):  # even the right one
            code, body, retry = self.login('joe@x.org', password)
            self.assertEqual(code, 429, body)
            self.assertIn('error', body)
            self.assertTrue(1 <= int(retry) <= 900)
        # The address has 2 failures left, whatever the account.
        self.assertEqual(self.login('x@x.org', 'p')[0], 401)
        self.assertEqual(self.login('jesse', 'p', '/donors/auth')[0], 401)
        self.assertEqual(self.login('y@x.org', 'p')[0], 429)

    def test_success_clears_the_account_count(self):
        self.add_manager('joe@x.org')
        for _ in range(2):
            self.assertEqual(self.login('joe@x.org', 'guess')[0], 401)
        self.assertEqual(self.login('joe@x.org', 'riesling')[0], 200)
        for _ in range(2):
            self.assertEqual(self.login('joe@x.org', 'guess')[0], 401)
        self.assertEqual(self.login('joe@x.org', 'riesling')[0], 200)


class TestBootstrapCloses(CCTestCase):

    def test_no_managers_from_loopback_once_an_admin_exists(self):
        self.add_manager('first@x.org', role='manager')
        admin = self.add_manager('root@x.org', role='admin')
        for role in ('admin', 'manager'):
            c, body = self.fetch_json('/managers', 'POST', {
                'email': 'late@x.org', 'password': 'p', 'role': role})
            self.assertError(c, 401, body)
        self.add_manager('m@x.org', token=admin)
        # Donors: still from loopback (a sign-up front end on this host).
        self.add_donor()

    def test_admins_made_before_the_index_close_it_too(self):
        sync = store.connect_sync(self.redis_server.url)
        sync.hset(keys.manager('old@x.org'), mapping={
            'email': 'old@x.org', 'role': 'admin', 'weight': '1.0',
            'password': 'x', 'token': 'y'})
        sync.sadd(keys.owner_targets('old@x.org'), 't')
        accounts.backfill_admins(sync)
        sync.close()
        c, body = self.fetch_json('/managers', 'POST', {
            'email': 'late@x.org', 'password': 'p', 'role': 'admin'})
        self.assertError(c, 401, body)


class TestRegistry(CCTestCase):
    """Names of online workservers cannot be taken over from another
    address; an admin forgets an offline WS."""

    def ws_call(self, path, body, source='127.0.0.1', token=CC_PASS):
        r = self.fetch(path, method='PUT', body=json.dumps(body),
                       headers={'Authorization': token},
                       network_interface=source)
        return r.code, json.loads(r.body)

    def register(self, name, source='127.0.0.1', port=1):
        return self.ws_call('/ws/register', {
            'name': name, 'url': '127.0.0.1', 'http_port': port}, source)

    def status(self):
        return self.fetch_json('/ws/status')[1]

    def test_no_takeover_of_an_online_name(self):
        self.assertEqual(self.register('w1', port=1)[0], 200)
        code, body = self.register('w1', '127.0.0.2', port=2)
        self.assertError(code, 409, body)
        code, body = self.ws_call('/ws/disconnect', {'name': 'w1'},
                                  '127.0.0.2')
        self.assertError(code, 409, body)
        self.assertEqual(self.status()['w1'], {
            'url': '127.0.0.1', 'http_port': 1, 'online': True,
            'draining': False})
        # Its own address refreshes it; offline, the name may move.
        self.assertEqual(self.register('w1', port=1)[0], 200)
        for _ in range(self.settings.max_ws_fails):
            self.sync(lambda: workservers.record_failure(self.app, 'w1'))
        self.assertEqual(self.register('w1', '127.0.0.2', port=2)[0], 200)
        self.assertEqual(self.status()['w1']['http_port'], 2)
        # A goodbye from its address lets the name move as well.
        self.assertEqual(self.ws_call('/ws/disconnect', {'name': 'w1'},
                                      '127.0.0.2')[0], 200)
        self.assertEqual(self.register('w1', port=3)[0], 200)

    def test_admin_removes_an_offline_ws(self):
        admin = self.add_manager('root@x.org', role='admin')
        manager = self.add_manager('m@x.org', token=admin)
        self.register('w1')
        self.register('w2')
        self.sync(lambda: self.redis.sadd(keys.ws_pending_deletes('w1'), 't'))
        path = '/ws/remove/w1'
        code, body = self.fetch_json(path, 'PUT')
        self.assertError(code, 401, body)
        code, body = self.fetch_json(path, 'PUT', token=manager)
        self.assertError(code, 403, body)
        code, body = self.fetch_json(path, 'PUT', token=admin)
        self.assertError(code, 409, body)
        code, body = self.fetch_json('/ws/remove/nope', 'PUT', token=admin)
        self.assertError(code, 404, body)
        self.ws_call('/ws/disconnect', {'name': 'w1'})
        self.assertEqual(self.fetch_json(path, 'PUT', token=admin),
                         (200, {}))
        self.assertEqual(sorted(self.status()), ['w2'])
        # Not probed any more: no record comes back; its pending deletions
        # stay for when it does.
        self.sync(lambda: workservers.probe_all(self.app))
        self.assertFalse(self.sync(lambda: self.redis.exists(keys.ws('w1'))))
        self.assertEqual(self.sync(lambda: self.redis.smembers(
            keys.ws_pending_deletes('w1'))), {'t'})
        self.assertEqual(sorted(self.status()), ['w2'])
        # It may register again.
        self.assertEqual(self.register('w1')[0], 200)
        self.assertEqual(sorted(self.status()), ['w1', 'w2'])


    def test_drain_survives_registration_not_removal(self):
        admin = self.add_manager('root@x.org', role='admin')
        self.register('w1')
        body = json.dumps({'drain': True})
        self.assertEqual(self.fetch_json('/ws/drain/w1', 'PUT', body=body,
                                         token=admin), (200, {}))
        self.assertTrue(self.status()['w1']['draining'])
        self.assertTrue(self.fetch_json('/status')[1]['workservers']['w1'][
            'draining'])
        # A restart of the WS (registering again) keeps it draining.
        self.ws_call('/ws/disconnect', {'name': 'w1'})
        self.assertEqual(self.register('w1')[0], 200)
        self.assertTrue(self.status()['w1']['draining'])
        self.fetch_json('/ws/drain/w1', 'PUT', token=admin,
                        body=json.dumps({'drain': False}))
        self.assertFalse(self.status()['w1']['draining'])
        self.fetch_json('/ws/drain/w1', 'PUT', body=body, token=admin)
        # Removal forgets it with the rest of the record.
        self.ws_call('/ws/disconnect', {'name': 'w1'})
        self.fetch_json('/ws/remove/w1', 'PUT', token=admin)
        self.register('w1')
        self.assertFalse(self.status()['w1']['draining'])


class TestTargets(CCTestCase):

    def setUp(self):
        super().setUp()
        self.joe = self.add_manager('joe@x.org')
        self.bob = self.add_manager('bob@x.org')
        self.admin = self.add_manager('root@x.org', role='admin')

    def test_post_and_info(self):
        tid = self.post_target(self.joe)
        info = self.info(tid, self.joe)
        self.assertEqual(info['owner'], 'joe@x.org')
        self.assertEqual(info['stage'], 'private')
        self.assertEqual(info['engine'], 'openmm')
        self.assertEqual(info['engine_versions'], ['6.0'])
        self.assertEqual(info['options'], {'steps_per_frame': 50000})
        self.assertEqual(info['files'], ['integrator.xml.gz.b64',
                                         'system.xml.b64'])
        self.assertEqual(info['weight'], 1.0)
        self.assertEqual(info['allowed_ws'], [])
        self.assertEqual(info['striated_ws'], [])
        self.assertIsInstance(info['creation_date'], float)
        # in the shared store, nothing on this CC's disk
        self.assertEqual(sorted(self.sync(lambda: self.redis.hkeys(
            keys.target_files(tid)))), info['files'])
        self.assertFalse(os.path.exists(os.path.join(
            self.settings.data_folder, 'targets')))
        # the file as it was sent
        r = self.fetch('/targets/%s/system.xml.b64' % tid,
                       headers={'Authorization': self.joe})
        self.assertEqual((r.code, r.body), (200, B64.encode()))

    def test_files_of_an_older_cc_move_into_the_store(self):
        """An older CC kept target files in data_folder/targets/<id>/; at
        start they go into Redis and the folders go away."""
        from server.cc import targets
        tid = self.post_target(self.joe)
        self.sync(lambda: self.redis.delete(keys.target_files(tid)))
        root = os.path.join(self.settings.data_folder, 'targets')
        for folder, files in ((tid, TARGET_FILES),
                              ('gone', {'x.b64': B64})):
            os.makedirs(os.path.join(root, folder))
            for name, value in files.items():
                with open(os.path.join(root, folder, name), 'w') as f:
                    f.write(value)
        targets.import_disk_files(self.settings, self.redis_server.url)
        self.assertEqual(os.listdir(root), [])
        self.assertEqual(self.sync(lambda: self.redis.hgetall(
            keys.target_files(tid))), TARGET_FILES)
        self.assertFalse(self.sync(lambda: self.redis.exists(
            keys.target_files('gone'))))

    def test_list_targets(self):
        t1 = self.post_target(self.joe)
        self.assertEqual(self.fetch_json('/targets', token=self.joe)[1],
                         {'targets': [t1]})
        self.assertEqual(self.fetch_json('/targets', token=self.bob)[1],
                         {'targets': []})
        self.assertEqual(self.fetch_json('/targets')[1], {'targets': []})
        t2 = self.post_target(self.bob, stage='public')
        t3 = self.post_target(self.bob, stage='beta')
        self.assertEqual(self.fetch_json('/targets')[1],
                         {'targets': sorted([t2, t3])})
        self.assertEqual(self.fetch_json('/targets', token=self.bob)[1],
                         {'targets': sorted([t2, t3])})
        self.assertEqual(self.fetch_json('/targets', token='junk')[0], 401)
        # public info needs no token, private does; the owner's email only
        # to the owner and admins
        self.assertNotIn('owner', self.info(t2))
        self.assertNotIn('owner', self.info(t2, self.joe))
        self.assertEqual(self.info(t2, self.bob)['owner'], 'bob@x.org')
        self.assertEqual(self.info(t2, self.admin)['owner'], 'bob@x.org')
        c, body = self.fetch_json('/targets/info/' + t1)
        self.assertError(c, 401, body)
        self.info(t1, self.admin)

    def test_update(self):
        self.register_dead_ws('firebat')
        tid = self.post_target(self.joe)
        before = self.info(tid, self.joe)
        c, body = self.fetch_json('/targets/update/' + tid, 'PUT', {
            'stage': 'public', 'engine_versions': ['6.0', '6.1']},
            token=self.joe)
        self.assertEqual(c, 200, body)
        after = self.info(tid, self.joe)
        self.assertEqual(after['stage'], 'public')
        self.assertEqual(after['engine_versions'], ['6.0', '6.1'])
        for same in ('options', 'description', 'weight', 'allowed_ws',
                     'files', 'owner', 'creation_date'):
            self.assertEqual(after[same], before[same], same)
        self.assertEqual(self.fetch_json('/targets')[1], {'targets': [tid]})
        c, _ = self.fetch_json('/targets/update/' + tid, 'PUT', {
            'options': {'a': 1}, 'weight': 3, 'allowed_ws': ['firebat'],
            'description': 'new', 'stage': 'private'}, token=self.admin)
        self.assertEqual(c, 200)
        after = self.info(tid, self.joe)
        self.assertEqual((after['options'], after['weight'],
                          after['allowed_ws'], after['description'],
                          after['stage']),
                         ({'a': 1}, 3.0, ['firebat'], 'new', 'private'))
        self.assertEqual(self.fetch_json('/targets')[1], {'targets': []})

    def test_bad_target_input(self):
        self.register_dead_ws('firebat')
        tid = self.post_target(self.joe)
        before = self.info(tid, self.joe)
        for body in ({'stage': 'gold'}, {'stage': 5},
                     {'allowed_ws': ['nowhere']}, {'allowed_ws': 'firebat'},
                     {'allowed_ws': [1]}, {'engine_versions': []},
                     {'engine_versions': [6]}, {'engine_versions': '6.0'},
                     {'options': []}, {'weight': 0}, {'weight': 'x'},
                     {'weight': float('nan')}, {'description': None},
                     {'owner': 'bob@x.org'}, {'files': {}}, {},
                     {'stage': 'public', 'allowed_ws': ['nowhere']}):
            c, reply = self.fetch_json('/targets/update/' + tid, 'PUT', body,
                                       token=self.joe)
            self.assertError(c, 400, reply)
        self.assertEqual(self.info(tid, self.joe), before)
        c, reply = self.fetch_json('/targets/update/bad_id', 'PUT',
                                   {'stage': 'beta'}, token=self.joe)
        self.assertError(c, 400, reply)
        c, reply = self.fetch_json(
            '/targets/update/00000000-0000-4000-8000-000000000000', 'PUT',
            {'stage': 'beta'}, token=self.joe)
        self.assertError(c, 404, reply)
        n = len(self.fetch_json('/targets', token=self.joe)[1]['targets'])
        for body in ({}, {'engine': 'openmm'},
                     {'engine': 'openmm', 'engine_versions': []},
                     {'engine_versions': ['1'], 'engine': 'a/b'},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'files': {'../x': 'a'}},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'files': {'x.b64': 'not base64!'}},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'files': {'x.gz.b64': B64}},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'files': {'x': 1}},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'files': {'x': 'a', 'x.b64': B64}},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'files': []},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'stage': 'gold'},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'allowed_ws': ['nowhere']},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'options': 'fast'},
                     {'engine': 'openmm', 'engine_versions': ['1'],
                      'weight': -2}):
            c, reply = self.fetch_json('/targets', 'POST', body,
                                       token=self.joe)
            self.assertError(c, 400, reply)
        self.assertEqual(
            len(self.fetch_json('/targets', token=self.joe)[1]['targets']), n)
        self.assertEqual(self.sync(lambda: self.redis.keys(
            keys.target_files('*'))), [keys.target_files(tid)])
        for path in ('/targets/info/x', '/targets/streams/x',
                     '/targets/%s/..' % tid, '/targets/%s/nofile' % tid,
                     '/streams/info/nocolon', '/streams/info/abc:def'):
            c, reply = self.fetch_json(path, token=self.joe)
            self.assertIn(c, (400, 404), path)
            self.assertError(c, c, reply)
        c, reply = self.fetch_json('/nowhere')
        self.assertError(c, 404, reply)

    def test_delete(self):
        tid = self.post_target(self.joe, stage='public')
        c, _ = self.fetch_json('/targets/delete/' + tid, 'PUT',
                               token=self.joe)
        self.assertEqual(c, 200)
        self.assertEqual(self.fetch_json('/targets/info/' + tid)[0], 404)
        self.assertEqual(self.fetch_json('/targets')[1], {'targets': []})
        self.assertEqual(self.fetch_json('/targets', token=self.joe)[1],
                         {'targets': []})
        c, reply = self.fetch_json('/targets/delete/' + tid, 'PUT',
                                   token=self.joe)
        self.assertError(c, 404, reply)
        left = self.sync(lambda: self.redis.keys('*' + tid + '*'))
        self.assertEqual(left, [])

    def test_ownership_matrix(self):
        """Every manager endpoint: no token 401, another manager 403, the
        owner and an admin get through (the dead WS then answers 503)."""
        self.register_dead_ws('dead')
        tid = self.post_target(self.joe)
        sid = '00000000-0000-4000-8000-000000000001:dead'

        async def fake_stream():
            await self.redis.hset(keys.stream(sid),
                                  mapping={'target_id': tid, 'ws': 'dead'})
            await self.redis.sadd(keys.target_streams(tid), sid)
            await self.redis.hset(keys.target_ws(tid), 'dead', 1)
        self.sync(fake_stream)
        endpoints = [
            ('GET', '/targets/info/' + tid, None, 200),
            ('PUT', '/targets/update/' + tid, {'weight': 2}, 200),
            ('GET', '/targets/%s/system.xml.b64' % tid, None, 200),
            ('GET', '/targets/streams/' + tid, None, 200),
            ('POST', '/streams', {'target_id': tid,
                                  'files': {'state.xml': 'x'}}, 503),
            ('PUT', '/streams/start/' + sid, None, 503),
            ('PUT', '/streams/stop/' + sid, None, 503),
            ('PUT', '/streams/delete/' + sid, None, 503),
            ('GET', '/streams/info/' + sid, None, 503),
            ('GET', '/streams/%s/frames.xtc' % sid, None, 307),
        ]
        for method, path, body, allowed in endpoints:
            for token, expected in ((None, 401), ('junk', 401),
                                    (self.bob, 403), (self.joe, allowed),
                                    (self.admin, allowed)):
                headers = {'Authorization': token} if token else {}
                r = self.fetch(path, method=method, headers=headers,
                               body=json.dumps(body) if body is not None
                               else (b'{}' if method != 'GET' else None),
                               follow_redirects=False)
                self.assertEqual(r.code, expected, (path, token, r.body))
                if expected >= 400:
                    self.assertIn('error', json.loads(r.body))
        # creating a target needs a manager token (a donor's is none)
        donor = self.add_donor()
        for token in (None, 'junk', donor):
            self.post_target(token, code=401)
        # the down WS is reported, not fatal
        r = self.fetch('/targets/streams/' + tid,
                       headers={'Authorization': self.joe})
        self.assertEqual(r.code, 200)
        self.assertEqual(json.loads(r.body), {'dead': {}})
        self.assertEqual(r.headers['X-Unreachable-Workservers'], 'dead')
        # delete last: owner, then admin on another target
        for token, expected in ((None, 401), (self.bob, 403),
                                (self.joe, 200)):
            c, _ = self.fetch_json('/targets/delete/' + tid, 'PUT',
                                   token=token)
            self.assertEqual(c, expected)
        tid2 = self.post_target(self.joe)
        c, _ = self.fetch_json('/targets/delete/' + tid2, 'PUT',
                               token=self.admin)
        self.assertEqual(c, 200)

    def test_download_redirect_is_signed(self):
        ws = self.add_ws('firebat')
        tid = self.post_target(self.joe)
        c, body = self.fetch_json('/streams', 'POST', {
            'target_id': tid, 'files': {'state.xml': 's'}}, token=self.joe)
        self.assertEqual(c, 200, body)
        sid = body['stream_id']
        r = self.fetch('/streams/%s/frames.xtc' % sid,
                       headers={'Authorization': self.joe},
                       follow_redirects=False)
        self.assertEqual(r.code, 307)
        loc = r.headers['Location']
        prefix = 'https://127.0.0.1:%d/streams/%s/frames.xtc?' % (ws.port,
                                                                  sid)
        self.assertTrue(loc.startswith(prefix), loc)
        from urllib.parse import parse_qs

        from server import signing
        q = parse_qs(loc[len(prefix):])
        self.assertTrue(signing.valid([CC_PASS], sid, 'frames.xtc',
                                      q['expires'][0], q['signature'][0]))
        # the WS takes the signed URL (nothing committed yet: empty file),
        # and refuses it once tampered with
        r = self.fetch(loc)
        self.assertEqual((r.code, r.body), (200, b''))
        r = self.fetch(loc.replace('frames.xtc', 'log.txt'))
        self.assertEqual(r.code, 401)
        r = self.fetch('/streams/%s/..' % sid,
                       headers={'Authorization': self.joe},
                       follow_redirects=False)
        self.assertEqual(r.code, 400)


class TestStreamsAndAssign(CCTestCase):

    def setUp(self):
        super().setUp()
        self.joe = self.add_manager('joe@x.org')
        self.donor = self.add_donor()

    def post_stream(self, tid, code=200, token=None):
        c, body = self.fetch_json('/streams', 'POST', {
            'target_id': tid, 'files': {'state.xml': 'seed'}},
            token=token or self.joe)
        self.assertEqual(c, code, body)
        return body.get('stream_id')

    def assign(self, code=200, **fields):
        body = {'engine': 'openmm', 'engine_version': '6.0'}
        body.update(fields)
        c, reply = self.fetch_json('/core/assign', 'POST', body)
        self.assertEqual(c, code, reply)
        return reply

    def test_placement_even_and_files_once(self):
        a, b, c = self.add_ws('a'), self.add_ws('b'), self.add_ws('c')
        tid = self.post_target(self.joe)
        sids = [self.post_stream(tid) for _ in range(9)]
        self.assertEqual(len(set(sids)), 9)
        for ws in (a, b, c):
            streams = ws.streams()
            self.assertEqual(len(streams), 3)
            self.assertEqual({h['target_id'] for h in streams.values()},
                             {tid})
            for sid in streams:
                self.assertEqual(ws.storage.stream_files(sid),
                                 {'state.xml': 'seed'})
            self.assertEqual(ws.targets(), {tid: TARGET_FILES})
            # the files went along only with the first stream
            posts = [body for m, p, body in ws.calls
                     if (m, p) == ('POST', '/streams')]
            self.assertEqual(len(posts), 3)
            self.assertIn('target_files', posts[0])
            self.assertTrue(all('target_files' not in p for p in posts[1:]))
        self.assertEqual(self.info(tid, self.joe)['striated_ws'],
                         ['a', 'b', 'c'])
        c_, listing = self.fetch_json('/targets/streams/' + tid,
                                      token=self.joe)
        self.assertEqual(c_, 200)
        self.assertEqual({s for ws in listing.values() for s in ws},
                         set(sids))
        # allowed_ws narrows placement
        c_, _ = self.fetch_json('/targets/update/' + tid, 'PUT',
                                {'allowed_ws': ['b']}, token=self.joe)
        self.post_stream(tid)
        self.assertEqual((len(a.streams()), len(b.streams()),
                          len(c.streams())), (3, 4, 3))

    def test_ws_that_lost_target_gets_files_again(self):
        ws = self.add_ws('a')
        tid = self.post_target(self.joe)
        self.post_stream(tid)
        ws.storage.remove_target(tid)  # its folder is gone from the disk
        self.assertEqual(ws.targets(), {})
        self.post_stream(tid)
        self.assertEqual(len(ws.streams()), 2)
        self.assertEqual(ws.targets(), {tid: TARGET_FILES})
        # the WS refused the post without files, the CC sent them again
        posts = [body for m, p, body in ws.calls
                 if (m, p) == ('POST', '/streams')]
        self.assertEqual(['target_files' in p for p in posts],
                         [True, False, True])

    def test_stream_commands_routed(self):
        a, b = self.add_ws('a'), self.add_ws('b')
        tid = self.post_target(self.joe)
        s1, s2 = self.post_stream(tid), self.post_stream(tid)
        for sid in (s1, s2):
            ws, other = (a, b) if sid.endswith(':a') else (b, a)
            self.assertIn(sid, ws.streams())
            self.assertNotIn(sid, other.streams())
            for action, status in (('stop', 'STOPPED'), ('start', 'OK')):
                c, _ = self.fetch_json('/streams/%s/%s' % (action, sid),
                                       'PUT', token=self.joe)
                self.assertEqual(c, 200)
                self.assertEqual(ws.streams()[sid]['status'], status)
                self.assertEqual(ws.storage.stream_meta(sid)['status'],
                                 status)
            c, body = self.fetch_json('/streams/info/' + sid, token=self.joe)
            self.assertEqual((c, body['target_id']), (200, tid))
        c, _ = self.fetch_json('/streams/delete/' + s1, 'PUT', token=self.joe)
        self.assertEqual(c, 200)
        c, body = self.fetch_json('/streams/info/' + s1, token=self.joe)
        self.assertError(c, 404, body)
        emptied = a if s1.endswith(':a') else b
        self.assertEqual((emptied.streams(), emptied.targets()), ({}, {}))
        self.assertEqual(len(self.info(tid, self.joe)['striated_ws']), 1)
        # the emptied WS gets the target files again with its next stream
        for _ in range(2):
            self.post_stream(tid)
        self.assertEqual(len(a.streams()) + len(b.streams()), 3)
        self.assertEqual(a.targets(), {tid: TARGET_FILES})
        self.assertEqual(b.targets(), {tid: TARGET_FILES})

    def test_no_ws_online(self):
        tid = self.post_target(self.joe)
        c, body = self.fetch_json('/streams', 'POST', {
            'target_id': tid, 'files': {'state.xml': 'x'}}, token=self.joe)
        self.assertError(c, 503, body)
        self.register_dead_ws('dead')
        c, body = self.fetch_json('/streams', 'POST', {
            'target_id': tid, 'files': {'state.xml': 'x'}}, token=self.joe)
        self.assertError(c, 503, body)
        self.assertEqual(self.info(tid, self.joe)['striated_ws'], [])

    def test_placement_skips_failing_ws(self):
        self.register_dead_ws('dead')
        ws = self.add_ws('alive')
        tid = self.post_target(self.joe)
        for _ in range(3):
            self.post_stream(tid)
        self.assertEqual(len(ws.streams()), 3)

    def test_bad_stream_input(self):
        self.add_ws('a')
        tid = self.post_target(self.joe)
        for body in ({}, {'target_id': tid}, {'target_id': 'x', 'files': {
                'a': 'b'}}, {'target_id': tid, 'files': {}},
                {'target_id': tid, 'files': {'a/b': 'x'}},
                {'target_id': tid, 'files': {'a.b64': '!!'}},
                {'target_id': tid, 'files': 'a'}, {'target_id': [tid],
                                                   'files': {'a': 'b'}}):
            c, reply = self.fetch_json('/streams', 'POST', body,
                                       token=self.joe)
            self.assertError(c, 400, reply)
        c, reply = self.fetch_json('/streams', 'POST', {
            'target_id': '00000000-0000-4000-8000-000000000000',
            'files': {'a': 'b'}}, token=self.joe)
        self.assertError(c, 404, reply)
        for path in ('/streams/start/x', '/streams/stop/1:2'):
            c, reply = self.fetch_json(path, 'PUT', token=self.joe)
            self.assertError(c, 400, reply)
        c, reply = self.fetch_json(
            '/streams/start/00000000-0000-4000-8000-000000000000:a', 'PUT',
            token=self.joe)
        self.assertError(c, 404, reply)

    def test_assign(self):
        a = self.add_ws('a')
        tid = self.post_target(self.joe, options={'steps_per_frame': 7})
        sid = self.post_stream(tid)
        # private: never handed out
        self.assertIn('error', self.assign(503))
        self.assertIn('error', self.assign(403, target_id=tid))
        self.assertIn('error', self.assign(503, stage='beta'))
        self.fetch_json('/targets/update/' + tid, 'PUT', {'stage': 'beta'},
                        token=self.joe)
        self.assign(503)
        reply = self.assign(stage='beta', donor_token=self.donor)
        url = 'https://127.0.0.1:%d/core/start' % a.port
        token = reply.pop('token')
        self.assertEqual(reply, {'uri': url, 'url': url,
                                 'options': {'steps_per_frame': 7}})
        self.assertEqual(a.stream_of(token), sid)
        c, active = self.ws_json(a, '/active_streams')
        self.assertEqual(c, 200, active)
        self.assertEqual(active[tid][sid]['donor'], 'jesse')
        self.assertIn('error', self.assign(503, stage='beta'))
        c, _ = self.fetch_json('/targets/update/' + tid, 'PUT',
                               {'stage': 'public'}, token=self.joe)
        s2 = self.post_stream(tid)
        self.assign(503, engine_version='5.0')
        self.assign(503, engine='other')
        reply = self.assign(target_id=tid)
        self.assertEqual(a.stream_of(reply['token']), s2)
        c, active = self.ws_json(a, '/active_streams')
        self.assertEqual(c, 200, active)
        self.assertIsNone(active[tid][s2]['donor'])
        self.assertIn('error', self.assign(503))
        self.assertIn('error', self.assign(
            404, target_id='00000000-0000-4000-8000-000000000000'))

    def test_concurrent_assignments_share_activation_calls(self):
        """Issue 15: assignments asked while an activation call to a WS
        is in flight go together in its next call. Each still gets its own
        stream and token, the WS records each one's donor, and those
        beyond the free streams get 503."""
        a = self.add_ws('a')
        tid = self.post_target(self.joe, stage='public')
        sids = {self.post_stream(tid) for _ in range(10)}
        client = AsyncHTTPClient(force_instance=True, max_clients=32)
        self.addCleanup(client.close)

        def ask(i):
            body = {'engine': 'openmm', 'engine_version': '6.0'}
            if i % 2:
                body['donor_token'] = self.donor
            return client.fetch(self.get_url('/core/assign'), method='POST',
                                body=json.dumps(body), raise_error=False,
                                ca_certs=certs()['ca'])
        replies = self.sync(lambda: asyncio.gather(*(ask(i)
                                                     for i in range(14))))
        ok = [(i, json.loads(r.body)['token'])
              for i, r in enumerate(replies) if r.code == 200]
        self.assertEqual(sorted(r.code for r in replies),
                         [200] * 10 + [503] * 4)
        given = {a.stream_of(token): i for i, token in ok}
        self.assertEqual(set(given), sids)  # one token per stream
        c, active = self.ws_json(a, '/active_streams')
        self.assertEqual(c, 200, active)
        self.assertEqual({sid: s['donor'] for sid, s in active[tid].items()},
                         {sid: 'jesse' if i % 2 else None
                          for sid, i in given.items()})
        calls = [body for m, p, body in a.calls
                 if (m, p) == ('POST', '/streams/activate')]
        self.assertLess(len(calls), 14)
        self.assertTrue(any(len(b.get('activations', ())) > 1
                            for b in calls), calls)
        # Alone again, an activation goes in the single form.
        del a.calls[:]
        self.fetch_json('/streams/stop/' + next(iter(sids)), 'PUT',
                        token=self.joe)
        self.fetch_json('/streams/start/' + next(iter(sids)), 'PUT',
                        token=self.joe)
        self.assign()
        self.assertEqual([('target_id' in b, 'activations' in b)
                          for m, p, b in a.calls
                          if p == '/streams/activate'], [(True, False)])

    def test_assign_returns_options_as_stored(self):
        """Options go back as the target stored them (the CC sends the
        stored JSON text as is): nesting, unicode, empty."""
        self.add_ws('a')
        options = {'nested': [1, {'b': '\u00e9\u2603'}], 'x': None,
                   'f': 0.5, 'quote': 'a "b" \\ c'}
        for opts in (options, {}):
            tid = self.post_target(self.joe, stage='public', options=opts,
                                   engine_versions=['opt'])
            self.post_stream(tid)
            reply = self.assign(engine_version='opt')
            self.assertEqual(reply['options'], opts)
            self.assertEqual(sorted(reply), ['options', 'token', 'uri',
                                             'url'])

    def test_assign_bad_input(self):
        for body in ({}, {'engine': 'openmm'}, {'engine_version': '6'},
                     {'engine': 1, 'engine_version': '6'},
                     {'engine': 'openmm', 'engine_version': 6},
                     {'engine': 'openmm', 'engine_version': '6',
                      'stage': 'private'},
                     {'engine': 'openmm', 'engine_version': '6',
                      'target_id': 'nope'},
                     {'engine': 'openmm', 'engine_version': '6',
                      'target_id': 5},
                     {'engine': 'openmm', 'engine_version': '6',
                      'donor_token': 5},
                     {'engine': 'openmm', 'engine_version': '6',
                      'core_version': 5}):
            c, reply = self.fetch_json('/core/assign', 'POST', body)
            self.assertError(c, 400, reply)
        c, reply = self.fetch_json('/core/assign', 'POST', {
            'engine': 'openmm', 'engine_version': '6',
            'donor_token': 'unknown'})
        self.assertError(c, 401, reply)
        c, reply = self.fetch_json('/core/assign', 'POST', b'{')
        self.assertError(c, 400, reply)

    def test_assign_skips_offline_and_failing_ws(self):
        a, b = self.add_ws('a'), self.add_ws('b')
        tid = self.post_target(self.joe, stage='public')
        sids = {self.post_stream(tid) for _ in range(4)}
        b.stop()
        # b is still marked online: its failure is skipped, a serves
        got = {a.stream_of(self.assign()['token']) for _ in range(2)}
        self.assertEqual(got, {s for s in sids if s.endswith(':a')})
        self.assign(503)
        # b offline after max_ws_fails: not even asked
        self.sync(lambda: workservers.probe_all(self.app))
        self.sync(lambda: workservers.probe_all(self.app))
        self.sync(lambda: workservers.probe_all(self.app))
        self.assertFalse(self.fetch_json('/ws/status')[1]['b']['online'])
        # asking the down b would count one more failure of it
        fails = self.sync(lambda: self.redis.hget(keys.ws('b'), 'fails'))
        self.assign(503)
        self.assertEqual(self.sync(lambda: self.redis.hget(keys.ws('b'),
                                                           'fails')), fails)
        b.start()
        self.sync(lambda: workservers.probe_all(self.app))
        self.assertTrue(self.fetch_json('/ws/status')[1]['b']['online'])
        got = {b.stream_of(self.assign()['token']) for _ in range(2)}
        self.assertEqual(got, {s for s in sids if s.endswith(':b')})

    def test_draining_ws_gets_no_streams_nor_activations(self):
        a, b = self.add_ws('a'), self.add_ws('b')
        admin = self.add_manager('root@x.org', role='admin')
        tid = self.post_target(self.joe, stage='public')
        sids = {self.post_stream(tid) for _ in range(4)}
        self.assertEqual(self.fetch_json('/ws/drain/b', 'PUT', {
            'drain': True}, token=admin), (200, {}))
        sids |= {self.post_stream(tid) for _ in range(3)}
        on_a = {s for s in sids if s.endswith(':a')}
        self.assertEqual(len(on_a), 5)
        got = {a.stream_of(self.assign()['token']) for _ in range(5)}
        self.assertEqual(got, on_a)
        self.assign(503)  # b's two idle streams are not handed out
        # A target only b may hold waits.
        only_b = self.post_target(self.joe, allowed_ws=['b'])
        c, body = self.fetch_json('/streams', 'POST', {
            'target_id': only_b, 'files': {'state.xml': 'x'}},
            token=self.joe)
        self.assertError(c, 503, body)
        self.assertIn('draining', body['error'])
        # Undrained, b serves again.
        self.fetch_json('/ws/drain/b', 'PUT', {'drain': False}, token=admin)
        got = {b.stream_of(self.assign()['token']) for _ in range(2)}
        self.assertEqual(got, sids - on_a)
        self.post_stream(only_b)

    def test_weighted_choice(self):
        """Weight 0.001 vs 1000: the heavy target is chosen first."""
        self.add_ws('a')
        light = self.post_target(self.joe, stage='public', weight=0.001)
        heavy = self.post_target(self.joe, stage='public', weight=1000)
        for tid in (light, heavy):
            for _ in range(3):
                self.post_stream(tid)
        firsts = [self.assign()['token'] for _ in range(3)]
        ws = self.workservers[0]
        streams = ws.streams()
        owners = [streams[ws.stream_of(t)]['target_id'] for t in firsts]
        # each draw picks heavy unless u**(1/1000) < v**(1000): practically
        # never; the last three go to light once heavy is exhausted
        self.assertEqual(owners.count(heavy), 3)
        rest = [self.assign()['token'] for _ in range(3)]
        self.assertEqual({streams[ws.stream_of(t)]['target_id']
                          for t in rest},
                         {light})

    def test_delete_target_with_ws_down(self):
        a, b = self.add_ws('a'), self.add_ws('b')
        tid = self.post_target(self.joe)
        for _ in range(4):
            self.post_stream(tid)
        b.stop()
        c, body = self.fetch_json('/targets/delete/' + tid, 'PUT',
                                  token=self.joe)
        self.assertEqual(c, 200, body)
        self.assertEqual((a.streams(), a.targets()), ({}, {}))
        self.assertEqual(len(b.streams()), 2)
        self.assertEqual(self.sync(lambda: self.redis.smembers(
            keys.ws_pending_deletes('b'))), {tid})
        self.sync(lambda: workservers.probe_all(self.app))  # still down
        self.assertEqual(len(b.streams()), 2)
        b.start()
        self.sync(lambda: workservers.probe_all(self.app))
        self.sync(lambda: self.app.flushing['b'])
        self.assertEqual(b.streams(), {})
        self.assertEqual(b.targets(), {})
        self.assertEqual(self.sync(lambda: self.redis.smembers(
            keys.ws_pending_deletes('b'))), set())

    def test_reregistration_finishes_pending_deletion(self):
        a = self.add_ws('a')
        tid = self.post_target(self.joe)
        self.post_stream(tid)
        a.stop()
        c, _ = self.fetch_json('/targets/delete/' + tid, 'PUT',
                               token=self.joe)
        self.assertEqual(c, 200)
        self.assertEqual(len(a.streams()), 1)
        a.start()
        c, _ = self.fetch_json('/ws/register', 'PUT', a.register_body(),
                               token=CC_PASS)
        self.assertEqual(c, 200)
        self.sync(lambda: self.app.flushing['a'])
        self.assertEqual((a.streams(), a.targets()), ({}, {}))
        self.assertEqual(self.sync(lambda: self.redis.smembers(
            keys.ws_pending_deletes('a'))), set())

    def test_removed_ws_gets_its_pending_deletions_back(self):
        # Issue 22 point 8: a target deleted while its WS was down, the WS
        # removed by an admin and restarted: it must not keep the target.
        admin = self.add_manager('root@x.org', role='admin')
        a = self.add_ws('a')
        tid = self.post_target(self.joe)
        self.post_stream(tid)
        a.stop()
        c, _ = self.fetch_json('/targets/delete/' + tid, 'PUT',
                               token=self.joe)
        self.assertEqual(c, 200)
        for _ in range(self.settings.max_ws_fails):
            self.sync(lambda: workservers.record_failure(self.app, 'a'))
        self.assertEqual(self.fetch_json('/ws/remove/a', 'PUT', token=admin),
                         (200, {}))
        a.start()
        self.assertEqual(len(a.streams()), 1)
        c, _ = self.fetch_json('/ws/register', 'PUT', a.register_body(),
                               token=CC_PASS)
        self.assertEqual(c, 200)
        self.sync(lambda: self.app.flushing['a'])
        self.assertEqual((a.streams(), a.targets()), ({}, {}))
        self.assertEqual(self.sync(lambda: self.redis.smembers(
            keys.ws_pending_deletes('a'))), set())

    def test_deleted_while_placing_is_undone(self):
        """A target deleted between reservation and record: the stream the
        WS just made is removed again and the caller gets 404."""
        a = self.add_ws('a')
        tid = self.post_target(self.joe)
        from server.cc import streams, targets
        real_post = streams._post_to

        async def post_then_delete(app, ws, base, has_files, target, files,
                                   tags):
            sid = await real_post(app, ws, base, has_files, target, files,
                                  tags)
            await targets.delete(app, target.target_id)
            return sid
        streams._post_to = post_then_delete
        try:
            c, body = self.fetch_json('/streams', 'POST', {
                'target_id': tid, 'files': {'state.xml': 'x'}},
                token=self.joe)
        finally:
            streams._post_to = real_post
        self.assertError(c, 404, body)
        self.assertEqual((a.streams(), a.targets()), ({}, {}))
        self.assertEqual(self.sync(lambda: self.redis.keys('*' + tid + '*')),
                         [])
        self.assertEqual(self.sync(lambda: self.redis.keys('stream:*')), [])


class TestRogueWorkserver(TestStreamsAndAssign):
    """A WS that holds the cc_pass and lies: the real WS of this process
    with one of its answers replaced (issue 22)."""

    def test_listing_keeps_only_streams_placed_there(self):
        a = self.add_ws('a')
        self.add_ws('b')
        tid = self.post_target(self.joe)
        sids = [self.post_stream(tid) for _ in range(4)]
        on_a = sorted(s for s in sids if s.endswith(':a'))
        on_b = sorted(s for s in sids if s.endswith(':b'))
        real = ws_streams.target_streams

        async def lying(app, target_id, cc):
            listing = await real(app, target_id, cc)
            if app is a.app:
                entry = {'status': 'OK', 'frames': 0, 'error_count': 0,
                         'active': False, 'tags': {}}
                listing['../../../../../../../y'] = entry
                listing['/etc/passwd'] = entry
                listing[on_b[0]] = entry  # another WS's stream
                listing['%s:a' % uuid.uuid4()] = entry  # never placed
                listing[on_a[0]] = 'not an object'
            return listing

        with mock.patch.object(ws_streams, 'target_streams', lying):
            c, body = self.fetch_json('/targets/streams/' + tid,
                                      token=self.joe)
        self.assertEqual(c, 200, body)
        self.assertEqual(sorted(body['a']), on_a[1:])
        self.assertEqual(sorted(body['b']), on_b)

    def test_reconciliation_adopts_nothing_malformed(self):
        a = self.add_ws('a')
        tid = self.post_target(self.joe)
        sid = self.post_stream(tid)
        real = ws_streams.all_streams
        bad = ['../../../../../../../y', '%s:b' % uuid.uuid4(), 'x:a']

        async def lying(app, cc):
            listing = await real(app, cc)
            listing.update({s: 0 for s in bad})
            listing['%s:a' % uuid.uuid4()] = 'yesterday'
            return listing

        with mock.patch.object(ws_streams, 'all_streams', lying):
            self.sync(lambda: reconcile.reconcile_ws(self.app, 'a'))
        self.assertEqual(self.sync(lambda: self.redis.smembers(
            keys.target_streams(tid))), {sid})
        self.assertEqual(len(a.streams()), 1)

    def test_reports_are_checked(self):
        a = self.add_ws('a')
        tid = self.post_target(self.joe, stage='public')
        other = self.post_target(self.joe, stage='public')  # none on a
        sids = [self.post_stream(tid) for _ in range(2)]
        now = time.time()

        def record(sid, frames, **more):
            r = {'id': uuid.uuid4().hex, 'donor': '', 'engine': 'openmm',
                 'core_version': '1', 'target_id': tid, 'stream_id': sid,
                 'start': repr(now - 60), 'end': repr(now),
                 'reason': 'stop', 'frames': frames}
            r.update(more)
            return r
        bogus = [record(sids[0], 10 ** 15),
                 record('%s:a' % uuid.uuid4(), 5),   # never placed
                 record(sids[1], 4, target_id=other),  # not its target
                 record(sids[1], 3)]                 # the honest one

        async def outbox():
            for r in bogus:
                await a.redis.xadd(a.keys.outbox(self.settings.name), r)
        self.sync(outbox)

        async def summary(app, cc=None):
            return ['x'], {
                tid: {'queued': 10 ** 15, 'active': 'many', 'stopped': -1},
                other: {'queued': 7, 'active': 7, 'stopped': 7},
                str(uuid.uuid4()): {'queued': 1, 'active': 1, 'stopped': 1},
                '../x': 5}

        async def per_minute(app, cc):
            return {str(int(now // 60)): {'frames': 10 ** 15, 'errors': 'x'},
                    'soon': {'frames': 1}, '99999999999': 3}

        with mock.patch.object(ws_sessions, 'summary', summary), \
                mock.patch.object(ws_sessions, 'per_minute', per_minute):
            self.sync(lambda: collect.pull(self.app, 'a'))
        c, status = self.fetch_json('/status')
        self.assertEqual(c, 200, status)
        self.assertEqual(status['streams'], {
            'total': 2, 'active': 0, 'idle': 2, 'stopped': 0})
        self.assertEqual(status['targets'], {
            tid: {'queued': 2, 'active': 0},
            other: {'queued': 0, 'active': 0}})
        self.assertLessEqual(max(status['history']['frames']), 2 * 60)
        self.assertEqual(status['history']['errors'], [0] * 60)
        c, stats = self.fetch_json('/targets/stats/' + tid, token=self.joe)
        self.assertEqual((c, stats['frames'], stats['sessions']), (200, 3, 1))
        c, stats = self.fetch_json('/targets/stats/' + other, token=self.joe)
        self.assertEqual((c, stats['frames']), (200, 0))
        # reports in Redis from before these checks do not break /status
        self.sync(lambda: self.redis.hset(keys.ws_report('a'), mapping={
            'streams': '[1]', 'targets': '"x"', 'per_minute': '{',
            'disk_free_mb': 'many'}))
        self.assertEqual(self.fetch_json('/status')[0], 200)


class TestTargetQuotas(CCTestCase):
    conf = {'max_target_files_per_manager_in_bytes': 3 * 1024 * 1024,
            'max_target_files_total_in_bytes': 9 * 512 * 1024}

    def setUp(self):
        super().setUp()
        self.joe = self.add_manager('joe@x.org')
        self.bob = self.add_manager('bob@x.org')

    def big(self, token, code, mib=1):
        text = base64.b64encode(os.urandom(mib * 768 * 1024)).decode()
        return self.post_target(token, code, files={'a.b64': text})

    def used_memory(self):
        return self.sync(lambda: self.redis.info('memory'))['used_memory']

    def test_quota_per_manager_and_in_all(self):
        joes = [self.big(self.joe, 200) for _ in range(2)]
        before = self.used_memory()
        c, body = self.fetch_json('/targets', 'POST', {
            'engine': 'openmm', 'engine_versions': ['6.0'],
            'files': {'a.b64': base64.b64encode(
                os.urandom(2 * 768 * 1024)).decode()}}, token=self.joe)
        self.assertError(c, 507, body)
        self.assertIn('manager', body['error'])
        self.assertLess(self.used_memory() - before, 512 * 1024)
        bobs = [self.big(self.bob, 200) for _ in range(2)]
        c, body = self.fetch_json('/targets', 'POST', {
            'engine': 'openmm', 'engine_versions': ['6.0'],
            'files': {'a.b64': 'AAAA' * 230000}}, token=self.bob)
        self.assertError(c, 507, body)
        self.assertIn('full', body['error'])
        # deleting gives the bytes back
        for tid, token in [(t, self.joe) for t in joes] + [(bobs[0],
                                                             self.bob)]:
            self.assertEqual(self.fetch_json('/targets/delete/' + tid, 'PUT',
                                             token=token)[0], 200)
        self.big(self.joe, 200, mib=2)
        self.assertEqual(self.sync(lambda: self.redis.hgetall(
            keys.TARGET_BYTES)), {'joe@x.org': str(2 * 1024 * 1024 + 5),
                                  'bob@x.org': str(1024 * 1024 + 5)})


class TestStoreFull(CCTestCase):

    def test_a_full_store_is_a_507(self):
        joe = self.add_manager('joe@x.org')
        used = self.sync(lambda: self.redis.info('memory'))['used_memory']
        sync = store.connect_sync(self.redis_server.url)
        try:
            sync.config_set('maxmemory', used + 256 * 1024)
            c, body = self.fetch_json('/targets', 'POST', {
                'engine': 'openmm', 'engine_versions': ['6.0'],
                'files': {'a.b64': base64.b64encode(
                    os.urandom(1024 * 1024)).decode()}}, token=joe)
            self.assertError(c, 507, body)
            self.assertIn('full', body['error'])
            # Past it: writes in Lua scripts (the quota's) are refused too.
            sync.config_set('maxmemory', used // 2)
            c, body = self.fetch_json('/targets', 'POST', {
                'engine': 'openmm', 'engine_versions': ['6.0'],
                'files': {'a.b64': 'AAAA'}}, token=joe)
            self.assertError(c, 507, body)
            c, body = self.fetch_json('/donors', 'POST', {
                'username': 'jesse', 'email': 'jv@x.org', 'password': 'pw'})
            self.assertError(c, 507, body)
        finally:
            sync.config_set('maxmemory', 0)
            sync.close()
        self.assertEqual(self.sync(lambda: self.redis.keys('target:*')), [])
