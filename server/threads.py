"""Thread pools for blocking work, one per kind of work, used the same way
by both servers: `await threads.disk(func, *args)`. Each pool is made on
first use, after the fork, in the worker that uses it."""
import asyncio
import concurrent.futures
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar('T')


class Pool:
    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def __call__(self, func: Callable[..., T], *args: Any,
                       **kwargs: Any) -> T:
        """Run `func(*args, **kwargs)` in this pool, off the event loop."""
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(
                self.size, thread_name_prefix=self.name)
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(func, *args, **kwargs))


# Disk work mostly waits on fsync, and the filesystem's journal commits the
# fsyncs that wait together at once: more threads in flight is more work per
# commit (WS stream creation with 6 threads: 170/s; with 32: 300/s, 16
# clients).
disk = Pool(32, 'disk')

# CPU work (password hashing, decoding large files): about one thread per
# core, as Python's default executor sizes it.
cpu = Pool(min(32, (os.cpu_count() or 1) + 4), 'cpu')
