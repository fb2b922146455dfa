"""A short `make fuzz`: a few hundred requests generated from the OpenAPI
documents against a real CC and WS; no reply >= 500 and no traceback in
their logs."""
import io
import unittest

from tools import fuzz


class TestFuzz(unittest.TestCase):

    def test_a_short_fuzz_run(self):
        out = io.StringIO()
        run, tracebacks = fuzz.fuzz(300, out=out)
        report = out.getvalue()
        self.assertEqual(run.sent, 300, report)
        self.assertEqual(run.failures, [], report)
        self.assertEqual(tracebacks, [], report)
        # Not only refusals: real operations ran.
        self.assertGreater(run.codes['2xx'], 10, report)


if __name__ == '__main__':
    unittest.main()
