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
