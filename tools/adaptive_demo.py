"""`make adaptive`: adaptive sampling against plain MD, REPLICATES times
each, on the embedded default (a CC, a WS, real OpenMM cores), with alanine
dipeptide in implicit solvent (amber14 + OBC2, no box).

1. starts the servers once (tools.demo's orchestration) under
   data/adaptive/ with the shipped anonymous assignment limits; the demo's
   cores are the researcher's own and present a core key made with its own
   limits (KEY_LIMITS), so they are never throttled as strangers; builds
   the target with OpenMM;
2. per replicate, two public targets, `plain-<r>` and `adaptive-<r>`, each
   run by CORES OpenMM cores at once, with replicate-specific seeds. plain:
   CORES streams from the minimized structure (different velocities),
   stopped at TOTAL_FRAMES committed frames (checked at every poll of the
   adaptive loop). adaptive: siegetank.adaptive.Sampler: IN_FLIGHT short
   streams of FRAMES_PER_STREAM frames queued at any time, every REFILL
   finished ones replaced by seeds from the best-scored regular-space
   clusters (sin/cos phi/psi; SCORE: FAST-style, distance from the start
   plus a count bonus, or least counts), to TOTAL_FRAMES frames. Settings
   can be overridden from the environment (ADAPTIVE_REPLICATES,
   ADAPTIVE_FRAMES, ADAPTIVE_SCORE, ...) for quick trials;
3. per replicate and arm, in arrival order of the first TOTAL_FRAMES
   frames: phi/psi cells visited (10-degree grid), frames until the first
   visit to each metastable basin, frames per wall-second; the replicate
   table with median and range; plots in data/adaptive/;
4. an MSM with deeptime from every synced frame of both arms: implied
   timescales against lag (plot), Bayesian error bars, only timescales
   longer than the lag, a Chapman-Kolmogorov test (plot);
5. stops everything and checks that no process is left.
"""
import os
import re
import shutil
import signal
import sys
import time

import numpy as np

from tools import demo

ROOT = demo.ROOT
RUN = os.path.join(ROOT, 'data', 'adaptive')
CORES = 2                  # per arm
SOLVENT = 'obc2'           # see build_target.SOLVENTS
STEPS_PER_FRAME = 500      # 1 ps per frame (2 fs steps)
REPLICATES = int(os.environ.get('ADAPTIVE_REPLICATES', 3))
TOTAL_FRAMES = int(os.environ.get('ADAPTIVE_FRAMES', 800))  # per arm
DMIN = float(os.environ.get('ADAPTIVE_DMIN', 0.15))  # sin/cos(phi, psi)
IN_FLIGHT = int(os.environ.get('ADAPTIVE_IN_FLIGHT', 8))  # streams
FRAMES_PER_STREAM = int(os.environ.get('ADAPTIVE_FPS', 5))  # per stream
SCORE = os.environ.get('ADAPTIVE_SCORE', 'least-counts')  # or fast
FAST_COUNTS_WEIGHT = float(os.environ.get('ADAPTIVE_FAST_WEIGHT', 1.0))
REFILL = int(os.environ.get('ADAPTIVE_REFILL', 3))  # finished per round
GRID_DEG = 10              # coverage cells: 36 x 36 on phi/psi
# Metastable basins on phi/psi (degrees): (phi range, psi ranges).
BASINS = {'alphaR': ((-180, 0), ((-100, 50),)),
          'beta/PPII': ((-180, 0), ((50, 180), (-180, -100))),
          'alphaL/C7ax': ((0, 120), ((-180, 180),))}
MSM_STATES = 40
MSM_LAGS = (1, 2, 5, 10, 20, 50)
MSM_LAG = 10               # frames
# The researcher's own cores come with a core key whose limits the admin
# set when making it (POST /engines/keys `limits`): the anonymous limits
# of the shipped cc.conf stay as they are and never stall them.
KEY_LIMITS = {'held': 1000, 'per_minute': 100000}

T0 = time.monotonic()
def say(text):
    print('[%5.1fs] %s' % (time.monotonic() - T0, text), flush=True)


def start_cores(procs, arm, address, ca, target_id, key):
    """`key`: the core key the CC requires (passed in the environment).
    Both arms alike: a checkpoint every 0.25 s (a 22-atom state), so a
    stream stopped at its quota loses little uncommitted work."""
    return [procs.start('%s-core%d' % (arm, i + 1), [
        sys.executable, '-m', 'siegetank.core', '--cc', address, '--ca', ca,
        '--engine', 'openmm', '--platform', 'CPU', '--threads', '1',
        '--target-id', target_id, '--checkpoint-every', '0.25',
        '--heartbeat-every', '5', '--backoff-first', '0.05',
        '--backoff-max', '0.5'], {'SIEGETANK_CORE_KEY': key})
        for i in range(CORES)]


def stop_cores(procs, cores):
    for c in cores:
        procs.stop(c)


# What core_summary reads of a core's summary line (siegetank.core
# __main__.SUMMARY).
CORE_SUMMARY = re.compile(r'core: .* (\d+) streams \((\d+) stopped by the '
                          r'manager\), (\d+) errors')


def core_summary(procs, cores):
    """(streams, stopped by the manager, errors) of stopped cores, summed
    from the summary line each printed in its log on exit. The sampler and
    the budget stop streams all the time: those are no errors."""
    total = [0, 0, 0]
    for c in cores:
        with open(os.path.join(procs.folder, c.demo_name + '.log')) as f:
            found = CORE_SUMMARY.findall(f.read())
        if found:
            total = [t + int(n) for t, n in zip(total, found[-1],
                                                 strict=True)]
    return tuple(total)


def total_frames(target):
    return sum(s['frames'] for s in target.stream_info().values())


def cells(angles):
    """Indices of the GRID_DEG-degree phi/psi cells of each frame."""
    n = 360 // GRID_DEG
    idx = np.floor((angles + 180.0) / GRID_DEG).astype(int) % n
    return idx[:, 0] * n + idx[:, 1]


def coverage_curve(angles):
    """Cells visited after each frame."""
    seen = np.zeros((360 // GRID_DEG) ** 2, dtype=bool)
    curve = np.empty(len(angles), dtype=int)
    count = 0
    for i, c in enumerate(cells(angles)):
        if not seen[c]:
            seen[c] = True
            count += 1
        curve[i] = count
    return curve


def ordered_angles(folder, arrivals=None):
    """phi/psi of an arm's frames in the order they arrived: sync by sync
    (`arrivals`: per sync {stream: (first frame, count)}; default: all in
    one), streams interleaved frame by frame within a sync."""
    from siegetank import adaptive
    cache = adaptive.FeatureCache(folder, adaptive.phi_psi)
    cache.update()
    feats = cache.all()
    if arrivals is None:
        arrivals = [{sid: (0, len(f)) for sid, f in feats.items()}]
    out = []
    for batch in arrivals:
        parts = [feats[sid][start:start + n]
                 for sid, (start, n) in sorted(batch.items())]
        longest = max((len(p) for p in parts), default=0)
        for i in range(longest):
            out.extend(p[i] for p in parts if i < len(p))
    return np.array(out).reshape(-1, 2)


def first_visits(angles):
    """{basin: frames until its first visit (1-based), None if never}."""
    out = {}
    for name, ((lo, hi), psis) in BASINS.items():
        inside = (angles[:, 0] > lo) & (angles[:, 0] < hi) & np.any(
            [(angles[:, 1] >= a) & (angles[:, 1] < b) for a, b in psis],
            axis=0)
        hits = np.flatnonzero(inside)
        out[name] = int(hits[0]) + 1 if len(hits) else None
    return out


def plot(path, plain, adaptive_, curves):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    bins = np.linspace(-180, 180, 360 // GRID_DEG + 1)
    for ax, (name, angles) in zip(axes[:2], (('plain MD', plain),
                                             ('adaptive', adaptive_)),
                                  strict=True):
        h, _, _ = np.histogram2d(angles[:, 0], angles[:, 1], bins=[bins,
                                                                   bins])
        img = ax.imshow(np.log10(h.T + 1), origin='lower', cmap='viridis',
                        extent=(-180, 180, -180, 180), aspect='equal')
        ax.set_title('%s, all replicates: %d frames, %d cells' % (
            name, len(angles), int((h > 0).sum())))
        ax.set_xlabel('phi (deg)')
        ax.set_ylabel('psi (deg)')
        fig.colorbar(img, ax=ax, label='log10(frames + 1)')
    for (name, runs), color in zip(curves.items(), ('C0', 'C1'), strict=False):
        for i, curve in enumerate(runs):
            axes[2].plot(np.arange(1, len(curve) + 1), curve, color=color,
                         alpha=0.8, lw=1, label=name if i == 0 else None)
    axes[2].set_xlabel('committed frames')
    axes[2].set_ylabel('phi/psi cells visited (%d deg grid)' % GRID_DEG)
    axes[2].legend()
    axes[2].set_title('coverage, %d replicates per arm' % len(
        curves['plain MD']))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def score(initial):
    """The seed choice: least counts, or (SCORE=fast) FAST-style: reward
    the distance from the starting structure in the feature space, plus
    the 1/sqrt(counts) bonus."""
    from siegetank import adaptive
    if SCORE == 'least-counts':
        return adaptive.least_counts
    start = adaptive.backbone_dihedrals(initial)[0]
    return adaptive.fast(lambda centers: np.linalg.norm(centers - start,
                                                        axis=1),
                         FAST_COUNTS_WEIGHT)


def replicate(r, admin, key, procs, address, ca, summary, built, initial,
              system, integrator):
    """One replicate of both arms; returns {arm: {angles, rate, ...}}."""
    from siegetank import adaptive, build_target
    targets = {arm: admin.add_target(
        options=summary['options'], engine='openmm',
        engine_versions=summary['engine_versions'],
        description='alanine dipeptide, %s, replicate %d' % (arm, r),
        stage='public', files=build_target.target_files(built))
        for arm in ('plain', 'adaptive')}
    folders = {arm: os.path.join(RUN, 'sync', '%s-%d' % (arm, r))
               for arm in targets}
    plain_streams = adaptive.seed_streams(targets['plain'], initial, CORES,
                                          system, integrator,
                                          seed=1000 + r)
    budget = adaptive.Budget(targets['plain'], plain_streams, TOTAL_FRAMES)
    sampler = adaptive.Sampler(
        targets['adaptive'], folders['adaptive'], adaptive.backbone_dihedrals,
        system, integrator, in_flight=IN_FLIGHT,
        frames_per_stream=FRAMES_PER_STREAM, refill=REFILL, seed=2000 + r,
        clusters=adaptive.LeastCounts(DMIN, score=score(initial)), poll=0.2,
        watch=[budget])
    sampler.begin(initial)
    cores = {arm: start_cores(procs, '%s%d' % (arm, r), address, ca,
                              targets[arm].id, key) for arm in targets}
    t0 = time.monotonic()
    ended = {}

    def check():
        for c in cores['plain'] + cores['adaptive']:
            if c.poll() is not None and c.returncode != 0:
                raise SystemExit('adaptive: %s exited with %s, see its log'
                                 % (c.demo_name, c.returncode))
        if budget.done and 'plain' not in ended:
            ended['plain'] = time.monotonic()
            stop_cores(procs, cores['plain'])

    sampler.watch.append(check)
    rounds = sampler.run(max_frames=TOTAL_FRAMES, progress=False)
    ended['adaptive'] = time.monotonic()
    sampler.stop_all()
    stop_cores(procs, cores['adaptive'])
    budget.wait(poll=0.2)
    check()
    stop_cores(procs, cores['plain'])
    targets['plain'].sync(folders['plain'])
    out = {}
    for arm in targets:
        angles = ordered_angles(folders[arm], sampler.arrivals
                                if arm == 'adaptive' else None)
        out[arm] = {'angles': angles, 'folder': folders[arm],
                    'rate': (budget.committed if arm == 'plain'
                             else sampler.frames) / (ended[arm] - t0)}
    overhead = rounds[['sync_cluster_s', 'seed_s']].sum().sum()
    say('replicate %d: plain %d frames at %.1f frames/s; adaptive %d '
        'frames at %.1f frames/s, %d rounds (sync+featurize+cluster+seed '
        '%.1f s in all, %.2f s per round), %d streams' % (
            r + 1, budget.committed, out['plain']['rate'], sampler.frames,
            out['adaptive']['rate'], len(rounds) - 1, overhead,
            overhead / max(1, len(rounds) - 1), len(sampler.parents)))
    say('replicate %d cores: %s' % (r + 1, '; '.join(
        '%s %d streams (%d stopped by the manager), %d errors'
        % ((arm,) + core_summary(procs, cores[arm])) for arm in targets)))
    return out


def med_range(values, fmt='%d'):
    """'median [min-max]'; None counts as not reached (above any value)."""
    reached = [v for v in values if v is not None]
    missing = len(values) - len(reached)
    if not reached:
        return 'not reached (%d/%d)' % (len(values), len(values))
    ordered = sorted(reached) + [float('inf')] * missing
    med = ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else \
        (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    text = ('not reached' if med == float('inf') else fmt % med) + \
        ' [' + fmt % min(reached) + '-' + (
            'not reached' if missing else fmt % max(reached)) + ']'
    return text


def assignments_refused():
    """How many assignments the CC refused with 429 (its access log)."""
    n = 0
    for name in os.listdir(RUN):
        if name.startswith('cc') and name.endswith('.log'):
            with open(os.path.join(RUN, name), errors='replace') as f:
                n += sum('429 POST /core/assign' in line for line in f)
    return n


def run(procs):
    import mdtraj

    from siegetank import adaptive, build_target
    from siegetank.client import Client
    address, ca, confs = demo.setup_servers(procs, ws_names=('firebat',))
    procs.confs = confs
    admin = Client(address, ca=ca)
    admin.token = admin.create_manager('admin@adaptive.local',
                                       os.urandom(8).hex(), 'admin')
    key = admin.create_core_key('openmm', 'adaptive demo cores',
                                limits=KEY_LIMITS)['key']
    built = os.path.join(RUN, 'target')
    summary = build_target.build(built, streams=0, solvent=SOLVENT,
                                 steps_per_frame=STEPS_PER_FRAME)
    ps = summary['ps_per_frame']
    say('built with OpenMM %s: alanine dipeptide, amber14 + OBC2 implicit '
        'solvent (%d atoms), %g ps per frame; the cores\' core key has '
        'its own limits' % (
            build_target.engine_version(), summary['atoms'], ps))
    initial = mdtraj.load(os.path.join(built, 'topology.pdb'))
    import openmm
    des = openmm.XmlSerializer.deserialize
    with open(os.path.join(built, 'system.xml')) as f:
        system = des(f.read())
    with open(os.path.join(built, 'integrator.xml')) as f:
        integrator = des(f.read())
    say('%d replicates per arm, %d OpenMM cores (CPU, 1 thread) per arm, '
        'both arms at once; plain MD: %d streams from the minimized '
        'structure; adaptive: %s, %d streams in flight of %d frames, a '
        'round per %d finished, clusters dmin %g; %d frames per arm' % (
            REPLICATES, CORES, CORES, SCORE if SCORE != 'fast' else
            'FAST-style score (distance from the start + %g x count bonus)'
            % FAST_COUNTS_WEIGHT, IN_FLIGHT, FRAMES_PER_STREAM, REFILL, DMIN,
            TOTAL_FRAMES))
    results = [replicate(r, admin, key, procs, address, ca, summary, built,
                         initial, system, integrator)
               for r in range(REPLICATES)]

    arms = (('plain MD', 'plain'), ('adaptive', 'adaptive'))
    n = min(TOTAL_FRAMES, *(len(res[a]['angles']) for res in results
                            for _, a in arms))
    table = []
    curves = {label: [] for label, _ in arms}
    for r, res in enumerate(results):
        for label, arm in arms:
            angles = res[arm]['angles'][:n]
            curve = coverage_curve(angles)
            curves[label].append(curve)
            table.append(dict(replicate=r + 1, arm=label, frames=n,
                              cells=int(curve[-1]), rate=res[arm]['rate'],
                              **first_visits(angles)))
    print('\nreplicate  arm       frames  cells  frames/s  ' + '  '.join(
        '%-12s' % b for b in BASINS) + '  (first visit, frames)')
    for row in table:
        print('%9d  %-8s  %6d  %5d  %8.1f  ' % (
            row['replicate'], row['arm'], row['frames'], row['cells'],
            row['rate']) + '  '.join('%-12s' % (
                'not reached' if row[b] is None else row[b])
                for b in BASINS))
    print('median [range] over %d replicates:' % len(results))
    for label, _ in arms:
        rows = [t for t in table if t['arm'] == label]
        print('  %-8s cells %s; frames/s %s; first visit: %s' % (
            label, med_range([t['cells'] for t in rows]),
            med_range([t['rate'] for t in rows], '%.1f'), '; '.join(
                '%s %s' % (b, med_range([t[b] for t in rows]))
                for b in BASINS)))
    cells = {label: [t['cells'] for t in table if t['arm'] == label]
             for label, _ in arms}
    ratios = [a / p for a, p in zip(cells['adaptive'], cells['plain MD'],
                                    strict=True)]
    rates = [t['rate'] for t in table]
    rate_ratios = [a / p for p, a in zip(rates[0::2], rates[1::2],
                                         strict=True)]
    print('coverage ratio adaptive/plain at %d frames: median %.2f [%.2f-'
          '%.2f]; frames/s ratio: median %.2f [%.2f-%.2f]' % (
              n, np.median(ratios), min(ratios), max(ratios),
              np.median(rate_ratios), min(rate_ratios), max(rate_ratios)),
          flush=True)
    say('HTTP 429 answered to the cores: %d (their core key carries its own '
        'limits: %s)' % (assignments_refused(), KEY_LIMITS))
    png = os.path.join(RUN, 'adaptive.png')
    plot(png, np.concatenate([res['plain']['angles'][:n]
                              for res in results]),
         np.concatenate([res['adaptive']['angles'][:n] for res in results]),
         curves)
    say('plot: %s' % os.path.relpath(png, ROOT))

    trajs = []
    for res in results:
        for _, arm in arms:
            cache = adaptive.FeatureCache(res[arm]['folder'],
                                          adaptive.backbone_dihedrals)
            cache.update()
            trajs.extend(cache.all().values())
    t = time.monotonic()
    model = adaptive.msm(trajs, n_states=MSM_STATES, lags=MSM_LAGS,
                         lag=MSM_LAG, ps_per_frame=ps)
    its_png = os.path.join(RUN, 'msm-its.png')
    ck_png = os.path.join(RUN, 'msm-ck.png')
    adaptive.plot_msm(model, its_png, ck_png)
    say('MSM (deeptime, %d k-means states, %d connected, Bayesian, %d '
        'trajectories of both arms, %.0f s): implied timescales longer than '
        'the lag of %g ps, mean [95%% interval]: %s; plots %s, %s' % (
            MSM_STATES, model['states'], len(trajs), time.monotonic() - t,
            model['lag_ps'], ', '.join(
                '%.0f [%.0f-%.0f] ps' % x for x in model['timescales'])
            or 'none', os.path.relpath(its_png, ROOT),
            os.path.relpath(ck_png, ROOT)))
    return np.median(ratios)


def main():
    shutil.rmtree(RUN, ignore_errors=True)
    os.makedirs(RUN)
    say('run folder %s' % os.path.relpath(RUN, ROOT))
    procs = demo.Procs(RUN)
    procs.confs = []
    code = 0
    try:
        run(procs)
    except BaseException as e:
        code = 1
        if not isinstance(e, SystemExit):
            import traceback
            traceback.print_exc()
        else:
            print(e)
    finally:
        for p in procs.all:
            if 'core' in p.demo_name and p.poll() is None:
                procs.stop(p, signal.SIGTERM)
        procs.stop_all()
        left = demo.check_nothing_left(procs, procs.confs)
        say('servers stopped; %s' % ('processes left: %s' % ', '.join(left)
                                     if left else 'no process left behind'))
    say('adaptive finished in %.0f s' % (time.monotonic() - T0))
    return 1 if code or left else 0


if __name__ == '__main__':
    sys.exit(main())
