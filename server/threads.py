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
        return await asyncio.get_running_loop().run_in_executor(
            self._executor(), functools.partial(func, *args, **kwargs))

    async def then(self, free: Callable[[], None], func: Callable[..., T],
                   *args: Any) -> T:
        """`func(*args)` in this pool, then `free()`: on the event loop
        once it returned, or, if the caller is cancelled first (a server
        stopping), in the thread once `func` is done, never before: what
        it frees (fds, a lock) is still `func`'s until then."""
        running = self._executor().submit(func, *args)
        try:
            return await asyncio.wrap_future(running)
        finally:
            if running.done():
                free()
            else:
                running.add_done_callback(lambda _: free())

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(
                self.size, thread_name_prefix=self.name)
        return self.executor


# Disk work mostly waits on fsync, and the filesystem's journal commits the
# fsyncs that wait together at once: more threads in flight is more work per
# commit (WS stream creation with 6 threads: 170/s; with 32: 300/s, 16
# clients).
disk = Pool(32, 'disk')

# CPU work (password hashing, decoding large files): about one thread per
# core, as Python's default executor sizes it.
cpu = Pool(min(32, (os.cpu_count() or 1) + 4), 'cpu')
