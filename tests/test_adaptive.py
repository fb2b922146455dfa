"""siegetank.adaptive: seeding a stream from a committed frame (OpenMM),
least-counts clustering, and two rounds of the adaptive loop on a real CC
and WS with a real OpenMM core process (alanine dipeptide in vacuum, 10
steps per frame), synced and read back by mdtraj."""
import os
import signal
import subprocess
import sys
import unittest

import numpy as np

from siegetank import adaptive, build_target
from tests.cluster import Cluster
from tools.testing import ROOT, tmpdir


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
    def test_least_counted_clusters_are_chosen(self):
        rng = np.random.default_rng(0)
        lc = adaptive.LeastCounts(dmin=0.5)
        # Three well separated blobs with 20, 2 and 7 frames.
        blob = lambda c, n: c + 0.01 * rng.standard_normal((n, 2))  # noqa
        lc.add('s1', 0, np.concatenate([blob(0, 20), blob(5, 2)]))
        lc.add('s2', 0, blob(10, 7))
        self.assertEqual(sorted(lc.counts), [2, 7, 20])
        picks = lc.choose(2, rng)
        self.assertEqual(sorted(picks)[0][0], 's1')
        self.assertIn(picks[0], [('s1', 20), ('s1', 21)])
        self.assertEqual(picks[1][0], 's2')
        self.assertTrue(lc.under_sampled('s2', 2))  # s2 ends in the 7s
        self.assertFalse(lc.under_sampled('s2', 1))


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

    def test_two_rounds(self):
        import mdtraj
        admin = self.cluster.admin
        target = admin.add_target(
            options=self.summary['options'], engine='openmm',
            engine_versions=self.summary['engine_versions'], stage='public',
            files=build_target.target_files(self.built))
        system, integrator = adaptive.load_engine_files(target)
        synced = os.path.join(self.folder, 'synced')
        sampler = adaptive.Sampler(
            target, synced, adaptive.backbone_dihedrals, system, integrator,
            streams_per_round=2, frames_per_stream=4, seed=3, poll=0.1,
            clusters=adaptive.LeastCounts(dmin=0.2), extend=False)
        core = subprocess.Popen(
            [sys.executable, '-m', 'siegetank.core', '--cc',
             self.cluster.address, '--ca', self.cluster.ca, '--engine',
             'openmm', '--platform', 'CPU', '--threads', '1', '--target-id',
             target.id, '--checkpoint-every', '0.2', '--backoff-first',
             '0.1', '--backoff-max', '0.5', '-q'],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        try:
            initial = mdtraj.load(os.path.join(self.built, 'topology.pdb'))
            first = sampler.step(initial)
            round0 = list(sampler.live)
            second = sampler.step()
            round1 = list(sampler.live)
        finally:
            core.send_signal(signal.SIGTERM)
            _, err = core.communicate(timeout=60)
        self.assertEqual(core.returncode, 0, err)

        listing = target.stream_info()
        self.assertGreaterEqual(first, 8)
        self.assertGreaterEqual(second, 4)
        self.assertEqual(sampler.frames, first + second)
        for sid in round0:
            self.assertEqual(listing[sid]['tags']['round'], '0')
        seeded = sampler.history[1]['seeded']
        self.assertEqual(sampler.history[1]['extended'], [])
        self.assertEqual(sorted(seeded), sorted(round1))
        self.assertEqual(len(seeded), 2)
        for sid in seeded:
            tags = listing[sid]['tags']
            self.assertEqual(tags['round'], '1')
            self.assertIn(tags['parent'], round0)
            self.assertLess(int(tags['frame']),
                            listing[tags['parent']]['frames'])
        # The last round's streams are stopped; each ran its quota.
        for sid in round0 + round1:
            self.assertEqual(listing[sid]['status'], 'STOPPED')
        for sid in round1:
            self.assertGreaterEqual(listing[sid]['frames'], 4)

        # Synced files are the committed trajectories, read by mdtraj with
        # the topology the target carries.
        top = os.path.join(synced, 'topology.pdb')
        self.assertTrue(os.path.exists(top))
        cache = adaptive.FeatureCache(synced, adaptive.backbone_dihedrals)
        feats = cache.all()
        for sid, entry in listing.items():
            traj = mdtraj.load(os.path.join(synced, 'streams', sid,
                                            'frames.xtc'), top=top)
            self.assertEqual(traj.n_frames, entry['frames'])
            self.assertEqual(traj.n_atoms, self.summary['atoms'])
            self.assertTrue(np.all(np.diff(traj.time) > 0))
            np.testing.assert_allclose(
                feats[sid], adaptive.backbone_dihedrals(traj), atol=1e-6)
        # Nothing new: nothing featurized, no bytes moved.
        self.assertEqual(cache.update(), {})
        self.assertEqual(target.sync(synced)['bytes'], 0)
