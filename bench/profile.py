"""Profile the hot paths with py-spy: the CC's placement and assignment (a
CC of 2 processes and a WS as in `python -m bench --only assignments`), or
the WS's frame path (`--spy frames`: the frame workload of `make bench`).
Prints the CPU each server process spends per request and, for every
profiled phase, the functions with the most samples (own and inclusive).

    python -m bench.profile [--streams N] [--duration S] [--out DIR]
                            [--spy place|assign|frames] [--processes N]
                            [--size BYTES] [--cores C]

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
from tools.testing import command_centers


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
             '200', '--gil', '-f', 'raw', '-o', path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        print('py-spy of pid %d -> %s' % (pid, path))
    time.sleep(1)  # attached before the load starts
    return procs


def top(paths, n=25):
    """The functions with the most samples over collapsed-stack files:
    (own, inclusive) as shares of all samples, printed."""
    own, incl, total = {}, {}, 0
    for path in paths:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for line in lines:
            stack, _, count = line.rpartition(' ')
            if not count.isdigit():
                continue
            k = int(count)
            frames = [f for f in stack.split(';')[1:] if f]
            total += k
            if frames:
                own[frames[-1]] = own.get(frames[-1], 0) + k
            for f in set(frames):
                incl[f] = incl.get(f, 0) + k
    if not total:
        print('no samples')
        return
    print('%d samples; top own | top inclusive' % total)
    a = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    b = sorted(incl.items(), key=lambda kv: -kv[1])[:n]
    for (fa, ka), (fb, kb) in zip(a, b, strict=False):
        print('%5.1f%% %-60s | %5.1f%% %s' % (
            100.0 * ka / total, fa[:60], 100.0 * kb / total, fb[:70]))


def profile_frames(args):
    """py-spy on the WS's workers while the frame workload runs."""
    ws = servers.start_ws(num_processes=args.processes,
                          heartbeat_increment=3600)
    try:
        pids = servers.server_pids(ws)
        pythons = [pid for pid in pids if 'python' in psutil.Process(
            pid).name() and (args.processes == 1 or pid != ws.process.pid)]
        spies = spy(pythons, args.duration + 1, args.out, 'frames')
        before = cpu_by_process(pids)
        out = workloads.frames_ws(ws, args.size, args.cores, args.duration)
        show('frames', before, cpu_by_process(pids), out['requests'])
        print('frames: %(rate).0f/s, p99 %(p99_ms).1f ms, %(errors)d errors,'
              ' %(mismatches)d mismatches' % out)
        for s in spies:
            s.wait()
        top([os.path.join(args.out, 'frames_%d.txt' % pid)
             for pid in pythons])
    finally:
        ws.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--streams', type=int, default=3000)
    p.add_argument('--duration', type=float, default=3.0)
    p.add_argument('--spy', choices=('place', 'assign', 'frames'))
    p.add_argument('--processes', type=int, default=2)
    p.add_argument('--size', type=int, default=10_000)
    p.add_argument('--cores', type=int, default=32)
    p.add_argument('--out', default='/tmp/siegetank-profile')
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.spy == 'frames':
        return profile_frames(args)
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
