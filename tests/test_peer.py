"""server.peer: server-to-server HTTPS over pooled keep-alive connections.
A real Tornado HTTPS server in-process; what a pool opened is read from
the pool itself and from the server's side (the client ports it saw)."""
import asyncio
import gc
import os
import socket
import time
from types import SimpleNamespace
from unittest import mock

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.testing import AsyncTestCase, gen_test
from tornado.web import Application, RequestHandler

from server import peer, tls
from tools.testing import certs, tmpdir


class Echo(RequestHandler):
    """Replies with what it got and the client port, or misbehaves on
    request: drop the connection unanswered, or never answer."""

    def initialize(self, state):
        self.state = state

    async def post(self):
        self.state['ports'].add(self.request.connection.stream.socket
                                .getpeername()[1])
        if self.state.get('drop'):
            self.state['drop'] -= 1
            self.request.connection.stream.close()
            return
        if self.state.get('hang'):
            await self.state['hang'].wait()
        self.write({'got': self.request.body.decode(),
                    'auth': self.request.headers.get('Authorization')})


class PeerTestCase(AsyncTestCase):

    def setUp(self):
        super().setUp()
        self.state = {'ports': set()}
        self.ctx = tls.client_context(certs()['ca'])
        [sock] = bind_sockets(0, '127.0.0.1')
        self.port = sock.getsockname()[1]
        self.server = self.serve([sock])

    def serve(self, sockets, certfile=None, keyfile=None):
        c = certs()
        server_ctx = tls.server_context(SimpleNamespace(
            ssl_certfile=certfile or c['cert'],
            ssl_key=keyfile or c['key']))
        server = HTTPServer(Application([(r'/', Echo, {'state': self.state})]),
                            ssl_options=server_ctx)
        server.add_sockets(sockets)
        return server

    def tearDown(self):
        if self.state.get('hang'):
            self.state['hang'].set()
        self.server.stop()
        self.io_loop.run_sync(self.server.close_all_connections)
        self.io_loop.run_sync(peer.close_idle)
        super().tearDown()

    def url(self, host='127.0.0.1'):
        return 'https://%s:%d/' % (host, self.port)

    def pool(self):
        return peer.pool('127.0.0.1', self.port, self.ctx)

    async def restart_server(self):
        """Stop the server (its connections closed) and serve again on the
        same port, as a restarted WS does."""
        self.server.stop()
        await self.server.close_all_connections()
        self.server = self.serve(bind_sockets(self.port, '127.0.0.1'))

    @gen_test
    async def test_connection_reused_across_calls(self):
        for i in range(5):
            reply = await peer.call(self.ctx, 'POST', self.url(), {'n': i},
                                    auth='secret', timeout=10)
            self.assertEqual(reply.code, 200)
            self.assertEqual(reply.body, {'got': '{"n": %d}' % i,
                                          'auth': 'secret'})
        self.assertEqual(self.pool().opened, 1)
        self.assertEqual(len(self.state['ports']), 1)

    @gen_test
    async def test_concurrent_calls_get_their_own_connections(self):
        replies = await asyncio.gather(*(
            peer.call(self.ctx, 'POST', self.url(), {'n': i}, timeout=10)
            for i in range(4)))
        self.assertEqual([r.body['got'] for r in replies],
                         ['{"n": %d}' % i for i in range(4)])
        opened = self.pool().opened
        self.assertEqual(len(self.pool().idle), opened)
        await peer.call(self.ctx, 'POST', self.url(), timeout=10)
        self.assertEqual(self.pool().opened, opened)

    @gen_test
    async def test_peer_restart_next_call_reconnects(self):
        """The pooled connection died with the old server; the next call
        notices (nothing to reuse) and connects again, no error."""
        await peer.call(self.ctx, 'POST', self.url(), timeout=10)
        await self.restart_server()
        reply = await peer.call(self.ctx, 'POST', self.url(), timeout=10)
        self.assertEqual(reply.code, 200)
        self.assertEqual(self.pool().opened, 2)

    @gen_test
    async def test_reused_connection_closed_unanswered_is_retried(self):
        """The peer closes a kept connection as the request arrives (it
        never answered it): the request goes again on a new connection."""
        await peer.call(self.ctx, 'POST', self.url(), timeout=10)
        self.state['drop'] = 1
        reply = await peer.call(self.ctx, 'POST', self.url(), {'x': 1},
                                timeout=10)
        self.assertEqual(reply.body['got'], '{"x": 1}')
        self.assertEqual(self.pool().opened, 2)

    @gen_test
    async def test_new_connection_closed_unanswered_is_an_error(self):
        """On a fresh connection there is no stale-connection excuse: a
        failure to answer is the peer's failure, never sent twice."""
        self.state['drop'] = 2
        with self.assertRaises(peer.PeerError):
            await peer.call(self.ctx, 'POST', self.url(), timeout=10)
        self.assertEqual(self.state['drop'], 1)
        self.assertEqual(self.pool().idle, [])

    @gen_test
    async def test_hung_peer_times_out_and_its_connection_is_dropped(self):
        await peer.call(self.ctx, 'POST', self.url(), timeout=10)
        self.state['hang'] = asyncio.Event()
        with self.assertRaises(peer.PeerError) as e:
            await peer.call(self.ctx, 'POST', self.url(), timeout=0.3)
        self.assertIn('no answer', str(e.exception))
        self.assertEqual(self.pool().idle, [])
        self.state['hang'].set()
        self.state['hang'] = None
        reply = await peer.call(self.ctx, 'POST', self.url(), timeout=10)
        self.assertEqual(reply.code, 200)

    @gen_test
    async def test_peer_that_never_handshakes_times_out(self):
        """A listening socket nobody serves: TCP connects, TLS never
        finishes; the call still ends within its timeout."""
        silent = socket.socket()
        silent.bind(('127.0.0.1', 0))
        silent.listen(8)
        try:
            with self.assertRaises(peer.PeerError):
                await peer.call(self.ctx, 'GET', 'https://127.0.0.1:%d/'
                                % silent.getsockname()[1], timeout=0.3)
        finally:
            silent.close()

    @gen_test
    async def test_refused_is_a_peer_error(self):
        silent = socket.socket()
        silent.bind(('127.0.0.1', 0))
        port = silent.getsockname()[1]
        silent.close()
        with self.assertRaises(peer.PeerError) as e:
            await peer.call(self.ctx, 'GET', 'https://127.0.0.1:%d/' % port,
                            timeout=5)
        self.assertIn('refused', str(e.exception).lower())

    @gen_test(timeout=20)
    async def test_name_that_does_not_resolve_is_a_peer_error(self):
        """A registered WS whose host name does not resolve (a fuzzed
        registration `K`) fails as a refused one does, and a lookup that
        fails only after the call's time bound is not left to be logged
        as an unhandled exception (socket.gaierror) by the event loop."""
        real = socket.getaddrinfo

        def lookup(host, *args, **kwargs):
            if host == 'slow.invalid':  # a resolver that answers late
                time.sleep(1.0)
                raise socket.gaierror(socket.EAI_NONAME, 'Name or service '
                                      'not known')
            return real(host, *args, **kwargs)

        with mock.patch('socket.getaddrinfo', lookup), \
                self.assertNoLogs(level='WARNING'):
            for host in ('K', 'slow.invalid'):
                with self.assertRaises(peer.PeerError):
                    await peer.call(self.ctx, 'GET', self.url(host),
                                    timeout=0.3)
            await asyncio.sleep(1.5)  # the late lookup ends meanwhile
            gc.collect()

    @gen_test
    async def test_certificate_of_another_ca_is_refused(self):
        folder = tmpdir('otherca')
        ca = os.path.join(folder, 'ca.pem')
        tls.make_ca(ca, os.path.join(folder, 'ca.key'))
        cert, key = (os.path.join(folder, 'server.pem'),
                     os.path.join(folder, 'server.key'))
        tls.make_server_cert(cert, key, ca, os.path.join(folder, 'ca.key'),
                             ['localhost', '127.0.0.1'])
        self.server.stop()
        await self.server.close_all_connections()
        self.server = self.serve(bind_sockets(self.port, '127.0.0.1'),
                                 cert, key)
        with self.assertRaises(peer.PeerError) as e:
            await peer.call(self.ctx, 'POST', self.url(), timeout=5)
        self.assertIn('certificate', str(e.exception).lower())
        self.assertEqual(self.state['ports'], set())

    @gen_test
    async def test_raw_and_non_json_replies(self):
        reply = await peer.call(self.ctx, 'POST', self.url(), b'{"a": 1}',
                                raw=True, timeout=10)
        self.assertIsInstance(reply.body, bytes)
        self.assertIn(b'"got"', reply.body)
        with self.assertRaises(peer.PeerError) as e:  # Tornado's HTML 405
            await peer.call(self.ctx, 'GET', self.url(), timeout=10)
        self.assertIn('not JSON (HTTP 405)', str(e.exception))
