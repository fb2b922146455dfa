"""A rolling upgrade under load, checked: `python -m tools.upgrade`.

A CC and two WS (two worker processes each), each with its embedded Redis,
on loopback; the synthetic cores of tools/chaos.py keep sending frames and
checkpoints, and a manager keeps downloading. Every server is then
restarted, one after the other (the CC, then each WS: the order of
docs/operations.md, "Rolling upgrade"): SIGTERM, wait for exit 0, start
again -- first from this checkout, then from a copy of it standing for a
newer one. After each start the run waits until the server answers and
the cores have acknowledged more frames.

Checked at the end, with the cores stopped: every stream downloads as the
frames of a checkpoint no older than the last one acknowledged to its core
(no acknowledged frame lost, nothing torn), and the answers the cores saw
other than 200 were only retryable ones: a connection refused or closed
while a server restarts, a 503 that carries Retry-After; and a 401 for a
token of the WS's previous run, after which the core asks the CC again (a
WS that restarts ends its sessions: docs/faults.md). Prints the figures.
"""
import argparse
import collections
import os
import shutil
import sys
import time

import requests

from tools import chaos
from tools.testing import (
    ROOT,
    ServerProcess,
    command_centers,
    tmpdir,
    wait_for,
)

ALLOWED = {'connection refused', 'connection closed', '503 Retry-After',
           '401 token of a previous WS run'}
COPIED = ('server', 'siegetank', 'redis', 'cc.py', 'ws.py')


class Core(chaos.Core):
    """chaos.Core that rides through a restart (retries for up to a
    minute) and counts every answer that was not a 200."""

    def call(self, method, url, body=None, token=None, moment=None):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.stopping:
                raise chaos.Gone('stopping')
            try:
                r = self.http.request(method, url, json=body, timeout=20,
                                      headers={'Authorization': token or ''})
            except requests.ConnectionError as e:
                self.chaos.seen('connection refused' if 'refused' in str(e)
                                else 'connection closed')
                time.sleep(0.2)
                continue
            except requests.Timeout:
                self.chaos.seen('timeout')
                continue
            if r.status_code == 200:
                return r
            if r.status_code == 503:
                wait = r.headers.get('Retry-After')
                self.chaos.seen('503 Retry-After' if wait
                                else '503 without Retry-After')
                # Shorter than asked: the run is short (a real core waits).
                time.sleep(min(float(wait or 1), 0.5))
                continue
            if r.status_code == 401 and token:
                self.chaos.seen('401 token of a previous WS run')
            else:
                self.chaos.seen('%d %s' % (r.status_code, url.rsplit(
                    '/', 2)[-2:]))
            raise chaos.Gone('%s %s: %d' % (method, url, r.status_code))
        raise chaos.Gone('%s %s: no success in a minute' % (method, url))


class Upgrade(chaos.Chaos):
    """chaos.Chaos with a second WS (the streams spread over both)."""

    def __init__(self, seed):
        super().__init__(seed, cc_processes=2)
        self.ws2 = ServerProcess('ws', command_centers=command_centers(
            self.cc), num_processes=2, heartbeat_increment=chaos.HEARTBEAT_S,
            pulse_frequency_in_ms=200, register_retry_max_in_s=0.5,
            redis_timeout_in_s=2.0)
        self.answers = collections.Counter()
        self.restarts = []

    def start(self):
        self.ws2.start()   # registers once the CC is up
        super().start()

    def wait_healthy(self, timeout=90):
        """Both WS online (chaos checks its one)."""
        super().wait_healthy(timeout)

        def online():
            r = self.http.get(self.cc.url + '/ws/status', timeout=5)
            state = r.json().get(self.ws2.name) if r.status_code == 200 \
                else None
            return state is not None and state['online']
        wait_for(online, 'the second WS online', timeout,
                 errors=(requests.RequestException, ValueError))

    def stop(self):
        super().stop()
        if self.ws2.process is not None and self.ws2.process.poll() is None:
            self.ws2.stop()

    def seen(self, what):
        with self.ledger.lock:
            self.answers[what] += 1

    def start_clients(self):
        self.cores = [Core(self, self.rng.random())
                      for _ in range(self.n_cores)]
        self.manager = chaos.Manager(self, self.rng.random())
        for t in self.cores + [self.manager]:
            t.start()

    def acked(self):
        with self.ledger.lock:
            return sum(self.ledger.acked.values())

    def progress(self, frames=20, timeout=120):
        """Wait until the cores acknowledged `frames` more frames."""
        goal = self.acked() + frames
        wait_for(lambda: self.acked() >= goal,
                 'the cores acknowledging %d more frames' % frames, timeout)

    def restart(self, server, root):
        code = server.stop(timeout=60)
        if code != 0:
            self.ledger.fail('stop', '%s exited %s on SIGTERM:\n%s' % (
                server.kind, code, server.read_log()[-2000:]))
        server.root = root
        server.start(timeout=60)
        self.wait_healthy()
        self.restarts.append((server.kind, root))
        self.progress()

    def run_upgrade(self, newer):
        holders = collections.Counter(sid.rsplit(':', 1)[1]
                                      for sid in self.streams)
        if set(holders) != {self.ws.name, self.ws2.name}:
            self.ledger.fail('setup', 'streams not on both WS: %s'
                             % dict(holders))
        self.progress()
        for root in (ROOT, newer):
            # The order of docs/operations.md: the CCs one by one, then
            # the workservers one by one.
            for server in (self.cc, self.ws, self.ws2):
                self.restart(server, root)
        self.stop_clients()
        self.manager.join(60)
        for sid in self.streams:
            if not self.check_download(self.http, sid, full=True):
                self.ledger.fail('unavailable', sid)
        for what, n in self.answers.items():
            if what not in ALLOWED:
                self.ledger.fail('answer', '%s x%d' % (what, n))

    def report(self):
        with self.ledger.lock:
            acked = sum(self.ledger.acked.values())
            failures = list(self.ledger.failures)
        lines = ['restarts: %s' % ', '.join(
            '%s (%s)' % (kind, 'newer' if root != ROOT else 'same')
            for kind, root in self.restarts),
            'frames acknowledged: %d in %d streams on 2 WS (each '
            'downloaded)' % (acked, len(self.streams)),
            'frames lost: %d' % sum(1 for what, _ in failures
                                    if what in ('lost', 'torn')),
            'answers other than 200 the cores saw: %s'
            % (dict(sorted(self.answers.items())) or 'none'),
            'failures: %d' % len(failures)]
        lines += ['  %s: %s' % f for f in failures[:20]]
        return '\n'.join(lines)


def newer_checkout():
    """A copy of this checkout's runtime (what a deploy of a newer one
    puts next to the running one)."""
    folder = os.path.join(tmpdir('upgrade'), 'siegetank-newer')
    os.makedirs(folder)
    for name in COPIED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(folder, name),
                            ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(src, folder)
    return folder


def run(seed=0):
    """(failures, answers, report)."""
    upgrade = Upgrade(seed)
    try:
        upgrade.start()
        upgrade.run_upgrade(newer_checkout())
    finally:
        upgrade.stop()
    return list(upgrade.ledger.failures), upgrade.answers, upgrade.report()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    failures, _, report = run(args.seed)
    print(report)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
