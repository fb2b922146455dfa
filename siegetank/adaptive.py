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
  round with the new frames only (`partial_fit`), and the least-counts
  choice of frames to seed from;
- `Sampler`: the loop. A round seeds streams (tags `{parent, frame,
  round}`), lets the cores run them to `frames_per_stream` committed frames
  each (stopping every stream at its quota, so the cores move on), syncs,
  featurizes and clusters the new frames, then extends the streams that
  sit in a least-sampled cluster and leaves the over-sampled ones stopped;
  fresh seeds fill up the rest of the next round.

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

    def update(self):
        """{stream id: (first new frame, features of the new frames)} for
        every stream with frames not featurized yet."""
        new = {}
        for sid in syncing.local_streams(self.folder):
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
class LeastCounts:
    """Regular-space clusters (deeptime) of every frame seen, grown with
    each batch of new frames, with per-cluster counts and members."""

    def __init__(self, dmin=0.3, max_centers=5000):
        from deeptime.clustering import RegularSpace
        self.clustering = RegularSpace(dmin=dmin, max_centers=max_centers)
        self.model = None
        self.counts = np.zeros(0, dtype=np.int64)
        self.members = []       # per cluster: [(stream id, frame)]
        self.last = {}          # stream id -> cluster of its latest frame

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

    def least(self, k, rng):
        """The `k` clusters with the fewest frames (ties at random)."""
        order = np.lexsort((rng.random(len(self.counts)), self.counts))
        return [int(c) for c in order[:k]]

    def choose(self, k, rng):
        """`k` (stream id, frame) to seed from: a random frame of each of
        the k least-counted clusters."""
        return [self.members[c][rng.integers(len(self.members[c]))]
                for c in self.least(k, rng)]

    def under_sampled(self, sid, k):
        """Whether stream `sid` ended in one of the `k` least-counted
        clusters (ties count as in)."""
        c = self.last.get(sid)
        if c is None or not len(self.counts):
            return False
        return self.counts[c] <= np.sort(self.counts)[min(k, len(
            self.counts)) - 1]


# -- the loop ---------------------------------------------------------------
class Sampler:
    """Least-counts adaptive sampling on `target`, synced into `folder`.
    Each round runs `streams_per_round` streams to `frames_per_stream`
    committed frames each. `featurizer`: see FeatureCache; `clusters`: a
    LeastCounts; `system`/`integrator`: the target's (seed_state);
    `extend`: False to seed every stream of a round afresh."""

    def __init__(self, target, folder, featurizer, system, integrator,
                 streams_per_round=4, frames_per_stream=50, clusters=None,
                 seed=1, poll=0.5, filename='frames.xtc', log=None,
                 extend=True):
        self.target, self.folder = target, folder
        # what a seed is made of, and how new frames are seen
        self.featurizer, self.system = featurizer, system
        self.integrator = integrator
        self.streams_per_round = streams_per_round
        self.frames_per_stream = frames_per_stream
        self.clusters = clusters or LeastCounts()
        self.rng, self.seed = np.random.default_rng(seed), seed
        self.poll, self.filename, self.extend = poll, filename, extend
        self.log = log or (lambda text: None)
        self.cache = None
        self.round = 0
        self.live = []          # streams of the current round
        self.seeds_made = 0
        self.history = []       # per round: {round, seeded, extended, ...}
        self.arrivals = []      # per sync: {stream id: (first frame, n)}

    def sync(self):
        """Sync the target, featurize and cluster only the new frames;
        returns the number of new frames."""
        result = self.target.sync(self.folder, (self.filename,))
        if self.cache is None:
            self.cache = FeatureCache(self.folder, self.featurizer,
                                      filename=self.filename)
        new = self.cache.update()
        for sid, (start, feats) in sorted(new.items()):
            self.clusters.add(sid, start, feats)
        self.last_sync = result
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

    def seed_from(self, sid, index, tags):
        """A new stream of the target started from frame `index` of stream
        `sid` (fresh velocities: every seed its own random seed)."""
        self.seeds_made += 1
        state = seed_state(self.frame(sid, index), 0, self.system,
                           self.integrator,
                           seed=self.seed * 100003 + self.seeds_made)
        return self.target.add_stream({'state.xml.gz.b64': state},
                                      tags=tags)

    def begin(self, initial):
        """Round 0: `streams_per_round` streams from the structure(s) in the
        mdtraj trajectory `initial`."""
        self.live = seed_streams(self.target, initial, self.streams_per_round,
                                 self.system, self.integrator, self.seed)
        self.seeds_made = len(self.live)
        self.history.append({'round': 0, 'seeded': list(self.live),
                             'extended': [], 'clusters': 0})
        return self.live

    def start_round(self):
        """Extend the live streams that ended under-sampled, stop (leave
        stopped) the others, seed fresh streams from least-counted clusters
        for the rest of the round; returns the round's stream ids."""
        self.round += 1
        k = self.streams_per_round
        extended = [s for s in self.live if self.extend and
                    self.clusters.under_sampled(s, k)][:k]
        seeded = []
        for sid, index in self.clusters.choose(k - len(extended), self.rng):
            seeded.append(self.seed_from(sid, index, {
                'parent': sid, 'frame': str(index),
                'round': str(self.round)}))
        for sid in extended:
            self.target.client.stream(sid).start()
        self.history.append({'round': self.round, 'seeded': seeded,
                             'extended': extended,
                             'clusters': len(self.clusters.counts)})
        self.log('round %d: %d new streams from least-counted clusters, %d '
                 'extended, %d left stopped (over-sampled); %d clusters' % (
                     self.round, len(seeded), len(extended),
                     len(self.live) - len(extended),
                     len(self.clusters.counts)))
        self.live = extended + seeded
        return self.live

    def run_live(self, timeout=3600):
        """Let the cores run the round's streams: each is stopped once it
        has `frames_per_stream` more committed frames than at the round's
        start; returns when all are."""
        info = self.target.stream_info()
        quota = {s: info.get(s, {}).get('frames', 0) + self.frames_per_stream
                 for s in self.live}
        left = set(self.live)
        deadline = time.monotonic() + timeout
        while left:
            for sid in sorted(left):
                s = info.get(sid)
                if s and s['frames'] >= quota[sid]:
                    self.target.client.stream(sid).stop()
                    left.discard(sid)
            if not left:
                break
            if time.monotonic() > deadline:
                raise TimeoutError('round %d: streams %s did not reach %d '
                                   'frames' % (self.round, sorted(left),
                                               self.frames_per_stream))
            time.sleep(self.poll)
            info = self.target.stream_info()

    def step(self, initial=None):
        """One round: start it (round 0 from `initial`), run it, sync and
        cluster its frames; returns the new frames."""
        if self.round == 0 and not self.history:
            self.begin(initial)
        else:
            self.start_round()
        self.run_live()
        return self.sync()

    def save_history(self):
        with open(os.path.join(self.folder, 'rounds.json'), 'w') as f:
            json.dump(self.history, f, indent=1)
