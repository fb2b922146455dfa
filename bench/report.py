"""Terminal table, verdict against the issue's targets, and the PNG plot."""


def _f(v, fmt='%.1f'):
    return '-' if v is None else fmt % v


def print_row(row):
    print('  ' + ', '.join('%s=%s' % (k, _f(v, '%.3g') if isinstance(v, float)
                                      else v) for k, v in row.items()
                           if not k.endswith('_spread')), flush=True)


def table(results):
    print('\nframe PUTs (req/s, median of %d x %.0fs; WS and ceiling with '
          'the same number of processes)'
          % (results['reps'], results['duration_s']))
    print('%5s %7s %5s %9s %9s %6s %8s %8s %9s %9s' % (
        'procs', 'size', 'cores', 'ours/s', 'ceil/s', 'ratio', 'p99 ours',
        'p99 ceil', 'cpu ms/r', 'ceil ms/r'))
    for r in results['frames']:
        print('%5d %7d %5d %9s %9s %6s %8s %8s %9s %9s' % (
            r['processes'], r['size'], r['cores'], _f(r['ours_rate'], '%.0f'),
            _f(r['ceiling_rate'], '%.0f'), _f(r['ratio'], '%.2f'),
            _f(r['ours_p99_ms']), _f(r['ceiling_p99_ms']),
            _f(r['ours_cpu_ms_per_request'], '%.2f'),
            _f(r['ceiling_cpu_ms_per_request'], '%.2f')))
    a = results.get('activations')
    if a:
        print('\nactivations: %s/s vs ceiling %s/s (ratio %s); stream '
              'creation %s/s' % (_f(a['ours_rate'], '%.0f'),
                                 _f(a['ceiling_rate'], '%.0f'),
                                 _f(a['ratio'], '%.2f'),
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
    print('\nverdict:')
    for name, (value, target, ok) in results['verdict'].items():
        print('  %-26s %10s  target %-8s %s' % (
            name, _f(value, '%.3g'), target, 'ok' if ok else 'NOT MET'))


def verdict(results, targets):
    out = {}
    # The targets are for the most processes measured (two by default).
    most = max((r['processes'] for r in results['frames']), default=None)
    rows = [r for r in results['frames'] if r['processes'] == most
            and r['cores'] >= 8 and r['ratio'] is not None]
    for size, key in ((10_000, 'frames_10k'), (100_000, 'frames_100k')):
        ratios = [r['ratio'] for r in rows if r['size'] == size]
        if ratios:
            out['%s_min_ratio_c8plus_%dp' % (key, most)] = (
                min(ratios), targets[key], min(ratios) >= targets[key])
    p99 = [r['ours_p99_ms'] / r['ceiling_p99_ms'] for r in rows
           if r['size'] == 10_000 and r['ceiling_p99_ms']]
    if p99:
        key = 'p99_vs_ceiling_10k'
        out['%s_max_c8plus_%dp' % (key, most)] = (
            max(p99), targets[key], max(p99) <= targets[key])
    if results.get('activations'):
        v = results['activations']['ratio']
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
        n += r['ours_errors'] + r['ceiling_errors'] + r['mismatches']
    for key in ('activations',):
        if results.get(key):
            n += results[key]['ours_errors'] + results[key]['ceiling_errors']
    for key in ('assignments', 'sweep', 'volunteers'):
        if results.get(key):
            n += results[key]['errors']
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
        label = '%d KB' % (size // 1000)
        ax1.plot(cores, [r['ours_rate'] for r in rows], 'o' + style,
                 color='C0', label='WS ' + label)
        ax1.plot(cores, [r['ceiling_rate'] for r in rows], 's' + style,
                 color='C1', label='ceiling ' + label)
        ax2.plot(cores, [r['ours_p99_ms'] for r in rows], 'o' + style,
                 color='C0', label='WS ' + label)
        ax2.plot(cores, [r['ceiling_p99_ms'] for r in rows], 's' + style,
                 color='C1', label='ceiling ' + label)
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
