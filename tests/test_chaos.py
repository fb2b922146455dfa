"""A short `make chaos` (tools/chaos.py): tens of kill -9 points across
WS workers, the WS, its Redis, the CC and its Redis while synthetic cores
and a manager work, with every check of the full run after each restart."""
import os
import sys
import unittest

from tools import chaos

POINTS = int(os.environ.get('CHAOS_POINTS', '30'))


class TestChaos(unittest.TestCase):

    def test_kill_points_lose_nothing(self):
        seed = int(os.environ.get('CHAOS_SEED', '0')) or None
        done, failures, report = chaos.run(POINTS, seed=seed,
                                           deep_every=POINTS // 2,
                                           minutes=15)
        sys.stderr.write(report + '\n')
        self.assertEqual(done, POINTS)
        self.assertEqual(failures, [])
