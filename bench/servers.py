"""Servers a benchmark run starts and measures: our CC/WS as real processes
(with embedded Redis) and the bare and durable Tornado ceilings, plus their
CPU and memory as the OS sees them."""
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time

import psutil
import requests

from tools.testing import (
    ROOT,
    ServerProcess,
    certs,
    command_centers,
    free_port,
    tmpdir,
)


def client_ssl():
    return ssl.create_default_context(cafile=certs()['ca'])


class Ceiling:
    """A ceiling server (bench/ceiling.py) in its own process group: bare,
    or `durable` with its files in a folder of its own, removed with the
    run's temporary folder when the run ends: a deletion inside the run
    makes the file creations after it cost more (docs/benchmarks.md, the
    slow rep)."""

    def __init__(self, processes=1, durable=False, disk_threads=None):
        self.port = free_port()
        self.durable = durable
        c = certs()
        args = [sys.executable, '-m', 'bench.ceiling', '--port',
                str(self.port), '--cert', c['cert'], '--key', c['key'],
                '--processes', str(processes)]
        self.data = tmpdir('durable') if durable else None
        if durable:
            args += ['--data', self.data]
            if disk_threads:
                args += ['--disk-threads', str(disk_threads)]
        self.process = subprocess.Popen(args, cwd=ROOT,
                                        start_new_session=True)
        session = requests.Session()
        session.trust_env = False
        deadline = time.monotonic() + 30
        while True:
            try:
                if session.get('https://127.0.0.1:%d/' % self.port,
                               verify=c['ca'], timeout=1).ok:
                    break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def pids(self):
        return tree_pids(self.process.pid)

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)


@contextlib.contextmanager
def stopping():
    """`keep(server)` registers a started server; all are stopped on the
    way out, the last started first, whatever happened."""
    with contextlib.ExitStack() as stack:
        def keep(server):
            stack.callback(server.stop)
            return server
        yield keep


def tree_pids(pid):
    """A process and all its descendants (workers, embedded Redis)."""
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def start_ws(root=None, **conf):
    """A WS; measured alone unless `command_centers` names a CC; run from
    the checkout `root` (default: this one)."""
    conf.setdefault('command_centers', command_centers())
    conf.setdefault('log_level', 'warning')
    ws = ServerProcess('ws', **conf)
    if root:
        ws.root = os.path.abspath(root)
    return ws.start()


def start_cc(**conf):
    conf.setdefault('log_level', 'warning')
    # The benchmark's cores all come from one address: the per-client
    # assignment limits (docs/security.md) would measure 429s.
    conf.setdefault('client_max_held_streams', 10 ** 9)
    conf.setdefault('client_assigns_per_minute', 10 ** 9)
    return ServerProcess('cc', **conf).start()


def server_pids(server):
    return tree_pids(server.process.pid)
