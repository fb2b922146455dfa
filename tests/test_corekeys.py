"""Core keys (2015 form) with real processes and the reference core: admin
only, the key decides the engine, a revoked or missing key is a 401 that
tells the core to update, and the `siegetank keys` commands."""
import unittest

import requests

from siegetank.client import SiegetankError
from siegetank.core import Core, Fatal, make_engine, synthetic
from tests.cluster import Cluster
from tests.test_cli import CLITestCase


class TestCoreKeys(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(cc_values={'require_core_keys': True}).start()
        cls.target, _ = cls.cluster.synthetic_target(streams=2)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def assign(self, key=None, **body):
        body = dict({'engine_version': synthetic.VERSION}, **body)
        headers = {'Authorization': key} if key else {}
        return requests.post('https://%s/core/assign' % self.cluster.address,
                             json=body, headers=headers,
                             verify=self.cluster.ca, timeout=30)

    def core(self, key, frames=3):
        return Core(self.cluster.address, make_engine('synthetic', rate=500),
                    ca=self.cluster.ca, target_id=self.target.id,
                    max_frames=frames, checkpoint_every=0.01, core_key=key)

    def test_admin_only(self):
        c = self.cluster
        manager = c.client(c.admin.create_manager('m@keys.org', 'pw'))
        for client, status in ((manager, 403), (c.client(), 401)):
            for call in (lambda client=client: client.create_core_key(
                             'synthetic'),
                         client.core_keys,
                         lambda client=client: client.revoke_core_key(
                             '0' * 16)):
                with self.assertRaises(SiegetankError) as e:
                    call()
                self.assertEqual(e.exception.status, status)
        with self.assertRaises(SiegetankError) as e:
            c.admin.revoke_core_key('0' * 16)
        self.assertEqual(e.exception.status, 404)

    def test_key_decides_engine_and_revocation_refuses(self):
        admin = self.cluster.admin
        made = admin.create_core_key('synthetic', 'core 1.0 build')
        key, key_id = made['key'], made['key_id']
        listed = admin.core_keys()[key_id]
        self.assertEqual((listed['engine'], listed['description'],
                          listed['last_used']),
                         ('synthetic', 'core 1.0 build', None))
        self.assertNotIn(key, repr(admin.core_keys()))
        self.assertNotIn(key, repr(self.cluster.cc.redis().keys('*')))

        # Required: no key is a 401 telling the core to update.
        r = self.assign(engine='synthetic')
        self.assertEqual(r.status_code, 401)
        self.assertIn('update', r.json()['error'])
        # The key's engine; a body engine that differs is a 400.
        r = self.assign(key, engine='openmm')
        self.assertEqual(r.status_code, 400)
        self.assertIn('engine', r.json()['error'])
        self.assertEqual(self.core(key).run()['checkpoints'] > 0, True)
        self.assertIsNotNone(admin.core_keys()[key_id]['last_used'])
        r = self.assign('Bearer ' + key, target_id=self.target.id)
        self.assertEqual(r.status_code, 200, r.text)

        admin.revoke_core_key(key_id)
        self.assertNotIn(key_id, admin.core_keys())
        r = self.assign(key, engine='synthetic')
        self.assertEqual(r.status_code, 401)
        self.assertIn('revoked', r.json()['error'])
        self.assertIn('update', r.json()['error'])
        with self.assertRaises(Fatal) as e:
            self.core(key).run()
        self.assertIn('revoked', str(e.exception))
        r = self.assign('not-a-key', engine='synthetic')
        self.assertEqual(r.status_code, 401)
        self.assertIn('update', r.json()['error'])


class TestFleetCLI(CLITestCase):
    """`siegetank keys`, `status`, `donors` and `targets stats`."""

    def test_keys_status_and_stats_commands(self):
        c = self.cluster
        self.ok('--cc', c.address, '--ca', c.ca, 'login', '--token',
                c.admin.token)
        out = self.ok('keys', 'create', 'synthetic', '--description', 'v1')
        key_id, key = out.split()[2], out.split()[-1]
        self.assertEqual(len(key), 64)
        self.assertIn(key_id, self.ok('keys', 'list'))
        self.assertIn('v1', self.ok('keys', 'list'))
        self.ok('keys', 'revoke', key_id)
        self.assertNotIn(key_id, self.ok('keys', 'list'))
        code, _, err = self.run_cli('keys', 'revoke', key_id)
        self.assertEqual(code, 1)
        self.assertIn('404', err)

        target, _ = c.synthetic_target(streams=1)
        token = c.admin.create_donor('cli-donor', 'pw', 'cd@test.org')
        stats = Core(c.address, make_engine('synthetic', rate=500),
                     ca=c.ca, donor_token=token, target_id=target.id,
                     max_frames=7, checkpoint_every=0.01).run()
        self.assertEqual(stats['frames'], 7)
        from tools.testing import wait_for
        wait_for(lambda: c.client().donor_stats('cli-donor')['sessions'],
                 'the session recorded')
        out = self.ok('donors', 'stats', 'cli-donor')
        self.assertEqual(out.splitlines()[1].split()[:4],
                         ['cli-donor', '7', '1', '1'])
        out = self.ok('donors', 'top', '-n', '5')
        self.assertIn('cli-donor', out)
        out = self.ok('targets', 'stats', target.id)
        self.assertIn('frames', out)
        self.assertIn('ended by stop', out)
        out = self.ok('status')
        for word in ('workserver', 'online', 'cores active',
                     'frames, last hour', 'address'):
            self.assertIn(word, out)
        self.assertIn(c.ws[0].name, out)


if __name__ == '__main__':
    unittest.main()
