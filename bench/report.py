"""Terminal table, verdict against the issue's targets, and the PNG plot."""


def _f(v, fmt='%.1f'):
    return '-' if v is None else fmt % v


def print_row(row):
    print('  ' + ', '.join('%s=%s' % (k, _f(v, '%.3g') if isinstance(v, float)
                                      else v) for k, v in row.items()
                           if not k.endswith(('_spread', '_reps'))),
          flush=True)


SERVERS = ('ours', 'before', 'bare', 'durable')  # before: --before


def _reps(row, name, key, fmt='%.0f'):
    return '/'.join(_f(r.get(key), fmt) for r in row.get(name + '_reps', []))


def table(results):
    if results['frames']:
        frames_table(results)
    rest(results)


def frames_table(results):
    print('\nframe PUTs of SimCores (a checkpoint and a heartbeat every 10 '
          'frames): median of %d interleaved reps x %.1fs; our WS, the bare '
          'and the durable ceiling with the same number of processes; CPU '
          'is the server\'s (with its Redis) per frame PUT'
          % (results['reps'], results['duration_s']))
    print('%5s %6s %5s %-7s %7s %5s %6s %7s %6s %6s %7s %7s  %s' % (
        'procs', 'size', 'cores', 'server', 'req/s', 'xbare', 'xdurab',
        'cpu ms/f', 'p50 ms', 'p99 ms', 'ckpt p50', 'ckpt p99',
        'req/s of each rep'))
    for r in results['frames']:
        for name in SERVERS:
            if '%s_rate' % name not in r:
                continue
            print('%5d %6d %5d %-7s %7s %5s %6s %7s %6s %6s %7s %7s  %s' % (
                r['processes'], r['size'], r['cores'], name,
                _f(r['%s_rate' % name], '%.0f'),
                _f(_ratio(r, name, 'bare'), '%.2f'),
                _f(_ratio(r, name, 'durable'), '%.2f'),
                _f(r['%s_cpu_ms_per_frame' % name], '%.2f'),
                _f(r['%s_p50_ms' % name]), _f(r['%s_p99_ms' % name]),
                _f(r['%s_checkpoints_p50_ms' % name]),
                _f(r['%s_checkpoints_p99_ms' % name]),
                _reps(r, name, 'rate')))


def rest(results):
    reps = [rep for row in results.get('frames', []) for key, value in
            row.items() if key.endswith('_reps') for rep in value]
    if any(not rep.get('caches_dropped') for rep in reps):
        print('\nThe page cache was not dropped before every rep (not root, '
              'or --no-settle): on a VM whose host takes free memory back, '
              'later reps pay for the cache of earlier ones '
              '(docs/benchmarks.md, the slow rep)')
    if results.get('file_create_us_start') is not None:
        print('\nCPU to create a file where the servers keep their data: '
              '%.0f us at the start, %.0f us at the end (about 20 us on '
              'this disk when nothing was deleted there lately)'
              % (results['file_create_us_start'],
                 results['file_create_us_end']))
    a = results.get('activations')
    if a:
        print('\nactivations: %s/s vs bare ceiling %s/s (ratio %s); stream '
              'creation %s/s' % (_f(a['ours_rate'], '%.0f'),
                                 _f(a['bare_rate'], '%.0f'),
                                 _f(a['ratio_bare'], '%.2f'),
                                 _f(a['stream_create_rate'], '%.0f')))
    s = results.get('assignments')
    if s:
        print('CC assignments (2 processes): %s/s, p99 %s ms, server CPU %s '
              'ms per assignment (CC %s + WS %s, each with its Redis); '
              'streams placed via the CC at %s/s'
              % (_f(s['rate'], '%.0f'), _f(s['p99_ms']),
                 _f(s.get('cpu_ms_per_request'), '%.2f'),
                 _f(s.get('cc_cpu_ms_per_request'), '%.2f'),
                 _f(s.get('ws_cpu_ms_per_request'), '%.2f'),
                 _f(s.get('placement_rate'), '%.0f')))
    d = results.get('download')
    if d:
        print('download of %.0f MB: %s MB/s, server RSS growth %s MB'
              % (d['megabytes'], _f(d['mb_per_s'], '%.0f'),
                 _f(d['rss_growth_mb'])))
    sc = results.get('scale')
    if sc:
        print('%d streams: created at %s/s, Redis %s bytes per idle stream'
              % (sc['streams'], _f(sc['create_rate'], '%.0f'),
                 _f(sc['redis_bytes_per_stream'], '%.0f')))
    sw = results.get('sweep')
    if sw:
        print('%d streams expiring at once: request p99 %s ms overall, '
              '%s ms in the worst second; all requeued %s s after the last '
              'expired' % (sw['expiring'], _f(sw['p99_ms']),
                           _f(sw['worst_window_p99_ms']),
                           _f(sw['drained_s_after_expiry'])))
    v = results.get('volunteers')
    if v:
        print('%d cores at a frame each %.0f s (%d KB), a checkpoint every '
              '10, on a WS of 2 processes: %d frames, %d checkpoints, %d '
              'heartbeats in %.0f s; server CPU %s s per core-hour (one CPU '
              'carries %s such cores); p99 %s ms'
              % (v['cores'], v['frame_every_s'], v['size'] // 1000,
                 v['frames'], v['checkpoints'], v['heartbeats'],
                 v['seconds'], _f(v['cpu_s_per_core_hour'], '%.2f'),
                 _f(v['cores_per_cpu'], '%.0f'), _f(v['p99_ms'])))
        if 'bare_cpu_s_per_core_hour' in v:
            print('  the same cores against the ceilings: bare %s s per '
                  'core-hour (ours %sx), durable %s s (ours %sx)'
                  % (_f(v['bare_cpu_s_per_core_hour'], '%.2f'),
                     _f(v['ratio_bare'], '%.2f'),
                     _f(v['durable_cpu_s_per_core_hour'], '%.2f'),
                     _f(v['ratio_durable'], '%.2f')))
    st = results.get('status')
    if st:
        print('GET /status with %d streams (%d active, %d public targets): '
              'median %s ms, p99 %s ms (admin: median %s ms, p99 %s ms); '
              'GET / on the same CC meanwhile: median %s ms, p99 %s ms'
              % (st['streams'], st['active'], st['targets'],
                 _f(st['median_ms'], '%.2f'), _f(st['p99_ms'], '%.2f'),
                 _f(st['admin_median_ms'], '%.2f'),
                 _f(st['admin_p99_ms'], '%.2f'),
                 _f(st['health_median_ms'], '%.2f'),
                 _f(st['health_p99_ms'], '%.2f')))
    c = results.get('costs')
    if c:
        print('\nper-request costs (WS of 2 processes; CPU with its Redis):')
        for size in ('10k', '100k'):
            for kind, v in c['ws_%s' % size].items():
                if kind == 'rss_kb_per_connection':
                    print('  %-5s memory per idle connection %.0f KB'
                          % (size, v))
                    continue
                print('  %-5s %-30s %6.2f ms CPU %5.1f WS Redis commands'
                      % (size, kind, v['cpu_ms'], v['redis_commands']))
        h = c['hub']
        print('  assignment: CC %.2f + WS %.2f ms CPU, %.1f hub commands; '
              'hub background %.1f commands/s for one WS'
              % (h['cc_cpu_ms_per_assignment'],
                 h['ws_cpu_ms_per_assignment'],
                 h['hub_commands_per_assignment'],
                 h['idle_commands_per_s']))
    print('\nverdict:')
    for name, (value, target, ok) in results['verdict'].items():
        print('  %-26s %10s  target %-8s %s' % (
            name, _f(value, '%.3g'), target, 'ok' if ok else 'NOT MET'))


def _ratio(row, name, base):
    """`name`'s rate over `base`'s in one frames row."""
    a, b = row.get('%s_rate' % name), row.get('%s_rate' % base)
    return a / b if a is not None and b else None


def headline(results):
    """The frames rows the targets are for: the most processes measured,
    at 32 cores (or the most cores up to 32 measured)."""
    most = max((r['processes'] for r in results['frames']), default=None)
    rows = [r for r in results['frames'] if r['processes'] == most]
    cores = max((r['cores'] for r in rows if r['cores'] <= 32),
                default=None)
    return {r['size']: r for r in rows if r['cores'] == cores}


def verdict(results, targets):
    out = {}
    rows = headline(results)

    def check(key, value, target, floor=True):
        if value is not None:
            out[key] = (value, target,
                        value >= target if floor else value <= target)
    for size in (10_000, 100_000):
        r = rows.get(size)
        if not r:
            continue
        tag = '%dk_c%d_%dp' % (size // 1000, r['cores'], r['processes'])
        check('frames_%s_vs_durable' % tag, _ratio(r, 'ours', 'durable'),
              targets['frames_%dk_vs_durable' % (size // 1000)])
        if size == 10_000:
            check('frames_%s_vs_bare' % tag, _ratio(r, 'ours', 'bare'),
                  targets['frames_10k_vs_bare'])
            check('cpu_ms_per_frame_%s' % tag, r['ours_cpu_ms_per_frame'],
                  targets['cpu_ms_per_frame_10k'], floor=False)
        if r['ours_p99_ms'] and r['durable_p99_ms']:
            check('p99_vs_durable_%s' % tag,
                  r['ours_p99_ms'] / r['durable_p99_ms'],
                  targets['p99_vs_durable'], floor=False)
    if results.get('volunteers'):
        check('volunteer_cpu_s_per_core_hour',
              results['volunteers']['cpu_s_per_core_hour'],
              targets['volunteer_cpu_s_per_core_hour'], floor=False)
    if results.get('activations'):
        v = results['activations']['ratio_bare']
        floor = targets['activations']
        out['activations_ratio'] = (v, floor, v is not None and v >= floor)
    if results.get('assignments'):
        v = results['assignments']['rate']
        out['assignments_per_s'] = (v, targets['assignments_per_s'],
                                    v is not None and
                                    v >= targets['assignments_per_s'])
    if results.get('scale'):
        v = results['scale']['redis_bytes_per_stream']
        ceiling = targets['redis_bytes_per_stream']
        out['redis_bytes_per_stream'] = (v, ceiling, v <= ceiling)
    if results.get('download'):
        v = results['download']['mb_per_s']
        out['download_mb_per_s'] = (v, targets['download_mb_per_s'],
                                    v >= targets['download_mb_per_s'])
    if results.get('status'):
        v = results['status']['p99_ms']
        key = 'status_p99_ms_%dk' % (results['status']['streams'] // 1000)
        out[key] = (v, targets['status_p99_ms_100k'],
                    v <= targets['status_p99_ms_100k'])
    return out


def error_count(results):
    n = 0
    for r in results['frames']:
        n += sum(r.get('%s_errors' % name, 0) for name in SERVERS) \
            + r['mismatches']
    for key in ('activations',):
        if results.get(key):
            n += results[key]['ours_errors'] + results[key]['bare_errors']
    for key in ('assignments', 'sweep', 'volunteers'):
        if results.get(key):
            n += results[key]['errors']
    if results.get('volunteers'):
        n += sum(results['volunteers'].get('%s_errors' % name, 0)
                 for name in ('bare', 'durable'))
    if results.get('costs'):
        c = results['costs']
        n += c['hub']['assign_errors'] + sum(
            v['errors'] for size in ('ws_10k', 'ws_100k')
            for v in c[size].values() if isinstance(v, dict))
    for key in ('sweep', 'volunteers'):
        if results.get(key):
            n += results[key]['mismatches']
    if results.get('download') and not results['download']['ok']:
        n += 1
    return n


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    most = max(r['processes'] for r in results['frames'])
    for size, style in ((10_000, '-'), (100_000, '--')):
        rows = sorted((r for r in results['frames'] if r['size'] == size
                       and r['processes'] == most), key=lambda r: r['cores'])
        if not rows:
            continue
        cores = [r['cores'] for r in rows]
        for i, (name, marker) in enumerate(zip(SERVERS, 'o^sd',
                                               strict=True)):
            if '%s_rate' % name not in rows[0]:
                continue
            label = '%s %d KB' % (name, size // 1000)
            ax1.plot(cores, [r['%s_rate' % name] for r in rows],
                     marker + style, color='C%d' % i, label=label)
            ax2.plot(cores, [r['%s_p99_ms' % name] for r in rows],
                     marker + style, color='C%d' % i, label=label)
    for ax, title, unit in ((ax1, 'throughput', 'requests/s'),
                            (ax2, 'p99 latency', 'ms')):
        ax.set_xscale('log', base=2)
        ax.set_xlabel('concurrent cores')
        ax.set_ylabel(unit)
        ax.set_title('frame PUTs, %d process(es): %s' % (most, title))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
