"""Credentials as both servers keep and check them: a token is stored only
as its SHA-256, and shared passes are compared in constant time."""
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode('utf-8')).hexdigest()


def new_token() -> tuple[str, str]:
    """(token, its hash): 256 random bits, hex (safe as a CLI argument)."""
    token = secrets.token_hex(32)
    return token, token_hash(token)


def new_donor_token() -> tuple[str, str]:
    """(token, its hash) in the form a 2014 core accepts: its
    `--donor_token` must be 36 characters, a uuid4 (122 random bits, from
    os.urandom). Tokens of the 64-hex form issued before keep working:
    both are looked up by the same hash."""
    token = str(uuid.uuid4())
    return token, token_hash(token)


def matches_any(token: str | None, passes: Iterable[str]) -> bool:
    """True if `token` is one of `passes`; the time taken does not tell
    which, nor how much of one matched."""
    given = (token or '').encode('utf-8')
    found = False
    for p in passes:  # no early exit
        found |= hmac.compare_digest(given, p.encode('utf-8'))
    return found and bool(given)
