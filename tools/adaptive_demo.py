"""`make adaptive`: least-counts adaptive sampling against plain MD, on the
embedded default (a CC, a WS, real OpenMM cores), with alanine dipeptide in
implicit solvent (amber14 + OBC2).

1. starts the servers (tools.demo's orchestration) under data/adaptive/
   and builds the target with OpenMM; two public targets get its files:
   `adaptive` and `plain`;
2. runs CORES OpenMM cores on each target at once. plain: CORES streams
   from the minimized structure (different velocities), left to run.
   adaptive: rounds of siegetank.adaptive.Sampler (STREAMS streams of
   FRAMES_PER_STREAM frames each; between rounds a sync, featurization of
   the new frames only, regular-space clustering, least-counts seeding with
   tags {parent, frame, round}, over-sampled streams left stopped). Each
   arm stops at TOTAL_FRAMES committed frames;
3. syncs both targets (a repeated sync shows how many bytes it moved: none),
   and compares the first TOTAL_FRAMES frames of each: phi/psi histograms
   and cells visited on a fixed 10-degree grid against frames, plotted to
   data/adaptive/adaptive.png, and the coverage ratio adaptive / plain;
4. estimates an MSM with deeptime from all synced frames of both arms and
   prints its slowest implied timescales;
5. stops everything and checks that no process is left.
"""
import os
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
DMIN = 0.3                 # regular-space clusters on sin/cos(phi, psi)
STEPS_PER_FRAME = 500      # 1 ps per frame (2 fs steps)
STREAMS = 4                # adaptive streams per round
FRAMES_PER_STREAM = 25     # committed frames of each per round
TOTAL_FRAMES = 1500        # per arm
GRID_DEG = 10              # coverage cells: 36 x 36 on phi/psi
MSM_CLUSTERS = 40
MSM_LAG = 5                # frames

T0 = time.monotonic()


def say(text):
    print('[%5.1fs] %s' % (time.monotonic() - T0, text), flush=True)


def start_cores(procs, arm, address, ca, target_id, key):
    """`key`: the core key the CC requires (passed in the environment)."""
    return [procs.start('%s-core%d' % (arm, i + 1), [
        sys.executable, '-m', 'siegetank.core', '--cc', address, '--ca', ca,
        '--engine', 'openmm', '--platform', 'CPU', '--threads', '1',
        '--target-id', target_id, '--checkpoint-every', '1',
        '--heartbeat-every', '5', '--backoff-first', '0.2',
        '--backoff-max', '1'], {'SIEGETANK_CORE_KEY': key})
        for i in range(CORES)]


def stop_cores(procs, cores):
    for c in cores:
        procs.stop(c)


def total_frames(target):
    return sum(s['frames'] for s in target.stream_info().values())


def run_plain(target, streams, check):
    """Plain MD: wait until the streams hold TOTAL_FRAMES committed frames,
    then stop them. Called between adaptive rounds (returns True when
    done)."""
    if total_frames(target) < TOTAL_FRAMES:
        check()
        return False
    for sid in streams:
        target.client.stream(sid).stop()
    return True


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
        ax.set_title('%s: %d frames, %d cells' % (
            name, len(angles), int((h > 0).sum())))
        ax.set_xlabel('phi (deg)')
        ax.set_ylabel('psi (deg)')
        fig.colorbar(img, ax=ax, label='log10(frames + 1)')
    for name, curve in curves.items():
        axes[2].plot(np.arange(1, len(curve) + 1), curve, label=name)
    axes[2].set_xlabel('committed frames')
    axes[2].set_ylabel('phi/psi cells visited (%d deg grid)' % GRID_DEG)
    axes[2].legend()
    axes[2].set_title('coverage')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def msm_timescales(folders, ps_per_frame, n=4):
    """Slowest implied timescales (ps) of an MSM of every synced stream:
    k-means on the dihedral features, sliding counts at MSM_LAG frames,
    reversible maximum likelihood on the largest connected set."""
    from deeptime.clustering import KMeans
    from deeptime.markov import TransitionCountEstimator
    from deeptime.markov.msm import MaximumLikelihoodMSM

    from siegetank import adaptive
    trajs = []
    for folder in folders:
        cache = adaptive.FeatureCache(folder, adaptive.backbone_dihedrals)
        cache.update()
        trajs.extend(f for f in cache.all().values() if len(f) > MSM_LAG)
    kmeans = KMeans(MSM_CLUSTERS, fixed_seed=1, max_iter=100).fit(
        np.concatenate(trajs)).fetch_model()
    dtrajs = [kmeans.transform(t) for t in trajs]
    counts = TransitionCountEstimator(MSM_LAG, 'sliding').fit(
        dtrajs).fetch_model().submodel_largest()
    msm = MaximumLikelihoodMSM(reversible=True).fit(counts).fetch_model()
    return msm.timescales(n) * ps_per_frame, msm.n_states, len(dtrajs)


def run(procs):
    import mdtraj

    from siegetank import adaptive, build_target
    from siegetank.client import Client
    address, ca, confs = demo.setup_servers(procs, ws_names=('firebat',))
    procs.confs = confs
    admin = Client(address, ca=ca)
    admin.token = admin.create_manager('admin@adaptive.local',
                                       os.urandom(8).hex(), 'admin')
    key = admin.create_core_key('openmm', 'adaptive demo cores')['key']
    built = os.path.join(RUN, 'target')
    summary = build_target.build(built, streams=0, solvent=SOLVENT,
                                 steps_per_frame=STEPS_PER_FRAME)
    ps = summary['ps_per_frame']
    say('built with OpenMM %s: alanine dipeptide, amber14 + OBC2 implicit '
        'solvent (%d atoms), %g ps per frame' % (
            build_target.engine_version(), summary['atoms'], ps))
    targets = {arm: admin.add_target(
        options=summary['options'], engine='openmm',
        engine_versions=summary['engine_versions'],
        description='alanine dipeptide, %s' % arm, stage='public',
        files=build_target.target_files(built)) for arm in ('plain',
                                                            'adaptive')}
    system, integrator = adaptive.load_engine_files(targets['adaptive'])
    initial = mdtraj.load(os.path.join(built, 'topology.pdb'))
    folders = {arm: os.path.join(RUN, 'sync', arm) for arm in targets}

    plain_streams = adaptive.seed_streams(targets['plain'], initial, CORES,
                                          system, integrator, seed=7)
    sampler = adaptive.Sampler(
        targets['adaptive'], folders['adaptive'], adaptive.backbone_dihedrals,
        system, integrator, streams_per_round=STREAMS,
        frames_per_stream=FRAMES_PER_STREAM, seed=11, log=say,
        clusters=adaptive.LeastCounts(DMIN), poll=0.25)
    sampler.begin(initial)
    say('%d OpenMM cores (CPU, 1 thread) per arm; plain MD: %d streams from '
        'the minimized structure; adaptive: rounds of %d streams x %d frames;'
        ' each arm to %d frames' % (CORES, CORES, STREAMS, FRAMES_PER_STREAM,
                                    TOTAL_FRAMES))
    cores = {arm: start_cores(procs, arm, address, ca, targets[arm].id, key)
             for arm in targets}

    def check():
        for c in cores['plain'] + cores['adaptive']:
            if c.poll() is not None and c.returncode != 0:
                raise SystemExit('adaptive: %s exited with %s, see its log'
                                 % (c.demo_name, c.returncode))

    plain_done = False
    while True:
        sampler.run_live()
        check()
        new = sampler.sync()
        if not plain_done:
            plain_done = run_plain(targets['plain'], plain_streams, check)
            if plain_done:
                stop_cores(procs, cores['plain'])
                say('plain MD reached %d frames: its streams and cores '
                    'stopped' % total_frames(targets['plain']))
        say('adaptive: %d frames synced (%d new), %d clusters' % (
            sampler.frames, new, len(sampler.clusters.counts)))
        if sampler.frames >= TOTAL_FRAMES:
            break
        sampler.start_round()
    stop_cores(procs, cores['adaptive'])
    while not plain_done:
        time.sleep(1)
        plain_done = run_plain(targets['plain'], plain_streams, check)
    stop_cores(procs, cores['plain'])
    sampler.save_history()

    t = time.monotonic()
    first = targets['plain'].sync(folders['plain'])
    say('plain synced: %d bytes in %.1f s' % (first['bytes'],
                                              time.monotonic() - t))
    again = {arm: targets[arm].sync(folders[arm])['bytes']
             for arm in targets}
    say('repeated sync of both targets: %d bytes moved' % sum(
        again.values()))

    angles = {'plain MD': ordered_angles(folders['plain']),
              'adaptive': ordered_angles(folders['adaptive'],
                                         sampler.arrivals)}
    n = min(TOTAL_FRAMES, *(len(a) for a in angles.values()))
    angles = {k: v[:n] for k, v in angles.items()}
    curves = {k: coverage_curve(v) for k, v in angles.items()}
    png = os.path.join(RUN, 'adaptive.png')
    plot(png, angles['plain MD'], angles['adaptive'], curves)
    ratio = curves['adaptive'][-1] / curves['plain MD'][-1]
    say('phi/psi cells visited in %d frames: adaptive %d, plain MD %d' % (
        n, curves['adaptive'][-1], curves['plain MD'][-1]))
    say('plot: %s' % os.path.relpath(png, ROOT))
    timescales, states, ntraj = msm_timescales(folders.values(), ps)
    say('MSM (deeptime, %d k-means states, lag %g ps, %d trajectories of '
        'both arms; %d states connected): slowest implied timescales %s ps'
        % (MSM_CLUSTERS, MSM_LAG * ps, ntraj, states,
           ', '.join('%.1f' % x for x in timescales)))
    print('coverage ratio adaptive/plain: %.2f' % ratio, flush=True)
    return ratio


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
