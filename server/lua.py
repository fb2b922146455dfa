"""The one way to run Lua on Redis: a `Script`, sent once per Redis and then
called by its SHA1 (a hot path should not send the script text with every
call). Every check-then-set on Redis is a Script (or a MULTI); each lives
beside the model code whose keys it touches.

The connection is always the caller's explicit first argument: a redis-py
client, or a server's multiplexed hot-path connection (server/fastredis.py).
Both offer `evalsha` and `eval`."""
import hashlib

from redis.exceptions import NoScriptError


class Script:
    def __init__(self, text):
        self.text = text
        self.sha = hashlib.sha1(text.encode('utf-8')).hexdigest()

    async def __call__(self, conn, keys=(), args=()):
        try:
            return await conn.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # first call since this Redis started
            return await conn.eval(self.text, len(keys), *keys, *args)
