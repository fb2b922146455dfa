"""`make bench`: measure the WS and CC against a bare Tornado ceiling and a
durable one (bench/ceiling.py) measured in the same run and process mode,
and report a table, a JSON file and a PNG plot under bench/results/.

    python -m bench [--quick] [--processes N] [--out DIR]

--quick is a smoke run of every workload (seconds, tiny sizes); its figures
mean nothing."""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from bench import report, servers, workloads
from tools.testing import command_centers

TARGETS = {  # ratio or absolute floor/ceiling the issues ask for
    # issue 21, at C = 32 (the most cores up to 32 measured) with the most
    # processes measured (two by default)
    'frames_10k_vs_durable': 0.8, 'frames_10k_vs_bare': 0.45,
    'frames_100k_vs_durable': 0.9, 'p99_vs_durable': 2.0,
    'cpu_ms_per_frame_10k': 0.45, 'volunteer_cpu_s_per_core_hour': 0.8,
    'activations': 0.6, 'assignments_per_s': 1000.0,
    'redis_bytes_per_stream': 1024.0, 'download_mb_per_s': 300.0,
    'status_p99_ms_100k': 50.0,
}
# What each frames run reports, per server and per repetition.
FIGURES = ('rate', 'p50_ms', 'p99_ms', 'cpu_ms_per_request',
           'cpu_ms_per_frame', 'checkpoints_p50_ms', 'checkpoints_p99_ms')
REP_FIGURES = ('rate', 'cpu_ms_per_frame', 'checkpoints_p50_ms',
               'checkpoints_p99_ms', 'server_cpu_share', 'host_idle_share',
               'host_iowait_share', 'host_steal_share', 'settle_s',
               'disk_write_mb_per_s', 'disk_busy_share',
               'dirty_mb', 'writeback_mb', 'redis_commands_per_request',
               'redis_aof_rewrites',
               'redis_aof_mb', 'caches_dropped', 'file_create_us')


def file_create_us(n=200):
    """CPU microseconds to create an empty file where the servers keep
    their data (nothing deleted: that would raise it). On ext4 without a
    journal each new inode skips those freed in the last 1-5 minutes
    (the kernel's recently_deleted), so right after a mass deletion (an
    earlier run's clean-up) this is 10-20x its usual 20 us, and a
    checkpoint, which creates three inodes (the durable ceiling's: one),
    costs that much more CPU (docs/benchmarks.md, the slow rep)."""
    folder = servers.tmpdir('inodes')
    t = time.process_time()
    for i in range(n):
        os.close(os.open(os.path.join(folder, str(i)),
                         os.O_CREAT | os.O_WRONLY, 0o600))
    return 1e6 * (time.process_time() - t) / n


def settle_files(limit_us, most_s):
    """Wait (at most `most_s`) until creating a file costs under
    `limit_us` where the servers keep their data, so that a run does not
    measure the clean-up of the run before it (see file_create_us).
    Returns (seconds waited, the last cost)."""
    t = time.monotonic()
    cost = file_create_us()
    while cost > limit_us and time.monotonic() - t < most_s:
        time.sleep(10)
        cost = file_create_us()
    return time.monotonic() - t, cost


def median_spread(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def record(results, name, row):
    results[name] = row
    report.print_row(row)


def repeat(fn, reps):
    return [fn() for _ in range(reps)]


def interleave(fns, reps, settle=True):
    """{name: [result of each rep]}: one rep of every server in turn, the
    order rotated each rep, so that a slow moment of the machine falls on
    all of them alike. With `settle`, every rep starts with nothing dirty
    in the page cache and the clean cache dropped (a sync and
    drop_caches, outside the measure, timed in the result as
    `settle_s`): else the frames a rep wrote are written back 30 s
    later (vm.dirty_expire_centisecs), inside whichever rep runs then,
    whose fsyncs can wait behind them (docs/benchmarks.md, the slow
    rep). Each rep also keeps what creating a file cost just before it
    (`file_create_us`): a deletion inside the run would show there."""
    runs = {name: [] for name in fns}
    order = list(fns)
    for _ in range(reps):
        for name in order:
            before = settled(settle)
            runs[name].append(dict(fns[name](), **before))
        order = order[1:] + order[:1]
    return runs


def settled(sync=True):
    """Before a measured span, with `sync`: nothing dirty in the page
    cache and the clean page cache dropped (drop_caches); what that took
    and what creating a file costs now ({settle_s, caches_dropped,
    file_create_us}; see interleave)."""
    t = time.perf_counter()
    dropped = False
    if sync:
        os.sync()
        dropped = drop_caches()
    return {'settle_s': time.perf_counter() - t, 'caches_dropped': dropped,
            'file_create_us': file_create_us(50)}


def drop_caches():
    """Free the clean page cache (root only; False if not allowed). On
    a VM whose host takes free memory back (virtio-balloon free page
    reporting, as on the development machine), a page cache that has grown
    by about 1 GB writes into pages the host must fault in first: each
    10 KB write then costs about 9x the CPU. Without this a run's later
    reps, which find the earlier reps' files cached, paid that and the
    first did not (docs/benchmarks.md, the slow rep). Nothing a measured
    span reads comes from the page cache; the next write to a dropped
    file's last partial page reads it back once."""
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('1')
        return True
    except OSError:
        return False


def bench_frames(args, results, keep):
    """Frame PUTs of SimCores (a checkpoint and a heartbeat every 10
    frames) against our WS, the bare ceiling and the durable one, with
    one and with two processes each (or only --processes N)."""
    sizes = [10_000, 100_000]
    levels = args.cores or ([1, 8] if args.quick else [1, 8, 32, 128])
    for processes in [args.processes] if args.processes else [1, 2]:
        bare = keep(servers.Ceiling(processes))
        durable = keep(servers.Ceiling(processes, durable=True,
                                       disk_threads=args.disk_threads))
        ws = keep(servers.start_ws(num_processes=processes,
                                   heartbeat_increment=3600))
        before = args.before and keep(servers.start_ws(
            args.before, num_processes=processes, heartbeat_increment=3600))
        for size in sizes:
            for c in levels:
                def ours(ws=ws, size=size, c=c):
                    return workloads.frames_ws(ws, size, c, args.duration)

                def ceiling(server, size=size, c=c):
                    return workloads.frames_ceiling(server, size, c,
                                                    args.duration)

                fns = {'ours': ours,
                       'bare': lambda ceiling=ceiling, bare=bare:
                           ceiling(bare),
                       'durable': lambda ceiling=ceiling, durable=durable:
                           ceiling(durable)}
                if before:
                    fns['before'] = lambda before=before, size=size, c=c: \
                        workloads.frames_ws(before, size, c, args.duration)
                runs = interleave(fns, args.reps, settle=not args.no_settle)
                row = summarize('frames', {'processes': processes,
                                           'size': size, 'cores': c},
                                runs, FIGURES, REP_FIGURES)
                row['mismatches'] = sum(r['mismatches']
                                        for name in ('ours', 'before')
                                        for r in runs.get(name, []))
                row['frames_committed'] = sum(r['frames_committed']
                                              for r in runs['ours'])
                results['frames'].append(row)
                report.print_row(row)


def bench_volunteers(args, results, keep):
    """1,000 cores at a volunteer's pace on a WS of two processes, then the
    same cores against the bare and the durable ceiling (2 processes each):
    what this pace costs a server that does no more than take the body, or
    than the essential disk work, on the machine of the moment."""
    cores = 100 if args.quick else 1000
    pace = (cores, 12 if args.quick else 60, 1.0 if args.quick else 3.0,
            10_000)
    ws = keep(servers.start_ws(num_processes=2, heartbeat_increment=3600))
    before = settled()
    row = dict(workloads.volunteers(ws, *pace), workload='volunteers',
               processes=2, **before)
    for name, durable in (('bare', False), ('durable', True)):
        ceiling = servers.Ceiling(2, durable=durable)
        before = settled()
        try:  # stopped at once: the workloads after it run without it
            got = workloads.volunteers_ceiling(ceiling, *pace)
        finally:
            ceiling.stop()
        row.update(('%s_%s' % (name, k), v) for k, v in before.items())
        row['%s_cpu_s_per_core_hour' % name] = got['cpu_s_per_core_hour']
        row['%s_p99_ms' % name] = got['p99_ms']
        row['%s_errors' % name] = got['errors']
        row['ratio_%s' % name] = row['cpu_s_per_core_hour'] \
            / got['cpu_s_per_core_hour']
    record(results, 'volunteers', row)


def summarize(kind, params, runs, figures=('rate', 'p99_ms',
                                           'cpu_ms_per_request'),
              rep_figures=()):
    """One row: the median (and spread) of each figure per server, the
    ratios of ours to each ceiling, and each rep's `rep_figures`."""
    row = dict(params, workload=kind)
    for name, rs in runs.items():
        for key in figures:
            med, lo, hi = median_spread(rs, key)
            row['%s_%s' % (name, key)] = med
            row['%s_%s_spread' % (name, key)] = [lo, hi]
        row['%s_errors' % name] = sum(r['errors'] for r in rs)
        if rep_figures:
            row['%s_reps' % name] = [{k: r.get(k) for k in rep_figures}
                                     for r in rs]
    for name in runs:
        if name != 'ours':
            base = row['%s_rate' % name]
            row['ratio_%s' % name] = row['ours_rate'] / base if base \
                else None
    return row


def bench_activations(args, results, keep):
    n = 300 if args.quick else 5000
    bare = keep(servers.Ceiling(args.processes or 1))
    ws = keep(servers.start_ws(num_processes=args.processes or 1))
    runs, creates = {'ours': [], 'bare': []}, []
    for _ in range(args.reps):
        target, _, rate = asyncio.run(workloads.create_streams(ws.port, n))
        creates.append(rate)
        runs['ours'].append(workloads.activations(
            ws.port, servers.server_pids(ws), n, 32, args.duration,
            target))
        runs['bare'].append(workloads.activations(
            bare.port, bare.pids(), n, 32, args.duration))
    row = summarize('activations', {'cores': 32}, runs)
    row['stream_create_rate'] = statistics.median(creates)
    record(results, 'activations', row)


def bench_assignments(args, results, keep):
    # Every assignment takes a stream for good: enough for every repetition.
    n = (300 if args.quick else 4000) * args.reps
    cc = keep(servers.start_cc(num_processes=2))
    ws = keep(servers.start_ws(command_centers=command_centers(cc)))
    body, placed = workloads.prepare_cc_target(cc, ws, n)
    cc_pids, ws_pids = servers.server_pids(cc), servers.server_pids(ws)
    split = {'cc': 0.0, 'ws': 0.0}

    def run():
        before = [servers.cpu_seconds(p) for p in (cc_pids, ws_pids)]
        out = workloads.assignments(cc.port, cc_pids + ws_pids, 32,
                                    args.duration, body)
        after = [servers.cpu_seconds(p) for p in (cc_pids, ws_pids)]
        for k, b, a in zip(('cc', 'ws'), before, after, strict=True):
            split[k] += 1000 * (a - b)
        return out
    runs = repeat(run, args.reps)
    med, lo, hi = median_spread(runs, 'rate')
    row = {'workload': 'assignments', 'cc_processes': 2, 'clients': 32,
           'rate': med, 'rate_spread': [lo, hi],
           'p99_ms': median_spread(runs, 'p99_ms')[0],
           'cpu_ms_per_request': median_spread(
               runs, 'cpu_ms_per_request')[0],
           'requests': sum(r['requests'] for r in runs),
           # CPU ms per assignment in the CC's processes and in the
           # WS's (each with its Redis), summed over the runs
           'cc_cpu_ms_per_request': split['cc'] / max(1, sum(
               r['requests'] for r in runs)),
           'ws_cpu_ms_per_request': split['ws'] / max(1, sum(
               r['requests'] for r in runs)),
           'placement_rate': placed,
           'errors': sum(r['errors'] for r in runs)}
    record(results, 'assignments', row)


def bench_downloads(args, results, keep):
    mb = 20 if args.quick else 400
    ws = keep(servers.start_ws())
    sid, size = workloads.commit_large_stream(ws, mb)
    runs = repeat(lambda: workloads.download(ws, sid, size), args.reps)
    med, lo, hi = median_spread(runs, 'mb_per_s')
    row = {'workload': 'download', 'megabytes': size / 1e6,
           'mb_per_s': med, 'mb_per_s_spread': [lo, hi],
           'rss_growth_mb': max(r['rss_growth_mb'] for r in runs),
           'ok': all(r['ok'] for r in runs)}
    record(results, 'download', row)


def bench_scale(args, results, keep):
    n = 2000 if args.quick else 100_000
    ws = keep(servers.start_ws())
    row = dict(workloads.scale(ws, n), workload='scale')
    record(results, 'scale', row)


def bench_sweep(args, results, keep):
    expiring = 500 if args.quick else 10_000
    ws = keep(servers.start_ws(heartbeat_increment=3 if args.quick else 8,
                               pulse_frequency_in_ms=1000))
    row = dict(workloads.sweep(ws, expiring, 32, 10_000,
                               4 if args.quick else 20,
                               3 if args.quick else 8), workload='sweep')
    record(results, 'sweep', row)


def bench_status(args, results, keep):
    n = 2000 if args.quick else 100_000
    # The streams are made on the WS directly (bench/workloads.py
    # fleet_status): the CC counts a WS's streams only once it knows it
    # placed them, so its reconciliation adopts them within seconds here.
    cc = keep(servers.start_cc(stats_interval_in_ms=500,
                               reconcile_interval_in_s=1, ws_timeout_in_s=2))
    ws = keep(servers.start_ws(command_centers=command_centers(cc)))
    row = dict(workloads.fleet_status(cc, ws, n,
                                      active=100 if args.quick else 1000),
               workload='status')
    results['status'] = row
    report.print_row(row)


def bench_costs(args, results, keep):
    """Per-request costs for the capacity model (docs/capacity.md): WS CPU
    and WS Redis commands per frame (10 and 100 KB), checkpoint and
    heartbeat; hub commands and CPU per assignment; hub commands per
    second of the CC's background jobs for one WS."""
    n = 5 if args.quick else 100
    ws = keep(servers.start_ws(num_processes=2, heartbeat_increment=3600))
    row = {'workload': 'costs', 'processes': 2}
    for size in (10_000, 100_000):
        row['ws_%dk' % (size // 1000)] = workloads.request_costs(
            ws, size, 8, n, 50 if args.quick else 1000)
    cc = keep(servers.start_cc(num_processes=2))
    ws2 = keep(servers.start_ws(command_centers=command_centers(cc)))
    count = 50 if args.quick else 400
    body, _ = workloads.prepare_cc_target(cc, ws2, count)
    row['hub'] = workloads.hub_costs(cc, ws2, body, count,
                                     2.0 if args.quick else 15.0)
    record(results, 'costs', row)


WORKLOADS = {'frames': bench_frames, 'activations': bench_activations,
             'assignments': bench_assignments, 'downloads': bench_downloads,
             'scale': bench_scale, 'sweep': bench_sweep,
             'status': bench_status, 'volunteers': bench_volunteers,
             'costs': bench_costs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--processes', type=int,
                   help='frames and activations: this many processes '
                   '(default: frames with 1 and with 2, activations with 1)')
    p.add_argument('--cores', type=int, action='append',
                   help='frames: this many concurrent cores (repeatable; '
                   'default 1, 8, 32, 128; --quick 1, 8)')
    p.add_argument('--disk-threads', type=int, default=32,
                   help='the durable ceiling\'s fsync threads per process '
                   '(32: as many as the WS\'s disk pool)')
    p.add_argument('--before', metavar='CHECKOUT',
                   help='frames: also measure the WS of another checkout '
                   '(e.g. a worktree of an older commit), interleaved with '
                   'ours: a before/after table from one run')
    p.add_argument('--settle-files-s', type=float, default=300.0,
                   help='wait at most this long at the start for file '
                   'creation to be cheap again where the data goes (0: '
                   'not at all; --quick: not at all)')
    p.add_argument('--no-settle', action='store_true',
                   help='frames: no sync and no dropped page cache before '
                   'each rep (what a rep left dirty is written back inside '
                   'a later one; see drop_caches)')
    p.add_argument('--reps', type=int)
    p.add_argument('--duration', type=float)
    p.add_argument('--only', choices=sorted(WORKLOADS), action='append')
    p.add_argument('--out', default=os.path.join(servers.ROOT, 'bench',
                                                 'results'))
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    if args.quick:
        args.settle_files_s = 0
    args.duration = args.duration or (0.5 if args.quick else 3.0)
    results = {'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
               'processes': args.processes, 'reps': args.reps,
               'duration_s': args.duration, 'quick': args.quick,
               'cpus': os.cpu_count(), 'frames': []}
    if args.settle_files_s:
        waited, cost = settle_files(60.0, args.settle_files_s)
        print('waited %.0f s for file creation to cost %.0f us (limit 60)'
              % (waited, cost), flush=True)
        results['file_create_settle_s'] = waited
    results['file_create_us_start'] = file_create_us()
    for name in args.only or list(WORKLOADS):
        with servers.stopping() as keep:
            WORKLOADS[name](args, results, keep)
    results['file_create_us_end'] = file_create_us()
    results['verdict'] = report.verdict(results, TARGETS)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    report.table(results)
    if results['frames']:
        report.plot(results, os.path.join(args.out, 'frames.png'))
    errors = report.error_count(results)
    print('results in %s; %d errors/mismatches' % (args.out, errors))
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
