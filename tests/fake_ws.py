"""A stand-in workserver for in-process CC tests: the CC-facing endpoints
of API.md's Workserver table, in memory, on its own HTTPS port in the test's
loop. It checks `cc_pass`, activates each stream once, can be stopped and
started again on the same port (a WS going down and coming back), and
records every call so tests can see what the CC sent. The real WS is
exercised by the process tests."""
import json
import uuid

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from server import tls


class _Handler(tornado.web.RequestHandler):
    def initialize(self, ws):
        self.ws = ws

    def prepare(self):
        self.ws.calls.append((self.request.method, self.request.path,
                              json.loads(self.request.body)
                              if self.request.body else None))
        if self.request.path != '/' and \
                self.request.headers.get('Authorization') != self.ws.cc_pass:
            self.reply({'error': 'bad cc_pass'}, 401)

    def reply(self, obj, status=200):
        self.set_status(status)
        self.finish(json.dumps(obj))

    def body(self):
        return json.loads(self.request.body)


class Health(_Handler):
    def get(self):
        self.reply({'name': self.ws.name})


class Streams(_Handler):
    def post(self):
        body = self.body()
        tid = body['target_id']
        if tid not in self.ws.targets:
            if 'target_files' not in body:
                self.reply({'error': 'target files required'}, 400)
                return
            self.ws.targets[tid] = body['target_files']
        sid = '%s:%s' % (uuid.uuid4(), self.ws.name)
        self.ws.streams[sid] = {'target_id': tid, 'files':
                                body['stream_files'], 'active': False}
        self.reply({'stream_id': sid})


class Activate(_Handler):
    def post(self):
        body = self.body()
        for sid, s in sorted(self.ws.streams.items()):
            if s['target_id'] == body['target_id'] and not s['active']:
                s['active'] = True
                s['donor'] = body.get('donor_id')
                self.reply({'token': 'tok-' + sid, 'stream_id': sid})
                return
        self.reply({'error': 'no stream free'}, 503)


class Command(_Handler):
    def put(self, action, sid):
        if sid not in self.ws.streams:
            self.reply({'error': 'no such stream'}, 404)
            return
        if action == 'delete':
            tid = self.ws.streams.pop(sid)['target_id']
            if not any(s['target_id'] == tid
                       for s in self.ws.streams.values()):
                self.ws.targets.pop(tid, None)
        self.reply({})


class Info(_Handler):
    def get(self, sid):
        if sid not in self.ws.streams:
            self.reply({'error': 'no such stream'}, 404)
            return
        s = self.ws.streams[sid]
        self.reply({'target_id': s['target_id'], 'status': 'OK',
                    'frames': 0, 'error_count': 0, 'active': s['active'],
                    'creation_date': 0})


class TargetStreams(_Handler):
    def get(self, tid):
        self.reply({sid: {'status': 'OK', 'frames': 0, 'error_count': 0,
                          'active': s['active']}
                    for sid, s in self.ws.streams.items()
                    if s['target_id'] == tid})


class TargetDelete(_Handler):
    def put(self, tid):
        self.ws.targets.pop(tid, None)
        for sid in [k for k, s in self.ws.streams.items()
                    if s['target_id'] == tid]:
            del self.ws.streams[sid]
        self.reply({})


class FakeWS:
    def __init__(self, name, settings, cc_pass='test-cc-pass'):
        self.name = name
        self.cc_pass = cc_pass
        self.ssl = tls.server_context(settings)
        self.targets = {}
        self.streams = {}
        self.calls = []
        self.server = None
        sock = bind_sockets(0, '127.0.0.1')[0]
        self.port = sock.getsockname()[1]
        sock.close()
        args = {'ws': self}
        self.app = tornado.web.Application([
            (r'/', Health, args),
            (r'/streams', Streams, args),
            (r'/streams/activate', Activate, args),
            (r'/streams/(start|stop|delete)/([^/]+)', Command, args),
            (r'/streams/info/([^/]+)', Info, args),
            (r'/targets/streams/([^/]+)', TargetStreams, args),
            (r'/targets/delete/([^/]+)', TargetDelete, args),
        ])

    def start(self):
        self.server = HTTPServer(self.app, ssl_options=self.ssl)
        self.server.add_sockets(bind_sockets(self.port, '127.0.0.1'))
        return self

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None

    def register_body(self):
        return {'name': self.name, 'url': '127.0.0.1',
                'http_port': self.port}
