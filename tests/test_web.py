"""The base handler: JSON bodies, JSON errors with docs/api.md codes,
credentials from Authorization, request logs without tokens."""
import hashlib
import json
import logging
import unittest

from server import web
from server.web import (
    APIError,
    APIHandler,
    App,
    Budget,
    HealthHandler,
    TooLarge,
    allow,
    check_files,
    check_permissions,
    decode_files,
    gunzip,
    role,
)
from tools.testing import AppTestCase, raw_exchange


class Echo(APIHandler):
    @allow('anyone')
    def put(self):
        n = self.field('n', int)
        tags = self.field('tags', list, default=[])
        self.write_json({'n': n, 'tags': tags, 'token': self.token()})

    @allow('anyone')
    def get(self):
        raise RuntimeError('a bug, not bad input')


class Files(APIHandler):
    body_limit = 'max_body_size_in_bytes'

    @allow('anyone')
    async def put(self):
        files = check_files(self.field('files', dict), max_files=3)
        decoded, = await decode_files(self.config, files)
        self.write_json({k: v.decode() for k, v in decoded.items()})


@role('test_ok', 'bad token')
async def _ok(handler, rule):
    """Only the token `ok` passes; another token is refused."""
    if handler.token() not in (None, 'ok'):
        raise APIError(401, 'bad token')
    return handler.token()


class Guarded(APIHandler):
    """Credentials checked before the body."""

    @allow('test_ok')
    def put(self):
        self.write_json({'n': self.field('n', int)})


async def _own(handler, caller):
    """The path's name must be the caller's."""
    if handler.path_args[0] != caller:
        raise APIError(403, 'not yours')
    return {'name': caller}


class Owned(APIHandler):
    @allow('test_ok', owner=_own)
    def put(self, name):
        self.write_json(self.resource)

    @allow('test_ok', 'anyone')
    def get(self, name):
        self.write_json({'caller': self.caller})


class Undeclared(APIHandler):
    """Names no permission: no one may call it."""

    def put(self):
        self.write_json({'opened': True})


class TestApp(App):
    def __init__(self, settings, redis, task_id=0):
        super().__init__([(r'/', HealthHandler), (r'/echo', Echo),
                          (r'/files', Files), (r'/guarded', Guarded),
                          (r'/owned/([^/]+)', Owned)],
                         settings, redis, task_id)
        # Past the start-up check, as a handler added later would be.
        self.add_handlers(r'.*', [(r'/undeclared', Undeclared)])


class TestBaseHandler(AppTestCase):
    kind = 'cc'
    app_class = TestApp
    conf = {'max_small_body_size': 1000, 'max_body_size': 100000,
            'max_decoded_file_size': 5000, 'max_decoded_request_size': 8000}

    def raw(self, head, body=b''):
        return self.io_loop.run_sync(lambda: raw_exchange(
            self.get_http_port(), head, body, host='localhost'))

    def test_body_over_limit_is_413_json(self):
        code, body = self.fetch_json('/echo', 'PUT', {'n': 1, 'tags': [
            'x' * 2000]})
        self.assertEqual(code, 413)
        self.assertIn('over the limit of 1000', body['error'])
        self.assertEqual(self.fetch_json('/echo', 'PUT', {'n': 1})[0], 200)
        # Each endpoint its own limit: /files takes 100000.
        self.assertEqual(self.fetch_json('/files', 'PUT', {'files': {
            'a': 'x' * 2000}})[0], 200)

    def test_declared_length_over_limit_is_refused_unread(self):
        # Only the head is sent: the 413 comes without waiting for a body
        # (before, up to 1 GiB was read and dropped first).
        for length in ('1001', str(1 << 29), '9' * 30):
            status, headers, body = self.raw(
                'PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: ' + length)
            self.assertEqual(status, 413, length)
            self.assertIn('over the limit of 1000', json.loads(body)['error'])
            self.assertEqual(headers['Content-Type'].split(';')[0],
                             'application/json')

    def test_chunked_body_over_limit_stops_at_the_limit(self):
        head = 'PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked'
        chunk = b'%x\r\n%s\r\n' % (600, b'x' * 600)
        status, _, body = self.raw(head, chunk * 3 + b'0\r\n\r\n')
        self.assertEqual(status, 413)
        self.assertIn('over the limit of 1000', json.loads(body)['error'])
        ok = json.dumps({'n': 2}).encode()
        status, _, body = self.raw(head, b'%x\r\n%s\r\n0\r\n\r\n'
                                   % (len(ok), ok))
        self.assertEqual((status, json.loads(body)), (200, {
            'n': 2, 'tags': [], 'token': None}))

    def test_credentials_before_the_body(self):
        # A head promising 900 bytes and no body: the 401 comes at once.
        for token in ('', 'Authorization: nope\r\n'):
            status, _, body = self.raw(
                'PUT /guarded HTTP/1.1\r\nHost: x\r\n%sContent-Length: 900'
                % token)
            self.assertEqual(status, 401)
            self.assertEqual(json.loads(body), {'error': 'bad token'})
        # Whatever the body: a malformed one is still a 401.
        self.assertEqual(self.fetch_json('/guarded', 'PUT', '{', token='x'),
                         (401, {'error': 'bad token'}))
        self.assertEqual(self.fetch_json('/guarded', 'PUT', {'n': 1},
                                         token='ok'), (200, {'n': 1}))
        self.assertEqual(self.fetch_json('/guarded', 'PUT', '{',
                                         token='ok')[0], 400)

    def test_a_method_naming_no_permission_is_closed(self):
        with self.assertRaisesRegex(TypeError, 'Undeclared.put declares no'):
            check_permissions([(r'/undeclared', Undeclared)])
        with self.assertRaisesRegex(TypeError, 'no role'):
            check_permissions([(r'/x', type('X', (APIHandler,), {
                'get': allow('no_such_role')(lambda self: None)}))])
        status, _, body = self.raw(
            'PUT /undeclared HTTP/1.1\r\nHost: x\r\nContent-Length: 900')
        self.assertEqual(status, 403)
        self.assertIn('no one may call PUT /undeclared',
                      json.loads(body)['error'])
        # A method the handler does not have is still Tornado's 405.
        self.assertEqual(self.fetch_json('/guarded', 'GET')[0], 405)

    def test_roles_in_order_then_the_owner_before_the_body(self):
        # A token is optional where 'anyone' follows, but checked if sent.
        self.assertEqual(self.fetch_json('/owned/x'), (200, {'caller': None}))
        self.assertEqual(self.fetch_json('/owned/x', token='ok'),
                         (200, {'caller': 'ok'}))
        self.assertEqual(self.fetch_json('/owned/x', token='nope'),
                         (401, {'error': 'bad token'}))
        # The owner check runs from the headers too: refused unread.
        status, _, body = self.raw(
            'PUT /owned/other HTTP/1.1\r\nHost: x\r\nAuthorization: ok'
            '\r\nContent-Length: 900')
        self.assertEqual((status, json.loads(body)),
                         (403, {'error': 'not yours'}))
        self.assertEqual(self.fetch_json('/owned/ok', 'PUT', {}, token='ok'),
                         (200, {'name': 'ok'}))

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
                      {'.b64': b64}, {'': 'a'}, {'evil\n': 'a'},
                      {'a.gz.b64': gz[:-8]}, {'.gz.b64': gz},
                      {'a.b64': b64, 'a': 'x'}):
            code, body = self.fetch_json('/files', 'PUT', {'files': files})
            self.assertEqual(code, 400, files)
            self.assertIn('error', body)

    def test_decoded_sizes_are_bounded(self):
        import base64
        import gzip
        def gz(n):
            return base64.b64encode(gzip.compress(b'\0' * n)).decode()
        two = base64.b64encode(gzip.compress(b'ab') + gzip.compress(b'cd'))
        self.assertEqual(self.fetch_json('/files', 'PUT', {'files': {
            'a.gz.b64': gz(5000), 'm.gz.b64': two.decode()}})[1]['m'], 'abcd')
        for files, word in (({'a.gz.b64': gz(5001)}, 'limit per file'),
                            ({'a.gz.b64': gz(4000), 'b.gz.b64': gz(4001)},
                             'limit per request'),
                            ({'a.b64': base64.b64encode(b'x' * 5001).decode()},
                             'limit per file'),
                            ({'a': 'x', 'b': 'y', 'c': 'z', 'd': 'w'},
                             'the limit is 3')):
            code, body = self.fetch_json('/files', 'PUT', {'files': files})
            self.assertEqual(code, 413, files)
            self.assertIn(word, body['error'])

    def test_gunzip_stops_at_the_budget(self):
        import gzip
        bomb = gzip.compress(b'\0' * (64 << 20))  # 64 MiB in 64 KB
        with self.assertRaises(TooLarge):
            gunzip('bomb', bomb, Budget(1 << 20, 1 << 30))
        self.assertIsNone(gunzip('bomb', bomb, Budget(1 << 30, 1 << 30),
                                 keep=False))

    def test_request_log_has_no_token(self):
        with self.assertLogs('siegetank.access', logging.DEBUG) as logs:
            self.fetch_json('/echo', 'PUT', {'n': 'x'},
                            token='s3cret-token-value')
            self.fetch_json('/echo?signature=s3cret-sig', 'PUT', {'n': 1})
        text = '\n'.join(logs.output)
        self.assertIn('400 PUT /echo', text)
        self.assertNotIn('s3cret', text)
        self.assertTrue(any(r.startswith('WARNING') for r in logs.output))


class TestExactRoutes(unittest.TestCase):
    """Plain paths are found by one lookup, never ahead of an earlier
    pattern that Tornado would match first."""

    def test_first_match_kept(self):
        class A: pass  # noqa: E701
        class B: pass  # noqa: E701
        class C: pass  # noqa: E701
        handlers = [(r'/a/(.*)', A), (r'/a/b', B), (r'/c', C),
                    (r'/d', C, {'x': 1})]
        self.assertEqual(web.exact_routes(handlers), {'/c': C})
