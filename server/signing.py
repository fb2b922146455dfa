"""Signed, expiring download URLs: the CC hands a manager a WS URL that the
WS can check without a call back. Both sides derive the signing key from
the `cc_pass` they share, with HKDF and a label for this purpose alone, so
the pass itself is never an HMAC key and a leaked URL key is no pass."""
import functools
import hashlib
import hmac
import time
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL = b'siegetank: signed download URLs, v1'


@functools.lru_cache(maxsize=64)
def url_key(cc_pass: str) -> bytes:
    """The key of signed URLs derived from `cc_pass`."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=LABEL).derive(cc_pass.encode('utf-8'))


def signature(cc_pass: str, stream_id: str, filename: str,
              expires: int) -> str:
    msg = ('%s/%s/%d' % (stream_id, filename, expires)).encode()
    return hmac.new(url_key(cc_pass), msg, hashlib.sha256).hexdigest()


def query(cc_pass: str, stream_id: str, filename: str,
          lifetime: float) -> str:
    """The `?expires=..&signature=..` part of a URL valid for `lifetime` s."""
    expires = int(time.time()) + int(lifetime)
    return 'expires=%d&signature=%s' % (
        expires, signature(cc_pass, stream_id, filename, expires))


def valid(cc_passes: Iterable[str], stream_id: str, filename: str,
          expires: object, sig: str | None) -> bool:
    """True if `sig` was made with the key of one of `cc_passes` and has
    not expired."""
    try:
        when = int(expires)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    if when < time.time() or not sig:
        return False
    given = sig.encode('utf-8', 'replace')
    return any(hmac.compare_digest(
        signature(p, stream_id, filename, when).encode(), given)
        for p in cc_passes)
