"""The client's error, in a module of its own so that the modules the
client uses (sync.py) raise it without importing the client."""


class SiegetankError(Exception):
    """A request that did not succeed: `status` (None when the server could
    not be reached) and the server's `message`."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status
        self.message = message


def why(error):
    """The useful tail of a requests/urllib3 exception message."""
    text = str(error.args[0] if error.args else error)
    if 'Caused by' in text:
        text = text.split('Caused by', 1)[1].split(': ')[-1]
    return text.strip('"\'() ')[:200]
