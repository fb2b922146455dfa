"""The workserver application: routes of every resource module, CC
registration, the heartbeat sweep and the start-up recovery."""
import asyncio
import logging
import time

from tornado.ioloop import PeriodicCallback

from server import fastredis, monitor, runner, store
from server.web import App, HealthHandler
from server.ws import (
    cc_api,
    core,
    download,
    frame_path,
    recovery,
    registration,
    report,
    sessions,
    stream_record,
)
from server.ws.keys import Keys
from server.ws.storage import Storage

log = logging.getLogger('siegetank.ws')


class WorkServer(App):
    # Frames of known tokens take the lean path (frame_path.py).
    connection_class = frame_path.Connection

    def __init__(self, settings, redis, task_id=0):
        handlers: list[tuple] = [(r'/', HealthHandler)]
        handlers += cc_api.default_handlers
        handlers += download.default_handlers  # after /streams/<command>/..
        handlers += core.default_handlers
        handlers += report.default_handlers
        handlers += monitor.default_handlers
        super().__init__(handlers, settings, redis, task_id)
        self.keys = Keys(settings.name)
        # Hot-path scripts run over this (see fastredis.py).
        self.fastredis = fastredis.hot_path(redis)
        self.storage = Storage(settings.data_folder,
                               settings.checkpoint_flush)
        self.storage.ensure()
        self.tasks = []
        self.pulse = None
        self.unreleased = []   # locks to free once Redis answers again
        self.releasing = None
        self.live_tokens = core.LiveTokens()

    @classmethod
    def prepare(cls, settings, redis_url):
        """Rebuild the Redis index from the disk (recovery.py)."""
        recovery.prepare(settings, redis_url)

    @classmethod
    def worker_died(cls, settings, redis_url, prefix):
        """In the master: free (and repair) what a dead worker held; once
        more a moment later, for a lock command Redis had still to read
        from the dead worker's socket."""
        recovery.free_dead_holder(settings, redis_url, prefix)
        time.sleep(0.25)
        recovery.free_dead_holder(settings, redis_url, prefix)

    async def on_start(self):
        for name, cc in self.config.command_centers.items():
            self.tasks.append(asyncio.ensure_future(
                registration.register_forever(self, name, cc)))
        self.pulse = PeriodicCallback(self.on_pulse,
                                      self.config.pulse_interval_in_ms)
        self.pulse.start()

    async def on_pulse(self):
        """Worker 0's periodic job: an index Redis lost is rebuilt, then
        cores that went silent are swept and streams whose back-off is
        over requeued."""
        try:
            await recovery.check_index(self)
        except store.DOWN as e:
            log.warning('redis down, pulse skipped: %s', e)
            return
        await core.sweep_safely(self)
        try:
            await stream_record.requeue_due(self)
        except store.DOWN as e:
            log.warning('back-offs not requeued, redis down: %s', e)

    async def stream_counts(self):
        return (await sessions.summary(self))[0]

    async def close(self):
        await fastredis.close(self.redis, self.fastredis)

    async def on_stop(self):
        if self.pulse is not None:
            self.pulse.stop()
        for task in self.tasks:
            task.cancel()
        await registration.disconnect_all(self)


def main(argv=None):
    return runner.main('ws', WorkServer, argv)
