"""Prometheus metrics of both servers (served by monitor.py at /metrics).

Processes: prometheus_client's multiprocess mode, always (one worker or
many, the same code path). Before it forks, the master of runner.py calls
`prepare(settings)`: it wipes `<data_folder>/prometheus` (files of an
earlier run would be summed in) and points PROMETHEUS_MULTIPROC_DIR at it.
Each worker writes its samples to its own memory-mapped files there, a
scrape in any worker merges them all, and the supervisor calls
`worker_died(pid)` for a worker that exited so its live gauges drop out
(its counters stay: they count what it did). Without `prepare` (apps run
in-process by tests) the metrics live in this process's own registry.

Cost per request: a request only adds to plain dicts of this process
(about 4 us, against about 30 us for the three memory-mapped writes of a
counter and a histogram sample, measured on the shared 2-core machine);
`flush()` moves the sums into prometheus_client once a second (runner.py),
before a scrape, and when the worker stops. No Redis round trip.
"""
from __future__ import annotations

import bisect
import os
import re
import shutil
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import Settings

ENV = 'PROMETHEUS_MULTIPROC_DIR'
FLUSH_MS = 1000   # how often a worker adds its counts to the metrics
BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10,
           30)
_metrics: Metrics | None = None


def prepare(settings: Settings) -> None:
    """In the master, before any worker exists."""
    folder = os.path.join(settings.data_folder, 'prometheus')
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    os.environ[ENV] = folder
    from prometheus_client import values
    values.ValueClass = values.get_value_class()


def worker_died(pid: int) -> None:
    if os.environ.get(ENV):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


class Metrics:
    """Every metric, made once per process on first use."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
        )
        self.multiprocess = bool(os.environ.get(ENV))
        # Multiprocess: samples go to files, a scrape reads them through a
        # fresh registry (see exposition); no registry holds these objects.
        self.registry = None if self.multiprocess else CollectorRegistry()
        reg: dict[str, Any] = {'registry': self.registry}
        live: dict[str, Any] = {'registry': self.registry,
                                'multiprocess_mode': 'livemostrecent'}
        self.requests = Counter(
            'siegetank_http_requests', 'HTTP requests answered',
            ['route', 'method', 'status'], **reg)
        self.latency = Histogram(
            'siegetank_http_request_duration_seconds',
            'Time from request start to reply', ['route', 'status'],
            buckets=BUCKETS, **reg)
        self.counters = {
            'frames_received': Counter(
                'siegetank_frames_received', 'Frames accepted into stream '
                'buffers (WS)', **reg),
            'frames_committed': Counter(
                'siegetank_frames_committed', 'Frames committed by '
                'checkpoints (WS)', **reg),
            'checkpoints': Counter(
                'siegetank_checkpoints', 'Checkpoints that committed '
                'frames (WS)', **reg),
            'activations': Counter(
                'siegetank_activations', 'Streams activated for a core '
                '(WS)', **reg),
            'deactivations': Counter(
                'siegetank_deactivations', 'Activations ended, by reason '
                '(expiry = a core went silent) (WS)', ['reason'], **reg),
            'assignments': Counter(
                'siegetank_assignments', 'POST /core/assign outcomes '
                '(CC)', ['outcome'], **reg),
        }
        self.redis_rtt = Gauge('siegetank_redis_rtt_seconds',
                               'Round trip of a PING to this server\'s '
                               'Redis, measured at scrape', **live)
        self.disk_free = Gauge('siegetank_disk_free_bytes',
                               'Free space under data_folder', **live)
        self.disk_total = Gauge('siegetank_disk_total_bytes',
                                'Size of the file system of data_folder',
                                **live)
        self.store_up = Gauge('siegetank_store_up', '1 if this server\'s '
                              'Redis answered a PING at scrape, else 0',
                              **live)
        self.workserver_up = Gauge(
            'siegetank_workserver_up', '1 if the WS is online as this CC '
            'sees it, else 0 (CC)', ['ws'], **live)
        self.streams = Gauge('siegetank_streams', 'Streams by state (CC: '
                             'from the WS reports)', ['state'], **live)
        # (route, method, status) -> requests
        self._requests: dict[tuple[str, str, int], int] = {}
        # (route, status) -> [per bucket..., sum]
        self._latency: dict[tuple[str, int], list[float]] = {}
        # (counter name, label or None) -> sum
        self._counts: dict[tuple[str, str | None], int] = {}

    def observe_request(self, route: str, method: str, status: int,
                        seconds: float) -> None:
        key = (route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        lat = self._latency.get((route, status))
        if lat is None:
            lat = self._latency[(route, status)] = [0.0] * (len(BUCKETS)
                                                            + 2)
        lat[bisect.bisect_left(BUCKETS, seconds)] += 1  # last: +Inf
        lat[-1] += seconds

    def count(self, name: str, n: int = 1,
              label: str | None = None) -> None:
        key = (name, label)
        self._counts[key] = self._counts.get(key, 0) + n

    def flush(self) -> None:
        """Add what this process counted since the last flush to the
        metrics (the histogram's per-bucket values directly: observe()
        would take one sample at a time)."""
        requests, self._requests = self._requests, {}
        latency, self._latency = self._latency, {}
        counts, self._counts = self._counts, {}
        for (route, method, status), n in requests.items():
            self.requests.labels(route, method, str(status)).inc(n)
        for (route, status), lat in latency.items():
            child = self.latency.labels(route, str(status))
            # lat has one more item than the buckets: the sum
            for bucket, hits in zip(child._buckets, lat, strict=False):
                if hits:
                    bucket.inc(hits)
            child._sum.inc(lat[-1])
        for (name, label), n in counts.items():
            metric = self.counters[name]
            (metric if label is None else metric.labels(label)).inc(n)

    def exposition(self) -> bytes:
        self.flush()
        from prometheus_client import (
            CollectorRegistry,
            generate_latest,
            multiprocess,
        )
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


def get() -> Metrics:
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def count(name: str, n: int = 1, label: str | None = None) -> None:
    """Add `n` to counter `name` (of Metrics.counters)."""
    if n:
        get().count(name, n, label)


ROUTE_ARG = re.compile(r'\([^)]*\)')


def route_names(handlers: Iterable[tuple[Any, ...]]) -> dict[type, str]:
    """{handler class: route label}, e.g. '/streams/info/:arg'."""
    names: dict[type, str] = {}
    for pattern, cls, *_ in handlers:
        names.setdefault(cls, ROUTE_ARG.sub(':arg', pattern).rstrip('$'))
    return names
