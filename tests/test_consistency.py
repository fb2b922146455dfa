"""The CC's map of streams and the workservers' streams stay the same under
faults injected on the CC -> WS edge: a WS that answers a creation after
the CC's timeout, a connection cut after the request was sent, and maps
that drifted apart (repaired by the reconciliation)."""
import asyncio
import time

from server.cc import keys, reconcile, stream_map
from server.ws import cc_api
from server.ws import streams as ws_streams
from tests.test_cc import CC_PASS, CCTestCase
from tools.testing import wait_for


class Base(CCTestCase):
    conf = {'ws_timeout_in_s': 0.5}

    def setUp(self):
        super().setUp()
        self.joe = self.add_manager('joe@x.org')
        self.tid = self.post_target(self.joe)

    def post_stream(self, code=200):
        c, body = self.fetch_json('/streams', 'POST', {
            'target_id': self.tid, 'files': {'state.xml': 'seed'}},
            token=self.joe)
        self.assertEqual(c, code, body)
        return body.get('stream_id')

    def cc_streams(self):
        async def scan():
            return sorted([k[len('stream:'):] async for k in
                           self.redis.scan_iter(match='stream:*')])
        return self.sync(scan)

    def slow_creations(self, slow_calls):
        """The WS makes the stream, then sleeps past the CC's timeout
        before answering, for the first `slow_calls` creations."""
        real = ws_streams.create_stream
        calls = []

        async def slow(*args, **kw):
            sid = await real(*args, **kw)
            calls.append(sid)
            if len(calls) <= slow_calls:
                await asyncio.sleep(1.0)
            return sid
        ws_streams.create_stream = slow
        self.addCleanup(setattr, ws_streams, 'create_stream', real)
        return calls

    def redis_stats(self):
        return self.sync(lambda: self.redis.hgetall(keys.RECONCILE_STATS))


class TestCreationFaults(Base):

    def test_reply_too_late_then_the_retry_gets_the_same_stream(self):
        ws = self.add_ws('a')
        calls = self.slow_creations(1)
        sid = self.post_stream()
        self.assertEqual(calls, [sid, sid])  # sent twice, made once
        self.assertEqual(list(ws.streams()), [sid])
        self.assertEqual(self.cc_streams(), [sid])

    def test_connection_cut_after_the_request_then_the_same_stream(self):
        ws = self.add_ws('a')
        handler = cc_api.StreamsHandler
        real = handler.write_json
        cut = []

        def hang_up(self, obj, status=200):
            if not cut:  # the stream is made; the reply never leaves
                cut.append(obj['stream_id'])
                self.request.connection.stream.close()
                self._finished = True
                return
            real(self, obj, status)
        handler.write_json = hang_up
        self.addCleanup(setattr, handler, 'write_json', real)
        sid = self.post_stream()
        self.assertEqual(cut, [sid])
        self.assertEqual(list(ws.streams()), [sid])
        self.assertEqual(self.cc_streams(), [sid])

    def test_no_reply_at_all_abandons_and_the_ws_deletes_it_later(self):
        ws = self.add_ws('a')
        calls = self.slow_creations(2)
        self.post_stream(code=503)  # no other WS to try
        wait_for(lambda: len(calls) == 2 and ws.streams(), 'the late WS')
        self.assertEqual(len(set(calls)), 1)
        self.assertEqual(len(ws.streams()), 1)  # made, unknown to the CC
        self.assertEqual(self.cc_streams(), [])
        # The WS answers again (a probe, a registration): caught up.
        self.sync(lambda: reconcile.flush_abandoned(self.app, 'a'))
        self.assertEqual(ws.streams(), {})
        self.assertEqual(self.redis_stats(), {'abandoned_deleted': '1'})

    def test_the_next_ws_gets_the_stream_the_first_one_is_cleaned(self):
        a, b = self.add_ws('a'), self.add_ws('b')
        calls = self.slow_creations(2)
        sid = self.post_stream()
        wait_for(lambda: len(calls) == 3, 'the late WS')
        slow_ws = a if calls[0].endswith(':a') else b
        fast_ws = b if slow_ws is a else a
        self.assertEqual(list(fast_ws.streams()), [sid])
        self.assertEqual(len(slow_ws.streams()), 1)
        self.sync(lambda: reconcile.reconcile(self.app))
        self.assertEqual(slow_ws.streams(), {})
        self.assertEqual(self.cc_streams(), [sid])


class TestReconciliation(Base):

    def test_drifted_maps_are_repaired_and_counted(self):
        ws = self.add_ws('a')
        sids = [self.post_stream() for _ in range(3)]
        lost_by_cc, lost_by_ws, kept = sids
        record = self.sync(lambda: self.redis.hgetall(
            keys.stream(lost_by_cc)))
        self.sync(lambda: stream_map.forget(
            self.app, stream_map.StreamRecord.from_hash(lost_by_cc, record)))
        c, _ = self.ws_json_put(ws, '/streams/delete/' + lost_by_ws)
        self.assertEqual(c, 200)
        # A creation the CC abandoned that the WS made anyway.
        abandoned_id = '9a0b1c2d-0000-4000-8000-000000000001'
        c, body = self.ws_json_post(ws, '/streams', {
            'target_id': self.tid, 'stream_files': {'state.xml': 'x'},
            'creation_id': abandoned_id})
        self.assertEqual(c, 200, body)
        self.sync(lambda: reconcile.abandon(self.redis, 'a', abandoned_id))
        time.sleep(1.6)  # past the placement grace (3 x ws_timeout_in_s)
        self.sync(lambda: reconcile.reconcile(self.app))
        self.assertEqual(sorted(ws.streams()), sorted([lost_by_cc, kept]))
        self.assertEqual(self.cc_streams(), sorted([lost_by_cc, kept]))
        self.assertEqual(self.redis_stats(), {
            'adopted': '1', 'forgotten': '1', 'abandoned_deleted': '1'})
        listing = self.fetch_json('/targets/streams/' + self.tid,
                                  token=self.joe)[1]
        self.assertEqual(sorted(listing['a']), sorted([lost_by_cc, kept]))
        # Counted where the CC counts streams: deletions balance out.
        for sid in (lost_by_cc, kept):
            c, _ = self.fetch_json('/streams/delete/' + sid, 'PUT',
                                   token=self.joe)
            self.assertEqual(c, 200)
        counts = self.sync(lambda: self.redis.hgetall(
            keys.target_ws(self.tid)))
        self.assertEqual(counts, {})

    def ws_json_put(self, ws, path):
        r = self.fetch('https://127.0.0.1:%d%s' % (ws.port, path),
                       method='PUT', body='{}',
                       headers={'Authorization': CC_PASS})
        return r.code, r.body

    def ws_json_post(self, ws, path, body):
        import json
        r = self.fetch('https://127.0.0.1:%d%s' % (ws.port, path),
                       method='POST', body=json.dumps(body),
                       headers={'Authorization': CC_PASS}, raise_error=False)
        return r.code, json.loads(r.body)
