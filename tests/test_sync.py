"""Researchers' side against a real CC and WS: stream tags (stored,
listed, validated), and the incremental sync of a target: only new bytes
move (counted from the bytes the WS logs it sent), a repeated sync moves
none, a sync killed with SIGKILL mid-transfer or mid-append resumes and
ends byte-identical to the WS's committed frames, and the CLI."""
import contextlib
import glob
import http.server
import io
import json
import logging
import os
import re
import ssl
import subprocess
import sys
import threading
import unittest
import uuid

from server.ws.storage import Storage
from siegetank import cli, files, sync
from siegetank.client import Client, SiegetankError
from siegetank.core import make_engine, synthetic
from tests.cluster import Cluster
from tools.testing import ROOT, certs, tmpdir

FRAME_BYTES = 32768
SENT = re.compile(r'sent (\d+) bytes of (\S+) of stream (\S+) '
                  r'\(from byte (\d+) of (\d+)\)')

# Runs a sync in another process and kills it (SIGKILL) at a chosen point:
# `transfer` after that many bytes arrived, `append` half-way through
# appending a finished download to the file.
KILLER = r'''
import os, signal, sys
from siegetank import sync
from siegetank.client import Client
cc, token, ca, target, folder, where, after = sys.argv[1:]
got = [0]

def progress(n):
    got[0] += n
    if where == 'transfer' and got[0] >= int(after):
        os.kill(os.getpid(), signal.SIGKILL)

def torn(path, tail, offset):
    with open(path, 'ab') as f, open(tail, 'rb') as src:
        f.truncate(offset)
        f.write(src.read(int(after)))
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if where == 'append':
    sync._append = torn
Client(cc, token=token, ca=ca).load_target(target).sync(
    folder, ('frames.dat',), progress=progress)
'''


class SyncTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster().start()
        cls.admin = cls.cluster.admin
        cls.ws = cls.cluster.ws[0]

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def setUp(self):
        self.folder = tmpdir('sync')

    def run_frames(self, target, sid, frames):
        """`frames` more committed frames on stream `sid` (the others of
        the target stopped meanwhile)."""
        others = [s for s in target.stream_info() if s != sid]
        for s in others:
            self.admin.stream(s).stop()
        self.admin.stream(sid).start()
        self.cluster.run_core(target.id, frames, engine=make_engine(
            'synthetic', rate=1000, frame_bytes=FRAME_BYTES))
        for s in others:
            self.admin.stream(s).start()

    def committed(self, sid, name='frames.dat'):
        """The stream's committed bytes of `name`, read from the WS's disk."""
        data = b''
        for path, _ in Storage(self.ws.settings.data_folder).download_parts(
                sid, name) or []:
            with open(path, 'rb') as f:
                data += f.read()
        return data

    def local(self, folder, sid, name='frames.dat'):
        with open(os.path.join(folder, 'streams', sid, name), 'rb') as f:
            return f.read()

    def sent(self):
        """[(bytes, stream, from byte)] the WS logged it sent, so far."""
        return [(int(m.group(1)), m.group(3), int(m.group(4)))
                for m in SENT.finditer(self.ws.read_log())]

    def two_streams(self, frames=(12, 5)):
        """A target with two streams, in the order a sync takes them (by
        id), holding `frames` committed frames."""
        target, sids = self.cluster.synthetic_target(streams=2)
        sids = sorted(sids)
        for sid, n in zip(sids, frames, strict=True):
            self.run_frames(target, sid, n)
        return target, sids


class TestTags(SyncTestCase):
    def test_tags_stored_listed_and_shown(self):
        target, _ = self.cluster.synthetic_target(streams=0)
        tags = {'parent': 'abc:firebat', 'frame': '120', 'round': '2',
                'note': 'caf\u00e9'}
        sid = target.add_stream(synthetic.seed_files('a'), tags=tags)
        bare = target.add_stream(synthetic.seed_files('b'))
        self.assertEqual(self.admin.stream(sid).info()['tags'], tags)
        self.assertEqual(self.admin.stream(bare).tags, {})
        listing = target.stream_info()
        self.assertEqual(listing[sid]['tags'], tags)
        self.assertEqual(listing[bare]['tags'], {})
        self.assertEqual(listing[sid]['frames'], 0)
        # Exactly 4 KB of JSON is accepted.
        big = {'k': 'x' * (4096 - len('{"k":""}'))}
        self.assertEqual(self.admin.stream(target.add_stream(
            synthetic.seed_files('c'), tags=big)).info()['tags'], big)

    def test_bad_tags_are_400(self):
        target, _ = self.cluster.synthetic_target(streams=0)
        files = {'state.xml': 'x'}
        for bad in ([], 'a=b', {'a': 1}, {'a': None}, {'': 'x'},
                    {'a': {'b': 'c'}}, {'k': 'x' * (4097 - len('{"k":""}'))},
                    {'k%d' % i: 'v' * 60 for i in range(70)}):
            with self.assertRaises(SiegetankError) as e:
                self.admin.post('/streams', {'target_id': target.id,
                                             'files': files, 'tags': bad})
            self.assertEqual(e.exception.status, 400, bad)
            self.assertIn('tag', e.exception.message)
        self.assertEqual(target.stream_info(), {})

    def test_cli_adds_and_lists_tags(self):
        target, _ = self.cluster.synthetic_target(streams=0)
        seed = os.path.join(self.folder, 'state.xml')
        with open(seed, 'w') as f:
            f.write('{"frame": 0}')
        config = os.path.join(self.folder, 'config.json')
        with open(config, 'w') as f:
            json.dump({'cc': self.cluster.address, 'ca': self.cluster.ca,
                       'token': self.admin.token}, f)
        os.environ['SIEGETANK_CONFIG'] = config
        try:
            code, out, _ = run_cli('streams', 'add', target.id, seed,
                                   '--tag', 'parent=p:ws', '--tag', 'round=1')
            self.assertEqual(code, 0)
            sid = out.strip()
            code, out, _ = run_cli('streams', 'list', target.id)
            self.assertEqual(code, 0)
            self.assertIn('tags', out.splitlines()[0])
            self.assertIn('parent=p:ws,round=1', out)
            code, _, err = run_cli('streams', 'add', target.id, seed,
                                   '--tag', 'novalue')
            self.assertEqual(code, 2, err)
        finally:
            del os.environ['SIEGETANK_CONFIG']
        self.assertEqual(self.admin.stream(sid).tags,
                         {'parent': 'p:ws', 'round': '1'})


class TestSync(SyncTestCase):
    def test_only_new_bytes_then_none(self):
        target, (a, b) = self.two_streams()
        logged = len(self.sent())
        result = target.sync(self.folder, ('frames.dat',))
        self.assertEqual(sorted(result['grown']), sorted([a, b]))
        size = {s: len(self.committed(s)) for s in (a, b)}
        self.assertEqual(size[a], 12 * FRAME_BYTES)
        self.assertEqual(result['bytes'], size[a] + size[b])
        sent = self.sent()[logged:]
        self.assertEqual(sorted(sent), sorted([(size[a], a, 0),
                                               (size[b], b, 0)]))
        for s in (a, b):
            self.assertEqual(self.local(self.folder, s), self.committed(s))
        record = json.load(open(os.path.join(self.folder, 'streams', a,
                                             'stream.json')))
        self.assertEqual(record['frames'], 12)
        self.assertEqual(record['tags'], {})

        # Nothing grew: the WS sends nothing, not even an empty reply.
        again = target.sync(self.folder, ('frames.dat',))
        self.assertEqual((again['bytes'], again['grown']), (0, []))
        self.assertEqual(self.sent()[logged + 2:], [])

        # b grows: only b's new bytes, from where the local file ended.
        self.run_frames(target, b, 3)
        third = target.sync(self.folder, ('frames.dat',))
        self.assertEqual(third['grown'], [b])
        self.assertEqual(third['bytes'], 3 * FRAME_BYTES)
        self.assertEqual(self.sent()[logged + 2:],
                         [(3 * FRAME_BYTES, b, size[b])])
        self.assertEqual(self.local(self.folder, b), self.committed(b))
        self.assertEqual(self.local(self.folder, a), self.committed(a))

    def test_stream_sync(self):
        target, (a, _) = self.two_streams((3, 0))
        stream = self.admin.stream(a)
        self.assertEqual(stream.sync(self.folder, ('frames.dat',)),
                         3 * FRAME_BYTES)
        self.assertEqual(stream.sync(self.folder, ('frames.dat',)), 0)
        with open(os.path.join(self.folder, 'frames.dat'), 'rb') as f:
            self.assertEqual(f.read(), self.committed(a))

    def kill_sync(self, target, where, after):
        p = subprocess.run(
            [sys.executable, '-c', KILLER, self.cluster.address,
             self.admin.token, self.cluster.ca, target.id, self.folder,
             where, str(after)],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, -9, p.stderr)

    def test_killed_mid_transfer_resumes(self):
        target, (a, b) = self.two_streams((40, 4))
        first = a  # synced first: killed during its transfer
        self.kill_sync(target, 'transfer', 300000)
        parts = glob.glob(os.path.join(self.folder, 'streams', first,
                                       'frames.dat.part-0'))
        self.assertEqual(len(parts), 1)
        have = os.path.getsize(parts[0])
        self.assertGreater(have, 0)
        self.assertLess(have, len(self.committed(first)))
        self.assertFalse(os.path.exists(os.path.join(
            self.folder, 'streams', first, 'frames.dat')))
        logged = len(self.sent())
        result = target.sync(self.folder, ('frames.dat',))
        self.assertEqual(sorted(result['grown']), sorted([a, b]))
        resumed = [s for s in self.sent()[logged:] if s[1] == first]
        self.assertEqual(resumed, [(len(self.committed(first)) - have,
                                    first, have)])
        for s in (a, b):
            self.assertEqual(self.local(self.folder, s), self.committed(s))
        self.assertEqual(glob.glob(os.path.join(self.folder, 'streams', '*',
                                                '*.*-*')), [])
        self.assertEqual(target.sync(self.folder, ('frames.dat',))['bytes'],
                         0)

    def test_killed_mid_append_resumes(self):
        target, (a, b) = self.two_streams((6, 2))
        target.sync(self.folder, ('frames.dat',))
        self.run_frames(target, a, 5)
        self.kill_sync(target, 'append', 1000)
        path = os.path.join(self.folder, 'streams', a, 'frames.dat')
        old = 6 * FRAME_BYTES
        self.assertEqual(os.path.getsize(path), old + 1000)  # torn
        self.assertTrue(os.path.exists('%s.done-%d' % (path, old)))
        logged = len(self.sent())
        result = target.sync(self.folder, ('frames.dat',))
        self.assertEqual(result['bytes'], 0)   # all was on disk already
        self.assertEqual(self.sent()[logged:], [])
        self.assertEqual(self.local(self.folder, a), self.committed(a))
        self.assertEqual(len(self.committed(a)), 11 * FRAME_BYTES)

    def test_other_target_folder_is_refused(self):
        target, _ = self.two_streams((1, 0))
        other, _ = self.cluster.synthetic_target(streams=1)
        target.sync(self.folder, ('frames.dat',))
        with self.assertRaises(SiegetankError) as e:
            other.sync(self.folder, ('frames.dat',))
        self.assertIn(target.id, str(e.exception))

    def test_cli_sync(self):
        target, (a, b) = self.two_streams((2, 1))
        config = os.path.join(self.folder, 'config.json')
        with open(config, 'w') as f:
            json.dump({'cc': self.cluster.address, 'ca': self.cluster.ca,
                       'token': self.admin.token}, f)
        out_dir = os.path.join(self.folder, 'out')
        os.environ['SIEGETANK_CONFIG'] = config
        try:
            code, out, err = run_cli('sync', target.id, out_dir, '--file',
                                     'frames.dat')
            self.assertEqual(code, 0, err)
            self.assertIn('2 of 2 streams grew, %d bytes' % (
                3 * FRAME_BYTES), out)
            self.assertIn('sync %s' % target.id[:8], err)  # progress line
            code, out, err = run_cli('sync', target.id, out_dir, '--file',
                                     'frames.dat', '-q')
            self.assertIn('0 of 2 streams grew, 0 bytes', out)
            self.assertEqual(err, '')
        finally:
            del os.environ['SIEGETANK_CONFIG']
        for s in (a, b):
            self.assertEqual(self.local(out_dir, s), self.committed(s))


class Hostile(http.server.BaseHTTPRequestHandler):
    """A command center that lists stream ids meant to escape the sync
    folder (relative and absolute) next to one valid id, names a target
    file that is no plain name, and serves the same bytes for every
    file."""

    listing = {}

    def do_GET(self):
        if self.path.startswith('/targets/info/'):
            body = json.dumps({'files': ['topology.pdb/../../../t.pdb']})
        elif self.path.startswith('/targets/streams/'):
            body = json.dumps({'ws1': self.listing})
        else:
            body = 'EVIL'
        data = body.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class TestHostileListing(unittest.TestCase):
    """Issue 22, point 1: ids and names from a server are checked with the
    servers' grammar before they touch the disk."""

    def test_escaping_ids_are_skipped(self):
        root = tmpdir('victim')
        folder = os.path.join(root, 'a', 'b', 'target')
        absolute = os.path.join(root, 'abs')
        good = str(uuid.uuid4()) + ':ws1'
        entry = {'frames': 1, 'status': 'OK', 'tags': {}}
        Hostile.listing = {'../../../x': entry, absolute: entry,
                           '../../' + good: entry, good: entry}
        httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Hostile)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs()['cert'], certs()['key'])
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(httpd.server_close)
        self.addCleanup(httpd.shutdown)
        client = Client('127.0.0.1:%d' % httpd.server_address[1],
                        token='t', ca=certs()['ca'])
        said = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: said.append(record.getMessage())
        log = logging.getLogger('siegetank')
        log.addHandler(handler)
        try:
            result = client.load_target(str(uuid.uuid4())).sync(folder)
        finally:
            log.removeHandler(handler)
        written = [os.path.join(d, f) for d, _, files in os.walk(root)
                   for f in files]
        self.assertTrue(written)
        for path in written:
            self.assertTrue(path.startswith(folder + os.sep), path)
        self.assertFalse(os.path.exists(os.path.join(folder,
                                                     'topology.pdb')))
        self.assertEqual(result['grown'], [good])
        self.assertEqual(sorted(result['streams']), [good])
        with open(os.path.join(folder, 'streams', good, 'frames.xtc')) as f:
            self.assertEqual(f.read(), 'EVIL')
        said = '\n'.join(said)
        self.assertIn('../../../x', said)
        self.assertIn('topology.pdb/../../../t.pdb', said)

    def test_local_streams_skips_bad_ids(self):
        folder = tmpdir('local')
        good = str(uuid.uuid4()) + ':ws1'
        for sid, name in ((good, 'g'), ('../../x', 'b')):
            os.makedirs(os.path.join(folder, 'streams', name))
            with open(os.path.join(folder, 'streams', name, 'stream.json'),
                      'w') as f:
                json.dump({'stream_id': sid}, f)
        with self.assertLogs('siegetank', 'WARNING'):
            self.assertEqual(list(sync.local_streams(folder)), [good])

    def test_grammar_is_the_servers(self):
        from server import web
        for ours, theirs in ((files.TARGET_ID, web.TARGET_ID),
                             (files.STREAM_ID, web.STREAM_ID),
                             (files.FILE_NAME, web.FILE_NAME)):
            self.assertEqual(ours.pattern, theirs.pattern)
        tid = str(uuid.uuid4())
        for name in ('frames.xtc', 'state.xml.gz.b64', '.', '..', 'a..b',
                     '', 'a/b', 'x' * 129, '\u00e9', tid):
            server_ok = True
            try:
                web.check_file_name(name)
            except web.APIError:
                server_ok = False
            self.assertEqual(files.safe_file_name(name), server_ok, name)
        for sid in (tid + ':ws1', tid, tid + ':', tid + ':a/b',
                    '../' + tid + ':w', tid.upper() + ':w'):
            self.assertEqual(files.safe_stream_id(sid),
                             bool(web.STREAM_ID.fullmatch(sid)), sid)
        for t in (tid, tid + '\n', 'x', tid[:-1]):
            self.assertEqual(files.safe_target_id(t),
                             bool(web.TARGET_ID.fullmatch(t)), t)


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()
