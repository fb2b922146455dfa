"""The manager client against a real CC and two real workservers: accounts,
the 2014 module-level names, targets, streams, downloads (resumed with
Range through the CC's redirect to the WS), and TLS that only trusts the
CA it is given."""
import http.server
import json
import os
import shutil
import socket
import ssl
import threading
import unittest
import uuid

import siegetank
from siegetank import client as client_module
from siegetank.client import Client, SiegetankError
from siegetank.core import synthetic
from tests.cluster import Cluster
from tools.testing import certs, free_port, tmpdir


class ClientTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster(n_ws=2).start()
        cls.admin = cls.cluster.admin

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def setUp(self):
        self.folder = tmpdir('client')


class TestAccounts(ClientTestCase):
    def test_manager_login_rotates_token(self):
        c = self.cluster.client(self.admin.token)
        first = c.create_manager('m1@test.org', 'pw-1')
        me = self.cluster.client()
        second = me.generate_token('m1@test.org', 'pw-1')
        self.assertNotEqual(first, second)
        me.verify_token()
        with self.assertRaises(SiegetankError) as e:
            self.cluster.client(first).verify_token()
        self.assertEqual(e.exception.status, 401)
        with self.assertRaises(SiegetankError) as e:
            self.cluster.client().generate_token('m1@test.org', 'wrong')
        self.assertEqual(e.exception.status, 401)

    def test_donor(self):
        token = self.admin.create_donor('donor1', 'pw', 'd1@test.org')
        self.assertEqual(len(token) >= 16, True)
        again = self.cluster.client().donor_token('donor1', 'pw')
        self.assertTrue(again)
        with self.assertRaises(SiegetankError) as e:
            self.admin.create_donor('donor1', 'pw', 'other@test.org')
        self.assertEqual(e.exception.status, 409)

    def test_manager_cannot_create_accounts(self):
        m = self.cluster.client(self.admin.create_manager('m2@test.org',
                                                          'pw'))
        with self.assertRaises(SiegetankError) as e:
            m.create_manager('m3@test.org', 'pw')
        self.assertEqual(e.exception.status, 403)
        self.assertIn('admin', e.exception.message)


class TestLegacyNames(ClientTestCase):
    """The 2014 module-level API on the default client."""

    def tearDown(self):
        client_module._default = None

    def test_module_api(self):
        cc, ca = self.cluster.address, self.cluster.ca
        siegetank.login(cc, self.admin.token, ca=ca)
        status = siegetank.workserver_status()
        self.assertEqual(sorted(status), sorted(w.name for w in
                                                self.cluster.ws))
        self.assertTrue(all(s['online'] for s in status.values()))
        target = siegetank.add_target(
            options={'steps_per_frame': 5}, engine='openmm',
            engine_versions=['8.6'], description='legacy',
            files={'system.xml.gz.b64': b'<System/>',
                   'integrator.xml.gz.b64': b'<Integrator/>'})
        self.assertIn(target, siegetank.get_targets())
        loaded = siegetank.load_target(target.id)
        self.assertEqual(loaded.options, {'steps_per_frame': 5})
        self.assertEqual(sorted(loaded.files),
                         ['integrator.xml.gz.b64', 'system.xml.gz.b64'])
        self.assertEqual(loaded.engine, 'openmm')
        self.assertEqual(loaded.engine_versions, ['8.6'])
        self.assertEqual(loaded.description, 'legacy')
        self.assertEqual(loaded.stage, 'private')
        ids = [loaded.add_stream({'state.xml.gz.b64': b'<State %d/>' % i})
               for i in range(3)]
        streams = loaded.streams
        self.assertEqual(sorted(s.id for s in streams), sorted(ids))
        self.assertTrue(all(s.frames == 0 and s.status == 'OK'
                            for s in streams))
        # Streams are spread over both workservers.
        self.assertEqual(len({s.ws_name for s in streams}), 2)
        loaded.delete_stream(ids[0])
        self.assertEqual(sorted(s.id for s in loaded.streams),
                         sorted(ids[1:]))
        self.assertEqual(loaded.download('system.xml.gz.b64'), b'<System/>')
        loaded.delete()
        self.assertNotIn(target, siegetank.get_targets())

    def test_generate_token_logs_in(self):
        self.admin.create_manager('legacy@test.org', 'pw')
        token = siegetank.generate_token(self.cluster.address,
                                         'legacy@test.org', 'pw',
                                         ca=self.cluster.ca)
        self.assertEqual(client_module._default.token, token)
        self.assertEqual(siegetank.get_targets(), [])

    def test_not_logged_in(self):
        with self.assertRaises(SiegetankError):
            siegetank.get_targets()

    def test_bad_token(self):
        with self.assertRaises(SiegetankError) as e:
            siegetank.login(self.cluster.address, 'nope', ca=self.cluster.ca)
        self.assertEqual(e.exception.status, 401)


class TestTargetsAndStreams(ClientTestCase):
    def test_update_and_ownership(self):
        owner = self.cluster.client(self.admin.create_manager('o@test.org',
                                                              'pw'))
        other = self.cluster.client(self.admin.create_manager('x@test.org',
                                                              'pw'))
        target, (sid,) = self.cluster.synthetic_target(owner, stage='private')
        target.update(stage='beta', weight=3, description='changed')
        info = target.info()
        self.assertEqual((info['stage'], info['weight'],
                          info['description']), ('beta', 3, 'changed'))
        self.assertEqual(info['owner'], 'o@test.org')
        for call in (lambda: other.load_target(target.id).update(
                         stage='public'),
                     lambda: other.stream(sid).stop(),
                     lambda: other.load_target(target.id).delete()):
            with self.assertRaises(SiegetankError) as e:
                call()
            self.assertEqual(e.exception.status, 403)
        with self.assertRaises(SiegetankError) as e:
            owner.load_target(str(uuid.uuid4())).info()
        self.assertEqual(e.exception.status, 404)
        with self.assertRaises(SiegetankError) as e:
            target.update(stage='sideways')
        self.assertEqual(e.exception.status, 400)
        target.delete()

    def test_stream_stop_start_info(self):
        target, (sid,) = self.cluster.synthetic_target()
        s = self.admin.stream(sid)
        self.assertEqual(s.info()['target_id'], target.id)
        s.stop()
        self.assertEqual(s.status, 'STOPPED')
        s.start()
        self.assertEqual(s.status, 'OK')
        self.assertIs(s.active, False)
        s.delete()
        with self.assertRaises(SiegetankError) as e:
            s.info()
        self.assertEqual(e.exception.status, 404)
        target.delete()


class TestDownload(ClientTestCase):
    def test_download_resume_and_progress(self):
        target, (sid,) = self.cluster.synthetic_target()
        stream = self.admin.stream(sid)
        path = os.path.join(self.folder, 'frames.dat')
        # Before any commit: an empty file.
        self.assertEqual(stream.download('frames.dat', path), 0)
        self.cluster.run_core(target.id, 3)
        self.assertEqual(stream.info()['frames'], 3)
        seen = []
        size = stream.download('frames.dat', path,
                               progress=lambda done, total: seen.append(
                                   (done, total)))
        self.assertEqual(size, 3 * 1024)
        self.assertEqual(seen[-1], (size, size))
        # More frames later: only the new bytes are fetched and appended
        # (the local copy's first bytes, scribbled over, stay untouched).
        with open(path, 'r+b') as f:
            f.write(b'#' * 8)
        self.cluster.run_core(target.id, 2)
        size = stream.download('frames.dat', path)
        self.assertEqual(size, 5 * 1024)
        with open(path, 'rb') as f:
            self.assertEqual(f.read(8), b'#' * 8)
        self.assertEqual(stream.download('frames.dat', path, resume=False),
                         size)
        with open(path, 'rb') as f:
            full = f.read()
        self.assertEqual([line.split()[1] for line in full.splitlines()
                          if line.startswith(b'frame')],
                         [b'1', b'2', b'3', b'4', b'5'])
        # A download cut mid-frame resumes from the byte it stopped at.
        cut = os.path.join(self.folder, 'cut.dat')
        with open(cut, 'wb') as f:
            f.write(full[:1500])
        self.assertEqual(stream.download('frames.dat', cut), len(full))
        with open(cut, 'rb') as f:
            self.assertEqual(f.read(), full)
        # Complete already: nothing to fetch (416 handled).
        self.assertEqual(stream.download('frames.dat', cut), len(full))
        # No resume: fetched whole again.
        self.assertEqual(stream.download('frames.dat', cut, resume=False),
                         len(full))
        # A local file larger than the remote one is refused.
        big = os.path.join(self.folder, 'big.dat')
        with open(big, 'wb') as f:
            f.write(full + b'extra')
        with self.assertRaises(SiegetankError):
            stream.download('frames.dat', big)
        target.delete()

    def test_progress_bar_on_stderr(self):
        import io
        target, (sid,) = self.cluster.synthetic_target()
        self.cluster.run_core(target.id, 2)
        buf = io.StringIO()
        bar = client_module.Progress('x', 2048, 0, stream=buf)
        bar.update(2048)
        bar.close()
        self.assertIn('100.0%', buf.getvalue())
        path = os.path.join(self.folder, 'p.dat')
        self.assertEqual(self.admin.stream(sid).download(
            'frames.dat', path, progress=True), 2048)
        target.delete()


class TestTLS(ClientTestCase):
    def test_only_the_given_ca_is_trusted(self):
        # The system store does not know the dev CA: refused, not ignored.
        with self.assertRaises(SiegetankError) as e:
            Client(self.cluster.address).workserver_status()
        self.assertIn('TLS', str(e.exception))
        # REQUESTS_CA_BUNDLE cannot override the CA given to the client...
        other = tmpdir('otherca')
        from server import tls
        tls.ensure_dev_certs(os.path.join(other, 's.pem'),
                             os.path.join(other, 's.key'),
                             os.path.join(other, 'ca.pem'))
        old = os.environ.get('REQUESTS_CA_BUNDLE')
        os.environ['REQUESTS_CA_BUNDLE'] = os.path.join(other, 'ca.pem')
        try:
            self.assertTrue(self.cluster.client().workserver_status())
            with self.assertRaises(SiegetankError):
                Client(self.cluster.address,
                       ca=os.path.join(other, 'ca.pem')).workserver_status()
            # ...nor make the system store trust the dev CA.
            os.environ['REQUESTS_CA_BUNDLE'] = certs()['ca']
            with self.assertRaises(SiegetankError):
                Client(self.cluster.address).workserver_status()
        finally:
            if old is None:
                os.environ.pop('REQUESTS_CA_BUNDLE', None)
            else:
                os.environ['REQUESTS_CA_BUNDLE'] = old
        shutil.rmtree(other, ignore_errors=True)

    def test_missing_ca_file(self):
        with self.assertRaises(SiegetankError):
            Client(self.cluster.address, ca='/nonexistent/ca.pem')


class TestSyntheticSeeds(unittest.TestCase):
    def test_seed_is_a_state_file(self):
        self.assertEqual(list(synthetic.seed_files()), [synthetic.STATE_FILE])


class TestUnreachableWorkserver(unittest.TestCase):
    def test_streams_of_a_down_ws_are_flagged(self):
        cluster = Cluster(n_ws=2).start()
        try:
            target, ids = cluster.synthetic_target(streams=2)
            self.assertEqual(len(target.stream_info()), 2)
            self.assertEqual(target.unreachable, [])
            down = cluster.ws[1]
            down.stop()
            info = target.stream_info()
            self.assertEqual(target.unreachable, [down.name])
            self.assertEqual([s for s in ids if s not in info],
                             [s for s in ids if s.endswith(':' + down.name)])
        finally:
            cluster.stop()


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next of the server's `replies`
    ((status, headers)); the last one forever."""

    def do_GET(self):
        self.server.seen.append(self.path)
        status, headers = self.server.replies[
            min(len(self.server.seen), len(self.server.replies)) - 1]
        body = json.dumps({'error': 'store unavailable'} if status != 200
                          else {'ok': True}).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_GET

    def log_message(self, *args):
        pass


class TestRetries(unittest.TestCase):
    """Bounded retries of 503 and of connections that could not be made,
    waiting what Retry-After says; a clear error for each way of not
    reaching a CC. The waits are recorded, not slept."""

    def serve(self, *replies, tls=True):
        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        server.replies, server.seen = replies, []
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certs()['cert'], certs()['key'])
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return server

    def client(self, port, **kwargs):
        c = Client('127.0.0.1:%d' % port, ca=certs()['ca'], **kwargs)
        c.waits = []
        c.sleep = c.waits.append
        return c

    def test_503_is_retried_after_retry_after(self):
        server = self.serve((503, {'Retry-After': '2'}),
                            (503, {'Retry-After': '3'}), (200, {}))
        c = self.client(server.server_address[1])
        self.assertEqual(c.json('GET', '/x'), {'ok': True})
        self.assertEqual(c.waits, [2, 3])
        self.assertEqual(len(server.seen), 3)
        # A POST too: a 503 means the server did not do it.
        server.seen.clear()
        self.assertEqual(c.json('POST', '/y'), {'ok': True})
        self.assertEqual(len(server.seen), 3)

    def test_retries_are_bounded(self):
        server = self.serve((503, {'Retry-After': '100000'}))
        c = self.client(server.server_address[1], retries=3)
        with self.assertRaises(SiegetankError) as e:
            c.get('/x')
        self.assertEqual(e.exception.status, 503)
        self.assertIn('store unavailable', str(e.exception))
        self.assertEqual(len(server.seen), 4)
        # A Retry-After beyond reason is capped.
        self.assertEqual(c.waits, [c.max_wait] * 3)
        # Other errors are not retried.
        server = self.serve((404, {}))
        c = self.client(server.server_address[1])
        with self.assertRaises(SiegetankError) as e:
            c.get('/x')
        self.assertEqual((e.exception.status, len(server.seen), c.waits),
                         (404, 1, []))

    def test_no_cc_listening(self):
        c = self.client(free_port(), retries=2)
        with self.assertRaises(SiegetankError) as e:
            c.get('/x')
        message = str(e.exception)
        self.assertIn('connection refused', message)
        self.assertNotIn('TLS', message)
        self.assertIsNone(e.exception.status)
        self.assertEqual(len(c.waits), 2)

    def test_closed_during_handshake(self):
        """What a balancer with no CC behind it does: accepts, closes."""
        listener = socket.socket()
        listener.bind(('127.0.0.1', 0))
        listener.listen(16)
        self.addCleanup(listener.close)

        def accept_and_close():
            while True:
                try:
                    listener.accept()[0].close()
                except OSError:
                    return
        threading.Thread(target=accept_and_close, daemon=True).start()
        c = self.client(listener.getsockname()[1], retries=1)
        with self.assertRaises(SiegetankError) as e:
            c.get('/x')
        message = str(e.exception)
        self.assertIn('closed the connection', message)
        self.assertNotIn('verification', message)
        self.assertEqual(len(c.waits), 1)

    def test_wrong_ca_is_a_certificate_error(self):
        server = self.serve((200, {}))
        other = tmpdir('otherca')
        from server import tls
        tls.ensure_dev_certs(os.path.join(other, 's.pem'),
                             os.path.join(other, 's.key'),
                             os.path.join(other, 'ca.pem'))
        c = Client('127.0.0.1:%d' % server.server_address[1],
                   ca=os.path.join(other, 'ca.pem'))
        c.sleep = self.fail   # not retried
        with self.assertRaises(SiegetankError) as e:
            c.get('/x')
        self.assertIn('TLS verification', str(e.exception))
        self.assertEqual(server.seen, [])

    def test_plain_http_port(self):
        server = self.serve((200, {}), tls=False)
        c = self.client(server.server_address[1], retries=0)
        with self.assertRaises(SiegetankError) as e:
            c.get('/x')
        self.assertIn('not speak TLS', str(e.exception))
