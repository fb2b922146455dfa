"""Manager client of a Siegetank command center, over `requests`.

    import siegetank
    c = siegetank.Client('cc.example.org:443', ca='ca.pem')
    c.generate_token('me@example.org', 'secret')
    t = c.add_target(options={'steps_per_frame': 50000}, engine='openmm',
                     engine_versions=['8.6'], files={...}, stage='public')
    sid = t.add_stream({'state.xml.gz.b64': open('state.xml', 'rb').read()},
                       tags={'parent': 'none'})
    c.stream(sid).download('frames.xtc', 'traj.xtc')   # resumable
    t.sync('ala/')          # every stream, only what grew (siegetank.sync)

The 2014 module-level API (`login`, `generate_token`, `add_target`,
`load_target`, `get_targets`, `workserver_status`, ...) keeps working on top
of a default Client (see the end of this file).

TLS is always verified: against the CA bundle given (`ca=`), else the
system's store. `verify=` is passed on every request and the session ignores
the environment, so REQUESTS_CA_BUNDLE cannot silently swap the trust
anchor.
"""
import os
import sys
import time
import zlib
from typing import Any
from urllib.parse import quote

import requests

from siegetank import files as wire
from siegetank import sync as syncing
from siegetank.errors import SiegetankError
from siegetank.errors import why as _why

DEFAULT_TIMEOUT = 60
RETRIES = 3     # tries again of a 503 or a connection not made
MAX_WAIT = 30   # s, the longest wait before one of them
IDEMPOTENT = ('GET', 'HEAD', 'PUT', 'DELETE')


def _base_url(cc):
    cc = cc.rstrip('/')
    return cc if cc.startswith('https://') else 'https://' + cc


class Progress:
    """A one-line progress bar on stderr: redrawn in place on a terminal,
    one final line otherwise."""

    def __init__(self, label, total=None, done=0, stream=None):
        self.label = label
        self.total = total
        self.done = done
        self.start_done = done
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, 'isatty', lambda: False)()
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, n):
        self.done += n
        now = time.monotonic()
        if self.tty and now - self.last > 0.1:
            self.last = now
            self._draw('\r')

    def _draw(self, start, end=''):
        rate = (self.done - self.start_done) / max(
            1e-6, time.monotonic() - self.started)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = '#' * int(frac * 30)
            text = '%s [%-30s] %5.1f%% %s/%s %s/s' % (
                self.label, bar, 100 * frac, _size(self.done),
                _size(self.total), _size(rate))
        else:
            text = '%s %s %s/s' % (self.label, _size(self.done), _size(rate))
        self.stream.write(start + text + end)
        self.stream.flush()

    def close(self):
        self._draw('\r' if self.tty else '', '\n')


def _size(n):
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return ('%d %s' if unit == 'B' else '%.1f %s') % (n, unit)
        n /= 1024.0


class Client:
    """A session with one command center. `cc` is 'host:port' (or an
    https:// URL); `ca` the CA bundle to verify it (and the workservers it
    redirects downloads to) against; `token` a manager token."""

    def __init__(self, cc, token=None, ca=None, timeout=DEFAULT_TIMEOUT,
                 retries=RETRIES, max_wait=MAX_WAIT):
        self.cc = cc
        self.retries = retries
        self.max_wait = max_wait
        self.sleep = time.sleep
        self.url = _base_url(cc)
        self.token = token
        if ca is not None and not os.path.isfile(ca):
            raise SiegetankError('CA bundle %s does not exist' % ca)
        self.verify = os.path.abspath(ca) if ca else True
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE must not win

    # -- plumbing ---------------------------------------------------------
    def request(self, method, path, body=None, auth=True, stream=False,
                headers=None, ok=(200,)):
        """The reply of one request; SiegetankError unless its status is in
        `ok`. A 503 (the server did nothing: its store is away, or a
        balancer has no CC up) and a connection that could not be made are
        tried again, up to `retries` times, after what Retry-After says
        (else 1, 2, 4... s), never more than `max_wait` s at a time; a
        connection lost after the request went out only for idempotent
        methods (a POST may have been done)."""
        headers = dict(headers or {})
        if auth and self.token:
            headers['Authorization'] = self.token
        if body is None and method in ('PUT', 'POST'):
            body = {}
        for attempt in range(self.retries + 1):
            try:
                reply = self.session.request(
                    method, self.url + path, json=body, headers=headers,
                    verify=self.verify, timeout=self.timeout, stream=stream)
            except requests.RequestException as e:
                message, retry = _failure(self.cc, e, method)
                if not retry or attempt == self.retries:
                    raise SiegetankError(message) from e
                self.sleep(min(2 ** attempt, self.max_wait))
                continue
            if reply.status_code == 503 and attempt < self.retries:
                wait = _retry_after(reply, 2 ** attempt)
                reply.close()
                self.sleep(min(wait, self.max_wait))
                continue
            break
        if reply.status_code not in ok:
            message = _error_of(reply)
            reply.close()
            raise SiegetankError('%s %s: %s' % (method, path, message),
                                 reply.status_code)
        return reply

    def json(self, method, path, body=None, auth=True):
        reply = self.request(method, path, body, auth)
        try:
            return reply.json() if reply.content else {}
        except ValueError:
            raise SiegetankError('%s %s: the reply is not JSON'
                                 % (method, path)) from None

    def get(self, path):
        return self.json('GET', path)

    def put(self, path, body=None):
        return self.json('PUT', path, body)

    def post(self, path, body=None):
        return self.json('POST', path, body)

    # -- accounts ---------------------------------------------------------
    def create_manager(self, email, password, role='manager', weight=None):
        """Create a manager (or admin) account; returns its token. Needs an
        admin token, or no token from the CC's own host (bootstrap)."""
        body = {'email': email, 'password': password, 'role': role}
        if weight is not None:
            body['weight'] = weight
        return self.post('/managers', body)['token']

    def create_donor(self, username, password, email):
        """Create a donor account; returns its token."""
        return self.post('/donors', {'username': username,
                                     'password': password,
                                     'email': email})['token']

    def generate_token(self, email, password):
        """Log in as a manager: a new token (the old one stops working),
        kept on this client and returned."""
        self.token = self.json('POST', '/managers/auth',
                               {'email': email, 'password': password},
                               auth=False)['token']
        return self.token

    def donor_token(self, username, password):
        return self.json('POST', '/donors/auth', {'username': username,
                                                  'password': password},
                         auth=False)['token']

    # -- command center ---------------------------------------------------
    def workserver_status(self):
        """{ws_name: {url, http_port, online, draining}}"""
        return self.json('GET', '/ws/status', auth=False)

    def drain_workserver(self, name, drain=True):
        """(admin) Put a WS in drain (no new streams nor activations; its
        running cores go on) or, with drain=False, take it out."""
        self.put('/ws/drain/' + quote(name, safe=''), {'drain': drain})

    # -- fleet and stats (API.md, second round) --------------------------
    def status(self):
        """The fleet from /status (with an admin token, per-WS detail)."""
        return self.json('GET', '/status')

    def donor_stats(self, username):
        """{frames, sessions, last_seen, targets} of a donor."""
        return self.json('GET', '/donors/stats/' + username, auth=False)

    def top_donors(self, n=10):
        """[{username, frames, sessions}], best first (n <= 1000)."""
        return self.json('GET', '/stats/donors?top=%d' % n,
                         auth=False)['donors']

    def target_stats(self, target_id):
        """{frames, sessions, active_cores, donors, frames_last_24h,
        by_end_reason} of one of your targets."""
        return self.json('GET', '/targets/stats/' + target_id)

    def create_core_key(self, engine, description='', limits=None):
        """(admin) A new core key for `engine`: {key, key_id}; the key is
        shown only this once. `limits` ({held, per_minute}): its cores
        count as one client with these assignment limits."""
        body = {'engine': engine, 'description': description}
        if limits is not None:
            body['limits'] = limits
        return self.post('/engines/keys', body)

    def core_keys(self):
        """(admin) {key_id: {engine, description, creation_date,
        last_used}} of the live core keys."""
        return self.get('/engines/keys')

    def revoke_core_key(self, key_id):
        """(admin) Cores with that key get 401 from now on."""
        self.put('/engines/keys/delete/' + key_id)

    def get_targets(self):
        """Your targets (all public/beta ones without a token), as Target
        objects."""
        return [Target(self, t) for t in self.target_ids()]

    def target_ids(self):
        return self.get('/targets')['targets']

    def add_target(self, options, engine='openmm', engine_versions=(),
                   description='', stage='private', files=None,
                   allowed_ws=None, weight=None):
        """Create a target; `files` maps wire names (e.g.
        'system.xml.gz.b64') to raw bytes, encoded here. Returns a Target."""
        if isinstance(engine_versions, str):
            engine_versions = [engine_versions]
        body = {'description': description, 'engine': engine,
                'engine_versions': list(engine_versions),
                'options': options or {}, 'stage': stage}
        if files:
            body['files'] = wire.encode_files(files)
        if allowed_ws:
            body['allowed_ws'] = list(allowed_ws)
        if weight is not None:
            body['weight'] = weight
        return Target(self, self.post('/targets', body)['target_id'])

    def load_target(self, target_id):
        return Target(self, target_id)

    def stream(self, stream_id):
        return Stream(self, stream_id)

    load_stream = stream

    def verify_token(self):
        """Raise SiegetankError unless the token is accepted."""
        self.get('/targets')


def _failure(cc, error, method):
    """(message, retryable) for a request that got no reply: a
    certificate that does not verify, a port that does not speak TLS and a
    name that does not resolve are final; a connection refused, timed out
    or closed during the handshake (a balancer with no CC up) is not."""
    why = _why(error)
    text = repr(error)
    if isinstance(error, requests.exceptions.SSLError):
        if 'CERTIFICATE_VERIFY_FAILED' in text or 'match' in text:
            return ('TLS verification of %s failed (%s): give the right CA '
                    'bundle' % (cc, why)), False
        if 'WRONG_VERSION_NUMBER' in text or 'record layer' in text:
            return ('%s does not speak TLS (%s): is it the HTTPS port of a '
                    'command center?' % (cc, why)), False
        return ('%s closed the connection during the TLS handshake (%s): '
                'no command center answers behind it' % (cc, why)), True
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return ('no answer from %s (connect timed out): unreachable, or '
                'a firewall drops the connection' % cc), True
    if isinstance(error, requests.exceptions.ConnectionError):
        if 'refused' in text:
            return ('no command center answers at %s (connection refused): '
                    'is it running, and is that its address and port?'
                    % cc), True
        if 'resolve' in text or 'Name or service' in text:
            return 'cannot resolve %s (%s)' % (cc, why), False
        if 'NewConnectionError' in text:
            return 'cannot reach %s: %s' % (cc, why), True
    # Reset or closed: a balancer with no CC up, or a CC that stopped.
    return ('%s closed the connection (%s): no command center answered '
            'the request' % (cc, why), method in IDEMPOTENT)


def _retry_after(reply, default):
    try:
        return max(0, int(reply.headers.get('Retry-After', '')))
    except ValueError:
        return default


def _error_of(reply):
    try:
        return '%d %s' % (reply.status_code, reply.json()['error'])
    except (ValueError, KeyError, TypeError):
        text = (reply.text or '').strip().splitlines()
        return '%d %s' % (reply.status_code,
                          text[0][:200] if text else reply.reason)


class Remote:
    """What a target and a stream share: an id, and an info dict read from
    the CC at `INFO_PATH` + id."""

    INFO_PATH = ''
    client: Client
    _id: str
    _info: Any  # the info dict, None until read

    @property
    def id(self):
        return self._id

    def reload_info(self):
        self._info = self.client.get(self.INFO_PATH + self._id)
        return self._info

    def info(self):
        """Fresh info dict."""
        return self.reload_info()


def info_fields(*names):
    """Class decorator: a read-only attribute per field of the object's
    info (read through its `_field`)."""
    def decorate(cls):
        for name in names:
            def get(self, name=name):
                return self._field(name)
            setattr(cls, name, property(get, doc='`%s` of the info' % name))
        return cls
    return decorate


@info_fields('description', 'owner', 'creation_date', 'stage', 'allowed_ws',
             'striated_ws', 'engine', 'engine_versions', 'files', 'options',
             'weight')
class Target(Remote):
    """A target on the CC. Info fields load lazily and are cached; call
    `reload_info()` to refresh."""

    INFO_PATH = '/targets/info/'

    def __init__(self, client, target_id):
        self.client = client
        self._id = target_id
        self._info = None
        self.unreachable = []

    def __repr__(self):
        return '<target %s>' % self._id

    def __eq__(self, other):
        return isinstance(other, Target) and other._id == self._id

    def __hash__(self):
        return hash(self._id)

    def _field(self, name):
        if self._info is None:
            self.reload_info()
        return self._info.get(name)

    def update(self, **fields):
        """Change any of stage, allowed_ws, engine_versions, description,
        options, weight."""
        self.client.put('/targets/update/' + self._id, fields)
        self._info = None

    def delete(self):
        """Delete the target, its files and all its streams."""
        self.client.put('/targets/delete/' + self._id)

    def add_stream(self, files, tags=None):
        """Add a stream from {wire name: raw bytes}, with optional `tags`
        {str: str} (provenance, at most 4 KB); returns its id."""
        if not isinstance(files, dict):
            raise TypeError('files must be a dict of name -> bytes')
        body = {'target_id': self._id, 'files': wire.encode_files(files)}
        if tags:
            body['tags'] = dict(tags)
        return self.client.post('/streams', body)['stream_id']

    def delete_stream(self, stream_id):
        self.client.put('/streams/delete/' + stream_id)

    def sync(self, folder, filenames=('frames.xtc',), progress=None,
             on_stream=None):
        """Bring `folder` up to the committed frames of every stream: one
        listing call, then Range requests for the new bytes of the streams
        that grew (see siegetank.sync). Returns {bytes, grown, streams}."""
        return syncing.sync_target(self, folder, filenames, progress,
                                   on_stream)

    def stream_info(self):
        """{stream_id: {status, frames, error_count, active, tags, ws}} over
        every workserver holding the target's streams. Workservers that did
        not answer are listed in `self.unreachable` (their streams are
        missing)."""
        reply = self.client.request('GET', '/targets/streams/' + self._id)
        header = reply.headers.get('X-Unreachable-Workservers', '')
        self.unreachable = [w for w in header.split(',') if w]
        try:
            gathered = reply.json()
        except ValueError:
            raise SiegetankError('GET /targets/streams: the reply is not '
                                 'JSON') from None
        out = {}
        for ws, streams in gathered.items():
            for sid, info in streams.items():
                out[sid] = dict(info, ws=ws)
        return out

    @property
    def streams(self):
        """The target's streams (Stream objects, info preloaded)."""
        return [Stream(self.client, sid, info)
                for sid, info in sorted(self.stream_info().items())]

    def download(self, filename, path=None):
        """A target file's bytes (decoded from its `.b64`/`.gz.b64`
        transport form); written to `path` when given."""
        data = self.client.request(
            'GET', '/targets/%s/%s' % (self._id, filename)).content
        if filename.endswith('.b64'):
            try:
                data = wire.decode(filename, data)
            except (ValueError, OSError, zlib.error):
                pass  # served decoded already
        if path:
            with open(path, 'wb') as f:
                f.write(data)
        return data


@info_fields('frames', 'status', 'error_count', 'active', 'target_id',
             'creation_date', 'tags')
class Stream(Remote):
    """A stream (one trajectory). Info (status, frames, error_count, active)
    loads lazily; `reload_info()` refreshes it."""

    INFO_PATH = '/streams/info/'

    def __init__(self, client, stream_id, info=None):
        self.client = client
        self._id = stream_id
        self._info = dict(info) if info else None

    def __repr__(self):
        return '<stream %s>' % self._id

    @property
    def ws_name(self):
        return self._id.split(':', 1)[1] if ':' in self._id else None

    def _field(self, name):
        if self._info is None or name not in self._info:
            self.reload_info()
        return self._info.get(name)

    def sync(self, folder, filenames=('frames.xtc',), progress=None):
        """Bring `folder` up to this stream's committed frames, fetching
        only new bytes (see siegetank.sync); returns the bytes received."""
        return syncing.sync_stream(self, folder, filenames,
                                   progress=progress)

    def start(self):
        self.client.put('/streams/start/' + self._id)
        self._info = None

    def stop(self):
        self.client.put('/streams/stop/' + self._id)
        self._info = None

    def delete(self):
        self.client.put('/streams/delete/' + self._id)

    def download(self, filename='frames.xtc', path=None, resume=True,
                 progress=False, chunk_size=1 << 16):
        """Download the committed frames of `filename` to `path` (default:
        the file name) in constant memory. With `resume` and an existing
        `path`, only the bytes after its size are fetched (Range), so calling
        again later appends just the new frames. `progress`: True for a bar
        on stderr, or a callable(bytes_done, bytes_total). Returns the size
        of `path`."""
        path = path or filename
        have = os.path.getsize(path) if resume and os.path.exists(path) \
            else 0
        headers = {'Range': 'bytes=%d-' % have} if have else {}
        reply = self.client.request(
            'GET', '/streams/%s/%s' % (self._id, filename), stream=True,
            headers=headers, ok=(200, 206, 416))
        try:
            if reply.status_code == 416:      # nothing after what we have
                total = reply.headers.get('Content-Range', '').rpartition(
                    '/')[2]
                if total.isdigit() and int(total) < have:
                    raise SiegetankError(
                        '%s is larger (%d bytes) than %s on the server (%s '
                        'bytes): not a partial download of it' % (
                            path, have, filename, total))
                return have
            if reply.status_code == 200:      # whole file: start over
                have = 0
            length = reply.headers.get('Content-Length')
            total = have + int(length) if length is not None else None
            bar = None
            if progress is True:
                bar = Progress(self._id[:8] + ' ' + filename, total, have)
            with open(path, 'ab' if have else 'wb') as f:
                done = have
                for chunk in reply.iter_content(chunk_size):
                    f.write(chunk)
                    done += len(chunk)
                    if bar:
                        bar.update(len(chunk))
                    elif callable(progress):
                        progress(done, total)
            if bar:
                bar.close()
        except requests.RequestException as e:
            raise SiegetankError('download of %s interrupted (%s); run it '
                                 'again to resume'
                                 % (filename, _why(e))) from e
        finally:
            reply.close()
        return os.path.getsize(path)


# -- the 2014 module-level API, on a default client -------------------------
_default = None


def _client(cc_uri=None):
    if cc_uri is not None and (_default is None or _default.cc != cc_uri):
        return Client(cc_uri, ca=_default.verify if _default and isinstance(
            _default.verify, str) else None)
    if _default is None:
        raise SiegetankError('You are not logged in to a cc!')
    return _default


def login(cc, token, ca=None):
    """Use `token` with the CC at `cc` for the module-level calls; the token
    is checked."""
    global _default
    client = Client(cc, token, ca)
    client.verify_token()
    _default = client
    return client


def generate_token(cc, email, password, ca=None):
    """Log in with email/password; returns the new token."""
    global _default
    client = Client(cc, ca=ca)
    token = client.generate_token(email, password)
    _default = client
    return token


def add_target(options, engine, engine_versions, cc_uri=None, description='',
               stage='private', files=None, allowed_ws=None, weight=None):
    return _client(cc_uri).add_target(options, engine, engine_versions,
                                      description, stage, files, allowed_ws,
                                      weight)


def load_target(target_id, cc_uri=None):
    return Target(_client(cc_uri), target_id)


def load_stream(stream_id, cc_uri=None):
    return Stream(_client(cc_uri), stream_id)


def get_targets(cc_uri=None):
    return _client(cc_uri).get_targets()


def workserver_status(cc_uri=None):
    return _client(cc_uri).workserver_status()
