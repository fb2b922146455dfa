"""A smoke run of the benchmark code (seconds): every frame a core had
acknowledged is what the WS reports and what it serves, with zero errors,
through the same code `make bench` runs. Its figures are not checked:
timings belong to `make bench`, never to the tests."""
import asyncio
import base64
import glob
import json
import os
import subprocess
import sys
import unittest

from bench import servers, workloads
from tools.testing import ROOT, tmpdir


def quick(*args):
    """`python -m bench --quick` with these arguments (exit code 0
    asserted by the caller) into a fresh folder: (process, results or
    None, the folder)."""
    out = tmpdir('bench')
    p = subprocess.run(
        [sys.executable, '-m', 'bench', '--quick', *args, '--out', out],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = None
    if p.returncode == 0:
        with open(os.path.join(out, 'results.json')) as f:
            results = json.load(f)
    return p, results, out


class TestBenchSmoke(unittest.TestCase):

    def test_quick_frames_and_activations(self):
        p, results, out = quick('--only', 'frames', '--only', 'activations',
                                '--duration', '0.3')
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # 10 KB and 100 KB, 1 and 8 cores, with 1 and with 2 processes
        self.assertEqual(sorted((r['processes'], r['size'], r['cores'])
                                for r in results['frames']),
                         [(p, s, c) for p in (1, 2) for s in (10_000, 100_000)
                          for c in (1, 8)])
        for row in results['frames']:
            self.assertEqual((row['ours_errors'], row['mismatches']), (0, 0))
            self.assertGreater(row['frames_committed'], 0)
            # the same SimCore workload ran against both ceilings, in the
            # same run, without errors, and each reports its CPU per frame
            for name in ('ours', 'bare', 'durable'):
                self.assertEqual(row['%s_errors' % name], 0, name)
                self.assertEqual(len(row['%s_reps' % name]), 1, name)
                self.assertGreater(row['%s_cpu_ms_per_frame' % name], 0)
                # each rep started settled: synced, the clean page cache
                # dropped (where allowed), the cost of a file creation known
                [rep] = row['%s_reps' % name]
                self.assertEqual(rep['caches_dropped'], os.access(
                    '/proc/sys/vm/drop_caches', os.W_OK))
                self.assertGreater(rep['file_create_us'], 0)
            self.assertIsNotNone(row['ratio_durable'])
            self.assertIsNotNone(row['ratio_bare'])
        self.assertEqual(results['activations']['ours_errors'], 0)
        self.assertTrue(os.path.exists(os.path.join(out, 'frames.png')))

    def test_quick_volunteers(self):
        """The paced workload of many cores: every frame sent is
        acknowledged, reported and served; the CPU per core-hour is
        reported (its value unchecked), and beside it what the same cores
        cost the bare and the durable ceiling, measured without errors."""
        p, results, _ = quick('--only', 'volunteers')
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        row = results['volunteers']
        self.assertEqual((row['cores'], row['errors'], row['mismatches']),
                         (100, 0, 0))
        self.assertGreaterEqual(row['frames'], 100 * 10)
        self.assertGreaterEqual(row['checkpoints'], 100)
        self.assertGreater(row['cpu_s_per_core_hour'], 0)
        for name in ('bare', 'durable'):
            self.assertEqual(row['%s_errors' % name], 0, name)
            self.assertGreater(row['%s_cpu_s_per_core_hour' % name], 0)
            self.assertAlmostEqual(
                row['ratio_%s' % name], row['cpu_s_per_core_hour']
                / row['%s_cpu_s_per_core_hour' % name])
        self.assertIn('against the ceilings: bare', p.stdout)

    def test_quick_status(self):
        """The /status workload: the CC's report of the WS reaches every
        stream made, and /status answers (figures unchecked)."""
        p, results, _ = quick('--only', 'status')
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        row = results['status']
        self.assertEqual((row['streams'], row['active']), (2000, 100))

    def test_quick_costs(self):
        """The per-request costs behind docs/capacity.md are measured
        without errors for every kind of request (figures unchecked)."""
        p, results, _ = quick('--only', 'costs')
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        row = results['costs']
        for size in ('ws_10k', 'ws_100k'):
            self.assertEqual(sorted(row[size]),
                             ['checkpoint', 'frame', 'heartbeat',
                              'heartbeat on a new connection',
                              'rss_kb_per_connection'])
            for kind in ('checkpoint', 'frame', 'heartbeat'):
                self.assertEqual(row[size][kind]['errors'], 0)
            self.assertGreater(row[size]['frame']['redis_commands'], 0)
        self.assertEqual(row['hub']['assign_errors'], 0)
        self.assertGreater(row['hub']['hub_commands_per_assignment'], 0)


class TestDurableCeiling(unittest.TestCase):
    """The durable ceiling does the work it claims: every frame byte a
    core sent is in that core's file, and its newest checkpoint is on disk
    as sent, and it keeps each (as our WS keeps each chunk: no deletion
    inside a run, what makes its figures a fair bound)."""

    def test_frames_appended_and_checkpoint_kept(self):
        ceiling = servers.Ceiling(1, durable=True)
        try:
            data = [os.urandom(1000 + i) for i in range(3)]

            async def core(token):
                c = workloads.conn(ceiling.port)
                auth = {'Authorization': token}
                for d in data:
                    s, b = await c.request('PUT', '/core/frame', json.dumps(
                        {'files': {'frames.xtc.b64': base64.b64encode(
                            d).decode()}}).encode(), auth)
                    self.assertEqual((s, b), (200, b'{}'))
                for _ in range(2):
                    s, _ = await c.request('PUT', '/core/checkpoint',
                                           workloads.CHECKPOINT, auth)
                    self.assertEqual(s, 200)
                await c.close()

            async def both():
                await asyncio.gather(core('one'), core('two'))
            asyncio.run(both())
            [folder] = glob.glob(os.path.join(ceiling.data, '*'))
            frames = sorted(glob.glob(os.path.join(folder, '*.frames')))
            checkpoints = sorted(glob.glob(os.path.join(folder, '*.ckpt')))
            self.assertEqual(len(frames), 2)
            for path in frames:
                with open(path, 'rb') as f:
                    self.assertEqual(f.read(), b''.join(data))
            self.assertEqual(len(checkpoints), 4)  # every one kept
            for path in checkpoints:
                with open(path, 'rb') as f:
                    self.assertEqual(f.read(), workloads.CHECKPOINT)
        finally:
            ceiling.stop()
