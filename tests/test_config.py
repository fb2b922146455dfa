"""Configuration: a bad key stops start-up with one line naming it."""
import dataclasses
import os
import subprocess
import sys
import unittest

from server import config
from tools.testing import ROOT, tmpdir, write_conf


def conf_file(text):
    path = os.path.join(tmpdir('conf'), 'x.conf')
    with open(path, 'w') as f:
        f.write(text)
    return path


class TestConfig(unittest.TestCase):

    def test_shipped_configs_are_valid(self):
        cc = config.load(os.path.join(ROOT, 'cc.conf'), 'cc')
        ws = config.load(os.path.join(ROOT, 'ws.conf'), 'ws')
        self.assertEqual(cc.name, 'mengsk')
        self.assertIn('mengsk', ws.command_centers)
        self.assertEqual(ws.external_options['external_http_port'], 8960)

    def test_dev_cc_pass_only_on_loopback(self):
        """The shipped confs listen on loopback, so their dev cc_pass
        fallback works there and nowhere else."""
        env = dict(os.environ)
        env.pop('SIEGETANK_CC_PASS', None)
        for kind in ('cc', 'ws'):
            path = os.path.join(ROOT, kind + '.conf')
            r = subprocess.run(
                [sys.executable, '-c', 'from server import config; '
                 'config.load(%r, %r, %r)' % (path, kind,
                                              ['--bind_address=0.0.0.0'])],
                cwd=ROOT, env=env, capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn('SIEGETANK_CC_PASS', r.stderr)
        dev = config.DEV_CC_PASS
        self.assertConfigError(write_conf('cc', cc_pass=dev), 'cc',
                               'SIEGETANK_CC_PASS', "bind_address ''")
        config.load(write_conf('cc', cc_pass=dev, bind_address='127.0.0.1'),
                    'cc')
        centers = {'cc': {'url': '127.0.0.1:1', 'pass': dev}}
        public = {'external_url': 'ws.example.org', 'external_http_port': 1}
        self.assertConfigError(write_conf(
            'ws', command_centers=centers, external_options=public,
            bind_address='127.0.0.1'), 'ws', 'ws.example.org')
        self.assertConfigError(write_conf('ws', command_centers=centers),
                               'ws', 'SIEGETANK_CC_PASS')
        config.load(write_conf('ws', command_centers=centers,
                               bind_address='localhost'), 'ws')
        # A real secret may be used anywhere.
        config.load(write_conf('cc', cc_pass='s3cret' * 8), 'cc')

    def test_relative_paths_resolve_against_conf_folder(self):
        path = write_conf('cc', ssl_certfile='certs/x.pem',
                          data_folder='here')
        s = config.load(path, 'cc')
        folder = os.path.dirname(path)
        self.assertEqual(s.ssl_certfile,
                         os.path.join(folder, 'certs/x.pem'))
        self.assertEqual(s.data_folder, os.path.join(folder, 'here'))

    def assertConfigError(self, path, kind, *words, overrides=()):
        with self.assertRaises(config.ConfigError) as cm:
            config.load(path, kind, overrides)
        msg = str(cm.exception)
        self.assertNotIn('\n', msg)
        self.assertIn(path, msg)
        for w in words:
            self.assertIn(w, msg)

    def test_unknown_key(self):
        self.assertConfigError(write_conf('cc', max_ws_fail=3), 'cc',
                               'unknown key max_ws_fail')

    def test_missing_key(self):
        path = write_conf('ws')
        with open(path) as f:
            lines = [ln for ln in f if not ln.startswith('command_centers')]
        with open(path, 'w') as f:
            f.writelines(lines)
        self.assertConfigError(path, 'ws', 'missing required key '
                               'command_centers')

    def test_wrong_type(self):
        self.assertConfigError(write_conf('cc', internal_http_port='80x'),
                               'cc', 'internal_http_port', 'int')
        self.assertConfigError(write_conf('cc', allow_loopback_bootstrap=1),
                               'cc', 'allow_loopback_bootstrap', 'bool')
        self.assertConfigError(write_conf('ws', command_centers={'a': 'b'}),
                               'ws', 'command_centers')
        self.assertConfigError(
            write_conf('ws', redis_options={'port': 1, 'colour': 'red'}),
            'ws', "redis_options['colour']")

    def test_proxies_and_body_rate(self):
        self.assertConfigError(write_conf('cc', trusted_proxies=['nope']),
                               'cc', 'trusted_proxies', 'nope')
        self.assertConfigError(write_conf('ws', trusted_proxies='10.0.0.1'),
                               'ws', 'trusted_proxies')
        for key in ('body_grace_in_s', 'min_body_rate_in_bytes_per_s'):
            self.assertConfigError(write_conf('ws', **{key: -1}), 'ws', key)
        s = config.load(write_conf('cc', trusted_proxies=['10.0.0.2',
                                                          '2001:db8::/64']),
                        'cc')
        self.assertEqual(s.trusted_proxies, ['10.0.0.2', '2001:db8::/64'])

    def test_bad_name(self):
        for name in ('a b', 'ws*', 'x' * 65, '', 'a:b'):
            self.assertConfigError(write_conf('ws', name=name), 'ws', 'name')

    def test_no_redis(self):
        self.assertConfigError(write_conf('cc', redis_options=None), 'cc',
                               'redis_url')

    def test_sentinel_store(self):
        url = 'redis+sentinel://:pw@h1,h2:26380/hub/2'
        s = config.load(write_conf('cc', redis_url=url), 'cc')
        self.assertEqual(s.redis_wait_replicas, 1)
        self.assertEqual(
            config.load(write_conf('cc'), 'cc').redis_wait_replicas, 0)
        self.assertConfigError(write_conf('ws', redis_url=url), 'ws',
                               'command center only')
        self.assertConfigError(write_conf(
            'cc', redis_url='redis+sentinel://h1/'), 'cc', 'redis_url')
        self.assertConfigError(write_conf(
            'cc', max_body_size=600 * 1024 * 1024), 'cc', 'max_body_size')

    def test_bad_python(self):
        self.assertConfigError(conf_file('name = (\n'), 'cc', 'cannot be read')

    def test_overrides(self):
        path = write_conf('cc')
        s = config.load(path, 'cc', ['--max_ws_fails=7', '--name=hub',
                                     '--allow-loopback-bootstrap=False'])
        self.assertEqual((s.max_ws_fails, s.name,
                          s.allow_loopback_bootstrap), (7, 'hub', False))
        self.assertConfigError(path, 'cc', 'max_ws_fails',
                               overrides=['--max_ws_fails=many'])
        self.assertConfigError(path, 'cc', 'unknown key bogus',
                               overrides=['--bogus=1'])
        self.assertConfigError(path, 'cc', '--key=value',
                               overrides=['max_ws_fails'])

    def test_server_refuses_to_start_with_one_line(self):
        path = write_conf('ws', heartbeat_increment='soon')
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'ws.py'),
                            '--config', path], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stdout, '')
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn('heartbeat_increment', lines[0])
        self.assertIn(path, lines[0])

    def test_settings_are_typed_and_frozen(self):
        s = config.load(write_conf('ws', heartbeat_increment=60,
                                   register_retry_max_in_s=2), 'ws')
        self.assertIsInstance(s, config.Settings)
        self.assertEqual(s.heartbeat_increment_in_s, 60)
        self.assertIsInstance(s.register_retry_max_in_s, float)
        self.assertEqual(s.kind, 'ws')
        with self.assertRaises(dataclasses.FrozenInstanceError):
            s.name = 'other'  # type: ignore[misc]
        self.assertEqual(s.replace(name='other').name, 'other')
        self.assertTrue(s.applies('command_centers'))
        self.assertFalse(s.applies('cc_pass'))

    def test_units_in_names_and_old_keys(self):
        """Every duration and size says its unit; a product-card key
        without one is still read, in the .conf and on the command line,
        and may not be given twice under both names."""
        units = ('_in_s', '_in_ms', '_in_mb', '_in_bytes', '_in_chars')
        for f in dataclasses.fields(config.Settings):
            if any(w in f.name for w in ('timeout', 'interval', 'window',
                                         'lease', 'size', 'length',
                                         'increment', 'lifetime')):
                self.assertTrue(f.name.endswith(units), f.name)
        old = config.Settings.old_keys()
        self.assertEqual(old['heartbeat_increment'],
                         'heartbeat_increment_in_s')
        self.assertEqual(old['max_body_size'], 'max_body_size_in_bytes')
        self.assertEqual(old['pulse_frequency_in_ms'], 'pulse_interval_in_ms')
        path = write_conf('ws', heartbeat_increment=60, max_body_size=1000,
                          pulse_frequency_in_ms=250)
        s = config.load(path, 'ws')
        self.assertEqual((s.heartbeat_increment_in_s, s.max_body_size_in_bytes,
                          s.pulse_interval_in_ms), (60, 1000, 250))
        s = config.load(path, 'ws', ['--heartbeat_increment_in_s=30',
                                     '--max_body_size=2000'])
        self.assertEqual((s.heartbeat_increment_in_s,
                          s.max_body_size_in_bytes), (30, 2000))
        s = config.load(write_conf('ws', max_body_size_in_bytes=5), 'ws',
                        ['--heartbeat_increment=45'])
        self.assertEqual((s.heartbeat_increment_in_s,
                          s.max_body_size_in_bytes), (45, 5))
        self.assertConfigError(
            write_conf('ws', heartbeat_increment=1,
                       heartbeat_increment_in_s=2), 'ws',
            'heartbeat_increment', 'heartbeat_increment_in_s', 'one setting')
        self.assertConfigError(write_conf('ws', max_body_size=0), 'ws',
                               'max_body_size must be > 0')
        self.assertConfigError(write_conf('ws', heartbeat_increment=1.5),
                               'ws', 'heartbeat_increment must be int')

    def test_keys_of_the_other_kind_are_unknown(self):
        self.assertConfigError(write_conf('ws', cc_pass='x'), 'ws',
                               'unknown key cc_pass')
        self.assertConfigError(write_conf('cc', heartbeat_increment=9), 'cc',
                               'unknown key heartbeat_increment')


class TestReference(unittest.TestCase):
    def test_every_setting_is_in_the_configuration_reference(self):
        """docs/configuration.md names every key (as its attribute or its
        old .conf name)."""
        with open(os.path.join(ROOT, 'docs', 'configuration.md')) as f:
            doc = f.read()
        missing = [f.name for f in dataclasses.fields(config.Settings)
                   if 'kinds' in f.metadata and '`%s`' % f.name not in doc
                   and not (f.metadata['old']
                            and '`%s`' % f.metadata['old'] in doc)]
        self.assertEqual(missing, [])
