"""Profile the CC's placement and assignment paths: a CC (2 processes) and a
WS as in `python -m bench --only assignments`, the CPU each server process
spends per request, and optionally py-spy attached to every CC worker and
the WS while one phase runs.

    python -m bench.profile [--streams N] [--duration S]
                            [--spy place|assign] [--out DIR]

py-spy writes collapsed stacks (`-f raw`), one file per process, under
--out; any flame graph tool reads them."""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

from bench import servers, workloads
from server.testing import command_centers


def cpu_by_process(pids):
    out = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            out[pid] = ('%s %s' % (p.name(), ' '.join(p.cmdline()[1:2])),
                        t.user + t.system)
        except psutil.NoSuchProcess:
            pass
    return out


def show(phase, before, after, requests):
    for pid, (name, t0) in sorted(before.items()):
        if pid in after:
            print('%-7s pid %-7d %-45s %6.2f ms/request' % (
                phase, pid, name[:45],
                1000 * (after[pid][1] - t0) / max(1, requests)))


def spy(pids, seconds, out, phase):
    """py-spy on each pid for `seconds`; returns the processes."""
    exe = shutil.which('py-spy') or os.path.join(
        os.path.dirname(sys.executable), 'py-spy')
    procs = []
    for pid in pids:
        path = os.path.join(out, '%s_%d.txt' % (phase, pid))
        procs.append(subprocess.Popen(
            [exe, 'record', '-p', str(pid), '-d', str(int(seconds)), '-r',
             '200', '-f', 'raw', '-o', path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        print('py-spy of pid %d -> %s' % (pid, path))
    time.sleep(1)  # attached before the load starts
    return procs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--streams', type=int, default=3000)
    p.add_argument('--duration', type=float, default=3.0)
    p.add_argument('--spy', choices=('place', 'assign'))
    p.add_argument('--out', default='/tmp/siegetank-profile')
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cc = servers.start_cc(num_processes=2)
    ws = servers.start_ws(command_centers=command_centers(cc))
    try:
        pids = servers.server_pids(cc) + servers.server_pids(ws)
        pythons = [pid for pid in pids if pid != cc.process.pid
                   and 'python' in psutil.Process(pid).name()]
        spies = []
        if args.spy == 'place':
            spies = spy(pythons, 5 + args.streams / 50.0, args.out, 'place')
        before = cpu_by_process(pids)
        body, rate = workloads.prepare_cc_target(cc, ws, args.streams)
        show('place', before, cpu_by_process(pids), args.streams)
        print('placed %d streams at %.0f/s' % (args.streams, rate))
        for s in spies:
            s.send_signal(signal.SIGINT)  # py-spy writes what it has
            s.wait()
        spies = []
        if args.spy == 'assign':
            spies = spy(pythons, args.duration + 2, args.out, 'assign')
        before = cpu_by_process(pids)
        out = workloads.assignments(cc.port, pids, 32, args.duration, body)
        show('assign', before, cpu_by_process(pids), out['requests'])
        print('assignments: %(rate).0f/s, p50 %(p50_ms).1f ms, p99 '
              '%(p99_ms).1f ms, %(errors)d errors' % out)
        for s in spies:
            s.wait()
    finally:
        ws.stop()
        cc.stop()


if __name__ == '__main__':
    main()
