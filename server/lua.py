"""The one way to run Lua on Redis: a `Script`, sent once per Redis and then
called by its SHA1 (a hot path should not send the script text with every
call). Every check-then-set on Redis is a Script (or a MULTI); each lives
beside the model code whose keys it touches.

A Script names what it takes: `keys` (KEYS, in order), `walks` (key
templates with '%s' in ARGV, for a script that must go from one key to
another it learns inside, e.g. from a token to its stream) and `args` (the
rest of ARGV). The text run starts with a header that binds each name to a
Lua local and says so in a comment, so the body reads `stream`, not
`KEYS[1]`, and the ARGV of a call are built from keyword arguments by
name, here and nowhere else:

    HOLD = Script('...', keys=('token',), args=('now',), walks=('stream',))
    got = await HOLD(conn, token=..., now=..., stream=keys.stream.template)

The last name of `keys` or of `args` may be starred ('*stages'): it takes
a list (any length, maybe empty) and the body reads it as a Lua table.

`returns` turns a table reply into a typed record (a NamedTuple or
dataclass, called with the table's items); other replies come back as
Redis gave them (Lua false is None).

The connection is always the caller's explicit first argument: the sync
redis-py client (the call returns the reply), the asyncio one or a server's
multiplexed hot-path connection (server/fastredis.py; the call returns an
awaitable)."""
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError

import redis

LUA_WORDS = frozenset((
    'and break do else elseif end false for function goto if in local nil '
    'not or repeat return then true until while').split())


def _bare(name: str) -> str:
    return name[1:] if name.startswith('*') else name


def _check(names: Sequence[str], group: str) -> None:
    for i, name in enumerate(names):
        if name.startswith('*') and i != len(names) - 1:
            raise ValueError('only the last of %s may take a list: %r'
                             % (group, name))


def _header(keys: Sequence[str], walks: Sequence[str],
            args: Sequence[str]) -> str:
    _check(keys, 'keys')
    _check(args, 'args')
    names = [_bare(n) for n in list(keys) + list(walks) + list(args)]
    if any(n.startswith('*') for n in walks):
        raise ValueError('walks cannot take a list: %r' % (walks,))
    for name in names:
        if not name.isidentifier() or name in LUA_WORDS:
            raise ValueError('not a Lua name: %r' % name)
    if len(set(names)) != len(names):
        raise ValueError('a name is used twice: %r' % names)

    def said(group: Sequence[str]) -> str:
        return ', '.join(_bare(n) + ('...' if n.startswith('*') else '')
                         for n in group)

    def bound(group: Sequence[str], table: str, first: int) -> list[str]:
        return ['local %s = {unpack(%s, %d)}' % (n[1:], table, i + first)
                if n.startswith('*') else
                'local %s = %s[%d]' % (n, table, i + first)
                for i, n in enumerate(group)]

    lines = []
    if keys:
        lines.append('-- KEYS: ' + said(keys))
    if walks:
        lines.append("-- ARGV: key templates ('%s': an id the script reads): "
                     + said(walks))
    if args:
        lines.append('-- ARGV: ' + said(args))
    lines += bound(keys, 'KEYS', 1)
    lines += bound(list(walks) + list(args), 'ARGV', 1)
    return '\n'.join(lines) + '\n' if lines else ''


_SYNC: dict[type, bool] = {}


def _is_sync(conn: Any) -> bool:
    """Whether `conn` is the sync client, by its type, remembered:
    redis.Redis is a runtime Protocol, and an isinstance against it checks
    every member (it was most of a Script call's own time)."""
    kind = type(conn)
    sync = _SYNC.get(kind)
    if sync is None:
        sync = _SYNC[kind] = isinstance(conn, redis.Redis)
    return sync


class Script:
    def __init__(self, text: str, keys: Sequence[str] = (),
                 args: Sequence[str] = (), walks: Sequence[str] = (),
                 returns: Callable[..., Any] | None = None) -> None:
        self.text = _header(keys, walks, args) + text
        self.keys, self.walks, self.args = tuple(keys), tuple(walks), \
            tuple(args)
        self.sha = hashlib.sha1(self.text.encode('utf-8')).hexdigest()
        self.returns = returns
        # What bind checks and reads, worked out once (a hot path's call)
        self._names = frozenset(_bare(n) for n in self.keys + self.walks
                                + self.args)
        self._starred = any(n.startswith('*') for n in
                            self.keys + self.walks + self.args)

    @staticmethod
    def _values(names: Sequence[str], named: dict[str, Any]) -> list[Any]:
        values: list[Any] = []
        for name in names:
            if name.startswith('*'):
                values.extend(named[name[1:]])
            else:
                values.append(named[name])
        return values

    def bind(self, named: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """(KEYS, ARGV) from keyword arguments; every name, no other."""
        if named.keys() != self._names:
            raise TypeError('script takes %s; got %s'
                            % (sorted(self._names), sorted(named)))
        if None in named.values():
            name = next(k for k, v in named.items() if v is None)
            raise TypeError('script argument %s is None' % name)
        if not self._starred:
            return ([named[n] for n in self.keys],
                    [named[n] for n in self.walks + self.args])
        return (self._values(self.keys, named),
                self._values(self.walks + self.args, named))

    def __call__(self, conn: Any, **named: Any) -> Any:
        keys, args = self.bind(named)
        if _is_sync(conn):
            return self._typed(self._run_sync(conn, keys, args))
        return self._run_async(conn, keys, args)

    def _typed(self, reply: Any) -> Any:
        if self.returns is not None and isinstance(reply, list):
            return self.returns(*reply)
        return reply

    def _run_sync(self, conn: redis.Redis, keys: list[Any],
                  args: list[Any]) -> Any:
        try:
            return conn.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # first call since this Redis started
            return conn.eval(self.text, len(keys), *keys, *args)

    async def _run_async(self, conn: Any, keys: list[Any],
                         args: list[Any]) -> Any:
        try:
            reply = await conn.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            reply = await conn.eval(self.text, len(keys), *keys, *args)
        return self._typed(reply)


