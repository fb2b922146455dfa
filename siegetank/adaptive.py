"""Adaptive sampling over a Siegetank target, in small composable parts:

- `seed_state`: a stream's starting state.xml from a committed frame
  (positions and box from the trajectory, fresh Maxwell-Boltzmann
  velocities at the target's temperature from a per-seed random seed);
- featurizers: any callable mdtraj.Trajectory -> (frames, features) array,
  e.g. `backbone_dihedrals` (sin/cos of phi and psi);
- `FeatureCache`: featurizes only the frames a sync brought since the last
  time, keeping every stream's features on disk (`features/<name>/<sid>.npy`
  in the sync folder);
- `LeastCounts`: regular-space clustering with deeptime, grown round by
  round with the new frames only (`partial_fit`), and the choice of frames
  to seed from by a score per cluster: `least_counts` (default) or any
  callable, e.g. `fast(reward)` (FAST: a physical reward plus a count
  bonus);
- `Sampler`: the loop, lean: `in_flight` short streams are queued at any
  time (more than the cores, so a core never waits for the researcher);
  each is stopped at `frames_per_stream` committed frames, and as soon as
  `refill` of them are done a round runs: sync, featurize and cluster the
  new frames, seed as many fresh streams from the best-scored clusters
  (tags `{parent, frame, round}`). `run(n_rounds)` with a progress bar,
  `Sampler.resume(folder, ...)` after a crash or in a later session,
  `rounds()`/`streams()` as pandas DataFrames;
- `Budget`: a plain-MD control stopped at its frame budget;
- `msm`: an MSM with deeptime (implied timescales against lag, a
  Chapman-Kolmogorov test, Bayesian error bars).

`make adaptive` (tools/adaptive_demo.py) runs it on alanine dipeptide
against a plain-MD control.
"""
import json
import os
import time

import numpy as np

from siegetank import sync as syncing


# -- seeding ----------------------------------------------------------------
def temperature_of(integrator):
    """The integrator's temperature in kelvin (Langevin-type integrators)."""
    from openmm import unit
    if not hasattr(integrator, 'getTemperature'):
        raise ValueError('%s has no temperature: pass temperature='
                         % type(integrator).__name__)
    return integrator.getTemperature().value_in_unit(unit.kelvin)


def seed_state(traj, frame, system, integrator, seed, temperature=None):
    """The state.xml (a string) of a new stream started from frame `frame`
    of the mdtraj trajectory `traj`: its positions (constraints applied) and
    box, velocities drawn from Maxwell-Boltzmann at `temperature` (default:
    the integrator's) with random seed `seed` (> 0; different seeds give
    different velocities, the same seed the same ones), time 0."""
    import openmm
    from openmm import unit
    if seed < 1:
        raise ValueError('seed must be >= 1 (0 asks OpenMM for a random one)')
    kelvin = temperature if temperature is not None else \
        temperature_of(integrator)
    copy = openmm.XmlSerializer.deserialize(
        openmm.XmlSerializer.serialize(integrator))
    context = openmm.Context(system, copy,
                             openmm.Platform.getPlatformByName('Reference'))
    try:
        if traj.unitcell_vectors is not None:
            context.setPeriodicBoxVectors(*(openmm.Vec3(*v) for v in
                                            traj.unitcell_vectors[frame]))
        context.setPositions(traj.xyz[frame].astype(np.float64) *
                             unit.nanometer)
        context.applyConstraints(1e-6)
        context.setVelocitiesToTemperature(kelvin * unit.kelvin, int(seed))
        context.applyVelocityConstraints(1e-6)
        state = context.getState(getPositions=True, getVelocities=True,
                                 getParameters=True)
        return openmm.XmlSerializer.serialize(state)
    finally:
        del context


def seed_streams(target, traj, n, system, integrator, seed, tags=None):
    """`n` new streams of `target` started from the frames of `traj` in
    turn, each with its own velocities (random seeds seed*100003+1..n);
    tagged `{parent: "initial", frame, round: "0"}` plus `tags`. Returns
    their ids."""
    ids = []
    for i in range(n):
        state = seed_state(traj, i % traj.n_frames, system, integrator,
                           seed=seed * 100003 + i + 1)
        ids.append(target.add_stream(
            {'state.xml.gz.b64': state},
            tags=dict({'parent': 'initial', 'frame': str(i % traj.n_frames),
                       'round': '0'}, **(tags or {}))))
    return ids


def load_engine_files(target):
    """(system, integrator) of an OpenMM target, from its files."""
    import openmm
    des = openmm.XmlSerializer.deserialize
    return (des(target.download('system.xml.gz.b64').decode()),
            des(target.download('integrator.xml.gz.b64').decode()))


# -- features ---------------------------------------------------------------
def phi_psi(traj):
    """(frames, 2) backbone phi and psi in degrees (one residue pair)."""
    import mdtraj
    _, phi = mdtraj.compute_phi(traj, periodic=False)
    _, psi = mdtraj.compute_psi(traj, periodic=False)
    return np.degrees(np.column_stack([phi[:, 0], psi[:, 0]]))


def backbone_dihedrals(traj):
    """sin and cos of every backbone phi and psi: a Euclidean feature space
    with the dihedrals' periodicity."""
    import mdtraj
    angles = np.column_stack([mdtraj.compute_phi(traj, periodic=False)[1],
                              mdtraj.compute_psi(traj, periodic=False)[1]])
    return np.column_stack([np.sin(angles), np.cos(angles)])


def read_frames(path, topology, start=0, n_frames=None):
    """Frames `start`.. (`n_frames` of them, default all) of an XTC file as
    an mdtraj Trajectory, reading only those (the file's frame index is
    built from its headers)."""
    import mdtraj
    from mdtraj.formats import XTCTrajectoryFile
    with XTCTrajectoryFile(path) as f:
        if start >= len(f):
            return mdtraj.Trajectory(np.zeros((0, topology.n_atoms, 3),
                                              np.float32), topology)
        if start:
            f.seek(start)
        xyz, time_ps, _, box = f.read(n_frames)
    traj = mdtraj.Trajectory(xyz, topology, time=time_ps)
    if box is not None and len(box) and np.any(box):
        traj.unitcell_vectors = box
    return traj


def _save(path, array):
    tmp = path + '.tmp.npy'
    np.save(tmp, array)
    os.replace(tmp, path)


class FeatureCache:
    """Features of every synced stream of a target folder, kept in
    `folder/features/<name>/<stream id>.npy`; `update()` featurizes only the
    frames that arrived since."""

    def __init__(self, folder, featurizer, name=None, topology=None,
                 filename='frames.xtc'):
        import mdtraj
        self.folder = folder
        self.featurizer = featurizer
        self.filename = filename
        self.store = os.path.join(folder, 'features', name or getattr(
            featurizer, '__name__', 'features'))
        os.makedirs(self.store, exist_ok=True)
        top = topology or os.path.join(folder, 'topology.pdb')
        self.topology = mdtraj.load_topology(top) if isinstance(top, str) \
            else top

    def path(self, sid):
        return os.path.join(self.store, sid + '.npy')

    def load(self, sid):
        try:
            return np.load(self.path(sid))
        except FileNotFoundError:
            return None

    def update(self, streams=None):
        """{stream id: (first new frame, features of the new frames)} for
        every stream (or those of `streams`, e.g. the ones a sync grew) with
        frames not featurized yet."""
        new = {}
        for sid in (syncing.local_streams(self.folder) if streams is None
                    else streams):
            traj_path = os.path.join(self.folder, 'streams', sid,
                                     self.filename)
            if not os.path.exists(traj_path) or \
                    os.path.getsize(traj_path) == 0:
                continue
            old = self.load(sid)
            done = 0 if old is None else len(old)
            traj = read_frames(traj_path, self.topology, done)
            if traj.n_frames == 0:
                continue
            feats = np.asarray(self.featurizer(traj), dtype=np.float64)
            _save(self.path(sid), feats if old is None
                  else np.concatenate([old, feats]))
            new[sid] = (done, feats)
        return new

    def all(self):
        """{stream id: features of all its frames featurized so far}."""
        return {name[:-4]: np.load(os.path.join(self.store, name))
                for name in sorted(os.listdir(self.store))
                if name.endswith('.npy') and '.tmp' not in name}


# -- clustering and choice --------------------------------------------------
def least_counts(clusters):
    """The least-counts score: the fewer frames a cluster holds, the
    better a seed it is."""
    return -clusters.counts.astype(np.float64)


def fast(reward, counts_weight=1.0):
    """A FAST-style score (Zimmerman & Bowman, JCTC 2015): `reward(centers)`
    (one value per cluster center, higher is better: e.g. a distance to
    pull apart) rescaled to [0, 1], plus `counts_weight` times the count
    bonus 1/sqrt(counts) rescaled to [0, 1]."""
    def score(clusters):
        r = np.asarray(reward(clusters.centers), dtype=np.float64)
        bonus = 1.0 / np.sqrt(np.maximum(clusters.counts, 1))
        return _unit(r) + counts_weight * _unit(bonus)
    score.__name__ = 'fast'
    return score


def _unit(x):
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


class LeastCounts:
    """Regular-space clusters (deeptime) of every frame seen, grown with
    each batch of new frames, with per-cluster counts and members; seeds
    are chosen by `score(self)` (one value per cluster, highest first;
    default `least_counts`)."""

    def __init__(self, dmin=0.3, max_centers=5000, score=None):
        from deeptime.clustering import RegularSpace
        self.clustering = RegularSpace(dmin=dmin, max_centers=max_centers)
        self.score = score or least_counts
        self.model = None
        self.counts = np.zeros(0, dtype=np.int64)
        self.members = []       # per cluster: [(stream id, frame)]
        self.last = {}          # stream id -> cluster of its latest frame

    @property
    def centers(self):
        return self.model.cluster_centers if self.model is not None \
            else np.zeros((0, 0))

    def add(self, sid, start, features):
        """Count the frames `start`.. of stream `sid`; returns their
        clusters."""
        self.clustering.partial_fit(np.ascontiguousarray(features))
        self.model = self.clustering.fetch_model()
        labels = self.model.transform(np.ascontiguousarray(features))
        n = self.model.n_clusters
        if n > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(
                n - len(self.counts), dtype=np.int64)])
            self.members.extend([] for _ in range(n - len(self.members)))
        self.counts += np.bincount(labels, minlength=n)
        for i, label in enumerate(labels):
            self.members[label].append((sid, start + i))
        if len(labels):
            self.last[sid] = int(labels[-1])
        return labels

    def best(self, k, rng):
        """The `k` clusters of highest score (ties at random)."""
        scores = np.asarray(self.score(self), dtype=np.float64)
        if scores.shape != self.counts.shape:
            raise ValueError('score returned %s values for %d clusters'
                             % (scores.shape, len(self.counts)))
        order = np.lexsort((rng.random(len(scores)), -scores))
        return [int(c) for c in order[:k]]

    def choose(self, k, rng):
        """`k` (stream id, frame) to seed from: a random frame of each of
        the k best-scored clusters (cycling over them if there are fewer
        clusters than k)."""
        best = self.best(k, rng)
        return [self.members[c][rng.integers(len(self.members[c]))]
                for c in (best[i % len(best)] for i in range(k))] \
            if best else []


# -- the loop ---------------------------------------------------------------
STATE_FILE = 'sampler.json'
SEEDS = 'seeds.txt'     # the integrator seeds of a stream (openmm_engine)


class Sampler:
    """Adaptive sampling on `target`, synced into `folder`. Keeps
    `in_flight` streams queued or running; each runs `frames_per_stream`
    committed frames and is stopped; every `refill` finished streams make a
    round that seeds as many new ones from the best-scored clusters.
    `featurizer`: see FeatureCache; `clusters`: a LeastCounts (its `score`
    is the seed-choice hook); `system`/`integrator`: the target's
    (seed_state); `watch`: callables run at every poll (e.g. a Budget).
    The sync brings each stream's `filename` and its seeds.txt (the
    integrator seed of every activation, to rerun it)."""

    def __init__(self, target, folder, featurizer, system, integrator,
                 in_flight=6, frames_per_stream=10, refill=2, clusters=None,
                 seed=1, poll=0.25, filename='frames.xtc', log=None,
                 watch=()):
        self.target, self.folder = target, folder
        self.featurizer, self.system = featurizer, system
        self.integrator = integrator
        self.in_flight, self.refill = in_flight, max(1, min(refill,
                                                            in_flight))
        self.frames_per_stream = frames_per_stream
        self.clusters = clusters or LeastCounts()
        self.rng, self.seed = np.random.default_rng(seed), seed
        self.poll, self.filename = poll, filename
        self.log = log or (lambda text: None)
        self.watch = list(watch)
        os.makedirs(folder, exist_ok=True)
        self.cache = None
        self.round = 0
        self.live = {}          # stream id -> committed frames to stop at
        self.done = []          # streams stopped at their quota
        self.seeds_made = 0
        self.history = []       # per round: seeds, timings, counts
        self.arrivals = []      # per sync: {stream id: (first frame, n)}
        self.parents = {}       # stream id -> (parent, frame, round)
        self.polls = 0

    # state on disk, so a sampler can be resumed from its folder
    def settings(self):
        return {'in_flight': self.in_flight, 'refill': self.refill,
                'frames_per_stream': self.frames_per_stream,
                'seed': self.seed, 'poll': self.poll,
                'filename': self.filename}

    def save(self):
        """Write the sampler's state to folder/sampler.json (atomically)."""
        state = {'settings': self.settings(), 'round': self.round,
                 'live': self.live, 'done': self.done,
                 'seeds_made': self.seeds_made, 'history': self.history,
                 'arrivals': [{s: list(v) for s, v in a.items()}
                              for a in self.arrivals],
                 'parents': {s: list(v) for s, v in self.parents.items()},
                 'rng': self.rng.bit_generator.state}
        path = os.path.join(self.folder, STATE_FILE)
        with open(path + '.tmp', 'w') as f:
            json.dump(state, f)
        os.replace(path + '.tmp', path)

    @classmethod
    def resume(cls, target, folder, featurizer, system, integrator,
               clusters=None, log=None, watch=()):
        """The sampler saved in `folder`, its clusters rebuilt from the
        features cached there (frames in stream order, so the clusters may
        differ from the first session's, not the frames)."""
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        self = cls(target, folder, featurizer, system, integrator,
                   clusters=clusters, log=log, watch=watch,
                   **state['settings'])
        self.round, self.live = state['round'], state['live']
        self.done, self.seeds_made = state['done'], state['seeds_made']
        self.history = state['history']
        self.arrivals = [{s: tuple(v) for s, v in a.items()}
                         for a in state['arrivals']]
        self.parents = {s: tuple(v) for s, v in state['parents'].items()}
        self.rng.bit_generator.state = state['rng']
        self.cache = FeatureCache(folder, featurizer, filename=self.filename)
        for sid, feats in self.cache.all().items():
            if len(feats):
                self.clusters.add(sid, 0, feats)
        return self

    # the parts of a round
    def sync(self):
        """Sync the target, featurize and cluster only the new frames;
        returns the number of new frames."""
        result = self.target.sync(self.folder, (self.filename, SEEDS))
        if self.cache is None:
            self.cache = FeatureCache(self.folder, self.featurizer,
                                      filename=self.filename)
        new = self.cache.update(result['grown'])
        for sid, (start, feats) in sorted(new.items()):
            self.clusters.add(sid, start, feats)
        self.last_sync = result
        if new:
            self.arrivals.append({sid: (start, len(feats))
                                  for sid, (start, feats) in new.items()})
        return sum(len(f) for _, f in new.values())

    @property
    def frames(self):
        """Frames synced and clustered so far."""
        return int(self.clusters.counts.sum())

    def frame(self, sid, index):
        path = os.path.join(self.folder, 'streams', sid, self.filename)
        assert self.cache is not None, 'update() first'
        return read_frames(path, self.cache.topology, index, 1)

    def add(self, state, parent, frame):
        sid = self.target.add_stream({'state.xml.gz.b64': state}, tags={
            'parent': parent, 'frame': str(frame),
            'round': str(self.round)})
        self.live[sid] = self.frames_per_stream
        self.parents[sid] = (parent, frame, self.round)
        return sid

    def seed_from(self, sid, index):
        """A new stream of the target started from frame `index` of stream
        `sid` (fresh velocities: every seed its own random seed)."""
        self.seeds_made += 1
        state = seed_state(self.frame(sid, index), 0, self.system,
                           self.integrator,
                           seed=self.seed * 100003 + self.seeds_made)
        return self.add(state, sid, index)

    def begin(self, initial):
        """Round 0: `in_flight` streams from the structure(s) in the mdtraj
        trajectory `initial` (different velocities)."""
        seeded = []
        for i in range(self.in_flight):
            self.seeds_made += 1
            state = seed_state(initial, i % initial.n_frames, self.system,
                               self.integrator,
                               seed=self.seed * 100003 + self.seeds_made)
            seeded.append(self.add(state, 'initial', i % initial.n_frames))
        self.history.append({'round': 0, 'seeded': seeded, 'frames': 0,
                             'clusters': 0, 'time': time.time()})
        self.save()
        return seeded

    def wait(self, timeout=3600):
        """Poll until at least `refill` live streams reached their quota
        (stopping each as it does, so its core moves on to a queued one);
        the watchers run at every poll. Returns the finished streams."""
        finished = []
        deadline = time.monotonic() + timeout
        while True:
            self.polls += 1
            for w in self.watch:
                w()
            info = self.target.stream_info()
            for sid, quota in sorted(self.live.items()):
                s = info.get(sid)
                if s and s['frames'] >= quota:
                    self.target.client.stream(sid).stop()
                    finished.append(sid)
                    del self.live[sid]
            if len(finished) >= self.refill or (finished and not self.live):
                self.done.extend(finished)
                return finished
            if not self.live:
                return finished
            if time.monotonic() > deadline:
                raise TimeoutError('streams %s did not reach their quota'
                                   % sorted(self.live))
            time.sleep(self.poll)

    def step(self, initial=None):
        """One round: (round 0: seed from `initial`) wait for `refill`
        streams to finish, sync and cluster the new frames, seed as many
        new streams from the best-scored clusters. Returns the new
        frames."""
        if not self.history:
            self.begin(initial)
        t = {'start': time.monotonic()}
        finished = self.wait()
        t['waited'] = time.monotonic()
        new = self.sync()
        t['synced'] = time.monotonic()
        self.round += 1
        picks = self.clusters.choose(self.in_flight - len(self.live),
                                     self.rng)
        if not picks and not self.live:
            raise RuntimeError('nothing to run: no stream in flight and no '
                               'frame to seed from')
        seeded = [self.seed_from(sid, index) for sid, index in picks]
        t['seeded'] = time.monotonic()
        self.history.append({
            'round': self.round, 'seeded': seeded, 'finished': finished,
            'new_frames': new, 'frames': self.frames,
            'clusters': len(self.clusters.counts), 'time': time.time(),
            'wait_s': t['waited'] - t['start'],
            'sync_cluster_s': t['synced'] - t['waited'],
            'seed_s': t['seeded'] - t['synced']})
        self.save()
        self.log('round %d: %d streams done, %d new frames, %d clusters, '
                 '%d new streams' % (self.round, len(finished), new,
                                     len(self.clusters.counts), len(seeded)))
        return new

    def run(self, n_rounds=None, max_frames=None, initial=None,
            progress=True):
        """Rounds until `n_rounds` more are done or `max_frames` frames are
        synced (at least one of them); `initial` for a fresh sampler.
        `progress`: a tqdm bar (True), or False. Returns self.rounds()."""
        if n_rounds is None and max_frames is None:
            raise ValueError('give n_rounds or max_frames')
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max_frames if n_rounds is None else n_rounds,
                       unit='frames' if n_rounds is None else 'rounds',
                       desc='adaptive', initial=self.frames if n_rounds
                       is None else 0)
        done = 0
        try:
            while (n_rounds is None or done < n_rounds) and (
                    max_frames is None or self.frames < max_frames):
                new = self.step(initial)
                done += 1
                if bar is not None:
                    bar.update(1 if n_rounds is not None else new)
                    bar.set_postfix(clusters=len(self.clusters.counts),
                                    frames=self.frames)
        finally:
            if bar is not None:
                bar.close()
        return self.rounds()

    def stop_all(self):
        """Stop the streams still queued or running (end of a campaign)."""
        for sid in list(self.live):
            self.target.client.stream(sid).stop()
        self.done.extend(self.live)
        self.live = {}
        self.save()

    # results as tables
    def rounds(self):
        """One row per round: streams seeded, frames, clusters, and where
        the time went (waiting for the cores, sync + featurize + cluster,
        seeding)."""
        import pandas
        rows = [{k: (len(v) if isinstance(v, list) else v)
                 for k, v in h.items()} for h in self.history]
        return pandas.DataFrame(rows).set_index('round')

    def streams(self):
        """One row per stream: parent, frame, round, frames synced, the
        cluster of its last frame."""
        import pandas
        feats = self.cache.all() if self.cache is not None else {}
        rows = [{'stream': sid, 'parent': p, 'frame': f, 'round': r,
                 'frames': len(feats.get(sid, ())),
                 'last_cluster': self.clusters.last.get(sid, -1),
                 'running': sid in self.live}
                for sid, (p, f, r) in self.parents.items()]
        return pandas.DataFrame(rows).set_index('stream')


class Budget:
    """A plain-MD control: `check()` stops `streams` of `target` once they
    hold `frames` committed frames in all; call it often (a Sampler's
    `watch`, or `wait()`). `done` once stopped."""

    def __init__(self, target, streams, frames):
        self.target, self.streams, self.frames = target, streams, frames
        self.done = False
        self.committed = 0

    def check(self):
        if self.done:
            return True
        info = self.target.stream_info()
        self.committed = sum(info.get(s, {}).get('frames', 0)
                             for s in self.streams)
        if self.committed >= self.frames:
            for sid in self.streams:
                self.target.client.stream(sid).stop()
            self.done = True
        return self.done

    __call__ = check

    def wait(self, poll=0.25, timeout=3600):
        deadline = time.monotonic() + timeout
        while not self.check():
            if time.monotonic() > deadline:
                raise TimeoutError('budget of %d frames not reached'
                                   % self.frames)
            time.sleep(poll)


# -- Markov state model -----------------------------------------------------
def msm(trajs, n_states=40, lags=(1, 2, 5, 10, 20, 40), lag=10,
        n_timescales=4, n_metastable=3, n_samples=100, seed=1,
        ps_per_frame=1.0):
    """An MSM of the feature trajectories `trajs` (a list of (frames, d)
    arrays) with deeptime: k-means into `n_states` states, Bayesian MSMs
    (effective counts, reversible, `n_samples` posterior samples) at each
    of `lags` (frames) for the implied timescales, and at `lag` a
    Chapman-Kolmogorov test against `n_metastable` PCCA+ sets. Returns a
    dict: `timescales` [(mean, lower, upper) in ps] of the model at `lag`,
    only those longer than the lag (shorter ones are not resolved), `its`
    (deeptime ImpliedTimescales, frames), `ck` (ChapmanKolmogorovTest),
    `states` (connected), `lag_ps`."""
    from deeptime.clustering import KMeans
    from deeptime.markov import TransitionCountEstimator
    from deeptime.markov.msm import BayesianMSM
    from deeptime.util.validation import implied_timescales
    trajs = [np.ascontiguousarray(t, dtype=np.float64) for t in trajs
             if len(t) > 1]
    kmeans = KMeans(n_states, fixed_seed=seed, max_iter=100,
                    init_strategy='kmeans++').fit(
        np.concatenate(trajs)).fetch_model()
    dtrajs = [kmeans.transform(t) for t in trajs]
    lags = sorted(set(lags) | {lag})

    def bayesian(tau):
        counts = TransitionCountEstimator(tau, 'effective').fit(
            dtrajs).fetch_model().submodel_largest()
        return BayesianMSM(n_samples=n_samples, reversible=True).fit(
            counts).fetch_model()

    models = [bayesian(tau) for tau in lags
              if max(len(d) for d in dtrajs) > 2 * tau]
    chosen = models[[m.prior.lagtime for m in models].index(lag)]
    stats = chosen.gather_stats('timescales', k=n_timescales)
    timescales = [(float(m * ps_per_frame), float(lo * ps_per_frame),
                   float(hi * ps_per_frame))
                  for m, lo, hi in zip(stats.mean, stats.L, stats.R,
                                       strict=True)
                  if m > lag]
    longer = [m for m in models if m.prior.lagtime >= lag]
    ck = chosen.ck_test(longer, n_metastable)
    return {'timescales': timescales, 'its': implied_timescales(
        models, n_its=n_timescales), 'ck': ck,
        'states': chosen.prior.n_states, 'lag_ps': lag * ps_per_frame,
        'ps_per_frame': ps_per_frame, 'dtrajs': dtrajs}


def plot_msm(result, its_png, ck_png):
    """The implied timescales against lag (with the lag = timescale line
    under which nothing is resolved) and the Chapman-Kolmogorov test."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from deeptime.plots import plot_ck_test, plot_implied_timescales
    fig, ax = plt.subplots(figsize=(6, 4.5))
    plot_implied_timescales(result['its'], ax=ax)
    lags = result['its'].lagtimes
    ax.plot(lags, lags, 'k--', label='timescale = lag')
    ax.set_yscale('log')
    ax.set_xlabel('lag (frames of %g ps)' % result['ps_per_frame'])
    ax.set_ylabel('implied timescale (frames)')
    ax.set_title('implied timescales (Bayesian MSM, 95%)')
    fig.tight_layout()
    fig.savefig(its_png, dpi=90)
    plt.close(fig)
    grid = plot_ck_test(result['ck'], xlabel='lag (frames)')
    grid.figure.savefig(ck_png, dpi=90)
    plt.close(grid.figure)
