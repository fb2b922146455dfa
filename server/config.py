"""Load and validate a server's .conf file (a Python file) plus CLI overrides.

A bad configuration must stop the server at start with one line naming the
key and the file, never half-start it: every key is declared here with its
type, and unknown keys are refused so a typo cannot silently fall back to a
default.
"""
import argparse
import ast
import ipaddress
import os
import re
import runpy

from server import store

REQUIRED = object()


class ConfigError(Exception):
    """One clear line saying which key of which file is wrong."""


# A DNS name or an IPv4 address: what may stand before ':port' in a URL.
_HOST = re.compile(r'(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
                   r'(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?')
_PORT = re.compile(r'[0-9]{1,5}')


def is_host(text):
    return isinstance(text, str) and bool(_HOST.fullmatch(text))


def port_number(value):
    """The port an int or a string of ASCII digits stands for, or None."""
    if isinstance(value, str) and _PORT.fullmatch(value):
        value = int(value)
    if type(value) is int and 0 < value < 65536:
        return value
    return None


def _redis_options(value, where):
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


def _external_options(value, where):
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


def _command_centers(value, where):
    if not isinstance(value, dict):
        raise ConfigError('%s: command_centers must be a dict' % where)
    for name, cc in value.items():
        if (not isinstance(cc, dict) or set(cc) != {'url', 'pass'}
                or not all(isinstance(v, str) for v in cc.values())):
            raise ConfigError("%s: command_centers[%r] must be {'url': "
                              "'host:port', 'pass': str}" % (where, name))
    return value


def _networks(value, where, key='metrics_allow'):
    """A list of networks ('10.0.0.0/8', '2001:db8::/32', '192.0.2.7')."""
    if not isinstance(value, list):
        raise ConfigError('%s: %s must be a list of networks' % (where, key))
    for n in value:
        try:
            ipaddress.ip_network(n, strict=False)
        except (TypeError, ValueError):
            raise ConfigError('%s: %s: %r is not a network'
                              % (where, key, n))
    return value


def _proxies(value, where):
    return _networks(value, where, 'trusted_proxies')


# key: (type or checker, default). Paths are resolved against the conf folder.
COMMON = {
    'name': (str, REQUIRED),
    'internal_http_port': (int, REQUIRED),
    'ssl_certfile': ('path', REQUIRED),
    'ssl_key': ('path', REQUIRED),
    'ssl_ca_certs': ('path', REQUIRED),
    'redis_options': (_redis_options, None),
    'redis_url': (str, None),
    # Bounds of every Redis connection and command, hot path included: a
    # paused or dead Redis is a 503 after this long, never a hang.
    'redis_connect_timeout_in_s': (float, 2.0),
    'redis_timeout_in_s': (float, 5.0),
    'data_folder': ('path', 'data'),
    'num_processes': (int, 1),
    # Bodies (413 above, refused before they are read): endpoints that
    # carry target/stream files (WS POST /streams, CC POST /targets and
    # /streams) take max_body_size, every other endpoint but the core's
    # frames and checkpoints (WS keys) max_small_body_size.
    'max_body_size': (int, 64 * 1024 * 1024),
    'max_small_body_size': (int, 16 * 1024),
    # What `.gz`/`.b64` files may decode to, per file and per request.
    'max_decoded_file_size': (int, 128 * 1024 * 1024),
    'max_decoded_request_size': (int, 256 * 1024 * 1024),
    'max_files_per_request': (int, 64),
    # Slow clients: a request's headers (or the wait for the next request
    # on a kept-alive connection) and its body must arrive within these.
    'header_timeout_in_s': (float, 60.0),
    'body_timeout_in_s': (float, 300.0),
    # And a body must progress (as Apache's mod_reqtimeout MinRate): after
    # `body_grace_in_s`, at least this many bytes a second on average, else
    # the connection is cut (0: no minimum rate).
    'body_grace_in_s': (float, 20.0),
    'min_body_rate_in_bytes_per_s': (float, 500.0),
    # Hosts the dev certificate is issued for when it has to be generated.
    'dev_cert_hosts': (list, ['localhost', '127.0.0.1']),
    'log_level': (str, 'info'),
    # Address the HTTPS port listens on ('' = every interface).
    'bind_address': (str, ''),
    # Who may read /metrics besides loopback (monitor.py).
    'metrics_allow': (_networks, []),
    # Load balancers whose PROXY protocol header (v1/v2) or, when they
    # terminate TLS, X-Forwarded-For names the client (server/proxy.py).
    'trusted_proxies': (_proxies, []),
}

# The cc_pass the shipped confs fall back to: fine on one machine, refused
# on a server that others can reach (see check_dev_pass).
DEV_CC_PASS = 'dev-only-change-me'

CC = dict(COMMON, **{
    'cc_pass': (str, REQUIRED),
    'max_ws_fails': (int, 3),
    'allow_loopback_bootstrap': (bool, True),
    'ws_probe_interval_in_ms': (int, 5000),
    'ws_timeout_in_s': (float, 10.0),
    'signed_url_lifetime_in_s': (int, 3600),
    'max_files_per_target': (int, 64),
    'max_streams_per_target': (int, 100000),
    # Bytes of target files (as sent) a manager may keep in the hub store,
    # and all managers together: 507 past them (targets.py).
    'max_target_bytes_per_manager': (int, 1024 * 1024 * 1024),
    'max_target_bytes_total': (int, 8 * 1024 * 1024 * 1024),
    # How often each WS's streams are compared with the CC's map.
    'reconcile_interval_in_s': (float, 300.0),
    # Periodic jobs (probes, deletion replays) run in the one CC process
    # holding this Redis lease; another takes it over within a lease.
    'jobs_lease_in_ms': (int, 3000),
    # Account, target and stream records are acknowledged once this many
    # replicas have them (WAIT); default 1 with Sentinel, else 0 (no WAIT).
    'redis_wait_replicas': (int, None),
    'redis_wait_timeout_in_ms': (int, 1000),
    # Abuse controls of /core/assign, per client (a core key with limits,
    # else donor, else address): streams held at once (a hold ends with
    # its session, at the latest after client_hold_max_in_s; one whose
    # session the WS does not name after client_hold_in_s), and per minute.
    'client_max_held_streams': (int, 32),
    'client_hold_in_s': (int, 420),
    'client_hold_max_in_s': (int, 86400),
    'client_assigns_per_minute': (int, 120),
    # Failed logins allowed per account and per address in a window.
    'login_fails_per_account': (int, 10),
    'login_fails_per_address': (int, 100),
    'login_fail_window_in_s': (int, 900),
    # POST /core/assign needs a core key (corekeys.py); off: 2014 cores.
    'require_core_keys': (bool, False),
    # How often the CC pulls sessions and counts from each WS (collect.py).
    'stats_interval_in_ms': (int, 5000),
    # A session record a WS reports with more frames counts for nobody.
    'max_frames_per_session': (int, 1000000),
})

# A target file is one Redis value: at most proto-max-bulk-len (512 MB).
CC_MAX_BODY = 512 * 1024 * 1024

WS = dict(COMMON, **{
    'external_options': (_external_options, REQUIRED),
    'command_centers': (_command_centers, REQUIRED),
    'heartbeat_increment': (int, 900),
    'pulse_frequency_in_ms': (int, 1000),
    'max_stream_fails': (int, 10),
    'min_free_disk_in_mb': (int, 512),
    'register_retry_max_in_s': (float, 60.0),
    'max_frame_body_size': (int, 32 * 1024 * 1024),
    'max_checkpoint_body_size': (int, 64 * 1024 * 1024),
    'max_frames_per_request': (int, 100000),
    'max_error_length': (int, 16 * 1024),
    'max_errors_log_size': (int, 1024 * 1024),
    # Early windows (capped at heartbeat_increment): a token must reach
    # /core/start within the first, then send a heartbeat or a frame
    # within the second, else its stream goes back into the queue.
    'core_start_window_in_s': (int, 120),
    'first_heartbeat_window_in_s': (int, 300),
})

SCHEMAS = {'cc': CC, 'ws': WS}


def _check(key, value, kind, where, folder):
    if callable(kind) and not isinstance(kind, type):
        return kind(value, where)
    if kind == 'path':
        if not isinstance(value, str):
            raise ConfigError('%s: %s must be a path (str)' % (where, key))
        return os.path.normpath(os.path.join(folder, value))
    if kind is float and isinstance(value, int) \
            and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError('%s: %s must be %s, got %r'
                          % (where, key, kind.__name__, value))
    return value


def _parse_override(text, where):
    if not text.startswith('--') or '=' not in text:
        raise ConfigError('%s: override %r must look like --key=value'
                          % (where, text))
    key, raw = text[2:].split('=', 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return key.replace('-', '_'), value


def read_values(path):
    """The settings a .conf file assigns, unchecked (no private names,
    functions or modules)."""
    raw = runpy.run_path(path)
    return {k: v for k, v in raw.items()
            if not k.startswith('_') and not callable(v)
            and type(v).__name__ != 'module'}


def load(path, kind, overrides=()):
    """Return the validated settings of `path` for `kind` ('cc' or 'ws')."""
    schema = SCHEMAS[kind]
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError('%s: no such config file' % path)
    try:
        raw = read_values(path)
    except Exception as e:
        raise ConfigError('%s: cannot be read: %s: %s'
                          % (path, type(e).__name__, e))
    for item in overrides:
        key, value = _parse_override(item, path)
        raw[key] = value
    folder = os.path.dirname(path)
    settings = {'config_file': path, 'kind': kind}
    for key in raw:
        if key not in schema:
            raise ConfigError('%s: unknown key %s' % (path, key))
    for key, (typ, default) in schema.items():
        if key in raw and raw[key] is None and default is None:
            settings[key] = None
        elif key in raw:
            settings[key] = _check(key, raw[key], typ, path, folder)
        elif default is REQUIRED:
            raise ConfigError('%s: missing required key %s' % (path, key))
        elif typ == 'path' and default is not None:
            settings[key] = os.path.join(folder, default)
        else:
            settings[key] = default
    if settings['redis_options'] is None and settings['redis_url'] is None:
        raise ConfigError('%s: set redis_options (embedded Redis) or '
                          'redis_url (existing Redis)' % path)
    if not re.fullmatch(r'[A-Za-z0-9._-]{1,64}', settings['name']):
        raise ConfigError('%s: name must be 1-64 of [A-Za-z0-9._-] (it ends '
                          'stream ids)' % path)
    if settings['num_processes'] < 1:
        raise ConfigError('%s: num_processes must be >= 1' % path)
    for key, value in settings.items():  # limits and timeouts
        if (key.startswith('max_') or key.endswith('_timeout_in_s')) \
                and not value > 0:
            raise ConfigError('%s: %s must be > 0' % (path, key))
    for key in ('body_grace_in_s', 'min_body_rate_in_bytes_per_s'):
        if not settings[key] >= 0:
            raise ConfigError('%s: %s must be >= 0' % (path, key))
    _check_store(settings, path)
    check_dev_pass(settings, path)
    return settings


def write(path, values, header=None):
    """Write `values` as a .conf file that `load` reads back (a comment
    line `header` first)."""
    with open(path, 'w') as f:
        if header:
            f.write('# %s\n' % header)
        for k, v in values.items():
            f.write('%s = %r\n' % (k, v))


def _check_store(settings, path):
    """Sentinel (a `redis+sentinel://` redis_url) is for the CC's shared
    store; a WS's Redis is its own shard."""
    url = settings['redis_url'] or ''
    sentinel = url.startswith(store.SENTINEL_SCHEME)
    if sentinel and settings['kind'] != 'cc':
        raise ConfigError('%s: redis_url: Sentinel is supported for the '
                          'command center only' % path)
    if sentinel:
        try:
            store.parse_sentinel_url(url)
        except ValueError as e:
            raise ConfigError('%s: redis_url: %s' % (path, e))
    if settings['kind'] != 'cc':
        return
    if settings['redis_wait_replicas'] is None:
        settings['redis_wait_replicas'] = 1 if sentinel else 0
    if settings['redis_wait_replicas'] < 0:
        raise ConfigError('%s: redis_wait_replicas must be >= 0' % path)
    if settings['jobs_lease_in_ms'] < 300:
        raise ConfigError('%s: jobs_lease_in_ms must be >= 300' % path)
    if settings['max_body_size'] > CC_MAX_BODY:
        raise ConfigError('%s: max_body_size of a command center is at most '
                          '%d (a target file is one Redis value)'
                          % (path, CC_MAX_BODY))


def is_loopback_host(host):
    """True for localhost and loopback IP addresses."""
    if host.lower() in ('localhost', 'localhost.'):
        return True
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        return False


def check_dev_pass(settings, path):
    """The dev cc_pass only on a server nobody else can reach: a CC
    listening beyond loopback, or a WS telling cores a non-loopback
    address, refuses to start with it."""
    if settings['kind'] == 'cc':
        uses_dev = settings['cc_pass'] == DEV_CC_PASS
        public = not is_loopback_host(settings['bind_address'] or '0.0.0.0')
        where = 'bind_address %r' % (settings['bind_address'] or '')
    else:
        uses_dev = any(cc['pass'] == DEV_CC_PASS
                       for cc in settings['command_centers'].values())
        host = settings['external_options']['external_url']
        public = not (is_loopback_host(host) and is_loopback_host(
            settings['bind_address'] or '0.0.0.0'))
        where = 'external_url %r' % host
    if uses_dev and public:
        raise ConfigError(
            '%s: the dev cc_pass %r is refused with %s (reachable from '
            'other hosts): set SIEGETANK_CC_PASS to a secret, e.g. python -c '
            '"import secrets; print(secrets.token_hex(32))"'
            % (path, DEV_CC_PASS, where))


def parse_args(kind, argv=None):
    """Parse `--config PATH` and `--key=value` overrides; return settings."""
    parser = argparse.ArgumentParser(
        description='Siegetank %s' % ('command center' if kind == 'cc'
                                      else 'workserver'))
    parser.add_argument('--config', required=True, help='path to the .conf')
    args, rest = parser.parse_known_args(argv)
    return load(args.config, kind, rest)
