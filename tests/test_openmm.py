"""The OpenMM engine end to end: a target built by OpenMM itself (alanine
dipeptide in water) goes through a real CC and WS, a real core process runs
a handful of MD frames, the downloaded XTC is read back by mdtraj (frame
count = the WS's committed frames, time strictly increasing), and the
committed checkpoint, fetched as the next core would, reloads into OpenMM
at the last frame."""
import os
import subprocess
import sys
import unittest

import numpy as np

from siegetank import build_target
from siegetank import files as wire
from siegetank.core import loop
from tests.cluster import Cluster
from tools.testing import ROOT, tmpdir

FRAMES = 4
STEPS_PER_FRAME = 10


class TestOpenMMEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.folder = tmpdir('openmm')
        cls.built = os.path.join(cls.folder, 'target')
        cls.summary = build_target.build(cls.built, streams=2,
                                         steps_per_frame=STEPS_PER_FRAME)
        cls.cluster = Cluster().start()

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_streams_differ_only_by_velocities(self):
        import openmm
        from openmm import unit
        states = [openmm.XmlSerializer.deserialize(seed[
            'state.xml.gz.b64'].decode())
            for seed in build_target.stream_seeds(self.built)]
        self.assertEqual(len(states), 2)
        pos = [s.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
               for s in states]
        vel = [s.getVelocities(asNumpy=True).value_in_unit(
            unit.nanometer / unit.picosecond) for s in states]
        self.assertTrue(np.array_equal(pos[0], pos[1]))
        self.assertFalse(np.allclose(vel[0], vel[1]))
        self.assertEqual(self.summary['atoms'], len(pos[0]))

    def test_frames_through_cc_and_ws(self):
        import mdtraj
        import openmm
        from openmm import unit

        admin = self.cluster.admin
        target, sids = build_target.upload(admin, self.built, stage='public')
        self.assertEqual(len(sids), 2)
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.run(
            [sys.executable, '-m', 'siegetank.core', '--cc',
             self.cluster.address, '--ca', self.cluster.ca, '--engine',
             'openmm', '--platform', 'CPU', '--threads', '1',
             '--target-id', target.id, '--max-frames', str(FRAMES),
             '--checkpoint-every', '0', '-q'],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn('%d frames' % FRAMES, p.stderr)

        info = target.stream_info()
        sid = max(info, key=lambda s: info[s]['frames'])
        committed = info[sid]['frames']
        self.assertEqual(committed, FRAMES)
        self.assertFalse(info[sid]['active'])

        path = os.path.join(self.folder, 'frames.xtc')
        admin.stream(sid).download('frames.xtc', path)
        top = os.path.join(self.built, 'topology.pdb')
        traj = mdtraj.load(path, top=top)
        self.assertEqual(traj.n_frames, committed)
        self.assertEqual(traj.n_atoms, self.summary['atoms'])
        self.assertTrue(np.all(np.diff(traj.time) > 0), traj.time)
        self.assertAlmostEqual(traj.time[-1],
                               FRAMES * self.summary['ps_per_frame'],
                               places=3)
        self.assertTrue(np.all(np.isfinite(traj.xyz)))

        # The checkpoint, as the next core gets it, reloads into OpenMM at
        # the last committed frame.
        session = loop.requests.Session()
        session.trust_env = False
        assigned = loop.call(session, 'POST',
                             'https://%s/core/assign' % self.cluster.address,
                             body={'engine': 'openmm',
                                   'engine_version':
                                       build_target.engine_version(),
                                   'target_id': target.id},
                             verify=self.cluster.ca)
        start = loop.call(session, 'GET', assigned['url'],
                          assigned['token'], verify=self.cluster.ca)
        self.assertEqual(start['stream_id'], sid)
        files = wire.decode_files(start['files'])
        state = openmm.XmlSerializer.deserialize(
            files['state.xml.gz.b64'].decode())
        system = openmm.XmlSerializer.deserialize(
            files['system.xml.gz.b64'].decode())
        integrator = openmm.XmlSerializer.deserialize(
            files['integrator.xml.gz.b64'].decode())
        context = openmm.Context(system, integrator,
                                 openmm.Platform.getPlatformByName('CPU'),
                                 {'Threads': '1'})
        context.setState(state)
        now = context.getState(getPositions=True, enforcePeriodicBox=True)
        self.assertAlmostEqual(now.getTime().value_in_unit(unit.picosecond),
                               float(traj.time[-1]), places=3)
        xyz = now.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        self.assertLess(np.abs(xyz - traj.xyz[-1]).max(), 2e-3)
        integrator.step(STEPS_PER_FRAME)
        energy = context.getState(getEnergy=True).getPotentialEnergy()
        self.assertTrue(np.isfinite(energy.value_in_unit(
            unit.kilojoule_per_mole)))
        loop.call(session, 'PUT', assigned['url'].replace(
            '/core/start', '/core/stop'), assigned['token'], {},
            verify=self.cluster.ca)
        target.delete()


class TestEngineRuns(unittest.TestCase):
    """The engine without servers: alanine dipeptide in implicit solvent
    (OBC2, no cutoff, no box), a few frames on the Reference platform."""

    @classmethod
    def setUpClass(cls):
        import openmm
        cls.folder = tmpdir('openmm-engine')
        cls.built = os.path.join(cls.folder, 'obc2')
        build_target.build(cls.built, streams=1, solvent='obc2',
                           steps_per_frame=STEPS_PER_FRAME)
        cls.target_files = {
            k: v for k, v in build_target.target_files(cls.built).items()
            if k != 'topology.pdb.gz.b64'}
        cls.seed_files = build_target.stream_seeds(cls.built)[0]
        des = openmm.XmlSerializer.deserialize
        cls.system = des(cls.target_files['system.xml.gz.b64'].decode())
        state = des(cls.seed_files['state.xml.gz.b64'].decode())
        from openmm import unit
        # Far from the origin, so a wrap into any box would show.
        xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        cls.moved = xyz + 3.7
        context = openmm.Context(cls.system, openmm.VerletIntegrator(0.001),
                                 openmm.Platform.getPlatformByName(
                                     'Reference'))
        context.setState(state)
        context.setPositions(cls.moved * unit.nanometer)
        cls.seed_files = {'state.xml.gz.b64': openmm.XmlSerializer.serialize(
            context.getState(getPositions=True, getVelocities=True,
                             getParameters=True)).encode()}

    def run_frames(self, n, stream_files=None):
        from siegetank.core import openmm_engine
        engine = openmm_engine.Engine('Reference')
        run = engine.start(stream_files or self.seed_files,
                           self.target_files,
                           {'steps_per_frame': STEPS_PER_FRAME})
        try:
            frames = [run.next_frame(loop.threading.Event())[0]
                      for _ in range(n)]
            return run, frames, run.checkpoint()
        finally:
            run.close()

    def xtc(self, frames):
        import mdtraj
        from mdtraj.formats import XTCTrajectoryFile
        path = os.path.join(self.folder, 'frames-%s.xtc' % os.urandom(4).hex())
        with open(path, 'wb') as f:
            for files in frames:
                f.write(files['frames.xtc.b64'])
        with XTCTrajectoryFile(path) as f:
            xyz, _, _, box = f.read()
        traj = mdtraj.load(path, top=os.path.join(self.built, 'topology.pdb'))
        return xyz, box, traj

    def test_non_periodic_frames_have_no_box_and_are_not_wrapped(self):
        import openmm
        from openmm import unit
        self.assertFalse(self.system.usesPeriodicBoundaryConditions())
        run, frames, checkpoint = self.run_frames(3)
        xyz, box, traj = self.xtc(frames)
        self.assertFalse(np.any(box), box)
        self.assertIsNone(traj.unitcell_vectors)
        # The last frame is the simulation's own (unwrapped) positions: the
        # checkpoint's, centroid included.
        state = openmm.XmlSerializer.deserialize(
            checkpoint['state.xml.gz.b64'].decode())
        last = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        self.assertLess(np.abs(xyz[-1] - last).max(), 2e-3)
        np.testing.assert_allclose(xyz[-1].mean(0), last.mean(0), atol=1e-3)
        # Still near where it started (3.7 nm off the origin), not wrapped.
        np.testing.assert_allclose(xyz[0].mean(0), self.moved.mean(0),
                                   atol=0.05)

    def test_every_activation_draws_its_own_seed_and_records_it(self):
        from siegetank.core import openmm_engine
        one, frames1, _ = self.run_frames(2)
        two, frames2, _ = self.run_frames(2)
        self.assertNotEqual(one.seed, two.seed)
        # The first frame of an activation carries its seed, later ones not.
        text = frames1[0]['seeds.txt.b64'].decode()
        self.assertEqual(openmm_engine.read_seeds(text),
                         [(0, one.seed)])
        self.assertNotIn('seeds.txt.b64', frames1[1])
        # Same start, different noise: different trajectories.
        a, _, _ = self.xtc(frames1)
        b, _, _ = self.xtc(frames2)
        self.assertGreater(np.abs(a[-1] - b[-1]).max(), 1e-3)

    def test_a_recorded_seed_reproduces_the_activation(self):
        import openmm
        from openmm import unit
        run, frames, _ = self.run_frames(2)
        (step, seed), = openmm_engine_seeds(frames)
        integrator = openmm.XmlSerializer.deserialize(
            self.target_files['integrator.xml.gz.b64'].decode())
        integrator.setRandomNumberSeed(seed)
        context = openmm.Context(self.system, integrator,
                                 openmm.Platform.getPlatformByName(
                                     'Reference'))
        context.setState(openmm.XmlSerializer.deserialize(
            self.seed_files['state.xml.gz.b64'].decode()))
        integrator.step(2 * STEPS_PER_FRAME)
        again = context.getState(getPositions=True).getPositions(
            asNumpy=True).value_in_unit(unit.nanometer)
        xyz, _, _ = self.xtc(frames)
        self.assertEqual(step, 0)
        self.assertLess(np.abs(xyz[-1] - again).max(), 2e-3)

    def test_a_restart_draws_a_new_seed_recorded_at_its_step(self):
        from siegetank.core import openmm_engine
        first, _, checkpoint = self.run_frames(2)
        second, frames, _ = self.run_frames(1, checkpoint)
        self.assertNotEqual(first.seed, second.seed)
        self.assertEqual(openmm_engine.read_seeds(
            frames[0]['seeds.txt.b64'].decode()),
            [(2 * STEPS_PER_FRAME, second.seed)])


def openmm_engine_seeds(frames):
    from siegetank.core import openmm_engine
    return openmm_engine.read_seeds(b''.join(
        f.get('seeds.txt.b64', b'') for f in frames).decode())
