"""The base handler: JSON bodies, JSON errors with docs/api.md codes,
credentials from Authorization, request logs without tokens."""
import hashlib
import json
import logging

from server.testing import AppTestCase
from server.web import APIHandler, App, HealthHandler, decode_file


class Echo(APIHandler):
    def put(self):
        n = self.field('n', int)
        tags = self.field('tags', list, default=[])
        self.write_json({'n': n, 'tags': tags, 'token': self.token()})

    def get(self):
        raise RuntimeError('a bug, not bad input')


class Files(APIHandler):
    def put(self):
        out = {}
        for name, value in self.field('files', dict).items():
            stripped, data = decode_file(name, value)
            out[stripped] = data.decode()
        self.write_json(out)


class TestApp(App):
    def __init__(self, settings, redis, task_id=0):
        super().__init__([(r'/', HealthHandler), (r'/echo', Echo),
                          (r'/files', Files)], settings, redis, task_id)


class TestBaseHandler(AppTestCase):
    kind = 'cc'
    app_class = TestApp
    conf = {'max_body_size': 1000}

    def get_httpserver_options(self):
        return dict(super().get_httpserver_options(), max_body_size=1000)

    def test_body_over_limit_is_413_json(self):
        for size in (2000, 3 << 20):  # the client is still sending
            code, body = self.fetch_json('/echo', 'PUT', {'n': 1, 'tags': [
                'x' * size]})
            self.assertEqual(code, 413)
            self.assertIn('over the limit of 1000', body['error'])
        self.assertEqual(self.fetch_json('/echo', 'PUT', {'n': 1})[0], 200)

    def test_health(self):
        code, body = self.fetch_json('/')
        self.assertEqual(code, 200)
        self.assertEqual(body['kind'], 'cc')

    def test_fields(self):
        self.assertEqual(self.fetch_json('/echo', 'PUT', {'n': 3}),
                         (200, {'n': 3, 'tags': [], 'token': None}))
        for body, word in (({}, 'missing field n'),
                           ({'n': '3'}, 'field n must be int'),
                           ({'n': True}, 'field n must be int'),
                           ({'n': 1, 'tags': 'x'}, 'field tags'),
                           ('{"n": ', 'not valid JSON'),
                           ('[1, 2]', 'JSON object'),
                           (b'\xff\xfe', 'not valid JSON')):
            code, reply = self.fetch_json('/echo', 'PUT', body)
            self.assertEqual(code, 400, body)
            self.assertIn(word, reply['error'])

    def test_token_bare_or_bearer(self):
        for header in ('abc', 'Bearer abc', 'bearer  abc '):
            code, body = self.fetch_json('/echo', 'PUT', {'n': 1},
                                         token=header)
            self.assertEqual(body['token'], 'abc')

    def test_content_md5(self):
        raw = json.dumps({'n': 1})
        good = hashlib.md5(raw.encode()).hexdigest()
        self.assertEqual(self.fetch_json('/echo', 'PUT', raw, headers={
            'Content-MD5': good})[0], 200)
        code, body = self.fetch_json('/echo', 'PUT', raw, headers={
            'Content-MD5': '0' * 32})
        self.assertEqual(code, 400)
        self.assertIn('Content-MD5', body['error'])

    def test_errors_are_json(self):
        r = self.fetch('/nowhere')
        self.assertEqual(r.code, 404)
        self.assertEqual(r.headers['Content-Type'].split(';')[0],
                         'application/json')
        self.assertIn('no such endpoint', json.loads(r.body)['error'])
        code, body = self.fetch_json('/echo', 'DELETE')
        self.assertEqual(code, 405)
        self.assertIn('error', body)
        with self.assertLogs('siegetank', logging.ERROR):
            code, body = self.fetch_json('/echo')
        self.assertEqual((code, body), (500, {'error':
                                              'internal server error'}))

    def test_files(self):
        import base64
        import gzip
        b64 = base64.b64encode(b'hello').decode()
        gz = base64.b64encode(gzip.compress(b'world')).decode()
        code, body = self.fetch_json('/files', 'PUT', {'files': {
            'a.txt': 'plain', 'b.txt.b64': b64, 'c.txt.gz.b64': gz}})
        self.assertEqual((code, body), (200, {'a.txt': 'plain',
                                              'b.txt': 'hello',
                                              'c.txt': 'world'}))
        for files in ({'../x': 'a'}, {'a/b': 'a'}, {'x' * 129: 'a'},
                      {'a.b64': '!!!'}, {'a.gz.b64': b64}, {'a': 1},
                      {'.b64': b64}, {'': 'a'}):
            code, body = self.fetch_json('/files', 'PUT', {'files': files})
            self.assertEqual(code, 400, files)
            self.assertIn('error', body)

    def test_request_log_has_no_token(self):
        with self.assertLogs('siegetank.access', logging.DEBUG) as logs:
            self.fetch_json('/echo', 'PUT', {'n': 'x'},
                            token='s3cret-token-value')
            self.fetch_json('/echo?signature=s3cret-sig', 'PUT', {'n': 1})
        text = '\n'.join(logs.output)
        self.assertIn('400 PUT /echo', text)
        self.assertNotIn('s3cret', text)
        self.assertTrue(any(r.startswith('WARNING') for r in logs.output))
