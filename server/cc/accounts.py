"""Accounts: managers (role admin or manager) and donors.

Passwords are kept only as salted scrypt hashes, computed in a thread so the
loop never stalls on them. Tokens are random; Redis holds only sha256(token)
-> account, so a copy of the database does not hand out credentials.
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
from itertools import chain
from typing import Any

from redis.exceptions import WatchError

from server import store, threads
from server.cc import keys
from server.lua import Script
from server.tokens import new_token, token_hash
from server.web import APIError, APIHandler, too_many

log = logging.getLogger('siegetank.cc.accounts')

ROLES = ('admin', 'manager')
SCRYPT = {'n': 2 ** 14, 'r': 8, 'p': 1}
EMAIL = re.compile(r'[^@\s/]{1,128}@[^@\s/]{1,128}')
USERNAME = re.compile(r'[A-Za-z0-9._@+-]{1,64}')
MAX_PASSWORD = 1024


def _scrypt(password, salt, n, r, p):
    return hashlib.scrypt(password.encode('utf-8'), salt=salt, n=n, r=r, p=p,
                          maxmem=64 * 1024 * 1024, dklen=32)


async def hash_password(password):
    """'scrypt$n$r$p$salt$hash' (hex), computed off the loop."""
    salt = secrets.token_bytes(16)
    digest = await threads.cpu(_scrypt, password, salt, **SCRYPT)
    return 'scrypt$%d$%d$%d$%s$%s' % (SCRYPT['n'], SCRYPT['r'], SCRYPT['p'],
                                      salt.hex(), digest.hex())


# Checked against when the account does not exist, so that an unknown
# account costs the same scrypt as a known one (timing tells nothing).
DUMMY_HASH = 'scrypt$%d$%d$%d$%s$%s' % (SCRYPT['n'], SCRYPT['r'], SCRYPT['p'],
                                        '00' * 16, '00' * 32)


async def check_password(password, stored):
    try:
        _, n, r, p, salt, digest = stored.split('$')
        n, r, p, salt = int(n), int(r), int(p), bytes.fromhex(salt)
    except (AttributeError, ValueError):
        return False
    got = await threads.cpu(_scrypt, password, salt, n, r, p)
    return hmac.compare_digest(got.hex(), digest)


class BootstrapClosed(Exception):
    """An admin exists: accounts are made with an admin token now."""


# Create an account unless it or a unique key exists, in one step. KEYS:
# the account, its unique keys (a donor's email), the token key, the set
# of admins. ARGV: the name the token leads to, '1' for a bootstrap (no
# token: refused, -1, once an admin exists), '1' if it is an admin (then
# it joins the set), one value per unique key, field/value pairs.
_CREATE = Script("""
local n = #KEYS
if ARGV[2] == '1' and redis.call('SCARD', KEYS[n]) > 0 then return -1 end
for i = 1, n - 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 2, n - 2 do redis.call('SET', KEYS[i], ARGV[i + 2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, n + 1))
redis.call('SET', KEYS[n - 1], ARGV[1])
if ARGV[3] == '1' then redis.call('SADD', KEYS[n], ARGV[1]) end
return 1
""")


async def _create(app, account_key, unique_keys, fields, token_key, name,
                  bootstrap=False):
    """Create the account hash unless it or one of `unique_keys` exists;
    returns False on a duplicate. `token_key` -> `name` is the login. A
    manager made by `bootstrap` (no token) raises BootstrapClosed once an
    admin exists; a new admin joins the admins set, in the same step. The
    reply waits for `redis_wait_replicas` replicas (store.acknowledged)."""
    created = await store.acknowledged(
        app.redis, _CREATE,
        [account_key, *unique_keys, token_key, keys.admins],
        [name, '1' if bootstrap else '0',
         '1' if fields.get('role') == 'admin' else '0',
         *unique_keys.values(), *chain.from_iterable(fields.items())],
        app.config.redis_wait_replicas,
        app.config.redis_wait_timeout_in_ms)
    if created == -1:
        raise BootstrapClosed()
    return created == 1


async def _rotate(redis, account_key, token_key_of, name, new_hash):
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


class Manager:
    def __init__(self, email, role, weight=1.0):
        self.email = email
        self.role = role
        self.weight = weight

    @property
    def is_admin(self):
        return self.role == 'admin'


async def create_manager(app, email, password, role, weight,
                         bootstrap=False):
    """Returns the new token, or None if the email is taken; raises
    BootstrapClosed for a `bootstrap` creation once an admin exists."""
    token, th = new_token()
    fields = {'email': email, 'role': role, 'weight': repr(float(weight)),
              'password': await hash_password(password), 'token': th}
    ok = await _create(app, keys.manager(email), {}, fields,
                       keys.manager_token(th), email, bootstrap)
    return token if ok else None


def backfill_admins(redis):
    """Admins made before the admins set existed join it (sync, at start),
    so that an upgraded CC closes its bootstrap too."""
    pattern = keys.manager.template % '*'
    for key in redis.scan_iter(match=pattern, count=1000, _type='hash'):
        if redis.hget(key, 'role') == 'admin':
            redis.sadd(keys.admins, redis.hget(key, 'email'))


async def _authenticate(redis, account_key, token_key_of, name, password):
    """A new token (the old one dropped) for the right password, else
    None; managers and donors alike. An unknown account costs the same
    scrypt as a wrong password."""
    stored = await redis.hget(account_key, 'password')
    if not await check_password(password, stored or DUMMY_HASH) \
            or stored is None:
        return None
    token, th = new_token()
    await _rotate(redis, account_key, token_key_of, name, th)
    return token


# The manager of a token hash in one step. KEYS: the token key. ARGV: the
# manager key template. Returns {email, role, weight} or nil.
_MANAGER_OF = Script("""
local email = redis.call('GET', KEYS[1])
if not email then return false end
local h = redis.call('HMGET', string.format(ARGV[1], redis.sha1hex(email)),
                     'role', 'weight')
if not h[1] then return false end
return {email, h[1], h[2] or '1'}
""")


async def manager_of(app, token):
    """The Manager a token belongs to, or None."""
    if not token:
        return None
    found = await _MANAGER_OF(app.redis,
                              [keys.manager_token(token_hash(token))],
                              [keys.manager.template])
    if found is None:
        return None
    email, role, weight = found
    return Manager(email, role, float(weight))


async def create_donor(app, username, email, password):
    """Returns the new token, or None if the username or email is taken."""
    token, th = new_token()
    fields = {'username': username, 'email': email,
              'password': await hash_password(password), 'token': th}
    ok = await _create(app, keys.donor(username),
                       {keys.donor_email(email): username}, fields,
                       keys.donor_token(th), username)
    return token if ok else None


async def donor_of(app, token):
    """The donor username a token belongs to, or None."""
    if not token:
        return None
    return await app.redis.get(keys.donor_token(token_hash(token)))


# Failed logins: refused while the account's or the address's count in
# this window is at its budget. KEYS: account counter, address counter.
# ARGV: account budget, address budget. Returns the seconds to wait, or 0.
_LOGIN_BLOCKED = Script("""
for i = 1, 2 do
  local n = tonumber(redis.call('GET', KEYS[i]) or '0')
  if n >= tonumber(ARGV[i]) then
    return math.max(redis.call('TTL', KEYS[i]), 1)
  end
end
return 0
""")

# Count a failed login against both; each count lives for the window from
# its first failure. ARGV: window seconds.
_LOGIN_FAILED = Script("""
for i = 1, 2 do
  if redis.call('INCR', KEYS[i]) == 1 or redis.call('TTL', KEYS[i]) < 0 then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
return 1
""")


async def login(handler, scope, name, account_key, token_key_of, password):
    """A fresh token, or 401 for a wrong name or password, or 429 (with
    Retry-After, before any scrypt) once the account or the caller's
    address has used its failure budget; a success clears the account's
    count."""
    config, redis = handler.config, handler.redis
    counters = [keys.login_fails(scope, name),
                keys.login_fails('addr', handler.request.remote_ip)]
    wait = await _LOGIN_BLOCKED(redis, counters, [
        config.login_fails_per_account, config.login_fails_per_address])
    if wait:
        raise too_many('too many failed logins for this account or address;'
                       ' retry later', wait)
    token = await _authenticate(redis, account_key, token_key_of, name,
                                password)
    if token is None:
        await _LOGIN_FAILED(redis, counters,
                            [config.login_fail_window_in_s])
        raise APIError(401, 'wrong %s or password'
                       % ('email' if scope == 'manager' else 'username'))
    await redis.delete(counters[0])
    return token


def is_loopback(address):
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class AccountHandler(APIHandler):
    """Base of every handler that knows managers. Before the body is read,
    a token given is checked (401 if unknown) and one is required for the
    HTTP methods in `manager_methods`."""

    manager_methods: tuple[str, ...] = ()
    _manager: Any = False  # not looked up yet (then a Manager or None)

    async def authenticate(self):
        if self.token() is not None \
                or self.request.method in self.manager_methods:
            await self.require_manager()

    async def manager(self):
        """The caller's Manager, None without a token; 401 for an unknown
        token. Looked up once per request."""
        if self._manager is False:
            token = self.token()
            m = None if token is None \
                else await manager_of(self.application, token)
            if token is not None and m is None:
                raise APIError(401, 'unknown or expired manager token')
            self._manager = m
        return self._manager

    async def require_manager(self):
        m = await self.manager()
        if m is None:
            raise APIError(401, 'a manager token is required')
        return m

    async def require_creator(self):
        """Who may create accounts: an admin from anywhere (returns False),
        anyone from loopback while bootstrap is allowed (returns True: a
        bootstrap, which for managers closes once an admin exists)."""
        m = await self.manager()
        if m is not None:
            if not m.is_admin:
                raise APIError(403, 'only an admin may create accounts')
            return False
        if self.config.allow_loopback_bootstrap \
                and is_loopback(self.request.remote_ip):
            return True
        raise APIError(401, 'an admin token is required')

    def password(self):
        return self.field('password', str,
                          check=lambda p: 0 < len(p) <= MAX_PASSWORD)

    def email(self):
        return self.field('email', str, check=EMAIL.fullmatch).lower()


def valid_weight(w):
    """Weights (of managers and targets) are finite, positive, bounded."""
    try:
        return math.isfinite(w) and 0 < w <= 1e6
    except OverflowError:
        return False


class CreatorHandler(AccountHandler):
    """Account creation: the creator is checked before the body;
    `self.bootstrap` tells a loopback bootstrap from an admin."""

    async def authenticate(self):
        self.bootstrap = await self.require_creator()


class ManagersHandler(CreatorHandler):
    async def post(self):
        email = self.email()
        password = self.password()
        role = self.field('role', str, check=lambda r: r in ROLES)
        weight = self.field('weight', (int, float), 1, check=valid_weight)
        try:
            token = await create_manager(self.application, email, password,
                                         role, weight, self.bootstrap)
        except BootstrapClosed:
            raise APIError(401, 'an admin exists: an admin token is '
                           'required to create managers') from None
        if token is None:
            raise APIError(409, 'manager %s already exists' % email)
        log.info('created %s %s', role, email)
        self.write_json({'token': token})


class LoginHandler(AccountHandler):
    """Logging in takes no token (a stale one sent along is ignored)."""

    async def authenticate(self):
        pass


class ManagerAuthHandler(LoginHandler):
    async def post(self):
        email = self.email()
        password = self.password()
        token = await login(self, 'manager', email, keys.manager(email),
                            keys.manager_token, password)
        self.write_json({'token': token})


class DonorsHandler(CreatorHandler):
    async def post(self):
        username = self.field('username', str, check=USERNAME.fullmatch)
        email = self.email()
        password = self.password()
        token = await create_donor(self.application, username, email,
                                   password)
        if token is None:
            raise APIError(409, 'donor username or email already exists')
        log.info('created donor %s', username)
        self.write_json({'token': token})


class DonorAuthHandler(LoginHandler):
    async def post(self):
        username = self.field('username', str, check=USERNAME.fullmatch)
        password = self.password()
        token = await login(self, 'donor', username, keys.donor(username),
                            keys.donor_token, password)
        self.write_json({'token': token})


default_handlers = [
    (r'/managers', ManagersHandler),
    (r'/managers/auth', ManagerAuthHandler),
    (r'/donors', DonorsHandler),
    (r'/donors/auth', DonorAuthHandler),
]
