"""tools/codemods/settings_attrs.py: string lookups on settings objects
become attributes with the unit-named names, once, and nothing else is
touched."""
import os
import subprocess
import sys
import unittest

from tools.codemods import settings_attrs
from tools.testing import ROOT, tmpdir

BEFORE = '''\
def f(app, settings, conf, handler):
    a = app.config['heartbeat_increment'] + settings['name']
    b = self.application.config.get('max_body_size', 10)
    c = handler.config[self.body_limit]
    d = max(settings[k] for k in LIMITS if k in settings)
    e = app.config[
        'pulse_frequency_in_ms']
    app.config['min_free_disk_in_mb'] = 1 << 40
    g = config.load(path, 'ws')['data_folder']
    h = conf['internal_http_port'], settings['not_a_setting']
    i = server.settings.heartbeat_increment
    return a, b, c, d, e, g, h, i


class H:
    body_limit = 'max_frame_body_size'


LIMITS = ('max_small_body_size', 'max_body_size')
'''

AFTER = '''\
def f(app, settings, conf, handler):
    a = app.config.heartbeat_increment_in_s + settings.name
    b = self.application.config.max_body_size_in_bytes
    c = getattr(handler.config, self.body_limit)
    d = max(getattr(settings, k) for k in LIMITS if settings.applies(k))
    e = app.config.pulse_interval_in_ms
    app.config = app.config.replace(min_free_disk_in_mb=1 << 40)
    g = config.load(path, 'ws').data_folder
    h = conf['internal_http_port'], settings['not_a_setting']
    i = server.settings.heartbeat_increment_in_s
    return a, b, c, d, e, g, h, i


class H:
    body_limit = 'max_frame_body_size_in_bytes'


LIMITS = ('max_small_body_size', 'max_body_size')
'''


class TestSettingsCodemod(unittest.TestCase):

    def test_rewrite_is_exact_and_idempotent(self):
        after = settings_attrs.rewrite(BEFORE)
        self.assertEqual(after, AFTER)
        self.assertEqual(settings_attrs.rewrite(after), after)

    def test_command_line_check_and_apply(self):
        folder = tmpdir('codemod')
        path = os.path.join(folder, 'm.py')
        with open(path, 'w') as f:
            f.write(BEFORE)
        script = os.path.join(ROOT, 'tools', 'codemods', 'settings_attrs.py')

        def run(*args):
            return subprocess.run([sys.executable, script, *args, folder],
                                  capture_output=True, text=True, timeout=60)
        self.assertEqual(run('--check').returncode, 1)
        self.assertEqual(run().returncode, 0)
        with open(path) as f:
            self.assertEqual(f.read(), AFTER)
        self.assertEqual(run('--check').returncode, 0)

    def test_the_tree_has_no_string_lookups_left(self):
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, 'tools', 'codemods',
                                          'settings_attrs.py'), '--check',
             'server', 'siegetank', 'tools', 'bench', 'tests'],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
