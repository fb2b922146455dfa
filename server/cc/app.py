"""The command center application: routes of every resource module, the
periodic WS probe, and catching a WS up on what it missed while down."""
import asyncio
import logging

from tornado.ioloop import PeriodicCallback

from server import runner, store
from server.cc import (
    accounts,
    assign,
    reconcile,
    streams,
    targets,
    workservers,
)
from server.web import App, HealthHandler

log = logging.getLogger('siegetank.cc')


class CommandCenter(App):
    def __init__(self, settings, redis, task_id=0):
        handlers = [(r'/', HealthHandler)]
        handlers += accounts.default_handlers
        handlers += targets.default_handlers
        handlers += streams.default_handlers
        handlers += assign.default_handlers
        handlers += workservers.default_handlers
        super().__init__(handlers, settings, redis, task_id)
        self.probe = None
        self.reconciling = None
        self.flushing = {}

    def ws_back(self, name):
        """A WS answered a probe or registered: retry the target deletions
        it missed (one retry at a time per WS)."""
        task = self.flushing.get(name)
        if task is None or task.done():
            self.flushing[name] = asyncio.ensure_future(
                self._catch_up(name))

    async def _catch_up(self, name):
        await targets.flush_pending(self, name)
        await reconcile.flush_abandoned(self, name)

    async def on_start(self):
        self.probe = PeriodicCallback(self.on_probe,
                                      self.config['ws_probe_interval_in_ms'])
        self.probe.start()
        self.reconciling = PeriodicCallback(
            self.on_reconcile, 1000 * self.config['reconcile_interval_in_s'])
        self.reconciling.start()

    async def on_probe(self):
        try:
            await workservers.probe_all(self)
        except store.DOWN as e:
            log.warning('redis down, WS probes skipped: %s', e)

    async def on_reconcile(self):
        try:
            await reconcile.reconcile(self)
        except store.DOWN as e:
            log.warning('redis down, reconciliation skipped: %s', e)

    async def on_stop(self):
        if self.probe is not None:
            self.probe.stop()
        if self.reconciling is not None:
            self.reconciling.stop()
        for task in self.flushing.values():
            task.cancel()


def main(argv=None):
    return runner.main('cc', CommandCenter, argv)
