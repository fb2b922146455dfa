"""What every handler of both servers shares: JSON bodies parsed once, every
error as `{"error": ...}` with the status codes of docs/api.md, credentials
read from `Authorization`, and a request log that never shows a token.

Handlers stay thin: they read fields with `field()`, call model code, and
`raise APIError(code, message)` on anything wrong; `write_error` turns that
into JSON. Nothing a client sends may end in a 500 or an HTML page.
"""
import base64
import binascii
import functools
import hashlib
import inspect
import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tornado.web
from tornado import httputil
from tornado.web import HTTPError

from server import metrics, store, threads, tls
from server.config import Settings


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
    def json_loads(raw):  # type: ignore[misc]
        return json.loads(raw, parse_constant=_no_constant)
try:
    from pybase64 import b64decode
except ImportError:
    b64decode = base64.b64decode  # type: ignore[assignment]

access_log = logging.getLogger('siegetank.access')
app_log = logging.getLogger('siegetank')

REQUIRED = object()
RETRY_AFTER_S = 5  # Retry-After of a 503 while the store is down


class APIError(HTTPError):
    """A refusal with a message for the client. The message goes to the JSON
    body, never into the status line (it may quote client input).
    `fields`: more of the body, for a client that acts on them."""

    def __init__(self, status, message, headers=None, fields=None):
        super().__init__(status)
        self.message = message
        self.headers = headers or {}
        self.fields = fields or {}


# Characters of a client's value (a path, an id, a name) quoted in a log
# line or an error, and of a whole error message: a 60 KB path must not
# cost 60 KB of log (or of reply) per request.
SHOWN_MAX = 200
MESSAGE_MAX = 1024


def shown(value, limit=SHOWN_MAX):
    """`value` as text cut to `limit` characters, saying how long it was."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return '%s...(%d characters)' % (text[:limit], len(text))


def too_many(message, retry_after):
    """429 with `Retry-After` (whole seconds, at least 1)."""
    return APIError(429, message,
                    {'Retry-After': str(max(1, int(retry_after)))})


FILE_NAME = re.compile(r'[A-Za-z0-9._-]{1,128}')


class TooLarge(APIError):
    """A body, a decoded file or a count over its configured limit: 413,
    and nothing of the request is stored."""

    def __init__(self, message):
        super().__init__(413, message)


def check_file_name(name):
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name) \
            or name in ('.', '..') or '..' in name:
        raise APIError(400, 'bad file name %s: plain names of '
                        '[A-Za-z0-9._-], at most 128 characters'
                        % shown(repr(name)))
    return name


class Offload(Exception):
    """Too much to decode on the event loop: do it again in a thread."""


class Budget:
    """The decoded bytes a request may still produce: at most `per_file`
    for one file and `total` for all of them. An inline budget stands for
    the event loop: past it the decoding is redone in a thread with the
    real budget (Offload), instead of a 413."""

    def __init__(self, per_file, total, inline=False, why=None):
        self.per_file, self.inline, self.why = per_file, inline, why
        self.total = self.left = total

    @property
    def spent(self):
        return self.total - self.left

    def check(self, name, size):
        """`size` bytes of file `name` so far: still within both limits?"""
        if size <= self.per_file and size <= self.left:
            return
        if self.inline:
            raise Offload()
        if size > self.per_file:
            raise TooLarge('file %s decodes to over %d bytes (the limit '
                           'per file)' % (name, self.per_file))
        raise TooLarge('the files decode to over %d bytes (%s), file %s '
                       'reaching it' % (self.total,
                                        self.why or 'the limit per request',
                                        name))

    def spend(self, name, size):
        self.check(name, size)
        self.left -= size


INFLATE_STEP = 1 << 20   # bytes of output per step of a streamed gunzip


def _inflate(name, data, budget):
    """Yield the gunzipped bytes of `data` a step at a time, never past the
    budget, so a small bomb cannot take memory. Concatenated members make
    one file, as with gzip.decompress."""
    size = 0
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
        while not inflater.eof:
            try:
                part = inflater.decompress(data, INFLATE_STEP)
            except zlib.error:
                raise APIError(400, 'file %s.gz.b64 is not valid gzip'
                               % name) from None
            data = inflater.unconsumed_tail
            if not part and not data:
                raise APIError(400, 'file %s.gz.b64 is not valid gzip '
                               '(truncated)' % name)
            size += len(part)
            budget.check(name, size)
            yield part
        data = inflater.unused_data
        if not data:
            break
    budget.spend(name, size)


def _whole(name, data, budget):
    budget.spend(name, len(data))
    yield data


def decode_pieces(name, value, budget):
    """What a JSON file string stands for: `.b64` is base64, `.gz.b64`
    base64 of gzip. Returns (name without those suffixes, an iterator of
    its decoded bytes, which raises 413 past the budget); the name and the
    base64 are checked now (400)."""
    check_file_name(name)
    if not isinstance(value, str):
        raise APIError(400, 'file %s must be a string' % name)
    if not name.endswith('.b64'):
        return name, _whole(name, value.encode('utf-8'), budget)
    plain = decoded_name(name)
    if not plain:
        raise APIError(400, 'bad file name: nothing before .b64')
    try:
        data = b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, 'file %s is not valid base64' % name) from None
    if name.endswith('.gz.b64'):
        return plain, _inflate(plain, data, budget)
    return plain, _whole(plain, data, budget)


def decoded_name(name):
    """The name a sent file is stored under: without `.b64` or
    `.gz.b64`."""
    if name.endswith('.gz.b64'):
        return name[:-7]
    return name[:-4] if name.endswith('.b64') else name


def gunzip(name, data, budget, keep=True):
    """The gunzipped bytes of `data`, or None unless `keep` (then only
    the size is checked)."""
    return _collect(_inflate(name, data, budget), keep)


def _collect(pieces, keep):
    if keep:
        return b''.join(pieces)
    for _ in pieces:
        pass
    return None


def decoded_streams(files, budget):
    """{decoded name: iterator of its bytes} of checked `files`, for
    writing as they decode (see decode_pieces); 400 if two files decode to
    the same name."""
    out = {}
    for name, value in files.items():
        plain, pieces = decode_pieces(name, value, budget)
        if plain in out:
            raise APIError(400, 'two files decode to the name %s' % plain)
        out[plain] = pieces
    return out


# Ids as both servers take them: a target id is a uuid4 made by the CC, a
# stream id `<uuid4>:<ws name>` made by its WS.
_UUID4 = (r'[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}'
          r'-[0-9a-f]{12}')
TARGET_ID = re.compile(_UUID4)
STREAM_ID = re.compile(r'%s:[A-Za-z0-9._-]{1,64}' % _UUID4)


def check_target_id(target_id):
    if not isinstance(target_id, str) or not TARGET_ID.fullmatch(target_id):
        raise APIError(400, 'malformed target id %s'
                        % shown(repr(target_id)))
    return target_id


def check_stream_id(stream_id):
    if not isinstance(stream_id, str) or not STREAM_ID.fullmatch(stream_id):
        raise APIError(400, 'malformed stream id %s'
                        % shown(repr(stream_id)))
    return stream_id


def check_files(files, what='files', allow_empty=False, max_files=None):
    """A `{name: str}` dict with valid names (values are not decoded) and
    at most `max_files` entries (413 above)."""
    if not isinstance(files, dict) or (not files and not allow_empty):
        raise APIError(400, '%s must be a non-empty object of '
                        '{name: string}' % what)
    if max_files is not None and len(files) > max_files:
        raise TooLarge('%s has %d files: the limit is %d'
                       % (what, len(files), max_files))
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


def _decode_all(groups, budget, keep):
    return [{name: _collect(pieces, keep) for name, pieces in
             decoded_streams(files, budget).items()} for files in groups]


INLINE_DECODE_MAX = 256 * 1024  # bytes decoded on the event loop, at most


async def bounded(config, encoded, work, pool=threads.cpu, room=None):
    """`work(budget)` with a Budget of the configured decoded sizes
    (`max_decoded_file_size`, `max_decoded_request_size`), or less: `room`
    (bytes, why) a tighter total (a byte budget, ws/budgets.py). On the
    event loop while `encoded` (bytes of file text) and what it decodes to
    are small (a thread hop costs more), else in `pool`. Work cut short on
    the loop (Offload) is done again in the pool, so it must undo itself
    when it raises."""
    per_file = config.max_decoded_file_size_in_bytes
    total, why = config.max_decoded_request_size_in_bytes, None
    if room is not None and room[0] < total:
        total, why = room
    if encoded <= INLINE_DECODE_MAX:
        try:
            return work(Budget(min(per_file, INLINE_DECODE_MAX),
                               min(total, INLINE_DECODE_MAX), inline=True,
                               why=why))
        except Offload:
            pass
    return await pool(work, Budget(per_file, total, why=why))


def encoded_size(*groups):
    return sum(len(v) for files in groups for v in files.values())


async def decode_files(config, *groups, keep=True):
    """[{decoded name: bytes (None unless `keep`)}] of each checked dict of
    files in `groups`, all of them within the configured decoded sizes;
    400 if two files of a group decode to the same name."""
    return await bounded(config, encoded_size(*groups),
                         lambda budget: _decode_all(groups, budget, keep))


async def decoded_size(config, files, room=None):
    """The bytes checked `files` decode to (nothing kept), within the
    configured decoded sizes and `room` (see bounded)."""
    def work(budget):
        _decode_all([files], budget, False)
        return budget.spent
    return await bounded(config, encoded_size(files), work, room=room)


class App(tornado.web.Application):
    """A Tornado app with the server's settings and its Redis client.
    `on_start`/`on_stop` run in worker 0 only: periodic jobs and
    registrations happen once across processes."""

    holder = ''  # this worker's mark on what it holds (runner sets it)
    config: Settings
    redis: Any  # a redis.asyncio client

    def __init__(self, handlers, settings, redis, task_id=0):
        self.config = settings
        self.redis = redis
        self.task_id = task_id
        self.client_ssl = tls.client_context(settings.ssl_ca_certs)
        self.route_names = metrics.route_names(handlers)
        self.exact_routes = exact_routes(handlers)
        check_permissions(handlers)
        super().__init__(handlers, default_handler_class=NotFoundHandler,
                         log_function=log_request, compress_response=False,
                         serve_traceback=False)

    def find_handler(self, request, **kwargs):
        """A plain path (the core endpoints) by one dict lookup; the rest
        by Tornado's rules, in order."""
        handler = self.exact_routes.get(request.path)
        if handler is not None:
            return self.get_handler_delegate(request, handler)
        return super().find_handler(request, **kwargs)

    async def on_start(self):
        """Start background jobs (worker 0)."""

    async def on_stop(self):
        """Stop background jobs, say goodbye to peers (worker 0)."""

    async def close(self):
        """Release what the app holds (every worker, after serving)."""

    @classmethod
    def prepare(cls, settings, redis_url):
        """Once, in the master, before any worker is forked."""

    @classmethod
    def worker_died(cls, settings, redis_url, prefix):
        """In the master, when a worker died: free what it held in Redis
        (values starting with `prefix`, see runner.holder_prefix)."""

    async def stream_counts(self):
        """{state: streams} for the metrics (monitor.py)."""
        return {}


_PLAIN = re.compile(r'[/A-Za-z0-9_]+')


def exact_routes(handlers):
    """{path: handler class} of the routes whose pattern is a plain path
    and which no route before them would take (Tornado's first match)."""
    exact = {}
    for i, (pattern, handler, *rest) in enumerate(handlers):
        if rest or not _PLAIN.fullmatch(pattern):
            continue
        if not any(re.fullmatch(p[0], pattern) for p in handlers[:i]):
            exact[pattern] = handler
    return exact


_date = (0, '')


def http_date():
    """The Date header's value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, httputil.format_timestamp(now))
    return _date[1]


def http_server_options(settings):
    """Options of a server's httpserver.Server: slow clients are cut (the
    headers of a request, or the wait for the next one, within
    `header_timeout_in_s`; its body within `body_timeout_in_s`, and at
    `min_body_rate_in_bytes_per_s` after `body_grace_in_s`). Bodies are
    bounded per endpoint by APIHandler, which refuses early with a JSON
    413; the server-wide bound only has to be above every endpoint's."""
    return {'header_timeout': settings.header_timeout_in_s,
            'body_timeout': settings.body_timeout_in_s,
            'body_grace': settings.body_grace_in_s,
            'min_body_rate': settings.min_body_rate_in_bytes_per_s,
            'trusted_proxies': settings.trusted_proxies,
            'max_body_size': max(getattr(settings, k) for k in BODY_LIMITS
                                 if settings.applies(k)) + 1}


# The config keys of the body limits; an endpoint names its own.
BODY_LIMITS = ('max_small_body_size_in_bytes', 'max_body_size_in_bytes',
               'max_frame_body_size_in_bytes',
               'max_checkpoint_body_size_in_bytes')


def log_request(handler):
    """Level by status; the path without its query (signed URLs carry a
    signature there) and never a header, so no credential reaches the log;
    the path and the message cut (`shown`). Every request is counted in
    the metrics by its route."""
    req = handler.request
    log_line(handler.application.route_names.get(type(handler), 'unmatched'),
             req.method, req.path, handler.get_status(), req.request_time(),
             getattr(handler, '_error_message', ''))


def log_line(route, method, path, status, seconds, message=''):
    """The access log's line and the metrics of one request (log_request,
    and the WS's frame path, which has no handler)."""
    metrics.get().observe_request(route, method, status, seconds)
    if status < 400:
        level = logging.DEBUG
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if access_log.isEnabledFor(level):
        access_log.log(level, '%d %s %s %.1fms %s', status,
                       shown(method, 16), shown(path), 1000.0 * seconds,
                       shown(message, MESSAGE_MAX))


def error_reply(exc, http_reason=None):
    """(status, message, headers, fields) of the JSON error an exception
    is: an APIError its own (with its extra `fields`); a store that is
    down a 503 the client may retry, one that is full a 507; Tornado's
    HTTPError `http_reason` (its status's name by default); anything else
    a 500."""
    headers: dict[str, str] = {}
    fields: dict[str, Any] = {}
    reason = 'internal server error'
    if isinstance(exc, APIError):
        status, reason, fields = exc.status_code, exc.message, exc.fields
        headers.update(exc.headers)
    elif isinstance(exc, store.DOWN):
        status = 503
        reason = 'the store is down (%s), retry later' % (
            str(exc) or type(exc).__name__)
    elif store.full(exc):
        status = 507
        reason = 'the store is full (at its maxmemory): nothing was ' \
                 'stored; retry later or ask the operators'
    elif isinstance(exc, HTTPError):
        status = exc.status_code
        reason = http_reason or httputil.responses.get(status, 'Unknown')
    else:
        status = 500
    if status == 503:
        headers['Retry-After'] = str(RETRY_AFTER_S)
    return status, shown(reason, MESSAGE_MAX), headers, fields


def credential(headers):
    """The credential in `Authorization` (bare, or `Bearer <token>`)."""
    value = headers.get('Authorization', '').strip()
    if value[:7].lower() == 'bearer ':
        value = value[7:].strip()
    return value or None


def checked_md5(headers, raw):
    """The body's MD5 (hex) if the request sent Content-MD5, else None;
    400 if it does not match."""
    md5 = headers.get('Content-MD5')
    if md5 is None:
        return None
    digest = hashlib.md5(raw).hexdigest()
    if digest != md5.strip().lower():
        raise APIError(400, 'Content-MD5 does not match body')
    return digest


def parse_body(raw):
    """A request body as a JSON object; empty means {}; else a 400."""
    if not raw or not raw.strip():
        return {}
    try:
        body = json_loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, 'body is not valid JSON') from None
    if not isinstance(body, dict):
        raise APIError(400, 'body must be a JSON object')
    if _has_lone_surrogate(body):
        raise APIError(400, 'body has a string that is not valid Unicode '
                       '(a lone surrogate escape)')
    return body


def get_field(body, name, kind, default=REQUIRED, check=None):
    """A field of `body` of type `kind` (a type or tuple); 400 if missing
    or mistyped, or if `check(value)` is false."""
    if name not in body:
        if default is REQUIRED:
            raise APIError(400, 'missing field %s' % name)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds \
            or not isinstance(value, kinds):
        raise APIError(400, 'field %s must be %s' % (
            name, ' or '.join(k.__name__ for k in kinds)))
    if check is not None and not check(value):
        raise APIError(400, 'field %s has an invalid value' % name)
    return value


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


# Who may call an endpoint is declared on its method: `@allow('manager')`.
# A role names a kind of caller; its check (registered with `@role` by the
# module that owns that credential) reads the request's headers and
# returns who the caller is, None when the request carries no credential
# of that kind, or raises APIError (401, 403) for one that is wrong or not
# enough. 'anyone' is every caller.
Caller = Any
RoleCheck = Callable[['APIHandler', 'Permission'], Awaitable[Caller]]
OwnerCheck = Callable[['APIHandler', Caller], Awaitable[Any]]
_ROLES: dict[str, tuple[RoleCheck, str]] = {}
ANYONE = object()  # what the 'anyone' role returns: no one in particular


def role(name: str, missing: str) -> Callable[[RoleCheck], RoleCheck]:
    """Register the check of role `name`; `missing` is the 401 message
    when a rule's first role is this one and no role recognised the
    caller."""
    def register(check: RoleCheck) -> RoleCheck:
        _ROLES[name] = (check, missing)
        return check
    return register


async def _anyone(handler: 'APIHandler', rule: 'Permission') -> object:
    return ANYONE


role('anyone', '')(_anyone)


class Permission:
    """The rule of one method: the roles that may call it, tried in order
    (the first that recognises the caller decides), then `owner`, which
    checks that caller against the resource of the path (its 400, 404,
    403) and returns it as `handler.resource`. `purpose` completes the
    refusal of a caller of the wrong role ('only an admin may ...')."""

    def __init__(self, roles: tuple[str, ...], owner: OwnerCheck | None,
                 purpose: str) -> None:
        if not roles:
            raise TypeError('@allow needs at least one role')
        self.roles, self.owner, self.purpose = roles, owner, purpose

    def checks(self) -> list[tuple[RoleCheck, str]]:
        try:
            return [_ROLES[name] for name in self.roles]
        except KeyError as e:
            raise TypeError('no role %s is registered' % e) from None

    async def check(self, handler: 'APIHandler') -> None:
        for check, _ in self.checks():
            caller = await check(handler, self)
            if caller is not None:
                break
        else:
            raise APIError(401, self.checks()[0][1])
        handler.caller = None if caller is ANYONE else caller
        if self.owner is not None:
            handler.resource = await self.owner(handler, handler.caller)


Method = TypeVar('Method', bound=Callable[..., Any])


def allow(*roles: str, owner: OwnerCheck | None = None,
          purpose: str = 'do this') -> Callable[[Method], Method]:
    """Declare who may call the handler method it decorates (see
    Permission); checked from the headers before the body is read."""
    def declare(method: Method) -> Method:
        method.permission = Permission(roles, owner, purpose)  # type: ignore[attr-defined]
        return method
    return declare


HTTP_METHODS = ('get', 'head', 'post', 'put', 'delete', 'patch', 'options')


def check_permissions(handlers: list[Any]) -> None:
    """Every method of every routed handler declares who may call it, with
    roles that exist: a server with one that does not fails to start."""
    for route in handlers:
        cls = route[1]
        for name in HTTP_METHODS:
            method = getattr(cls, name, None)
            if method is None or method is getattr(tornado.web.RequestHandler,
                                                    name, None):
                continue
            rule = getattr(method, 'permission', None)
            if rule is None:
                raise TypeError('%s.%s declares no @allow'
                                % (cls.__name__, name))
            rule.checks()


def _after_body(method, parse):
    """Wrap an HTTP method to run once the body is in: not at all for a
    request refused before (the reply is out: finish it), and for PUT and
    POST (`parse`) after the body is checked (Content-MD5) and parsed, so a
    malformed body is a 400 even where no field is read."""
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        self.body_read = True
        if self.refused:
            if not self._finished:
                self.finish()
            return None
        if parse:
            self.body_received()
        result = method(self, *args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result
    wrapper.after_body = True  # type: ignore[attr-defined]
    return wrapper


# Bytes of a refused body read (and dropped) before hanging up, when the
# declared length is over the limit or unknown: enough that a client still
# sending usually reads our reply rather than a reset.
LINGER_MAX = 1 << 20


@tornado.web.stream_request_body
class APIHandler(tornado.web.RequestHandler):
    """Base of every JSON endpoint. The body is streamed in, so that in
    `prepare`, before any byte of it is read, a declared Content-Length
    over this endpoint's limit (`body_limit`, a config key) is a 413 and
    the method's `@allow` rule is checked (401, 403); a body that turns out
    longer (chunked) is a 413 at the limit. A refusal is answered at once; the
    rest of the body is then read and dropped (never kept) up to the
    endpoint's limit (LINGER_MAX when it was too long), so the client
    reads the reply, then the connection is closed."""

    body_limit = 'max_small_body_size_in_bytes'
    # The server's App (cc/app.py or ws/app.py): what a handler reads
    # beyond `config` and `redis` is the app's own.
    application: Any
    _body: Any = None
    _declared: int | None = None  # the Content-Length, if any
    _chunks: list[bytes] | None = []  # replaced per request (prepare)
    body_md5 = None
    refused = False
    body_read = False
    caller: Caller = None  # who the method's @allow recognised
    resource: Any = None  # what its owner check loaded

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ('get', 'put', 'post', 'delete'):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, 'after_body',
                                                  False):
                setattr(cls, name, _after_body(method, name in ('put',
                                                                'post')))

    @property
    def redis(self) -> Any:
        return self.application.redis

    @property
    def config(self) -> Settings:
        return self.application.config

    def clear(self):
        """Tornado's, with JSON and no Server header from the start and the
        Date formatted once a second (it was 3% of a frame's CPU)."""
        self._headers = httputil.HTTPHeaders({
            'Content-Type': 'application/json; charset=UTF-8',
            'Date': http_date()})
        self.set_default_headers()
        self._write_buffer = []
        self._status_code = 200
        self._reason = httputil.responses[200]

    def check_xsrf_cookie(self):
        pass

    async def prepare(self):
        self._chunks = []
        self._size = 0
        self._limit = getattr(self.config, self.body_limit)
        # Bodies are measured here and as they come (data_received, also
        # for chunked ones), not by Tornado, which would answer a bare 400.
        connection: Any = self.request.connection  # an HTTP1Connection
        connection.set_max_body_size(1 << 62)
        length = self.request.headers.get('Content-Length', '')
        if length.isascii() and length.isdigit():
            self._declared = int(length) if len(length) < 19 else 1 << 62
        try:
            if self._declared is not None and self._declared > self._limit:
                raise TooLarge('body of %s bytes is over the limit of %d '
                               'bytes' % (length, self._limit))
            await self.check_permission()
        except APIError as e:
            await self.refuse(e)

    async def check_permission(self) -> None:
        """The `@allow` rule of the HTTP method called, from the headers
        (401, 403, and the owner's 400/404); a method without one is
        refused (403): nothing is open by omission. A method the handler
        does not have is let through to Tornado's 405."""
        name = (self.request.method or '').lower()
        method = getattr(type(self), name, None)
        if method is None or method is getattr(tornado.web.RequestHandler,
                                                name, None):
            return
        rule = getattr(method, 'permission', None)
        if rule is None:
            raise APIError(403, 'no one may call %s %s'
                           % (self.request.method, self.request.path))
        await rule.check(self)

    def finish(self, chunk=None):
        if not self.body_read:
            # Answered before the body was read: Tornado hangs up after the
            # reply, so tell the client not to send more on this connection.
            self.set_header('Connection', 'close')
        return super().finish(chunk)

    def refuse(self, error):
        """Answer `error` now, before the body is read: it is dropped as it
        comes (at most a bound of it: see the class) and the request ends
        with it. Returns the flush of the reply."""
        self.refused = True
        self._error_message = error.message = shown(error.message,
                                                    MESSAGE_MAX)
        self._chunks = None
        length = self._declared
        self._linger = length if length is not None \
            and length <= self._limit else LINGER_MAX
        self._size = 0
        self.clear()
        self.set_header('Connection', 'close')
        self.set_status(error.status_code)
        data = json.dumps(dict(error.fields, error=error.message)).encode()
        self.set_header('Content-Length', len(data))
        self.write(data)
        if length == 0 or (length is None and 'chunked' not in
                            self.request.headers.get('Transfer-Encoding',
                                                     '').lower()):
            return self.finish()  # no body is coming
        return self.flush()

    def data_received(self, chunk):
        if self._finished:
            return None  # the connection closes
        self._size += len(chunk)
        if self.refused:
            if self._size > self._linger:
                self.finish()  # enough: hang up
            return None
        if self._size > self._limit:
            return self.refuse(TooLarge('body is over the limit of %d bytes'
                                        % self._limit))
        assert self._chunks is not None  # None only once refused
        self._chunks.append(chunk)
        return None

    def body_received(self):
        """The whole body is in: keep it as request.body, check its
        Content-MD5, parse it."""
        self.request.body = b''.join(self._chunks or ())
        self._chunks = []
        self.body_md5 = checked_md5(self.request.headers, self.request.body)
        _ = self.body  # parsed now: bad JSON is a 400 before the handler

    @property
    def body(self):
        """The request body as a JSON object, parsed once; empty means {}."""
        if self._body is None:
            self._body = parse_body(self.request.body)
        return self._body

    def field(self, name, kind, default=REQUIRED, check=None, body=None):
        """A body field of type `kind` (a type or tuple); 400 if missing or
        mistyped, or if `check(value)` is false. `body`: an object inside
        the body to read it from instead."""
        return get_field(self.body if body is None else body, name, kind,
                         default, check)

    @property
    def via_proxy(self):
        """True if the request came through a `trusted_proxies` balancer
        (its remote_ip is then the client it names: server/proxy.py)."""
        context = getattr(self.request.connection, 'context', None)
        return getattr(getattr(context, 'address', None), 'proxy',
                       None) is not None

    def token(self):
        return credential(self.request.headers)

    def write_json(self, obj, status=200):
        self.set_status(status)
        self.finish(b'{}' if not obj and type(obj) is dict
                    else json.dumps(obj))

    def send_error(self, status_code=500, **kwargs):
        """A store that is down (unreachable, paused past the timeout,
        loading, read-only) is a 503 the client may retry, not a 500."""
        exc = kwargs.get('exc_info', (None, None, None))[1]
        if isinstance(exc, store.DOWN):
            status_code = 503
        elif store.full(exc):
            status_code = 507
        super().send_error(status_code, **kwargs)

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get('exc_info', (None, None, None))[1]
        _, reason, headers, fields = error_reply(
            exc if exc is not None else HTTPError(status_code),
            self._reason)
        for name, value in headers.items():
            self.set_header(name, value)
        if status_code == 503:
            self.set_header('Retry-After', str(RETRY_AFTER_S))
        self._error_message = reason
        self.set_header('Content-Type', 'application/json; charset=UTF-8')
        self.finish(json.dumps(dict(fields, error=reason)))

    def log_exception(self, typ, value, tb):
        if isinstance(value, HTTPError):
            return  # an expected refusal; log_request reports it
        if isinstance(value, store.DOWN):  # one line, no traceback
            app_log.warning('%s %s: store down: %s',
                            shown(self.request.method, 16),
                            shown(self.request.path), value)
            return
        if store.full(value):
            app_log.error('%s %s: store full (maxmemory): %s',
                          shown(self.request.method, 16),
                          shown(self.request.path), shown(str(value)))
            return
        app_log.error('uncaught exception in %s %s',
                      shown(self.request.method, 16),
                      shown(self.request.path), exc_info=(typ, value, tb))


class NotFoundHandler(APIHandler):
    async def prepare(self):
        # The path is not quoted: the request log shows it already.
        raise APIError(404, 'no such endpoint for %s at this path'
                        % shown(self.request.method, 16))


class HealthHandler(APIHandler):
    """GET /: 200 while this server and its Redis answer, else a 503 that
    says the store is down (bounded by the Redis timeouts)."""

    @allow('anyone')
    async def get(self) -> None:
        try:
            await self.redis.ping()
        except store.DOWN as e:
            raise APIError(503, 'store down: redis is not reachable (%s)'
                           % (str(e) or type(e).__name__)) from e
        self.write_json({'name': self.config.name,
                         'kind': self.config.kind,
                         'store': 'up', 'time': time.time()})
