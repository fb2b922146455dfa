"""Lua scripts sent once per Redis and then called by their SHA1: a hot
path (assignment, placement, token lookup) should not send the script text
with every call."""
import hashlib

from redis.exceptions import NoScriptError


class Script:
    def __init__(self, text):
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, redis, keys=(), args=()):
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # first call since this Redis started
            return await redis.eval(self.text, len(keys), *keys, *args)
