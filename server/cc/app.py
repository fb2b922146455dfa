"""The command center application: routes of every resource module and
its periodic jobs (WS probes, reconciliation with the workservers,
catching a WS up on what it missed while down). Any number of CC processes
on any hosts sharing one Redis are one CC: nothing is kept on local disk,
and the jobs run in the one process holding the jobs lease
(server/lease.py)."""
import asyncio
import collections
import logging

from tornado.ioloop import PeriodicCallback

from server import fastredis, monitor, runner, store
from server.cc import (
    accounts,
    activations,
    assign,
    collect,
    corekeys,
    dashboard,
    keys,
    reconcile,
    reports,
    stats,
    status,
    streams,
    targets,
    workservers,
)
from server.lease import Lease
from server.web import App, HealthHandler

log = logging.getLogger('siegetank.cc')


class CommandCenter(App):
    def __init__(self, settings, redis, task_id=0):
        handlers: list[tuple] = [(r'/', HealthHandler)]
        handlers += stats.default_handlers  # before /targets/:id/:file
        handlers += accounts.default_handlers
        handlers += targets.default_handlers
        handlers += streams.default_handlers
        handlers += assign.default_handlers
        handlers += workservers.default_handlers
        handlers += corekeys.default_handlers
        handlers += status.default_handlers
        handlers += monitor.default_handlers
        handlers += dashboard.default_handlers
        super().__init__(handlers, settings, redis, task_id)
        self.lease = Lease(redis, keys.JOBS_LEASE,
                           settings.jobs_lease_in_ms)
        # The assignment's script runs over this (see fastredis.py).
        self.fastredis = fastredis.hot_path(redis)
        self.activations = activations.Activations(self)
        self.periodic = []
        self.flushing = {}
        # status.count, every worker: (what, minute) -> count
        self.counted: collections.Counter[tuple[str, int]] = \
            collections.Counter()
        self.counts_flusher = PeriodicCallback(
            lambda: status.flush(self), status.FLUSH_MS)
        self.counts_flusher.start()

    @classmethod
    def prepare(cls, settings, redis_url):
        """Before the workers start: target files of an older CC move from
        its disk into the store; admins made before the admins set join
        it (the loopback bootstrap closes for them too)."""
        targets.import_disk_files(settings, redis_url)
        redis = store.connect_sync(redis_url)
        try:
            accounts.backfill_admins(redis)
        finally:
            redis.close()

    def ws_back(self, name):
        """A WS answered a probe or registered: the lease holder retries
        what it missed (one catch-up at a time per WS)."""
        if not self.lease.held:
            return
        task = self.flushing.get(name)
        if task is None or task.done():
            self.flushing[name] = asyncio.ensure_future(
                self._catch_up(name))

    async def _catch_up(self, name):
        try:
            await targets.flush_pending(self, name)
            await reconcile.flush_abandoned(self, name)
        except store.DOWN as e:
            # the next probe that finds the WS back tries again
            log.warning('redis down, catch-up of %s skipped: %s', name, e)

    def every(self, interval_ms, job):
        """Run `job(app)` every `interval_ms` while this process holds the
        jobs lease; a round the store fails is skipped (logged)."""
        async def run():
            if not self.lease.held:
                return
            try:
                await job(self)
            except store.DOWN as e:
                log.warning('redis down, %s skipped: %s', job.__name__, e)
        callback = PeriodicCallback(run, interval_ms)
        callback.start()
        self.periodic.append(callback)

    async def on_start(self):
        self.lease.start()
        self.every(self.config.ws_probe_interval_in_ms,
                   workservers.probe_all)
        self.every(1000 * self.config.reconcile_interval_in_s,
                   reconcile.reconcile)
        self.every(self.config.stats_interval_in_ms, collect.collect_all)

    async def on_stop(self):
        for callback in self.periodic:
            callback.stop()
        for task in self.flushing.values():
            task.cancel()
        await self.lease.stop()

    async def close(self):
        self.counts_flusher.stop()
        await status.flush(self)
        await fastredis.close(self.redis, self.fastredis)

    async def stream_counts(self):
        """Streams by state, summed over the WS's last reports."""
        names = await self.redis.smembers(keys.WORKSERVERS)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            reports.read(pipe, name)
        totals = {'ok': 0, 'active': 0, 'stopped': 0}
        for h in await pipe.execute() if names else []:
            for state, n in reports.Report.from_hash(h).streams.items():
                if state in totals:
                    totals[state] += n
        return totals

    async def workservers_up(self) -> dict[str, int]:
        """{ws name: 1 if online, else 0}, for /metrics."""
        return {name: int(ws.online) for name, ws in
                (await workservers.load_all(self.redis)).items()}


def main(argv=None):
    return runner.main('cc', CommandCenter, argv)
