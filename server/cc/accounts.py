"""Accounts: managers (role admin or manager) and donors.

Passwords are kept only as salted scrypt hashes, computed in a thread so the
loop never stalls on them. Tokens are random (a donor's a uuid4, the form a
2014 core accepts); Redis holds only sha256(token) -> account, so a copy of
the database does not hand out credentials.
Authenticating again issues a new token and the old one stops working in the
same transaction.

Creating an account needs an admin token, or no token at all from a loopback
peer while `allow_loopback_bootstrap` is on (how the first admin is made).
That loopback bootstrap makes managers only until an admin exists; donors
it keeps making (a sign-up front end on the CC host may use it; a donor
token only attributes work).

Logins cost one scrypt whether the account exists or not, and failures are
counted per account and per address: over budget, 429 with Retry-After.
"""
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from redis.exceptions import WatchError

from server import store, threads
from server.cc import keys
from server.lua import Script
from server.tokens import new_donor_token, new_token, token_hash
from server.web import APIError, APIHandler, Permission, allow, role, too_many

log = logging.getLogger('siegetank.cc.accounts')

ROLES = ('admin', 'manager')
SCRYPT = {'n': 2 ** 14, 'r': 8, 'p': 1}
EMAIL = re.compile(r'[^@\s/]{1,128}@[^@\s/]{1,128}')
USERNAME = re.compile(r'[A-Za-z0-9._@+-]{1,64}')
MAX_PASSWORD = 1024


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode('utf-8'), salt=salt, n=n, r=r, p=p,
                          maxmem=64 * 1024 * 1024, dklen=32)


async def hash_password(password: str) -> str:
    """'scrypt$n$r$p$salt$hash' (hex), computed off the loop."""
    salt = secrets.token_bytes(16)
    digest = await threads.cpu(_scrypt, password, salt, **SCRYPT)
    return 'scrypt$%d$%d$%d$%s$%s' % (SCRYPT['n'], SCRYPT['r'], SCRYPT['p'],
                                      salt.hex(), digest.hex())


# Checked against when the account does not exist, so that an unknown
# account costs the same scrypt as a known one (timing tells nothing).
DUMMY_HASH = 'scrypt$%d$%d$%d$%s$%s' % (SCRYPT['n'], SCRYPT['r'], SCRYPT['p'],
                                        '00' * 16, '00' * 32)


async def check_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split('$')
        cost = int(n), int(r), int(p)
        salt_bytes = bytes.fromhex(salt)
    except (AttributeError, ValueError):
        return False
    got = await threads.cpu(_scrypt, password, salt_bytes, *cost)
    return hmac.compare_digest(got.hex(), digest)


class BootstrapClosed(Exception):
    """An admin exists: accounts are made with an admin token now."""


_CREATE = Script("""
-- Create an account unless it or a unique key exists, in one step.
-- token: the key of its token hash; name: what the token leads to;
-- bootstrap '1': made without a token, refused once an admin exists;
-- admin '1': it joins admins; uniques: keys that must not exist (a
-- donor's email), set to `name`; fields: the account's field/value pairs.
-- Returns 1 created, 0 taken, -1 bootstrap closed.
if bootstrap == '1' and redis.call('SCARD', admins) > 0 then return -1 end
if redis.call('EXISTS', account) == 1 then return 0 end
for _, unique in ipairs(uniques) do
  if redis.call('EXISTS', unique) == 1 then return 0 end
end
for _, unique in ipairs(uniques) do redis.call('SET', unique, name) end
redis.call('HSET', account, unpack(fields))
redis.call('SET', token, name)
if admin == '1' then redis.call('SADD', admins, name) end
return 1
""", keys=('account', 'token', 'admins', '*uniques'),
    args=('name', 'bootstrap', 'admin', '*fields'))


async def _create(app: Any, account_key: str, unique_keys: list[str],
                  fields: dict[str, str], token_key: str, name: str,
                  bootstrap: bool = False) -> bool:
    """Create the account hash unless it or one of `unique_keys` exists
    (they lead to `name` then); returns False on a duplicate. `token_key`
    -> `name` is the login. A manager made by `bootstrap` (no token) raises
    BootstrapClosed once an admin exists; a new admin joins the admins set,
    in the same step. The reply waits for `redis_wait_replicas` replicas
    (store.acknowledged)."""
    created = await store.acknowledged(
        app.redis, _CREATE, app.config.redis_wait_replicas,
        app.config.redis_wait_timeout_in_ms, account=account_key,
        token=token_key, admins=keys.admins, uniques=unique_keys,
        name=name, bootstrap='1' if bootstrap else '0',
        admin='1' if fields.get('role') == 'admin' else '0',
        fields=list(chain.from_iterable(fields.items())))
    if created == -1:
        raise BootstrapClosed()
    return created == 1


async def _rotate(redis: Any, account_key: str,
                  token_key_of: Callable[[str], str], name: str,
                  new_hash: str) -> None:
    """Point a fresh token at the account and drop the old one, atomically."""
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(account_key)
                old = await pipe.hget(account_key, 'token')
                pipe.multi()
                if old:
                    pipe.delete(token_key_of(old))
                pipe.hset(account_key, 'token', new_hash)
                pipe.set(token_key_of(new_hash), name)
                await pipe.execute()
                return
            except WatchError:
                continue


@dataclass(frozen=True)
class Manager:
    """Who a manager token stands for: the record `manager:<email id>`
    less its secrets (password, token hash), which stay in this module."""

    email: str
    role: str  # one of ROLES
    weight: float = 1.0

    @property
    def is_admin(self) -> bool:
        return self.role == 'admin'


async def create_manager(app: Any, email: str, password: str, role: str,
                         weight: float, bootstrap: bool = False
                         ) -> str | None:
    """Returns the new token, or None if the email is taken; raises
    BootstrapClosed for a `bootstrap` creation once an admin exists."""
    token, th = new_token()
    fields = {'email': email, 'role': role, 'weight': repr(float(weight)),
              'password': await hash_password(password), 'token': th}
    ok = await _create(app, keys.manager(email), [], fields,
                       keys.manager_token(th), email, bootstrap)
    return token if ok else None


def backfill_admins(redis: Any) -> None:
    """Admins made before the admins set existed join it (sync, at start),
    so that an upgraded CC closes its bootstrap too."""
    pattern = keys.manager.template % '*'
    for key in redis.scan_iter(match=pattern, count=1000, _type='hash'):
        if redis.hget(key, 'role') == 'admin':
            redis.sadd(keys.admins, redis.hget(key, 'email'))


async def _authenticate(redis: Any, account_key: str,
                        token_key_of: Callable[[str], str], name: str,
                        password: str,
                        make_token: Callable[[], tuple[str, str]] = new_token
                        ) -> str | None:
    """A new token (the old one dropped) for the right password, else
    None; managers and donors alike (a donor's from `new_donor_token`). An
    unknown account costs the same scrypt as a wrong password."""
    stored = await redis.hget(account_key, 'password')
    if not await check_password(password, stored or DUMMY_HASH) \
            or stored is None:
        return None
    token, th = make_token()
    await _rotate(redis, account_key, token_key_of, name, th)
    return token


def _found_manager(email: str, role: str, weight: str) -> Manager:
    return Manager(email, role, float(weight))


_MANAGER_OF = Script("""
-- The manager of a token hash in one step.
-- Returns {email, role, weight} (a Manager) or nil.
local email = redis.call('GET', token)
if not email then return false end
local h = redis.call('HMGET', string.format(manager, redis.sha1hex(email)),
                     'role', 'weight')
if not h[1] then return false end
return {email, h[1], h[2] or '1'}
""", keys=('token',), walks=('manager',), returns=_found_manager)


async def manager_of(app: Any, token: str | None) -> Manager | None:
    """The Manager a token belongs to, or None."""
    if not token:
        return None
    found: Manager | None = await _MANAGER_OF(
        app.redis, token=keys.manager_token(token_hash(token)),
        manager=keys.manager.template)
    return found


async def create_donor(app: Any, username: str, email: str,
                       password: str) -> str | None:
    """Returns the new token (a uuid, for 2014 cores), or None if the
    username or email is taken."""
    token, th = new_donor_token()
    fields = {'username': username, 'email': email,
              'password': await hash_password(password), 'token': th}
    ok = await _create(app, keys.donor(username),
                       [keys.donor_email(email)], fields,
                       keys.donor_token(th), username)
    return token if ok else None


async def donor_of(app: Any, token: str | None) -> str | None:
    """The donor username a token belongs to, or None."""
    if not token:
        return None
    return await app.redis.get(keys.donor_token(token_hash(token)))


_LOGIN_BLOCKED = Script("""
-- Failed logins: refused while the account's or the address's count in
-- this window is at its budget. Returns the seconds to wait, or 0.
for _, c in ipairs({{account_fails, account_budget},
                    {address_fails, address_budget}}) do
  local n = tonumber(redis.call('GET', c[1]) or '0')
  if n >= tonumber(c[2]) then
    return math.max(redis.call('TTL', c[1]), 1)
  end
end
return 0
""", keys=('account_fails', 'address_fails'),
    args=('account_budget', 'address_budget'))

_LOGIN_FAILED = Script("""
-- Count a failed login against both; each count lives for the window
-- from its first failure. Returns 1.
for _, fails in ipairs({account_fails, address_fails}) do
  if redis.call('INCR', fails) == 1 or redis.call('TTL', fails) < 0 then
    redis.call('EXPIRE', fails, window_s)
  end
end
return 1
""", keys=('account_fails', 'address_fails'), args=('window_s',))


async def login(handler: APIHandler, scope: str, name: str, account_key: str,
                token_key_of: Callable[[str], str], password: str) -> str:
    """A fresh token, or 401 for a wrong name or password, or 429 (with
    Retry-After, before any scrypt) once the account or the caller's
    address has used its failure budget; a success clears the account's
    count."""
    config, redis = handler.config, handler.redis
    counters = {'account_fails': keys.login_fails(scope, name),
                'address_fails': keys.login_fails(
                    'addr', handler.request.remote_ip)}
    wait = await _LOGIN_BLOCKED(
        redis, **counters, account_budget=config.login_fails_per_account,
        address_budget=config.login_fails_per_address)
    if wait:
        raise too_many('too many failed logins for this account or address;'
                       ' retry later', wait)
    token = await _authenticate(
        redis, account_key, token_key_of, name, password,
        new_donor_token if scope == 'donor' else new_token)
    if token is None:
        await _LOGIN_FAILED(redis, **counters,
                            window_s=config.login_fail_window_in_s)
        raise APIError(401, 'wrong %s or password'
                       % ('email' if scope == 'manager' else 'username'))
    await redis.delete(counters['account_fails'])
    return token


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@role('manager', 'a manager token is required')
async def _manager(handler: APIHandler, rule: Permission) -> Manager | None:
    """The Manager of the token in `Authorization`; None without one, 401
    for a token no manager has."""
    token = handler.token()
    if token is None:
        return None
    found = await manager_of(handler.application, token)
    if found is None:
        raise APIError(401, 'unknown or expired manager token')
    return found


@role('admin', 'an admin token is required')
async def _admin(handler: APIHandler, rule: Permission) -> Manager | None:
    """A manager whose role is admin; another manager is a 403."""
    found = await _manager(handler, rule)
    if found is not None and not found.is_admin:
        raise APIError(403, 'only an admin may %s' % rule.purpose)
    return found


class Bootstrap:
    """The caller of a loopback bootstrap (no token): see the module."""


@role('bootstrap', 'a token is required')
async def _bootstrap(handler: APIHandler,
                     rule: Permission) -> Bootstrap | None:
    """Anyone from loopback while `allow_loopback_bootstrap` is on."""
    if handler.config.allow_loopback_bootstrap \
            and not handler.via_proxy \
            and is_loopback(handler.request.remote_ip or ''):
        return Bootstrap()
    return None


def password_field(handler: APIHandler) -> str:
    return handler.field('password', str,
                         check=lambda p: 0 < len(p) <= MAX_PASSWORD)


def email_field(handler: APIHandler) -> str:
    return handler.field('email', str, check=EMAIL.fullmatch).lower()


def valid_weight(w: float) -> bool:
    """Weights (of managers and targets) are finite, positive, bounded."""
    try:
        return math.isfinite(w) and 0 < w <= 1e6
    except OverflowError:
        return False


class ManagersHandler(APIHandler):
    @allow('admin', 'bootstrap', purpose='create accounts')
    async def post(self) -> None:
        email = email_field(self)
        password = password_field(self)
        role = self.field('role', str, check=lambda r: r in ROLES)
        weight = self.field('weight', (int, float), 1, check=valid_weight)
        try:
            token = await create_manager(
                self.application, email, password, role, weight,
                bootstrap=isinstance(self.caller, Bootstrap))
        except BootstrapClosed:
            raise APIError(401, 'an admin exists: an admin token is '
                           'required to create managers') from None
        if token is None:
            raise APIError(409, 'manager %s already exists' % email)
        log.info('created %s %s', role, email)
        self.write_json({'token': token})


class ManagerAuthHandler(APIHandler):
    """Logging in takes no token (a stale one sent along is ignored)."""

    @allow('anyone')
    async def post(self) -> None:
        email = email_field(self)
        password = password_field(self)
        token = await login(self, 'manager', email, keys.manager(email),
                            keys.manager_token, password)
        self.write_json({'token': token})


class DonorsHandler(APIHandler):
    @allow('admin', 'bootstrap', purpose='create accounts')
    async def post(self) -> None:
        username = self.field('username', str, check=USERNAME.fullmatch)
        email = email_field(self)
        password = password_field(self)
        token = await create_donor(self.application, username, email,
                                   password)
        if token is None:
            raise APIError(409, 'donor username or email already exists')
        log.info('created donor %s', username)
        self.write_json({'token': token})


class DonorAuthHandler(APIHandler):
    @allow('anyone')
    async def post(self) -> None:
        username = self.field('username', str, check=USERNAME.fullmatch)
        password = password_field(self)
        token = await login(self, 'donor', username, keys.donor(username),
                            keys.donor_token, password)
        self.write_json({'token': token})


default_handlers = [
    (r'/managers', ManagersHandler),
    (r'/managers/auth', ManagerAuthHandler),
    (r'/donors', DonorsHandler),
    (r'/donors/auth', DonorAuthHandler),
]
