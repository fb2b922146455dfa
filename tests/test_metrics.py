"""GET /metrics of real CC and WS processes with num_processes = 2:
prometheus_client's multiprocess mode sums every worker (also one that
died), starts from zero on a restart, counts frames and assignments, and
answers only loopback and `metrics_allow` networks."""
import http.client
import os
import signal
import socket
import ssl
import time
import unittest

import psutil
import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from tests.cluster import Cluster
from tools.testing import ServerProcess, certs, wait_for


def scrape(server):
    """{(name, labels as a sorted tuple): value} of one scrape, on a new
    connection (so any worker may answer)."""
    r = requests.get(server.url + '/metrics', verify=certs()['ca'],
                     timeout=30, headers={'Connection': 'close'})
    assert r.status_code == 200, r.text
    assert r.headers['Content-Type'].startswith('text/plain')
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests_of(sample, route, status='200', method='GET'):
    return sample.get(('siegetank_http_requests_total', (
        ('method', method), ('route', route), ('status', status))), 0)


def served_by(server, route):
    """The pids whose own counter file has requests of `route`."""
    folder = os.path.join(server.settings.data_folder, 'prometheus')
    pids = set()
    for f in os.listdir(folder):
        if f.startswith('counter_'):
            for key, value, _, _ in MmapedDict.read_all_values_from_file(
                    os.path.join(folder, f)):
                if route in key and 'requests' in key and value > 0:
                    pids.add(f.rsplit('_', 1)[1].split('.')[0])
    return pids


def local_address():
    """A non-loopback address of this host (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(('198.18.0.1', 9))
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()


class TestMetricsTwoProcesses(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(cc_values={'num_processes': 2},
                              num_processes=2).start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_counts_are_summed_over_workers(self):
        cc = self.cluster.cc
        # Requests of the set-up (the cluster polls /ws/status) reach the
        # files within FLUSH_MS: let them land before counting from here.
        time.sleep(1.5 * metrics.FLUSH_MS / 1000)
        before = requests_of(scrape(cc), '/ws/status')
        n = 0
        # New connections until both workers served some (each has its own
        # files; a worker adds its counts there within FLUSH_MS); then
        # every scrape, whichever worker answers, sees all n.
        for _ in range(30):
            for _ in range(20):
                r = requests.get(cc.url + '/ws/status', verify=certs()['ca'],
                                 headers={'Connection': 'close'}, timeout=30)
                self.assertEqual(r.status_code, 200)
                n += 1
            time.sleep(1.5 * metrics.FLUSH_MS / 1000)
            if len(served_by(cc, '/ws/status')) == 2:
                break
        self.assertEqual(len(served_by(cc, '/ws/status')), 2)
        wait_for(lambda: requests_of(scrape(cc), '/ws/status') == before + n,
                 'both workers\' counts')
        for _ in range(6):
            self.assertEqual(requests_of(scrape(cc), '/ws/status'),
                             before + n)
        sample = scrape(cc)
        self.assertEqual(sample[(
            'siegetank_http_request_duration_seconds_count',
            (('route', '/ws/status'), ('status', '200')))], before + n)

        # A worker killed: restarted, marked dead; its counts stay.
        workers = psutil.Process(cc.process.pid).children()
        workers = [p for p in workers if 'redis' not in p.name()]
        victim = workers[0].pid
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len([p for p in psutil.Process(
            cc.process.pid).children() if 'redis' not in p.name()
            and p.pid != victim]) == 2, 'the worker restarted')
        self.assertEqual(requests_of(scrape(cc), '/ws/status'), before + n)

    def test_frames_and_assignments(self):
        c = self.cluster
        target, _ = c.synthetic_target(streams=2)
        stats = c.run_core(target.id, 12, checkpoint_every=0.01)
        committed = sum(s['frames'] for s in target.stream_info().values())
        self.assertEqual(stats['frames'], committed)
        expected = {
            ('siegetank_frames_committed_total', ()): committed,
            ('siegetank_frames_received_total', ()): committed,
            ('siegetank_checkpoints_total', ()): stats['checkpoints'],
            ('siegetank_activations_total', ()): stats['streams'],
            ('siegetank_deactivations_total', (('reason', 'stop'),)):
                stats['streams'],
        }

        def counted(w):
            """Each worker adds its counts within FLUSH_MS, and the CC's
            activation may land on the other worker than the frames: wait
            for every count, not for some."""
            return ({k: w.get(k, 0) for k in expected} == expected
                    and requests_of(w, '/core/stop', method='PUT')
                    == stats['streams'])
        ws = wait_for(lambda: (lambda w: w if counted(w) else None)(
            scrape(c.ws[0])), 'both workers\' counts')
        self.assertEqual({k: ws.get(k, 0) for k in expected}, expected)
        self.assertEqual(ws[('siegetank_streams', (('state', 'ok'),))], 2)
        self.assertGreater(ws[('siegetank_disk_free_bytes', ())], 0)
        self.assertGreater(ws[('siegetank_redis_rtt_seconds', ())], 0)
        self.assertEqual(requests_of(ws, '/core/frame', method='PUT'), 12)
        cc = wait_for(lambda: (lambda s: s if s.get((
            'siegetank_assignments_total', (('outcome', 'assigned'),)))
            else None)(scrape(c.cc)), 'the CC\'s counts')
        self.assertGreaterEqual(cc[('siegetank_assignments_total',
                                    (('outcome', 'assigned'),))],
                                stats['streams'])


class TestMetricsRestartAndAccess(unittest.TestCase):

    def test_wiped_on_start_and_loopback_only(self):
        address = local_address()
        with ServerProcess('cc') as cc:
            for _ in range(3):
                cc.request('GET', '/ws/status')
            self.assertEqual(requests_of(scrape(cc), '/ws/status'), 3)
            if address is not None:
                self.assertEqual(self.status_from(cc, address), 403)
        # The same server again: counts of the last run are gone.
        cc.start()
        try:
            self.assertEqual(requests_of(scrape(cc), '/ws/status'), 0)
        finally:
            cc.stop()
        if address is None:
            return
        with ServerProcess('cc', metrics_allow=[address + '/32']) as cc:
            self.assertEqual(self.status_from(cc, address), 200)

    def test_body_on_metrics_is_answered(self):
        # A GET /metrics with a body once got no reply and a traceback
        # (the async base prepare was not awaited).
        for kind in ('cc', 'ws'):
            with ServerProcess(kind) as server:
                r = server.session.get(server.url + '/metrics', data='x' * 10,
                                       timeout=10)
                self.assertEqual(r.status_code, 200, r.text)
                self.assertIn('siegetank_http_requests_total', r.text)
                server.stop()
                self.assertNotIn('Traceback', server.read_log())
                self.assertNotIn('never awaited', server.read_log())

    def status_from(self, server, address):
        """Status of /metrics asked from a non-loopback address (the
        certificate is checked against the CA, not against that name)."""
        ctx = ssl.create_default_context(cafile=certs()['ca'])
        ctx.check_hostname = False
        conn = http.client.HTTPSConnection(address, server.port, context=ctx,
                                           timeout=30)
        try:
            conn.request('GET', '/metrics')
            reply = conn.getresponse()
            body = reply.read()
            if reply.status == 403:
                assert b'"error"' in body
            return reply.status
        finally:
            conn.close()


if __name__ == '__main__':
    unittest.main()
