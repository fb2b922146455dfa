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

`returns` turns a table reply into a typed record (a NamedTuple or
dataclass, called with the table's items); other replies come back as
Redis gave them (Lua false is None).

The connection is always the caller's explicit first argument: the sync
redis-py client (the call returns the reply), the asyncio one or a server's
multiplexed hot-path connection (server/fastredis.py; the call returns an
awaitable). Scripts built without names are called with positional lists,
`script(conn, keys, args)`."""
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError

import redis

LUA_WORDS = frozenset((
    'and break do else elseif end false for function goto if in local nil '
    'not or repeat return then true until while').split())


def _header(keys: Sequence[str], walks: Sequence[str],
            args: Sequence[str]) -> str:
    names = list(keys) + list(walks) + list(args)
    for name in names:
        if not name.isidentifier() or name in LUA_WORDS:
            raise ValueError('not a Lua name: %r' % name)
    if len(set(names)) != len(names):
        raise ValueError('a name is used twice: %r' % names)
    lines = []
    if keys:
        lines.append('-- KEYS: ' + ', '.join(keys))
    if walks:
        lines.append("-- ARGV: key templates ('%s': an id the script reads): "
                     + ', '.join(walks))
    if args:
        lines.append('-- ARGV: ' + ', '.join(args))
    for i, name in enumerate(keys):
        lines.append('local %s = KEYS[%d]' % (name, i + 1))
    for i, name in enumerate(list(walks) + list(args)):
        lines.append('local %s = ARGV[%d]' % (name, i + 1))
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
        self.keys, self.walks, self.args = tuple(keys), tuple(walks), \
            tuple(args)
        self.named = bool(keys or walks or args)
        self.text = _header(self.keys, self.walks, self.args) + text
        self.sha = hashlib.sha1(self.text.encode('utf-8')).hexdigest()
        self.returns = returns

    def bind(self, named: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """(KEYS, ARGV) from keyword arguments; every name, no other."""
        expected = self.keys + self.walks + self.args
        if set(named) != set(expected):
            raise TypeError('script takes %s; got %s'
                            % (sorted(expected), sorted(named)))
        for name, value in named.items():
            if value is None:
                raise TypeError('script argument %s is None' % name)
        return ([named[k] for k in self.keys],
                [named[a] for a in self.walks + self.args])

    def __call__(self, conn: Any, keys: Sequence[Any] | None = None,
                 args: Sequence[Any] | None = None, **named: Any) -> Any:
        if named or (self.named and keys is None and args is None):
            if keys is not None or args is not None:
                raise TypeError('give KEYS and ARGV by name or as lists, '
                                'not both')
            keys, args = self.bind(named)
        keys, args = list(keys or ()), list(args or ())
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


