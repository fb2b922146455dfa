"""The jobs lease (server/lease.py) on a real Redis: one holder at a time,
renewed by its holder only, handed over on release or when the holder
stops renewing, and never counted as held by a holder whose store fails."""
import time

from server import store
from server.lease import Lease
from tools.testing import RedisTestCase, free_port, tmpdir

KEY = 'lease:test'


class TestLease(RedisTestCase):

    def sync(self, fn):
        return self.io_loop.run_sync(fn)

    def test_one_holder_then_handover(self):
        a, b = Lease(self.redis, KEY, 60000), Lease(self.redis, KEY, 60000)
        self.assertTrue(self.sync(a.refresh))
        self.assertFalse(self.sync(b.refresh))
        self.assertTrue(self.sync(a.refresh))        # renewed by its holder
        self.assertEqual(self.sync(lambda: self.redis.get(KEY)), a.id)
        self.assertTrue(a.held)
        self.assertFalse(b.held)
        self.sync(a.stop)                            # released at once
        self.assertFalse(a.held)
        self.assertTrue(self.sync(b.refresh))
        self.assertFalse(self.sync(a.refresh))
        self.sync(a.stop)                            # not ours: kept
        self.assertEqual(self.sync(lambda: self.redis.get(KEY)), b.id)

    def test_a_silent_holder_loses_it(self):
        a, b = Lease(self.redis, KEY, 300), Lease(self.redis, KEY, 300)
        self.assertTrue(self.sync(a.refresh))
        self.assertFalse(self.sync(b.refresh))
        deadline = time.monotonic() + 30
        while not self.sync(b.refresh):              # a stopped renewing
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        self.assertFalse(a.held)                     # its hold ran out first
        self.assertFalse(self.sync(a.refresh))

    def test_store_down_hold_runs_out(self):
        """A store error keeps the hold until it runs out, not longer."""
        server = store.RedisServer(tmpdir('redis'), free_port()).start()
        client = store.connect(server.url)
        try:
            long = Lease(client, KEY, 600000)
            short = Lease(client, KEY + ':short', 300)
            self.assertTrue(self.sync(long.refresh))
            self.assertTrue(self.sync(short.refresh))
            server.stop()
            self.assertTrue(self.sync(long.refresh))
            deadline = time.monotonic() + 30
            while short.held:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.05)
            self.assertFalse(self.sync(short.refresh))
        finally:
            self.sync(client.aclose)
            server.stop()
