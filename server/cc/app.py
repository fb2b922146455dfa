"""The command center application: routes of every resource module and the
periodic WS probe."""
from tornado.ioloop import PeriodicCallback

from server import runner
from server.cc import workservers
from server.web import App, HealthHandler


class CommandCenter(App):
    def __init__(self, settings, redis, task_id=0):
        handlers = [(r'/', HealthHandler)]
        handlers += workservers.default_handlers
        super().__init__(handlers, settings, redis, task_id)
        self.probe = None

    async def on_start(self):
        self.probe = PeriodicCallback(lambda: workservers.probe_all(self),
                                      self.config['ws_probe_interval_in_ms'])
        self.probe.start()

    async def on_stop(self):
        if self.probe is not None:
            self.probe.stop()


def main(argv=None):
    return runner.main('cc', CommandCenter, argv)
