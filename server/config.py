"""Load and validate a server's .conf file (a Python file) plus CLI overrides
into a typed, frozen `Settings`.

A bad configuration must stop the server at start with one line naming the
key and the file, never half-start it: every key is declared here, once, as
a field of `Settings` with its type, default and the kinds of server it
applies to; unknown keys are refused so a typo cannot silently fall back to
a default. Attribute names carry their unit (`_in_s`, `_in_ms`, `_in_mb`,
`_in_bytes`); the product card's .conf keys that lack one
(`heartbeat_increment`, `max_body_size`, ...) stay accepted under their old
name (`Settings.old_keys()`, docs/settings.md).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import ipaddress
import os
import re
import runpy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from server import store

KINDS = ('cc', 'ws')
CC = ('cc',)
WS = ('ws',)


class _Required:
    def __repr__(self) -> str:
        return 'REQUIRED'


REQUIRED: Any = _Required()


class ConfigError(Exception):
    """One clear line saying which key of which file is wrong."""


# A DNS name or an IPv4 address: what may stand before ':port' in a URL.
_HOST = re.compile(r'(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
                   r'(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?')
_PORT = re.compile(r'[0-9]{1,5}')


def is_host(text: object) -> bool:
    return isinstance(text, str) and bool(_HOST.fullmatch(text))


def port_number(value: object) -> int | None:
    """The port an int or a string of ASCII digits stands for, or None."""
    if isinstance(value, str) and _PORT.fullmatch(value):
        value = int(value)
    if type(value) is int and 0 < value < 65536:
        return value
    return None


Checker = Callable[[Any, str], Any]


def _redis_options(value: Any, where: str) -> dict[str, Any]:
    allowed = {'port': int, 'requirepass': str, 'appendfilename': str,
               'logfile': str, 'binary': str, 'bind': str,
               'unixsocket': str}
    if not isinstance(value, dict):
        raise ConfigError('%s: redis_options must be a dict' % where)
    for k, v in value.items():
        if k not in allowed:
            raise ConfigError('%s: unknown key redis_options[%r]' % (where, k))
        if not isinstance(v, allowed[k]) or isinstance(v, bool):
            raise ConfigError('%s: redis_options[%r] must be %s'
                              % (where, k, allowed[k].__name__))
    return value


def _external_options(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {'external_url',
                                                     'external_http_port'}:
        raise ConfigError("%s: external_options must be a dict with exactly "
                          "'external_url' and 'external_http_port'" % where)
    port = port_number(value['external_http_port'])
    if port is None:
        raise ConfigError("%s: external_options['external_http_port'] must be"
                          " a port number" % where)
    if not is_host(value['external_url']):
        raise ConfigError("%s: external_options['external_url'] must be a "
                          "host name or IPv4 address (no scheme, no port)"
                          % where)
    return {'external_url': value['external_url'],
            'external_http_port': port}


def _command_centers(value: Any, where: str) -> dict[str, dict[str, str]]:
    if not isinstance(value, dict):
        raise ConfigError('%s: command_centers must be a dict' % where)
    for name, cc in value.items():
        if (not isinstance(cc, dict) or set(cc) != {'url', 'pass'}
                or not all(isinstance(v, str) for v in cc.values())):
            raise ConfigError("%s: command_centers[%r] must be {'url': "
                              "'host:port', 'pass': str}" % (where, name))
    return value


def _networks(value: Any, where: str,
              key: str = 'metrics_allow') -> list[str]:
    """A list of networks ('10.0.0.0/8', '2001:db8::/32', '192.0.2.7')."""
    if not isinstance(value, list):
        raise ConfigError('%s: %s must be a list of networks' % (where, key))
    for n in value:
        try:
            ipaddress.ip_network(n, strict=False)
        except (TypeError, ValueError):
            raise ConfigError('%s: %s: %r is not a network'
                              % (where, key, n)) from None
    return value


def _proxies(value: Any, where: str) -> list[str]:
    return _networks(value, where, 'trusted_proxies')


def _flush(value: Any, where: str) -> str:
    if value not in ('fsync', 'syncfs'):
        raise ConfigError('%s: checkpoint_flush must be "fsync" or "syncfs"'
                          % where)
    return str(value)


def _key(default: Any = REQUIRED, *, kinds: Sequence[str] = KINDS,
         check: Checker | None = None, path: bool = False,
         old: str | None = None, unset: Any = None) -> Any:
    """One setting: its .conf default (REQUIRED: none), the server kinds
    that take it, a checker beyond its annotated type, whether it is a path
    (resolved against the conf folder), the .conf key it had before its
    unit entered its name, and its value on a kind that does not take it
    (a required key's placeholder)."""
    meta = {'default': default, 'kinds': tuple(kinds), 'check': check,
            'path': path, 'old': old}
    placeholder = unset if default is REQUIRED or set(kinds) != set(KINDS) \
        else default
    if isinstance(placeholder, (dict, list)):
        value = placeholder
        return field(default_factory=lambda: type(value)(value),
                     metadata=meta)
    return field(default=placeholder, metadata=meta)


MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """A server's validated settings; `kind` says which of the fields
    marked for one kind only mean anything (the others hold defaults)."""

    config_file: str = ''
    kind: str = ''

    # -- both kinds
    name: str = _key(unset='')
    internal_http_port: int = _key(unset=0)
    ssl_certfile: str = _key(path=True, unset='')
    ssl_key: str = _key(path=True, unset='')
    ssl_ca_certs: str = _key(path=True, unset='')
    redis_options: dict[str, Any] | None = _key(None, check=_redis_options)
    redis_url: str | None = _key(None)
    # Bounds of every Redis connection and command, hot path included: a
    # paused or dead Redis is a 503 after this long, never a hang.
    redis_connect_timeout_in_s: float = _key(2.0)
    redis_timeout_in_s: float = _key(5.0)
    data_folder: str = _key('data', path=True)
    num_processes: int = _key(1)
    # Bodies (413 above, refused before they are read): endpoints that
    # carry target/stream files (WS POST /streams, CC POST /targets and
    # /streams) take max_body_size_in_bytes, every other endpoint but the
    # core's frames and checkpoints (WS keys) max_small_body_size_in_bytes.
    max_body_size_in_bytes: int = _key(64 * MB, old='max_body_size')
    max_small_body_size_in_bytes: int = _key(16 * 1024,
                                             old='max_small_body_size')
    # What `.gz`/`.b64` files may decode to, per file and per request.
    max_decoded_file_size_in_bytes: int = _key(128 * MB,
                                               old='max_decoded_file_size')
    max_decoded_request_size_in_bytes: int = _key(
        256 * MB, old='max_decoded_request_size')
    max_files_per_request: int = _key(64)
    # Slow clients: a request's headers (or the wait for the next request
    # on a kept-alive connection) and its body must arrive within these.
    header_timeout_in_s: float = _key(60.0)
    body_timeout_in_s: float = _key(300.0)
    # And a body must progress (as Apache's mod_reqtimeout MinRate): after
    # body_grace_in_s, at least this many bytes a second on average, else
    # the connection is cut (0: no minimum rate).
    body_grace_in_s: float = _key(20.0)
    min_body_rate_in_bytes_per_s: float = _key(500.0)
    # Load balancers whose PROXY protocol header (v1/v2) or, when they
    # terminate TLS, X-Forwarded-For names the client (server/proxy.py).
    trusted_proxies: list[str] = _key([], check=_proxies)
    # Hosts the dev certificate is issued for when it has to be generated.
    dev_cert_hosts: list[str] = _key(['localhost', '127.0.0.1'])
    log_level: str = _key('info')
    # Address the HTTPS port listens on ('' = every interface).
    bind_address: str = _key('')
    # Who may read /metrics besides loopback (monitor.py).
    metrics_allow: list[str] = _key([], check=_networks)

    # -- command center
    cc_pass: str = _key(kinds=CC, unset='')
    max_ws_fails: int = _key(3, kinds=CC, unset=3)
    allow_loopback_bootstrap: bool = _key(True, kinds=CC, unset=False)
    ws_probe_interval_in_ms: int = _key(5000, kinds=CC, unset=5000)
    ws_timeout_in_s: float = _key(10.0, kinds=CC, unset=10.0)
    signed_url_lifetime_in_s: int = _key(3600, kinds=CC, unset=3600)
    max_files_per_target: int = _key(64, kinds=CC, unset=64)
    max_streams_per_target: int = _key(100000, kinds=CC, unset=100000)
    # Bytes of target files (as sent) a manager may keep in the hub store,
    # and all managers together: 507 past them (targets.py).
    max_target_files_per_manager_in_bytes: int = _key(
        1024 * MB, kinds=CC, unset=1024 * MB)
    max_target_files_total_in_bytes: int = _key(
        8 * 1024 * MB, kinds=CC, unset=8 * 1024 * MB)
    # How often each WS's streams are compared with the CC's map.
    reconcile_interval_in_s: float = _key(300.0, kinds=CC, unset=300.0)
    # Periodic jobs (probes, deletion replays) run in the one CC process
    # holding this Redis lease; another takes it over within a lease.
    jobs_lease_in_ms: int = _key(3000, kinds=CC, unset=3000)
    # Account, target and stream records are acknowledged once this many
    # replicas have them (WAIT); None in the .conf: 1 with Sentinel, else
    # 0 (no WAIT).
    redis_wait_replicas: int = _key(None, kinds=CC, unset=0)
    redis_wait_timeout_in_ms: int = _key(1000, kinds=CC, unset=1000)
    # Abuse controls of /core/assign, per client (a core key with limits,
    # else donor, else address): streams held at once (a hold ends with
    # its session, at the latest after client_hold_max_in_s; one whose
    # session the WS does not name after client_hold_in_s), and per minute.
    client_max_held_streams: int = _key(32, kinds=CC, unset=32)
    client_hold_in_s: int = _key(420, kinds=CC, unset=420)
    client_hold_max_in_s: int = _key(86400, kinds=CC, unset=86400)
    client_assigns_per_minute: int = _key(120, kinds=CC, unset=120)
    # Failed logins allowed per account and per address in a window.
    login_fails_per_account: int = _key(10, kinds=CC, unset=10)
    login_fails_per_address: int = _key(100, kinds=CC, unset=100)
    login_fail_window_in_s: int = _key(900, kinds=CC, unset=900)
    # POST /core/assign needs a core key (corekeys.py); off: 2014 cores.
    require_core_keys: bool = _key(False, kinds=CC, unset=False)
    # How often the CC pulls sessions and counts from each WS (collect.py).
    stats_interval_in_ms: int = _key(5000, kinds=CC, unset=5000)
    # A session record a WS reports with more frames counts for nobody.
    max_frames_per_session: int = _key(1000000, kinds=CC, unset=1000000)

    # -- workserver
    external_options: dict[str, Any] = _key(kinds=WS, check=_external_options,
                                            unset={})
    command_centers: dict[str, dict[str, str]] = _key(
        kinds=WS, check=_command_centers, unset={})
    heartbeat_increment_in_s: int = _key(900, kinds=WS, unset=900,
                                         old='heartbeat_increment')
    # The period of the WS's pulse to its command centers.
    pulse_interval_in_ms: int = _key(1000, kinds=WS, unset=1000,
                                     old='pulse_frequency_in_ms')
    max_stream_fails: int = _key(10, kinds=WS, unset=10)
    min_free_disk_in_mb: int = _key(512, kinds=WS, unset=512)
    # How a checkpoint's flushes are made (ws/storage.py, disk.GroupSync):
    # "fsync", each file and folder, by the checkpoint's disk thread;
    # "syncfs", the data folder's whole filesystem in one call shared by
    # the checkpoints due together (a group commit: fewer calls,
    # but it writes back every dirty page there, the WS Redis's AOF too:
    # only where the data folder has a filesystem of its own).
    checkpoint_flush: str = _key('fsync', kinds=WS, unset='fsync',
                                 check=_flush)
    # An anonymous client's error stop (ws/error_stops.py) keeps the stream
    # out of its queue this long, doubled for each one since the stream's
    # last checkpoint, at most max_error_backoff_in_s.
    error_backoff_in_s: int = _key(60, kinds=WS, unset=60)
    max_error_backoff_in_s: int = _key(3600, kinds=WS, unset=3600)
    # Byte budgets, in decoded bytes (docs/limits.md): the frames buffered
    # by one activation between checkpoints, one checkpoint's state files,
    # and a stream's committed total (frames and states of every chunk).
    # A real core stays far below: a 10,000-atom XTC frame is ~40 KB and
    # the reference core checkpoints every 60 s; a state.xml is a few MB.
    max_buffer_size_in_bytes: int = _key(1024 * MB, kinds=WS, unset=0)
    max_checkpoint_size_in_bytes: int = _key(256 * MB, kinds=WS, unset=0)
    max_stream_size_in_bytes: int = _key(64 * 1024 * MB, kinds=WS, unset=0)
    register_retry_max_in_s: float = _key(60.0, kinds=WS, unset=60.0)
    max_frame_body_size_in_bytes: int = _key(32 * MB, kinds=WS,
                                             unset=32 * MB,
                                             old='max_frame_body_size')
    max_checkpoint_body_size_in_bytes: int = _key(
        64 * MB, kinds=WS, unset=64 * MB, old='max_checkpoint_body_size')
    max_frames_per_request: int = _key(100000, kinds=WS, unset=100000)
    # Characters of a core's error text kept (its tail).
    max_error_length_in_chars: int = _key(16 * 1024, kinds=WS,
                                          unset=16 * 1024,
                                          old='max_error_length')
    max_errors_log_size_in_bytes: int = _key(MB, kinds=WS, unset=MB,
                                             old='max_errors_log_size')
    # Early windows (capped at heartbeat_increment_in_s): a token must
    # reach /core/start within the first, then send a heartbeat or a frame
    # within the second, else its stream goes back into the queue.
    core_start_window_in_s: int = _key(120, kinds=WS, unset=120)
    first_heartbeat_window_in_s: int = _key(300, kinds=WS, unset=300)

    def applies(self, attr: str) -> bool:
        """True if the setting `attr` is one this server's kind takes."""
        f = _FIELDS.get(attr)
        return f is not None and self.kind in f.metadata['kinds']

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (attribute names), unchecked: for tests
        that turn one knob of a running app."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def old_keys() -> dict[str, str]:
        """{.conf key without its unit: attribute} (both are accepted)."""
        return {f.metadata['old']: f.name for f in _FIELDS.values()
                if f.metadata['old']}

    @staticmethod
    def keys(kind: str) -> list[str]:
        """The attribute names a `kind` server's .conf may set."""
        return [name for name, f in _FIELDS.items()
                if kind in f.metadata['kinds']]


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)
           if 'kinds' in f.metadata}
_TYPES = get_type_hints(Settings)

# The cc_pass the shipped confs fall back to: fine on one machine, refused
# on a server that others can reach (see check_dev_pass).
DEV_CC_PASS = 'dev-only-change-me'

# A target file is one Redis value: at most proto-max-bulk-len (512 MB).
CC_MAX_BODY = 512 * 1024 * 1024


def _check(key: str, value: Any, f: dataclasses.Field[Any], where: str,
           folder: str) -> Any:
    """`value` given for the setting `f` under the .conf name `key`,
    checked (and a path resolved)."""
    meta = f.metadata
    typ = _TYPES[f.name]
    nullable = type(None) in get_args(typ)
    if value is None and (nullable or meta['default'] is None):
        return None
    if meta['check'] is not None:
        return meta['check'](value, where)
    if meta['path']:
        if not isinstance(value, str):
            raise ConfigError('%s: %s must be a path (str)' % (where, key))
        return os.path.normpath(os.path.join(folder, value))
    kind = get_origin(typ) or typ
    if nullable:
        kind = next(a for a in get_args(typ) if a is not type(None))
        kind = get_origin(kind) or kind
    if kind is float and isinstance(value, int) \
            and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError('%s: %s must be %s, got %r'
                          % (where, key, kind.__name__, value))
    return value


def _parse_override(text: str, where: str) -> tuple[str, Any]:
    if not text.startswith('--') or '=' not in text:
        raise ConfigError('%s: override %r must look like --key=value'
                          % (where, text))
    key, raw = text[2:].split('=', 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return key.replace('-', '_'), value


def read_values(path: str) -> dict[str, Any]:
    """The settings a .conf file assigns, unchecked (no private names,
    functions or modules)."""
    raw = runpy.run_path(path)
    return {k: v for k, v in raw.items()
            if not k.startswith('_') and not callable(v)
            and type(v).__name__ != 'module'}


def _by_attribute(raw: dict[str, Any], kind: str,
                  path: str) -> dict[str, tuple[str, Any]]:
    """{attribute: (.conf key as written, value)}; an unknown key, or one
    setting given under both its names, is an error."""
    old = Settings.old_keys()
    allowed = set(Settings.keys(kind))
    given: dict[str, tuple[str, Any]] = {}
    for key, value in raw.items():
        attr = old.get(key, key)
        if attr not in allowed:
            raise ConfigError('%s: unknown key %s' % (path, key))
        if attr in given:
            raise ConfigError('%s: %s and %s are one setting: set one'
                              % (path, given[attr][0], key))
        given[attr] = (key, value)
    return given


def load(path: str, kind: str, overrides: Iterable[str] = ()) -> Settings:
    """Return the validated settings of `path` for `kind` ('cc' or 'ws')."""
    if kind not in KINDS:
        raise ValueError('kind must be one of %s' % (KINDS,))
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError('%s: no such config file' % path)
    try:
        raw = read_values(path)
    except Exception as e:
        raise ConfigError('%s: cannot be read: %s: %s'
                          % (path, type(e).__name__, e)) from None
    for item in overrides:
        key, value = _parse_override(item, path)
        # An override replaces the setting under either of its names.
        attr = Settings.old_keys().get(key, key)
        for other in [k for k in raw
                      if Settings.old_keys().get(k, k) == attr]:
            del raw[other]
        raw[key] = value
    folder = os.path.dirname(path)
    given = _by_attribute(raw, kind, path)
    values: dict[str, Any] = {'config_file': path, 'kind': kind}
    names: dict[str, str] = {}  # attribute: the key the .conf used
    for attr in Settings.keys(kind):
        f = _FIELDS[attr]
        default = f.metadata['default']
        names[attr] = given[attr][0] if attr in given else attr
        if attr in given:
            values[attr] = _check(names[attr], given[attr][1], f, path,
                                  folder)
        elif default is REQUIRED:
            raise ConfigError('%s: missing required key %s' % (path, attr))
        elif f.metadata['path'] and default is not None:
            values[attr] = os.path.join(folder, default)
        else:
            values[attr] = copy.deepcopy(default)
    if values['redis_options'] is None and values['redis_url'] is None:
        raise ConfigError('%s: set redis_options (embedded Redis) or '
                          'redis_url (existing Redis)' % path)
    if not re.fullmatch(r'[A-Za-z0-9._-]{1,64}', values['name']):
        raise ConfigError('%s: name must be 1-64 of [A-Za-z0-9._-] (it ends '
                          'stream ids)' % path)
    if values['num_processes'] < 1:
        raise ConfigError('%s: num_processes must be >= 1' % path)
    for attr, value in values.items():  # limits and timeouts
        if (attr.startswith('max_') or attr.endswith('_timeout_in_s')) \
                and not value > 0:
            raise ConfigError('%s: %s must be > 0' % (path, names[attr]))
    for attr in ('body_grace_in_s', 'min_body_rate_in_bytes_per_s'):
        if not values[attr] >= 0:
            raise ConfigError('%s: %s must be >= 0' % (path, names[attr]))
    _check_store(values, names, path)
    settings = Settings(**values)
    check_dev_pass(settings, path)
    return settings


def write(path: str, values: dict[str, Any],
          header: str | None = None) -> None:
    """Write `values` as a .conf file that `load` reads back (a comment
    line `header` first)."""
    with open(path, 'w') as f:
        if header:
            f.write('# %s\n' % header)
        for k, v in values.items():
            f.write('%s = %r\n' % (k, v))


def _check_store(values: dict[str, Any], names: dict[str, str],
                 path: str) -> None:
    """Sentinel (a `redis+sentinel://` redis_url) is for the CC's shared
    store; a WS's Redis is its own shard."""
    url = values['redis_url'] or ''
    sentinel = url.startswith(store.SENTINEL_SCHEME)
    if sentinel and values['kind'] != 'cc':
        raise ConfigError('%s: redis_url: Sentinel is supported for the '
                          'command center only' % path)
    if sentinel:
        try:
            store.parse_sentinel_url(url)
        except ValueError as e:
            raise ConfigError('%s: redis_url: %s' % (path, e)) from None
    if values['kind'] != 'cc':
        return
    if values['redis_wait_replicas'] is None:
        values['redis_wait_replicas'] = 1 if sentinel else 0
    if values['redis_wait_replicas'] < 0:
        raise ConfigError('%s: redis_wait_replicas must be >= 0' % path)
    if values['jobs_lease_in_ms'] < 300:
        raise ConfigError('%s: jobs_lease_in_ms must be >= 300' % path)
    if values['max_body_size_in_bytes'] > CC_MAX_BODY:
        raise ConfigError('%s: %s of a command center is at most %d (a '
                          'target file is one Redis value)'
                          % (path, names['max_body_size_in_bytes'],
                             CC_MAX_BODY))


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IP addresses."""
    if host.lower() in ('localhost', 'localhost.'):
        return True
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        return False


def check_dev_pass(settings: Settings, path: str) -> None:
    """The dev cc_pass only on a server nobody else can reach: a CC
    listening beyond loopback, or a WS telling cores a non-loopback
    address, refuses to start with it."""
    if settings.kind == 'cc':
        uses_dev = settings.cc_pass == DEV_CC_PASS
        public = not is_loopback_host(settings.bind_address or '0.0.0.0')
        where = 'bind_address %r' % (settings.bind_address or '')
    else:
        uses_dev = any(cc['pass'] == DEV_CC_PASS
                       for cc in settings.command_centers.values())
        host = settings.external_options['external_url']
        public = not (is_loopback_host(host) and is_loopback_host(
            settings.bind_address or '0.0.0.0'))
        where = 'external_url %r' % host
    if uses_dev and public:
        raise ConfigError(
            '%s: the dev cc_pass %r is refused with %s (reachable from '
            'other hosts): set SIEGETANK_CC_PASS to a secret, e.g. python -c '
            '"import secrets; print(secrets.token_hex(32))"'
            % (path, DEV_CC_PASS, where))


def parse_args(kind: str, argv: Sequence[str] | None = None) -> Settings:
    """Parse `--config PATH` and `--key=value` overrides; return settings."""
    parser = argparse.ArgumentParser(
        description='Siegetank %s' % ('command center' if kind == 'cc'
                                      else 'workserver'))
    parser.add_argument('--config', required=True, help='path to the .conf')
    args, rest = parser.parse_known_args(argv)
    return load(args.config, kind, rest)
