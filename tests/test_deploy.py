"""The shipped service files (deploy/systemd) as systemd reads them:
rendered with this checkout's paths (verify wants each ExecStart binary to
exist) and checked by `systemd-analyze verify`, which must have nothing to
say; and the hardening every unit promises."""
import os
import re
import shutil
import subprocess
import unittest

from server import store
from tools.testing import ROOT, tmpdir

UNITS = os.path.join(ROOT, 'deploy', 'systemd')
HARDENING = {'User': 'siegetank', 'ProtectSystem': 'strict',
             'NoNewPrivileges': 'yes', 'PrivateTmp': 'yes',
             'Restart': 'on-failure', 'KillSignal': 'SIGTERM',
             'LimitNOFILE': '65536'}


def render(name, folder):
    """The unit with /opt/siegetank -> this checkout, Debian's
    redis-server -> the one the tests use."""
    with open(os.path.join(UNITS, name)) as f:
        text = f.read()
    text = text.replace('/opt/siegetank', ROOT).replace(
        '/usr/bin/redis-server', store.find_redis_binary())
    path = os.path.join(folder, name)
    with open(path, 'w') as f:
        f.write(text)
    return path


def verify(*paths):
    """systemd-analyze's complaints (it exits 0 on most of them)."""
    p = subprocess.run(['systemd-analyze', 'verify', '--man=no'] +
                       list(paths), capture_output=True, text=True,
                       timeout=120)
    return (p.stdout + p.stderr).strip() or p.returncode


def settings(path):
    pairs = re.findall(r'^(\w+)=(.*)$', open(path).read(), re.M)
    return dict(pairs)


class TestServiceFiles(unittest.TestCase):
    def setUp(self):
        self.folder = tmpdir('units')

    def test_units_verify(self):
        names = sorted(os.listdir(UNITS))
        self.assertEqual(names, ['siegetank-cc.service',
                                 'siegetank-redis.service',
                                 'siegetank-ws.service'])
        paths = [render(n, self.folder) for n in names]
        self.assertEqual(verify(*paths), 0)

    def test_hardening(self):
        for name in os.listdir(UNITS):
            unit = settings(os.path.join(UNITS, name))
            for key, value in HARDENING.items():
                self.assertEqual(unit.get(key), value, (name, key))
            self.assertIn(unit['ReadWritePaths'], unit['ExecStart'] + ' '
                          + '/var/lib/' + unit['StateDirectory'])
        for kind in ('cc', 'ws'):
            unit = settings(os.path.join(UNITS, 'siegetank-%s.service'
                                         % kind))
            # SIGTERM to the master alone: it stops its workers, then Redis.
            self.assertEqual(unit['KillMode'], 'mixed')
            self.assertIn('%s.py --config /etc/siegetank/%s.conf' % (
                kind, kind), unit['ExecStart'])

    def test_verify_complains(self):
        """The check above can fail: a mistyped value is reported."""
        path = render('siegetank-cc.service', self.folder)
        with open(path) as f:
            text = f.read().replace('ProtectSystem=strict',
                                    'ProtectSystem=strikt')
        with open(path, 'w') as f:
            f.write(text)
        self.assertIn('strikt', str(verify(path)))


class TestSystemPackages(unittest.TestCase):
    """tools/system-packages, which `make setup` runs."""
    SCRIPT = os.path.join(ROOT, 'tools', 'system-packages')

    def test_present_after_setup(self):
        p = subprocess.run(['sh', self.SCRIPT], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual((p.returncode, p.stdout + p.stderr), (0, ''))

    def test_missing_ones_make_one_line(self):
        """Without apt-get (or root) it installs nothing and names what
        to install: here a PATH with `id` alone (ip, iptables and haproxy
        are still found in /usr/sbin, chromium by its path)."""
        folder = tmpdir('bin')
        os.symlink(shutil.which('id'), os.path.join(folder, 'id'))
        p = subprocess.run(['/bin/sh', self.SCRIPT], capture_output=True,
                           text=True, timeout=120, env={'PATH': folder})
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stdout, '')
        self.assertIn('\n    apt-get install -y --no-install-recommends '
                      'make python3-venv prometheus systemd strace\n',
                      p.stderr)
