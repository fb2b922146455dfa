"""GET /metrics of both servers: Prometheus text from metrics.py, for
loopback (not through a balancer) and the `metrics_allow` networks only
(else 403).

The gauges that describe state rather than events (streams by state, disk
free and size, Redis up and its round trip, each WS online as the CC sees
it) are measured at scrape time by the worker that
answers, from counts the app already keeps (`app.stream_counts()`), never
by scanning streams.
"""
import functools
import ipaddress
import shutil
import time
from typing import Any

from server import metrics
from server.web import APIError, APIHandler, Permission, allow, role


@functools.lru_cache(maxsize=8)
def _networks(allowed: tuple[str, ...]) -> tuple[
        ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allowed)


def allowed(address: str | None, networks: list[str],
            via_proxy: bool = False) -> bool:
    """Loopback always (unless through a trusted proxy); else an address
    inside one of `networks`."""
    try:
        ip = ipaddress.ip_address(address or '')
    except ValueError:
        return False
    if ip.is_loopback and not via_proxy:
        return True
    return any(ip in net for net in _networks(tuple(networks)))


@role('metrics', 'open to loopback and the metrics_allow networks only')
async def _metrics_reader(handler: APIHandler, rule: Permission) -> str:
    """Loopback or an address of `metrics_allow`; anyone else a 403."""
    if not allowed(handler.request.remote_ip,
                   handler.config.metrics_allow, handler.via_proxy):
        raise APIError(403, '/metrics is open to loopback and the '
                       'metrics_allow networks only')
    return 'metrics'


class MetricsHandler(APIHandler):
    @allow('metrics')
    async def get(self) -> None:
        m = metrics.get()
        usage = shutil.disk_usage(self.config.data_folder)
        m.disk_free.set(usage.free)
        m.disk_total.set(usage.total)
        try:
            await self.store_gauges(m)
            m.store_up.set(1)
        except Exception:
            # Still a 200: the store is down, not this server (a server
            # that does not answer is Prometheus's own `up`).
            m.store_up.set(0)
        self.set_header('Content-Type',
                        'text/plain; version=0.0.4; charset=utf-8')
        self.finish(m.exposition())

    async def store_gauges(self, m: Any) -> None:
        app = self.application
        start = time.perf_counter()
        await self.redis.ping()
        m.redis_rtt.set(time.perf_counter() - start)
        for state, n in (await app.stream_counts()).items():
            m.streams.labels(state).set(n)
        workservers_up = getattr(app, 'workservers_up', None)   # CC only
        if workservers_up is not None:
            for name, up in (await workservers_up()).items():
                m.workserver_up.labels(name).set(up)


default_handlers = [
    (r'/metrics', MetricsHandler),
]
