"""Lua scripts sent once per Redis and then called by their SHA1: a hot
path should not send the script text with every call. Every check-then-set
on Redis is one of these (or a MULTI)."""
import hashlib

from redis.exceptions import NoScriptError


class Script:
    def __init__(self, text):
        self.text = text
        self.sha = hashlib.sha1(text.encode('utf-8')).hexdigest()

    async def __call__(self, client, keys=(), args=()):
        """`client`: a redis-py client, or an app whose `lua` attribute is a
        faster connection for hot paths (the WS's, see server/ws/lua.py)."""
        client = getattr(client, 'lua', client)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # first call since this Redis started
            return await client.eval(self.text, len(keys), *keys, *args)
