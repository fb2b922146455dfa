"""/dashboard in a real browser: Debian's headless chromium driven by
Playwright loads the page from a live CC with a core running, waits for
the frames figure to grow, switches to the admin view, and saves a
screenshot under tests/output/dashboard/ (or $SIEGETANK_TEST_OUTPUT)."""
import os
import threading
import unittest

from playwright.sync_api import sync_playwright

from siegetank.core import Core, make_engine
from tests.cluster import Cluster
from tools.testing import ROOT, wait_for

CHROMIUM = '/usr/bin/chromium'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu',
         '--disable-background-networking', '--disable-component-update',
         '--no-first-run']
OUTPUT = os.environ.get('SIEGETANK_TEST_OUTPUT',
                        os.path.join(ROOT, 'tests', 'output'))


class TestDashboard(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(n_ws=2, cc_values={'stats_interval_in_ms': 300}
                              ).start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_page_follows_a_running_core(self):
        c = self.cluster
        target, _ = c.synthetic_target(streams=3)
        donor = c.admin.create_donor('dash-donor', 'pw', 'dd@test.org')
        # One finished session (donor stats count ended sessions), then a
        # core that keeps running while the page watches.
        c.run_core(target.id, 5, donor_token=donor, checkpoint_every=0.01)
        stop = threading.Event()
        core = Core(c.address, make_engine('synthetic', rate=20), ca=c.ca,
                    donor_token=donor, target_id=target.id,
                    checkpoint_every=0.5, heartbeat_every=2, stop=stop)
        thread = threading.Thread(target=core.run)
        thread.start()
        folder = os.path.join(OUTPUT, 'dashboard')
        os.makedirs(folder, exist_ok=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM,
                                            args=FLAGS)
                try:
                    self.drive(browser, folder, target.id)
                finally:
                    browser.close()
        finally:
            stop.set()
            thread.join(60)

    def drive(self, browser, folder, target_id):
        c = self.cluster
        # The page is served with the test CA's certificate, which this
        # browser profile does not know: TLS itself is tested elsewhere.
        page = browser.new_page(ignore_https_errors=True,
                                viewport={'width': 1280, 'height': 900})
        errors = []
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.on('console', lambda m: m.type == 'error'
                and errors.append(m.text))
        page.goto('https://%s/dashboard?refresh=1' % c.address)

        def frames():
            text = page.inner_text('#frames-hour')
            return int(text) if text.isdigit() else None
        first = wait_for(lambda: frames() is not None and frames() + 1,
                         'the first figures') - 1
        wait_for(lambda: frames() > first, 'the frames figure to grow')
        wait_for(lambda: page.inner_text('#cores-active') == '1',
                 'the running core to show')
        self.assertEqual(page.inner_text('#ws-online'), '2 / 2')
        self.assertIn(target_id, page.inner_text('#targets'))
        wait_for(lambda: 'dash-donor' in page.inner_text('#donors'),
                 'the donor to show')
        self.assertEqual(page.locator('#chart svg rect').count(), 60)
        self.assertNotIn('address', page.inner_text('#workservers'))
        # With an admin token: per-WS detail.
        page.fill('#admin-token', c.admin.token)
        page.click('#admin-form button[type=submit]')
        wait_for(lambda: 'admin view' in page.inner_text('#updated'),
                 'the admin view')
        self.assertIn('address', page.inner_text('#workservers'))
        self.assertIn('127.0.0.1:%d' % c.ws[0].port,
                      page.inner_text('#workservers'))
        self.assertEqual(errors, [])
        path = os.path.join(folder, 'dashboard.png')
        page.screenshot(path=path, full_page=True)
        self.assertGreater(os.path.getsize(path), 10000)


if __name__ == '__main__':
    unittest.main()
