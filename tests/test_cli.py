"""The `siegetank` command line against a real CC and WS: login and its
0600 config file, targets, streams, downloads with a progress bar and
resume, ws status, and one-line errors with non-zero exit codes."""
import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import unittest
import uuid

from siegetank import cli
from siegetank.core import synthetic
from tests.cluster import Cluster
from tools.testing import ROOT, tmpdir


class CLITestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster().start()
        cls.cluster.admin.create_manager('cli@test.org', 'cli-pass')

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def setUp(self):
        self.folder = tmpdir('cli')
        self.env = {'SIEGETANK_CONFIG': os.path.join(self.folder, 'conf',
                                                     'config.json')}
        self.old_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def tearDown(self):
        for k, v in self.old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def run_cli(self, *argv):
        """(exit code, stdout, stderr) of `siegetank argv` in-process."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in argv])
            except SystemExit as e:  # argparse usage errors
                code = e.code
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv):
        code, out, err = self.run_cli(*argv)
        self.assertEqual(code, 0, err)
        return out

    def login(self):
        self.ok('--cc', self.cluster.address, '--ca', self.cluster.ca,
                'login', '--email', 'cli@test.org', '--password', 'cli-pass')


class TestLogin(CLITestCase):
    def test_login_saves_token_0600(self):
        self.login()
        path = self.env['SIEGETANK_CONFIG']
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            conf = json.load(f)
        self.assertEqual(conf['cc'], self.cluster.address)
        self.assertEqual(conf['ca'], os.path.abspath(self.cluster.ca))
        self.assertTrue(conf['token'])
        # Later commands need neither --cc nor --ca.
        self.assertEqual(self.ok('targets', 'list').splitlines()[0].split(),
                         ['target', 'stage', 'engine', 'versions',
                          'description'])
        self.ok('logout')
        code, _, err = self.run_cli('targets', 'create', '--engine-version',
                                    '1')
        self.assertEqual(code, 2)
        self.assertIn('not logged in', err)

    def test_wrong_password(self):
        code, out, err = self.run_cli(
            '--cc', self.cluster.address, '--ca', self.cluster.ca, 'login',
            '--email', 'cli@test.org', '--password', 'wrong')
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertTrue(err.startswith('siegetank: POST /managers/auth: 401'),
                        err)
        self.assertFalse(os.path.exists(self.env['SIEGETANK_CONFIG']))

    def test_login_with_token_and_bad_ca(self):
        self.ok('--cc', self.cluster.address, '--ca', self.cluster.ca,
                'login', '--token=' + self.cluster.admin.token)
        code, _, err = self.run_cli('--ca', os.path.join(self.folder, 'x'),
                                    'ws', 'status')
        self.assertEqual(code, 1)
        self.assertIn('does not exist', err)

    def test_subprocess_entry_point(self):
        """`python -m siegetank` is the same tool, exit codes included."""
        env = dict(os.environ, PYTHONPATH=ROOT, **self.env)
        p = subprocess.run([sys.executable, '-m', 'siegetank', '--cc',
                            self.cluster.address, '--ca', self.cluster.ca,
                            '--json', 'ws', 'status'], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        status = json.loads(p.stdout)
        self.assertEqual(list(status), [self.cluster.ws[0].name])
        p = subprocess.run([sys.executable, '-m', 'siegetank', '--cc',
                            '127.0.0.1:1', 'ws', 'status'], cwd=ROOT,
                           env=env, capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.strip(), 'siegetank: no command center '
                         'answers at 127.0.0.1:1 (connection refused): is '
                         'it running, and is that its address and port?')


class TestCommands(CLITestCase):
    def test_ws_status(self):
        out = self.ok('--cc', self.cluster.address, '--ca', self.cluster.ca,
                      'ws', 'status')
        self.assertIn(self.cluster.ws[0].name, out)
        self.assertIn('online', out)

    def test_ws_drain(self):
        name = self.cluster.ws[0].name
        self.login()
        code, _, err = self.run_cli('ws', 'drain', name)
        self.assertEqual(code, 1)
        self.assertIn('admin', err)
        self.ok('--cc', self.cluster.address, '--ca', self.cluster.ca,
                'login', '--email', 'admin@test.org', '--password',
                'admin-pass')
        try:
            self.assertIn('draining', self.ok('ws', 'drain', name))
            self.assertIn('online, draining', self.ok('ws', 'status'))
            self.assertIn('online, draining', self.ok('status'))
            code, _, err = self.run_cli('ws', 'drain', 'nope')
            self.assertEqual(code, 1)
            self.assertIn('unknown workserver nope', err)
        finally:
            self.ok('ws', 'drain', name, '--undo')
        self.assertNotIn('draining', self.ok('ws', 'status'))

    def test_status_names_public_targets(self):
        target, _ = self.cluster.synthetic_target()
        target.update(description='villin headpiece')
        out = self.ok('--cc', self.cluster.address, '--ca', self.cluster.ca,
                      'status')
        line = next(x for x in out.splitlines() if target.id in x)
        self.assertTrue(line.startswith('villin headpiece'), line)

    def test_accounts(self):
        self.ok('--cc', self.cluster.address, '--ca', self.cluster.ca,
                'login', '--token=' + self.cluster.admin.token)
        token = self.ok('account', 'donor', '--username', 'clidonor',
                        '--password', 'pw', '--email', 'cd@test.org').strip()
        self.assertTrue(token)
        self.ok('account', 'manager', '--email', 'new@test.org',
                '--password', 'pw')
        code, _, err = self.run_cli('account', 'manager', '--email',
                                    'new@test.org', '--password', 'pw')
        self.assertEqual((code, err.count('\n')), (1, 1))
        self.assertIn('409', err)

    def test_target_and_stream_lifecycle(self):
        self.login()
        files = os.path.join(self.folder, 'files')
        os.makedirs(files)
        for name in ('system.xml', 'integrator.xml'):
            with open(os.path.join(files, name), 'w') as f:
                f.write('<%s/>' % name)
        seed = os.path.join(files, 'state.xml')
        with open(seed, 'wb') as f:
            f.write(synthetic.seed_files()[synthetic.STATE_FILE])
        tid = self.ok('targets', 'create', os.path.join(files, 'system.xml'),
                      os.path.join(files, 'integrator.xml'),
                      '--engine', 'synthetic', '--engine-version',
                      synthetic.VERSION, '--steps-per-frame', '7',
                      '--stage', 'public', '--description', 'cli target'
                      ).strip()
        uuid.UUID(tid)
        self.assertIn(tid, self.ok('targets', 'list'))
        info = json.loads(self.ok('--json', 'targets', 'info', tid))
        self.assertEqual(info['options'], {'steps_per_frame': 7})
        self.assertEqual(sorted(info['files']),
                         ['integrator.xml.gz.b64', 'system.xml.gz.b64'])
        self.ok('targets', 'update', tid, '--weight', '2',
                '--options', '{"steps_per_frame": 9}')
        info = json.loads(self.ok('--json', 'targets', 'info', tid))
        self.assertEqual((info['weight'], info['options']),
                         (2, {'steps_per_frame': 9}))
        out_file = os.path.join(self.folder, 'system.xml')
        self.ok('targets', 'download', tid, 'system.xml.gz.b64', '-o',
                out_file)
        with open(out_file) as f:
            self.assertEqual(f.read(), '<system.xml/>')

        sids = self.ok('streams', 'add', tid, seed, seed).split()
        self.assertEqual(len(sids), 2)
        listing = self.ok('streams', 'list', tid)
        self.assertTrue(all(s in listing for s in sids))
        self.cluster.run_core(tid, 3)
        listed = json.loads(self.ok('--json', 'streams', 'list', tid))
        self.assertEqual(sum(s['frames'] for s in listed.values()), 3)
        sid = max(listed, key=lambda s: listed[s]['frames'])
        self.assertIn('STOPPED', self.ok('streams', 'stop', sid) +
                      self.ok('streams', 'info', sid))
        self.ok('streams', 'start', sid)
        self.assertIn('OK', self.ok('streams', 'info', sid))

        path = os.path.join(self.folder, 'frames.dat')
        code, out, err = self.run_cli('streams', 'download', sid,
                                      'frames.dat', '-o', path)
        self.assertEqual(code, 0, err)
        frames = listed[sid]['frames']
        self.assertEqual(out.strip(), '%s: %d bytes' % (path, frames * 1024))
        self.assertIn('100.0%', err)      # the progress bar
        with open(path, 'r+b') as f:      # cut mid-way: resumed
            f.truncate(700)
        self.ok('streams', 'download', sid, 'frames.dat', '-o', path, '-q')
        self.assertEqual(os.path.getsize(path), frames * 1024)

        other = [s for s in sids if s != sid][0]
        self.ok('streams', 'delete', other)
        self.assertNotIn(other, self.ok('streams', 'list', tid))
        self.ok('targets', 'delete', tid)
        code, _, err = self.run_cli('targets', 'info', tid)
        self.assertEqual(code, 1)
        self.assertEqual(err.count('\n'), 1)
        self.assertIn('404', err)

    def test_bad_input_is_one_line(self):
        self.login()
        code, _, err = self.run_cli('targets', 'create', '--engine-version',
                                    '1', '--options', '[1')
        self.assertEqual(code, 2)
        self.assertIn('--options is not valid JSON', err)
        code, _, err = self.run_cli('targets', 'create', '--engine-version',
                                    '1', '/nonexistent/system.xml')
        self.assertEqual(code, 2)
        self.assertEqual(err.count('\n'), 1)
        code, _, err = self.run_cli('streams', 'info', 'nope')
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith('siegetank: GET /streams/info/nope: '
                                       '4'), err)

    def test_build_target_files_upload(self):
        """Files written by build_target go up through `targets create` and
        `streams add` (names: system.xml.gz.b64, state.xml.gz.b64)."""
        self.login()
        folder = os.path.join(self.folder, 'b')
        os.makedirs(os.path.join(folder, 'streams', '0'))
        for name in ('system.xml', 'integrator.xml',
                     os.path.join('streams', '0', 'state.xml')):
            with open(os.path.join(folder, name), 'w') as f:
                f.write('<x/>')
        tid = self.ok('targets', 'create', os.path.join(folder, 'system.xml'),
                      os.path.join(folder, 'integrator.xml'),
                      '--engine-version', '8.6', '--steps-per-frame', '10'
                      ).strip()
        self.ok('streams', 'add', tid, os.path.join(folder, 'streams', '0',
                                                    'state.xml'))
        self.ok('targets', 'delete', tid)
