"""The Prometheus side: deploy/prometheus/alerts.yml passes `promtool check
rules` and its unit tests (alerts_test.yml: input series -> the alerts
that fire) pass `promtool test rules`; the /metrics text of a real CC and
WS passes `promtool check metrics` and carries the gauges the alerts read
(store up, disk size, each WS online as the CC sees it)."""
import os
import signal
import subprocess
import unittest

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster
from tools.testing import ROOT, certs, tmpdir, wait_for

RULES = os.path.join(ROOT, 'deploy', 'prometheus')


def promtool(*args, stdin=None):
    p = subprocess.run(['promtool'] + list(args), input=stdin,
                       capture_output=True, text=True, timeout=120,
                       cwd=RULES)
    return p.returncode, (p.stdout + p.stderr).strip()


def scrape(server):
    r = requests.get(server.url + '/metrics', verify=certs()['ca'],
                     timeout=60, headers={'Connection': 'close'})
    assert r.status_code == 200, r.text
    return r.text


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples}


class TestRules(unittest.TestCase):
    def test_check_rules(self):
        code, out = promtool('check', 'rules', 'alerts.yml')
        self.assertEqual(code, 0, out)
        self.assertIn('SUCCESS', out)

    def test_rules_unit_tests(self):
        code, out = promtool('test', 'rules', 'alerts_test.yml')
        self.assertEqual(code, 0, out)

    def test_unit_tests_can_fail(self):
        """An expected alert that the rules do not raise fails the run."""
        folder = tmpdir('rules')
        with open(os.path.join(RULES, 'alerts_test.yml')) as f:
            text = f.read()
        with open(os.path.join(folder, 'alerts_test.yml'), 'w') as f:
            f.write(text.replace('rule_files:\n  - alerts.yml',
                                 'rule_files:\n  - %s' % os.path.join(
                                     RULES, 'alerts.yml'))
                    .replace('alertname: SiegetankStoreDown',
                             'alertname: SiegetankNoSuchAlert'))
        code, out = promtool('test', 'rules',
                             os.path.join(folder, 'alerts_test.yml'))
        self.assertNotEqual(code, 0, out)
        self.assertIn('SiegetankNoSuchAlert', out)


class TestMetricsOutput(unittest.TestCase):
    def test_real_servers(self):
        cluster = Cluster(n_ws=1, cc_values={'require_core_keys': False})
        cluster.start()
        try:
            target, _ = cluster.synthetic_target(streams=1)
            cluster.run_core(target.id, 3)
            ws = cluster.ws[0]
            for server in (cluster.cc, ws):
                text = scrape(server)
                code, out = promtool('check', 'metrics', stdin=text)
                self.assertEqual(code, 0, '%s: %s' % (server.kind, out))
                got = samples(text)
                self.assertEqual(got[('siegetank_store_up', ())], 1)
                self.assertGreater(got[('siegetank_disk_total_bytes', ())],
                                   got[('siegetank_disk_free_bytes', ())])
            up = ('siegetank_workserver_up', (('ws', ws.name),))
            self.assertEqual(samples(scrape(cluster.cc))[up], 1)
            # The WS leaves: the CC's gauge says so.
            ws.stop()
            self.assertTrue(wait_for(
                lambda: samples(scrape(cluster.cc))[up] == 0))
            # The store paused: /metrics still answers, store_up 0 (a down
            # server is Prometheus's own `up`, a different alert).
            pid = cluster.cc.redis_pid()
            os.kill(pid, signal.SIGSTOP)
            try:
                got = samples(scrape(cluster.cc))
            finally:
                os.kill(pid, signal.SIGCONT)
            self.assertEqual(got[('siegetank_store_up', ())], 0)
            self.assertTrue(wait_for(lambda: samples(scrape(cluster.cc))[
                ('siegetank_store_up', ())] == 1))
        finally:
            cluster.stop()
