"""What every handler of both servers shares: JSON bodies parsed once, every
error as `{"error": ...}` with the status codes of docs/api.md, credentials
read from `Authorization`, and a request log that never shows a token.

Handlers stay thin: they read fields with `field()`, call model code, and
`raise APIError(code, message)` on anything wrong; `write_error` turns that
into JSON. Nothing a client sends may end in a 500 or an HTML page.
"""
import base64
import binascii
import gzip
import hashlib
import json
import logging
import re
import time
import zlib

import tornado.web
from tornado import httputil
from tornado.web import HTTPError

from server import tls, tokens


def _no_constant(name):
    """NaN and Infinity are not JSON; they could not be sent back either."""
    raise ValueError('%s is not JSON' % name)


# Frame bodies are mostly one long base64 string: orjson parses them and
# pybase64 decodes them several times faster than the standard library
# (measured: 100 KB frame, 260 -> 95 us and 560 -> 15 us). Both are in
# requirements.txt; the standard library stands in when one is missing.
try:  # strict: no NaN/Infinity, no lone surrogates, bounded depth
    from orjson import loads as json_loads
except ImportError:
    def json_loads(raw):
        return json.loads(raw, parse_constant=_no_constant)
try:
    from pybase64 import b64decode
except ImportError:
    b64decode = base64.b64decode

access_log = logging.getLogger('siegetank.access')
app_log = logging.getLogger('siegetank')

REQUIRED = object()


class APIError(HTTPError):
    """A refusal with a message for the client. The message goes to the JSON
    body, never into the status line (it may quote client input)."""

    def __init__(self, status, message):
        super().__init__(status)
        self.message = message


FILE_NAME = re.compile(r'^[A-Za-z0-9._-]{1,128}$')


def check_file_name(name):
    if not isinstance(name, str) or not FILE_NAME.match(name) \
            or name in ('.', '..') or '..' in name:
        raise APIError(400, 'bad file name %r: plain names of '
                        '[A-Za-z0-9._-], at most 128 characters' % (name,))
    return name


def decode_file(name, value):
    """The bytes a JSON file string stands for: `.b64` is base64, `.gz.b64`
    base64 of gzip. Returns (name without those suffixes, bytes)."""
    check_file_name(name)
    if not isinstance(value, str):
        raise APIError(400, 'file %s must be a string' % name)
    if not name.endswith('.b64'):
        return name, value.encode('utf-8')
    name = name[:-4]
    try:
        data = b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, 'file %s.b64 is not valid base64' % name)
    if name.endswith('.gz'):
        name = name[:-3]
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            raise APIError(400, 'file %s.gz.b64 is not valid gzip'
                            % name)
    if not name:
        raise APIError(400, 'bad file name: nothing before .b64')
    return name, data


def decode_files(files):
    """{name without transport suffixes: bytes} of a checked `{name: str}`
    dict; 400 if two files decode to the same name."""
    out = {}
    for name, value in files.items():
        plain, data = decode_file(name, value)
        if plain in out:
            raise APIError(400, 'two files decode to the name %s' % plain)
        out[plain] = data
    return out


def check_encoded(files, what='files', allow_empty=False):
    """check_files, and 400 unless every `.b64` / `.gz.b64` file decodes."""
    check_files(files, what, allow_empty)
    for name, value in files.items():
        decode_file(name, value)
    return files


# Ids as both servers take them: a target id is a uuid4 made by the CC, a
# stream id `<uuid4>:<ws name>` made by its WS.
_UUID4 = (r'[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}'
          r'-[0-9a-f]{12}')
TARGET_ID = re.compile(r'^%s$' % _UUID4)
STREAM_ID = re.compile(r'^%s:[A-Za-z0-9._-]{1,64}$' % _UUID4)


def check_target_id(target_id):
    if not isinstance(target_id, str) or not TARGET_ID.match(target_id):
        raise APIError(400, 'malformed target id %r' % (target_id,))
    return target_id


def check_stream_id(stream_id):
    if not isinstance(stream_id, str) or not STREAM_ID.match(stream_id):
        raise APIError(400, 'malformed stream id %r' % (stream_id,))
    return stream_id


def check_files(files, what='files', allow_empty=False):
    """A `{name: str}` dict with valid names (values are not decoded)."""
    if not isinstance(files, dict) or (not files and not allow_empty):
        raise APIError(400, '%s must be a non-empty object of '
                        '{name: string}' % what)
    for name, value in files.items():
        check_file_name(name)
        if not isinstance(value, str):
            raise APIError(400, '%s[%s] must be a string'
                            % (what, name))
    return files


TAGS_MAX_BYTES = 4096


def check_tags(tags):
    """Stream tags (API.md): a `{str: str}` object, names non-empty, at most
    TAGS_MAX_BYTES in all (its compact JSON in UTF-8); 400 otherwise."""
    if not isinstance(tags, dict):
        raise APIError(400, 'tags must be an object of {name: string}')
    for name, value in tags.items():
        if not name or not isinstance(value, str):
            raise APIError(400, 'tag %r must have a non-empty name and a '
                           'string value' % (name,))
    size = len(json.dumps(tags, separators=(',', ':'),
                          ensure_ascii=False).encode('utf-8'))
    if size > TAGS_MAX_BYTES:
        raise APIError(400, 'tags take %d bytes, over the limit of %d'
                       % (size, TAGS_MAX_BYTES))
    return tags


class App(tornado.web.Application):
    """A Tornado app with the server's settings and its Redis client.
    `on_start`/`on_stop` run in worker 0 only: periodic jobs and
    registrations happen once across processes."""

    def __init__(self, handlers, settings, redis, task_id=0):
        self.config = settings
        self.redis = redis
        self.task_id = task_id
        self.client_ssl = tls.client_context(settings['ssl_ca_certs'])
        super().__init__(handlers, default_handler_class=NotFoundHandler,
                         log_function=log_request, compress_response=False,
                         serve_traceback=False)

    def start_request(self, server_conn, request_conn):
        return _BodyLimit(self, super().start_request(server_conn,
                                                      request_conn),
                          request_conn)

    async def on_start(self):
        """Start background jobs (worker 0)."""

    async def on_stop(self):
        """Stop background jobs, say goodbye to peers (worker 0)."""

    async def close(self):
        """Release what the app holds (every worker, after serving)."""

    @classmethod
    def prepare(cls, settings, redis_url):
        """Once, in the master, before any worker is forked."""


class _BodyLimit(httputil.HTTPMessageDelegate):
    """Answers a declared Content-Length over `max_body_size` with a JSON
    413 (Tornado alone sends a bare 400 and hangs up). The body is read and
    dropped first, so the client, still sending, gets the reply instead of
    a reset; a body over DRAIN_MAX is not read: reply and hang up."""

    DRAIN_MAX = 1 << 30

    def __init__(self, app, delegate, connection):
        self.limit = app.config['max_body_size']
        self.delegate = delegate
        self.connection = connection
        self.refused = None

    def headers_received(self, start_line, headers):
        length = headers.get('Content-Length', '')
        if not (length.isdigit() and int(length) > self.limit):
            return self.delegate.headers_received(start_line, headers)
        self.refused = (start_line, int(length))
        # Let Tornado take (and drop) the body rather than refuse it itself.
        self.connection.set_max_body_size(int(length))
        if int(length) > self.DRAIN_MAX:
            self._reply()

    def _reply(self):
        start_line, length = self.refused
        body = json.dumps({'error': 'body of %d bytes is over the limit of '
                           '%d bytes' % (length, self.limit)}).encode()
        self.connection.write_headers(
            httputil.ResponseStartLine('HTTP/1.1', 413, 'Payload Too Large'),
            httputil.HTTPHeaders({
                'Content-Type': 'application/json; charset=UTF-8',
                'Content-Length': str(len(body))}), body)
        self.connection.finish()
        access_log.warning('413 %s %s', start_line.method,
                           start_line.path.split('?')[0])

    def data_received(self, chunk):
        if self.refused is None:
            return self.delegate.data_received(chunk)

    def finish(self):
        if self.refused is None:
            self.delegate.finish()
        else:
            self._reply()

    def on_connection_close(self):
        if self.refused is None:
            self.delegate.on_connection_close()


def log_request(handler):
    """Level by status; the path without its query (signed URLs carry a
    signature there) and never a header, so no credential reaches the log."""
    status = handler.get_status()
    if status < 400:
        level = logging.DEBUG
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if access_log.isEnabledFor(level):
        req = handler.request
        access_log.log(level, '%d %s %s %.1fms %s', status, req.method,
                       req.path, 1000.0 * req.request_time(),
                       getattr(handler, '_error_message', ''))


def _has_lone_surrogate(obj):
    """JSON may escape half a UTF-16 pair (\\ud800); such a string cannot
    be encoded to UTF-8 (for Redis, disk, or a peer), so it is bad input."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            if not o.isascii():
                try:
                    o.encode('utf-8')
                except UnicodeEncodeError:
                    return True
        elif isinstance(o, dict):
            stack.extend(o)
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return False


class APIHandler(tornado.web.RequestHandler):
    """Base of every JSON endpoint."""

    _body = None

    @property
    def redis(self):
        return self.application.redis

    @property
    def config(self):
        return self.application.config

    def set_default_headers(self):
        self.set_header('Content-Type', 'application/json; charset=UTF-8')
        self.clear_header('Server')

    def check_xsrf_cookie(self):
        pass

    body_md5 = None

    def prepare(self):
        md5 = self.request.headers.get('Content-MD5')
        if md5 is not None and self.request.body is not None:
            self.body_md5 = hashlib.md5(self.request.body).hexdigest()
            if self.body_md5 != md5.strip().lower():
                raise APIError(400, 'Content-MD5 does not match body')

    @property
    def body(self):
        """The request body as a JSON object, parsed once; empty means {}."""
        if self._body is None:
            raw = self.request.body
            if not raw or not raw.strip():
                self._body = {}
            else:
                try:
                    self._body = json_loads(raw)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    raise APIError(400, 'body is not valid JSON')
                if not isinstance(self._body, dict):
                    raise APIError(400, 'body must be a JSON object')
                if _has_lone_surrogate(self._body):
                    raise APIError(400, 'body has a string that is not '
                                   'valid Unicode (a lone surrogate escape)')
        return self._body

    def field(self, name, kind, default=REQUIRED, check=None):
        """A body field of type `kind` (a type or tuple); 400 if missing or
        mistyped, or if `check(value)` is false."""
        if name not in self.body:
            if default is REQUIRED:
                raise APIError(400, 'missing field %s' % name)
            return default
        value = self.body[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds \
                or not isinstance(value, kinds):
            raise APIError(400, 'field %s must be %s' % (
                name, ' or '.join(k.__name__ for k in kinds)))
        if check is not None and not check(value):
            raise APIError(400, 'field %s has an invalid value' % name)
        return value

    def token(self):
        """The credential in `Authorization` (bare, or `Bearer <token>`)."""
        value = self.request.headers.get('Authorization', '').strip()
        if value[:7].lower() == 'bearer ':
            value = value[7:].strip()
        return value or None

    def read_body_now(self):
        """A malformed body is a 400 even where no field is read."""
        if self.request.method in ('PUT', 'POST'):
            self.body

    def write_json(self, obj, status=200):
        self.set_status(status)
        self.finish(b'{}' if not obj and type(obj) is dict
                    else json.dumps(obj))

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get('exc_info', (None, None, None))[1]
        if isinstance(exc, APIError):
            reason = exc.message
        elif isinstance(exc, HTTPError) or exc is None:
            reason = self._reason
        else:
            reason = 'internal server error'
        self._error_message = reason
        self.set_header('Content-Type', 'application/json; charset=UTF-8')
        self.finish(json.dumps({'error': reason}))

    def log_exception(self, typ, value, tb):
        if isinstance(value, HTTPError):
            return  # an expected refusal; log_request reports it
        app_log.error('uncaught exception in %s %s', self.request.method,
                      self.request.path, exc_info=(typ, value, tb))


class PeerHandler(APIHandler):
    """Base of the endpoints one server calls on the other with a shared
    pass (`Authorization: <cc_pass>`), compared in constant time."""

    def peer_passes(self):
        """The passes a caller may present."""
        raise NotImplementedError

    def is_peer(self):
        return tokens.matches_any(self.token(), self.peer_passes())

    def prepare(self):
        super().prepare()
        if not self.is_peer():
            raise APIError(401, 'missing or wrong cc_pass')
        self.read_body_now()


class NotFoundHandler(APIHandler):
    def prepare(self):
        raise APIError(404, 'no such endpoint: %s %s'
                        % (self.request.method, self.request.path))


class HealthHandler(APIHandler):
    """GET /: 200 while this server and its Redis answer, else 503."""

    async def get(self):
        try:
            await self.redis.ping()
        except Exception:
            raise APIError(503, 'redis is not reachable')
        self.write_json({'name': self.config['name'],
                         'kind': self.config['kind'],
                         'time': time.time()})
