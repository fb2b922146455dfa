"""/dashboard in a real browser: Debian's headless chromium driven by
Playwright loads the page from a live CC, first with no frames yet (the
chart's axis: each label once), then with a core running: waits for the
frames figure to grow, reads the targets by description, switches to the
admin view (owners, per-WS detail), and saves screenshots under
tests/output/dashboard/ (or $SIEGETANK_TEST_OUTPUT)."""
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
DESCRIPTION = 'Alanine dipeptide, 300 K'
CHART_PLOT_HEIGHT = 200 - 22 - 10  # dashboard.js: H - bottom - top
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
        folder = os.path.join(OUTPUT, 'dashboard')
        os.makedirs(folder, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            try:
                self.empty_chart(browser, folder)
            finally:
                browser.close()
        owner = c.client(c.admin.create_manager('dash-owner@test.org', 'pw'))
        target, _ = c.synthetic_target(client=owner, streams=3)
        target.update(description=DESCRIPTION)
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

    def open(self, browser):
        """The page, and the list its script errors go to."""
        # The page is served with the test CA's certificate, which this
        # browser profile does not know: TLS itself is tested elsewhere.
        page = browser.new_page(ignore_https_errors=True,
                                viewport={'width': 1280, 'height': 900})
        errors = []
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.on('console', lambda m: m.type == 'error'
                and errors.append(m.text))
        page.goto('https://%s/dashboard?refresh=1' % self.cluster.address)
        return page, errors

    def y_labels(self, page):
        return page.locator('#chart text.y-label').all_text_contents()

    def empty_chart(self, browser, folder):
        """No frames yet: the axis reads 0 and 1, once each, and says so."""
        page, errors = self.open(browser)
        wait_for(lambda: page.inner_text('#frames-hour') == '0',
                 'the first figures')
        self.assertEqual(self.y_labels(page), ['0', '1'])
        self.assertEqual(page.text_content('#chart text.empty'),
                         'no frames in the last hour')
        self.assertEqual(errors, [])
        page.screenshot(path=os.path.join(folder, 'empty.png'))

    def drive(self, browser, folder, target_id):
        c = self.cluster
        page, errors = self.open(browser)

        def frames():
            text = page.inner_text('#frames-hour')
            return int(text) if text.isdigit() else None
        first = wait_for(lambda: frames() is not None and frames() + 1,
                         'the first figures') - 1
        wait_for(lambda: frames() > first, 'the frames figure to grow')
        wait_for(lambda: page.inner_text('#cores-active') == '1',
                 'the running core to show')
        self.assertEqual(page.inner_text('#ws-online'), '2 / 2')
        # Targets by description, the id on hover; no owners in public.
        wait_for(lambda: DESCRIPTION in page.inner_text('#targets'),
                 'the target by its description')
        self.assertNotIn(target_id, page.inner_text('#targets'))
        self.assertEqual(page.get_attribute(
            'td:text-is("%s")' % DESCRIPTION, 'title'), target_id)
        self.assertNotIn('dash-owner@test.org', page.inner_text('#targets'))
        # The axis: whole numbers in equal steps from 0, each once, and
        # every bar inside it (one render read at once: the page redraws).
        labels, heights = page.evaluate('''() => [
            Array.from(document.querySelectorAll('#chart text.y-label'),
                       t => t.textContent),
            Array.from(document.querySelectorAll('#chart rect'),
                       r => Number(r.getAttribute('height')))]''')
        values = [int(v) for v in labels]
        step = values[1]
        self.assertEqual(values, [i * step for i in range(len(values))])
        self.assertGreater(max(heights), 0)
        self.assertLessEqual(max(heights), CHART_PLOT_HEIGHT)
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
        self.assertIn('owner', page.inner_text('#targets thead'))
        self.assertIn('dash-owner@test.org', page.inner_text('#targets'))
        # A draining WS says so.
        c.admin.drain_workserver(c.ws[1].name)
        try:
            wait_for(lambda: 'online, draining' in page.inner_text(
                '#workservers'), 'the drain to show')
            self.assertEqual(errors, [])
            path = os.path.join(folder, 'dashboard.png')
            page.screenshot(path=path, full_page=True)
        finally:
            c.admin.drain_workserver(c.ws[1].name, False)
        self.assertGreater(os.path.getsize(path), 10000)


if __name__ == '__main__':
    unittest.main()
