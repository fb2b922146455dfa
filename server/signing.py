"""Signed, expiring download URLs: the CC hands a manager a WS URL that the
WS can check without a call back, using the `cc_pass` both sides share."""
import hashlib
import hmac
import time


def signature(secret, stream_id, filename, expires):
    msg = ('%s/%s/%d' % (stream_id, filename, expires)).encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def query(secret, stream_id, filename, lifetime):
    """The `?expires=..&signature=..` part of a URL valid for `lifetime` s."""
    expires = int(time.time()) + int(lifetime)
    return 'expires=%d&signature=%s' % (
        expires, signature(secret, stream_id, filename, expires))


def valid(secrets, stream_id, filename, expires, sig):
    """True if `sig` was made by one of `secrets` and has not expired."""
    try:
        expires = int(expires)
    except (TypeError, ValueError):
        return False
    if expires < time.time() or not sig or not sig.isascii():
        return False  # compare_digest takes ASCII strings only
    return any(hmac.compare_digest(signature(s, stream_id, filename, expires),
                                   sig) for s in secrets)
