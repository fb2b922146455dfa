"""The workserver application: routes of every resource module, CC
registration and the periodic jobs."""
import asyncio

from server import runner
from server.ws import registration
from server.web import App, HealthHandler


class WorkServer(App):
    def __init__(self, settings, redis, task_id=0):
        handlers = [(r'/', HealthHandler)]
        super().__init__(handlers, settings, redis, task_id)
        self.tasks = []

    async def on_start(self):
        for name, cc in self.config['command_centers'].items():
            self.tasks.append(asyncio.ensure_future(
                registration.register_forever(self, name, cc)))

    async def on_stop(self):
        for task in self.tasks:
            task.cancel()
        await registration.disconnect_all(self)


def main(argv=None):
    return runner.main('ws', WorkServer, argv)
