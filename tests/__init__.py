"""The test suite (nosetests). The harness it shares with bench/ and the
demo is tools/testing.py."""
