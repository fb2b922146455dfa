"""The workserver application: routes of every resource module, CC
registration, the heartbeat sweep and the start-up recovery."""
import asyncio

from tornado.ioloop import PeriodicCallback

from server import runner
from server.ws import core, recovery, registration, streams
from server.ws.keys import Keys
from server.ws.lua import Multiplexed
from server.ws.storage import Storage
from server.web import App, HealthHandler


class WorkServer(App):
    def __init__(self, settings, redis, task_id=0):
        handlers = [(r'/', HealthHandler)]
        handlers += streams.default_handlers
        handlers += core.default_handlers
        super().__init__(handlers, settings, redis, task_id)
        self.keys = Keys(settings['name'])
        self.lua = Multiplexed.like(redis)  # hot-path scripts (see lua.py)
        self.storage = Storage(settings['data_folder'])
        self.storage.ensure()
        self.tasks = []
        self.pulse = None

    @classmethod
    def prepare(cls, settings, redis_url):
        """Once, in the master, before any worker serves."""
        recovery.prepare(settings, redis_url)

    async def on_start(self):
        for name, cc in self.config['command_centers'].items():
            self.tasks.append(asyncio.ensure_future(
                registration.register_forever(self, name, cc)))
        self.pulse = PeriodicCallback(lambda: core.sweep_safely(self),
                                      self.config['pulse_frequency_in_ms'])
        self.pulse.start()

    async def close(self):
        """Every worker, after serving."""
        self.lua.close()

    async def on_stop(self):
        if self.pulse is not None:
            self.pulse.stop()
        for task in self.tasks:
            task.cancel()
        await registration.disconnect_all(self)


def main(argv=None):
    return runner.main('ws', WorkServer, argv)
