"""The client installs alone: `SIEGETANK_CLIENT_ONLY=1 pip install .`
builds `siegetank-client`, the `siegetank` package without `server` and
with requests as its one requirement, and what it holds imports without
the servers' code."""
import glob
import os
import subprocess
import sys
import unittest
import zipfile

from tools.testing import ROOT, tmpdir


def wheel(client_only):
    folder = tmpdir('wheel')
    env = dict(os.environ)
    env.pop('SIEGETANK_CLIENT_ONLY', None)
    if client_only:
        env['SIEGETANK_CLIENT_ONLY'] = '1'
    # Built from a copy: setuptools writes build/ and egg-info next to
    # setup.py.
    src = os.path.join(folder, 'src')
    os.makedirs(src)
    for name in ('setup.py', 'siegetank', 'server'):
        subprocess.run(['cp', '-r', os.path.join(ROOT, name), src],
                       check=True)
    p = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q',
                        '--no-deps', '--no-build-isolation', '-w', folder,
                        src], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (path,) = glob.glob(os.path.join(folder, '*.whl'))
    return path


class TestClientDistribution(unittest.TestCase):
    def test_client_wheel(self):
        path = wheel(client_only=True)
        self.assertTrue(os.path.basename(path).startswith(
            'siegetank_client-'), path)
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            (meta,) = [n for n in names if n.endswith('METADATA')]
            requires = [line.split(':', 1)[1].strip() for line in
                        z.read(meta).decode().splitlines()
                        if line.startswith('Requires-Dist:')
                        and 'extra ==' not in line]
            z.extractall(os.path.join(os.path.dirname(path), 'site'))
        self.assertEqual(requires, ['requests>=2.31'])
        self.assertEqual([n for n in names if n.startswith('server/')], [])
        self.assertIn('siegetank/client.py', names)
        self.assertIn('siegetank/core/loop.py', names)
        # Imports from the wheel alone: nothing of `server` is loaded.
        site = os.path.join(os.path.dirname(path), 'site')
        p = subprocess.run(
            [sys.executable, '-c',
             'import sys; sys.path.insert(0, %r); import siegetank, '
             'siegetank.client, siegetank.cli, siegetank.core.loop, '
             'siegetank.core.synthetic, siegetank.sync; '
             'assert siegetank.__file__.startswith(%r), siegetank.__file__; '
             'print(sorted(m for m in sys.modules if m == "server" or '
             'm.startswith("server.")))' % (site, site)],
            capture_output=True, text=True, timeout=60, cwd=site)
        self.assertEqual((p.returncode, p.stdout.strip()), (0, '[]'),
                         p.stderr)

    def test_full_wheel_has_the_servers(self):
        with zipfile.ZipFile(wheel(client_only=False)) as z:
            names = z.namelist()
        self.assertIn('server/cc/app.py', names)
        self.assertIn('siegetank/client.py', names)
