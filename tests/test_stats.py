"""Session stats, /status and core keys with real processes: a CC, two
workservers and real cores of several donors plus an anonymous one; every
figure is checked against the frames the workservers committed, across a
WS crash, a CC restart, an expiry and a manager's stop."""
import base64
import gzip
import os
import signal
import subprocess
import sys
import threading
import time
import unittest

import requests

from siegetank.core import Core, make_engine, synthetic
from tests.cluster import Cluster
from tools.testing import ROOT, certs, wait_for


def b64(data):
    return base64.b64encode(data).decode()


class ManualCore:
    """The core protocol by hand, to end a session exactly when and how a
    test wants."""

    def __init__(self, cluster, donor_token=None, key=None):
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = certs()['ca']
        body = {'engine': 'synthetic', 'engine_version': synthetic.VERSION,
                'core_version': 'manual-1', 'stage': 'beta'}
        if donor_token:
            body['donor_token'] = donor_token
        headers = {'Authorization': key} if key else {}
        r = self.session.post('https://%s/core/assign' % cluster.address,
                              json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        self.token = r.json()['token']
        self.base = r.json()['url'].rsplit('/core/start', 1)[0]
        self.stream_id = self.call('GET', '/core/start')['stream_id']
        self.frames = 0

    def call(self, method, path, body=None):
        r = self.session.request(method, self.base + path, json=body,
                                 headers={'Authorization': self.token},
                                 timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def commit(self, n):
        for i in range(n):
            self.call('PUT', '/core/frame', {
                'files': {'frames.dat.b64': b64(b'f%d' % (self.frames + i))}})
        self.call('PUT', '/core/checkpoint', {
            'files': {'state.xml.gz.b64': b64(gzip.compress(b'state'))}})
        self.frames += n


class TestSessionStats(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(n_ws=2, cc_values={'stats_interval_in_ms': 200},
                              heartbeat_increment=3,
                              pulse_frequency_in_ms=200).start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def run_cores(self, target_id, plan):
        """plan: [(donor token or None, frames)]; cores run at once, each
        checkpointing every few frames. Returns each core's stats."""
        results = [None] * len(plan)

        def run(i, token, frames):
            core = Core(self.cluster.address,
                        make_engine('synthetic', rate=200),
                        ca=self.cluster.ca, target_id=target_id,
                        donor_token=token, max_frames=frames,
                        checkpoint_every=0.02, heartbeat_every=1)
            results[i] = core.run()

        threads = [threading.Thread(target=run, args=(i, t, f))
                   for i, (t, f) in enumerate(plan)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results

    def committed(self, target):
        return sum(s['frames'] for s in target.stream_info().values())

    def test_every_figure_matches_the_committed_frames(self):
        c = self.cluster
        admin = c.admin
        tokens = {name: admin.create_donor(name, 'pw-' + name,
                                           name + '@test.org')
                  for name in ('alice', 'bob', 'carol')}
        target, sids = c.synthetic_target(streams=6, stage='beta')
        plan = [(tokens['alice'], 40), (tokens['alice'], 25),
                (tokens['bob'], 30), (None, 15)]
        results = self.run_cores(target.id, plan)
        self.assertTrue(all(r and r['checkpoints'] for r in results))
        # Each core's frames were all committed (its last checkpoint
        # before /core/stop): the WS agrees with the cores' sum.
        self.assertEqual(self.committed(target),
                         sum(r['frames'] for r in results))

        # A session of carol ended by a WS crash (3 frames committed, 1
        # buffered and lost), one ended by expiry (2), one by a manager's
        # stop (4), and one ended while the CC was down (5).
        crashed = ManualCore(c, tokens['carol'])
        crashed.commit(3)
        crashed.call('PUT', '/core/frame', {'files': {'x': 'lost'}})
        ws = next(w for w in c.ws if w.name == crashed.stream_id.split(':')[1])
        ws.kill()
        ws.start()
        silent = ManualCore(c, tokens['carol'])
        silent.commit(2)
        halted = ManualCore(c, tokens['bob'])
        halted.commit(4)
        admin.stream(halted.stream_id).stop()
        wait_for(lambda: not target.stream_info()[silent.stream_id]['active'],
                 'the silent core\'s stream to expire')
        late = ManualCore(c)
        late.commit(5)
        c.cc.stop()
        late.call('PUT', '/core/stop', {})
        c.cc.start()
        admin.stream(halted.stream_id).start()

        total = self.committed(target)
        sessions = sum(r['streams'] for r in results) + 4
        wait_for(lambda: admin.target_stats(target.id)['sessions']
                 == sessions, 'every session recorded', timeout=60)
        st = admin.target_stats(target.id)
        self.assertEqual(st['frames'], total)
        self.assertEqual(st['frames_last_24h'], total)
        self.assertEqual(st['active_cores'], 0)
        self.assertEqual(st['donors'], 3)
        self.assertEqual(st['by_end_reason'], {
            'stop': sum(r['streams'] for r in results) + 1,
            'ws_restart': 1, 'expiry': 1, 'manager_stop': 1})

        def frames_of(name):
            return sum(r['frames'] for (t, _), r in zip(plan, results,
                                                        strict=True)
                       if t == tokens[name])

        def sessions_of(name):
            return sum(r['streams'] for (t, _), r in zip(plan, results,
                                                         strict=True)
                       if t == tokens[name])

        anon = c.client()
        expected = {'alice': (frames_of('alice'), sessions_of('alice')),
                    'bob': (frames_of('bob') + 4, sessions_of('bob') + 1),
                    'carol': (3 + 2, 2)}
        for name, (frames, n) in expected.items():
            got = anon.donor_stats(name)
            self.assertEqual((got['frames'], got['sessions'],
                              got['targets']), (frames, n, 1), name)
            self.assertGreater(got['last_seen'], time.time() - 600)
        # The anonymous core's frames count for the target only.
        self.assertEqual(sum(f for f, _ in expected.values())
                         + frames_of_anonymous(plan, results) + 5, total)
        top = anon.top_donors(2)
        ranked = sorted(expected.items(), key=lambda kv: -kv[1][0])[:2]
        self.assertEqual([(d['username'], d['frames'], d['sessions'])
                          for d in top],
                         [(n, f, s) for n, (f, s) in ranked])

        # /status: per-minute frames add up to what was committed, and the
        # streams and cores by state match the workservers.
        def settled():
            st = anon.status()
            return st if sum(st['history']['frames']) == total \
                and sum(st['history']['assignments']) == sessions \
                and st['streams']['total'] == 6 else None
        st = wait_for(settled, '/status to catch up')
        self.assertEqual(st['cores_active'], 0)
        self.assertEqual(st['streams'], {'total': 6, 'active': 0,
                                         'idle': 6, 'stopped': 0})
        self.assertEqual(sum(st['history']['assignments']),
                         sessions)
        self.assertEqual(set(st['workservers']),
                         {w.name for w in c.ws})
        self.assertTrue(all('detail' not in w
                            for w in st['workservers'].values()))
        detail = admin.status()['workservers']
        self.assertEqual(sum(w['detail']['sessions_recorded']
                             for w in detail.values()), sessions)
        self.assertEqual(sum(w['detail']['frames_recorded']
                             for w in detail.values()), total)

        # Donor stats are public; target stats are the owner's.
        other = c.client(admin.create_manager('other@test.org', 'pw'))
        with self.assertRaises(Exception) as e:
            other.target_stats(target.id)
        self.assertEqual(e.exception.status, 403)
        r = requests.get('https://%s/stats/donors?top=1001' % c.address,
                         verify=c.ca)
        self.assertEqual((r.status_code, 'error' in r.json()), (400, True))
        r = requests.get('https://%s/donors/stats/nobody' % c.address,
                         verify=c.ca)
        self.assertEqual(r.status_code, 404)


class TestManagerStops(unittest.TestCase):
    """A researcher stopping and deleting the streams a core works on (as
    adaptive sampling does all the time) is no core error: not in the
    core's own summary, not in the target's stats, not in /status."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(cc_values={'stats_interval_in_ms': 200},
                              pulse_frequency_in_ms=200).start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_a_managers_stop_and_deletion_are_not_core_errors(self):
        c = self.cluster
        target, _ = c.synthetic_target(streams=3)
        core = subprocess.Popen(
            [sys.executable, '-m', 'siegetank.core', '--cc', c.address,
             '--ca', c.ca, '--engine', 'synthetic', '--rate', '20',
             '--target-id', target.id, '--checkpoint-every', '0.1',
             '--heartbeat-every', '0.2', '--backoff-first', '0.05',
             '--backoff-max', '0.5', '-q'], cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        worked = []

        def working():
            """The stream the core works on now, once it committed."""
            for sid, info in target.stream_info().items():
                if info['active'] and info['frames'] and sid not in worked:
                    worked.append(sid)
                    return sid
            return None
        try:
            c.admin.stream(wait_for(working, 'a first stream')).stop()
            c.admin.stream(wait_for(working, 'a second stream')).delete()
            wait_for(working, 'a third stream')
            core.send_signal(signal.SIGTERM)
            _, err = core.communicate(timeout=60)
        finally:
            if core.poll() is None:
                core.kill()
                core.communicate()
        self.assertEqual(core.returncode, 0, err)
        summary = err.strip().splitlines()[-1]
        self.assertIn(' 3 streams (2 stopped by the manager), 0 errors',
                      summary)
        wait_for(lambda: c.admin.target_stats(target.id)['sessions'] == 3,
                 'the three sessions recorded')
        self.assertEqual(c.admin.target_stats(target.id)['by_end_reason'],
                         {'manager_stop': 1, 'deletion': 1, 'stop': 1})
        frames = c.admin.target_stats(target.id)['frames']

        def reported():
            st = c.admin.status()
            return st if sum(st['history']['assignments']) == 3 and sum(
                st['history']['frames']) == frames else None
        status = wait_for(reported, '/status to count what was done')
        self.assertEqual(sum(status['history']['errors']), 0)


def frames_of_anonymous(plan, results):
    return sum(r['frames'] for (t, _), r in zip(plan, results, strict=True)
               if t is None)


if __name__ == '__main__':
    unittest.main()
