"""A rolling upgrade under load (tools/upgrade.py): the CC, then the WS,
restarted with SIGTERM from this checkout and then from a copy of it,
while synthetic cores work: no acknowledged frame lost, and the cores saw
only retryable answers."""
import sys
import unittest

from tools import upgrade


class TestRollingUpgrade(unittest.TestCase):

    def test_restart_everything_under_load(self):
        failures, answers, report = upgrade.run(seed=1)
        sys.stderr.write(report + '\n')
        self.assertEqual(failures, [])
        self.assertLessEqual(set(answers), upgrade.ALLOWED)
