"""siegetank.adaptive: seeding a stream from a committed frame (OpenMM),
clustering and the seed-choice score hook (least counts, FAST), the MSM,
the plain-MD Budget (synthetic cores), and the adaptive loop on a real CC
and WS with a real OpenMM core process (alanine dipeptide in vacuum, 10
steps per frame): rounds, resume from the folder, pandas tables, progress
bar, seeds recorded in the streams' files."""
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import unittest
from types import SimpleNamespace

import numpy as np

from siegetank import adaptive, build_target
from siegetank.core import Core, make_engine, openmm_engine
from tests.cluster import Cluster
from tools.testing import ROOT, tmpdir, wait_for


def built_target(folder):
    summary = build_target.build(folder, streams=0, solvent='vacuum',
                                 steps_per_frame=10)
    import openmm
    des = openmm.XmlSerializer.deserialize
    with open(os.path.join(folder, 'system.xml')) as f:
        system = des(f.read())
    with open(os.path.join(folder, 'integrator.xml')) as f:
        integrator = des(f.read())
    return summary, system, integrator


class TestSeedState(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import mdtraj
        cls.folder = tmpdir('seed')
        cls.summary, cls.system, cls.integrator = built_target(cls.folder)
        cls.initial = mdtraj.load(os.path.join(cls.folder, 'topology.pdb'))

    def state(self, seed):
        import openmm
        return openmm.XmlSerializer.deserialize(adaptive.seed_state(
            self.initial, 0, self.system, self.integrator, seed))

    def test_seeds_differ_by_velocities_only(self):
        from openmm import unit
        one, two, again = self.state(1), self.state(2), self.state(1)
        vel = [s.getVelocities(asNumpy=True).value_in_unit(
            unit.nanometer / unit.picosecond) for s in (one, two, again)]
        pos = [s.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
               for s in (one, two)]
        self.assertFalse(np.allclose(vel[0], vel[1]))
        self.assertTrue(np.array_equal(vel[0], vel[2]))
        self.assertTrue(np.array_equal(pos[0], pos[1]))
        # Positions are the frame's (constraints applied: small moves).
        self.assertLess(np.abs(pos[0] - self.initial.xyz[0]).max(), 5e-3)
        self.assertEqual(one.getTime().value_in_unit(unit.picosecond), 0)
        with self.assertRaises(ValueError):
            self.state(0)

    def test_velocities_at_the_target_temperature(self):
        from openmm import unit
        self.assertEqual(adaptive.temperature_of(self.integrator),
                         build_target.TEMPERATURE)
        # Kinetic temperature over many seeds (22 atoms each is noisy).
        masses = np.array([self.system.getParticleMass(i).value_in_unit(
            unit.dalton) for i in range(self.system.getNumParticles())])
        dof = 3 * len(masses) - self.system.getNumConstraints() - 3
        kinetic = []
        for seed in range(1, 41):
            v = self.state(seed).getVelocities(asNumpy=True).value_in_unit(
                unit.nanometer / unit.picosecond)
            kinetic.append(0.5 * (masses[:, None] * v ** 2).sum())
        kb = 0.00831446  # kJ/mol/K
        measured = 2 * np.mean(kinetic) / (dof * kb)
        self.assertLess(abs(measured - build_target.TEMPERATURE), 45)

    def test_seeded_state_loads_and_runs_in_the_target_system(self):
        import openmm
        from openmm import unit
        integrator = openmm.XmlSerializer.deserialize(
            openmm.XmlSerializer.serialize(self.integrator))
        context = openmm.Context(self.system, integrator,
                                 openmm.Platform.getPlatformByName('CPU'),
                                 {'Threads': '1'})
        context.setState(self.state(5))
        before = context.getState(getPositions=True).getPositions(
            asNumpy=True).value_in_unit(unit.nanometer)
        integrator.step(50)
        after = context.getState(getPositions=True, getEnergy=True)
        moved = after.getPositions(asNumpy=True).value_in_unit(
            unit.nanometer)
        self.assertTrue(np.all(np.isfinite(moved)))
        self.assertGreater(np.abs(moved - before).max(), 1e-3)
        self.assertTrue(np.isfinite(after.getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)))


class TestLeastCounts(unittest.TestCase):
    def blobs(self, score=None):
        rng = np.random.default_rng(0)
        lc = adaptive.LeastCounts(dmin=0.5, score=score)
        # Three well separated blobs with 20, 2 and 7 frames.
        blob = lambda c, n: c + 0.01 * rng.standard_normal((n, 2))  # noqa
        lc.add('s1', 0, np.concatenate([blob(0, 20), blob(5, 2)]))
        lc.add('s2', 0, blob(10, 7))
        return lc, rng

    def test_least_counted_clusters_are_chosen(self):
        lc, rng = self.blobs()
        self.assertEqual(sorted(lc.counts), [2, 7, 20])
        picks = lc.choose(2, rng)
        self.assertIn(picks[0], [('s1', 20), ('s1', 21)])
        self.assertEqual(picks[1][0], 's2')
        # More seeds than clusters: the best ones again.
        self.assertEqual(len(lc.choose(5, rng)), 5)

    def test_a_custom_score_decides_the_seeds(self):
        # Reward: the first feature of the center (the blob at 10 wins,
        # then the one at 5), whatever the counts.
        lc, rng = self.blobs(score=lambda c: c.centers[:, 0])
        picks = lc.choose(2, rng)
        self.assertEqual(picks[0][0], 's2')
        self.assertIn(picks[1], [('s1', 20), ('s1', 21)])
        bad, rng = self.blobs(score=lambda c: np.zeros(1))
        with self.assertRaises(ValueError):
            bad.choose(1, rng)

    def test_fast_score_weighs_reward_and_counts(self):
        # Reward favours the big blob at 0; with a heavy count bonus the
        # 2-frame blob wins, with none the reward decides.
        reward = lambda centers: -centers[:, 0]  # noqa
        lc, rng = self.blobs(score=adaptive.fast(reward, 0.0))
        self.assertEqual(lc.choose(1, rng)[0][1] < 20, True)
        lc, rng = self.blobs(score=adaptive.fast(reward, 10.0))
        self.assertIn(lc.choose(1, rng)[0], [('s1', 20), ('s1', 21)])


class TestMSM(unittest.TestCase):
    def test_timescales_longer_than_the_lag_with_error_bars(self):
        # Two wells, rare hops (about every 100 frames), fast noise inside.
        rng = np.random.default_rng(1)
        trajs = []
        for _ in range(6):
            well = np.cumsum(rng.random(600) < 0.01) % 2
            trajs.append((3.0 * well + 0.3 * rng.standard_normal(600))
                         [:, None])
        result = adaptive.msm(trajs, n_states=8, lags=(1, 2, 5, 10), lag=5,
                              n_samples=20, ps_per_frame=2.0)
        self.assertEqual(result['lag_ps'], 10.0)
        self.assertGreaterEqual(len(result['timescales']), 1)
        for mean, lower, upper in result['timescales']:
            self.assertGreater(mean, result['lag_ps'])
            self.assertLess(lower, mean)
            self.assertGreater(upper, mean)
        slowest = result['timescales'][0][0]
        self.assertGreater(slowest, 40)     # ~50 frames = 100 ps
        self.assertLess(slowest, 400)
        self.assertEqual(list(result['its'].lagtimes), [1, 2, 5, 10])
        self.assertTrue(result['its'].has_samples)
        self.assertEqual(list(result['ck'].lagtimes)[:2], [0, 5])
        folder = tmpdir('msm')
        its, ck = (os.path.join(folder, n) for n in ('its.png', 'ck.png'))
        adaptive.plot_msm(result, its, ck)
        self.assertGreater(os.path.getsize(its), 1000)
        self.assertGreater(os.path.getsize(ck), 1000)


class TestBudget(unittest.TestCase):
    """The plain-MD control stops at its frame budget, checked at every
    poll (not only between adaptive rounds)."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster().start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_plain_streams_stop_at_the_budget(self):
        target, sids = self.cluster.synthetic_target(streams=2)
        budget = adaptive.Budget(target, sids, 30)
        stop = threading.Event()
        core = Core(self.cluster.address, make_engine('synthetic', rate=20),
                    ca=self.cluster.ca, target_id=target.id, stop=stop,
                    checkpoint_every=0.1, backoff=None)
        worker = threading.Thread(target=core.run)
        worker.start()
        try:
            budget.wait(poll=0.05, timeout=120)
        finally:
            stop.set()
            worker.join(60)
        info = target.stream_info()
        self.assertTrue(budget.done)
        self.assertTrue(all(info[s]['status'] == 'STOPPED' for s in sids))
        total = sum(info[s]['frames'] for s in sids)
        self.assertGreaterEqual(budget.committed, 30)
        # Stopped within a few frames of the budget (one core at 20 frames
        # per second, committed every 0.1 s), not at a multiple of it.
        self.assertLess(total, 60)


class TestAdaptiveLoop(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.folder = tmpdir('adaptive')
        built = os.path.join(cls.folder, 'target')
        cls.summary, cls.system, cls.integrator = built_target(built)
        cls.built = built
        cls.cluster = Cluster().start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def core(self, target):
        return subprocess.Popen(
            [sys.executable, '-m', 'siegetank.core', '--cc',
             self.cluster.address, '--ca', self.cluster.ca, '--engine',
             'openmm', '--platform', 'CPU', '--threads', '1', '--target-id',
             target.id, '--checkpoint-every', '0.2', '--backoff-first',
             '0.1', '--backoff-max', '0.5', '-q'],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)

    def test_rounds_tables_resume_and_seeds(self):
        import mdtraj
        admin = self.cluster.admin
        target = admin.add_target(
            options=self.summary['options'], engine='openmm',
            engine_versions=self.summary['engine_versions'], stage='public',
            files=build_target.target_files(self.built))
        system, integrator = adaptive.load_engine_files(target)
        synced = os.path.join(self.folder, 'synced')
        scored = []

        def score(clusters):
            scored.append(len(clusters.counts))
            return adaptive.least_counts(clusters)

        watched = []
        sampler = adaptive.Sampler(
            target, synced, adaptive.backbone_dihedrals, system, integrator,
            in_flight=3, frames_per_stream=4, refill=2, seed=3, poll=0.1,
            clusters=adaptive.LeastCounts(dmin=0.2, score=score),
            watch=[lambda: watched.append(1)])
        core = self.core(target)
        err = io.StringIO()
        try:
            initial = mdtraj.load(os.path.join(self.built, 'topology.pdb'))
            with contextlib.redirect_stderr(err):
                rounds = sampler.run(n_rounds=2, initial=initial)
            # A new session: the sampler comes back from its folder.
            again = adaptive.Sampler.resume(
                target, synced, adaptive.backbone_dihedrals, system,
                integrator, clusters=adaptive.LeastCounts(dmin=0.2))
            self.assertEqual(again.round, 2)
            self.assertEqual(again.live, sampler.live)
            self.assertEqual(again.seeds_made, sampler.seeds_made)
            self.assertEqual(again.frames, sampler.frames)
            self.assertEqual(again.rng.bit_generator.state,
                             sampler.rng.bit_generator.state)
            more = again.run(n_rounds=1, progress=False)
            again.stop_all()
        finally:
            core.send_signal(signal.SIGTERM)
            _, core_err = core.communicate(timeout=60)
        self.assertEqual(core.returncode, 0, core_err)
        # The sampler stopped stream after stream under the core: its
        # manager's stops, no errors (the core's summary, the CC's stats).
        streams, by_manager, errors = map(int, re.search(
            r'(\d+) streams \((\d+) stopped by the manager\), (\d+) '
            r'errors', core_err.decode()).groups())
        self.assertEqual(errors, 0, core_err)
        self.assertGreaterEqual(by_manager, 4)
        stats = wait_for(lambda: (lambda st: st if st['sessions'] >= streams
                                  else None)(admin.target_stats(target.id)),
                         'the sessions recorded', timeout=60)
        self.assertNotIn('error', stats['by_end_reason'])
        self.assertGreaterEqual(stats['by_end_reason']['manager_stop'],
                                by_manager)

        # The progress bar, the score hook, the watchers at every poll.
        self.assertIn('2/2', err.getvalue())
        self.assertEqual(len(scored), 2)
        self.assertEqual(len(watched), sampler.polls)
        self.assertGreaterEqual(sampler.polls, 2)
        # Tables: one row per round (round 0 seeded 3 streams; each later
        # round as many as finished), one per stream.
        self.assertEqual(list(rounds.index), [0, 1, 2])
        self.assertEqual(list(more.index), [0, 1, 2, 3])
        self.assertEqual(rounds.loc[0, 'seeded'], 3)
        for r in (1, 2):
            self.assertEqual(rounds.loc[r, 'seeded'],
                             rounds.loc[r, 'finished'])
            self.assertGreaterEqual(rounds.loc[r, 'finished'], 2)
        self.assertTrue({'wait_s', 'sync_cluster_s', 'seed_s', 'frames',
                         'clusters'} <= set(rounds.columns))
        streams = again.streams()
        listing = target.stream_info()
        self.assertEqual(sorted(streams.index), sorted(listing))
        for sid, row in streams.iterrows():
            tags = listing[sid]['tags']
            self.assertEqual(tags['round'], str(row['round']))
            self.assertEqual(tags['parent'], row['parent'])
            self.assertEqual(listing[sid]['status'], 'STOPPED')
            if row['parent'] != 'initial':
                self.assertIn(row['parent'], listing)
                self.assertLess(row['frame'],
                                listing[row['parent']]['frames'])
        self.assertEqual(sorted(streams['round'].unique()), [0, 1, 2, 3])

        # Synced files are the committed trajectories, read by mdtraj with
        # the topology the target carries.
        again.sync()
        top = os.path.join(synced, 'topology.pdb')
        feats = again.cache.all()
        for sid, entry in listing.items():
            if not entry['frames']:     # stopped before a core took it
                continue
            traj = mdtraj.load(os.path.join(synced, 'streams', sid,
                                            'frames.xtc'), top=top)
            self.assertEqual(traj.n_frames, entry['frames'])
            self.assertIsNone(traj.unitcell_vectors)
            self.assertTrue(np.all(np.diff(traj.time) > 0))
            np.testing.assert_allclose(
                feats[sid], adaptive.backbone_dihedrals(traj), atol=1e-6)
        self.assertEqual(again.cache.update(), {})
        self.assertEqual(target.sync(synced)['bytes'], 0)

        # Every stream's seeds.txt names the integrator seed of each of its
        # activations; all differ.
        seeds = []
        for sid, entry in listing.items():
            if not entry['frames']:
                continue
            with open(os.path.join(synced, 'streams', sid,
                                   'seeds.txt')) as f:
                found = openmm_engine.read_seeds(f.read())
            self.assertGreaterEqual(len(found), 1)
            self.assertEqual(found[0][0], 0)
            seeds.extend(seed for _, seed in found)
        self.assertEqual(len(seeds), len(set(seeds)))


class TestDemoStatistics(unittest.TestCase):
    """make adaptive's per-replicate numbers: basins first visited, and the
    median and range with "not reached" ranked above any count."""

    def test_first_visits(self):
        from tools import adaptive_demo
        angles = np.array([[-70.0, -40.0], [-70.0, 140.0], [-150.0, -170.0],
                           [60.0, 40.0]])
        self.assertEqual(adaptive_demo.first_visits(angles), {
            'alphaR': 1, 'beta/PPII': 2, 'alphaL/C7ax': 4})
        self.assertEqual(adaptive_demo.first_visits(angles[:2])[
            'alphaL/C7ax'], None)

    def test_core_summaries_are_read_from_the_logs(self):
        """The demo sums the summary line (siegetank.core's SUMMARY) each
        core wrote in its log; a core that wrote none counts nothing."""
        from siegetank.core.__main__ import SUMMARY
        from tools import adaptive_demo
        folder = tmpdir('summaries')
        lines = {'a': {'frames': 90, 'checkpoints': 9, 'streams': 28,
                       'stopped_by_manager': 27, 'errors': 1, 'retries': 3},
                 'b': {'frames': 10, 'checkpoints': 2, 'streams': 5,
                       'stopped_by_manager': 4, 'errors': 0, 'retries': 0}}
        for name, stats in lines.items():
            with open(os.path.join(folder, name + '.log'), 'w') as f:
                f.write('... INFO working on stream s1\n%s\n'
                        % (SUMMARY % stats))
        with open(os.path.join(folder, 'c.log'), 'w') as f:
            f.write('killed before its summary\n')
        cores = [SimpleNamespace(demo_name=n) for n in ('a', 'b', 'c')]
        self.assertEqual(adaptive_demo.core_summary(
            SimpleNamespace(folder=folder), cores), (33, 31, 1))

    def test_median_and_range_count_not_reached(self):
        from tools import adaptive_demo
        self.assertEqual(adaptive_demo.med_range([3, 1, 2]), '2 [1-3]')
        self.assertEqual(adaptive_demo.med_range([5, None, 1]),
                         '5 [1-not reached]')
        self.assertEqual(adaptive_demo.med_range([5, None, None]),
                         'not reached [5-not reached]')
        self.assertEqual(adaptive_demo.med_range([None, None]),
                         'not reached (2/2)')
        self.assertEqual(adaptive_demo.coverage_curve(np.array(
            [[0.0, 0.0], [1.0, 1.0], [15.0, 0.0]])).tolist(), [1, 1, 2])
