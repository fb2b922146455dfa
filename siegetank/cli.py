"""`siegetank`: the manager's command line over siegetank.client.

    siegetank --cc cc.example.org:443 --ca ca.pem login --email me@lab.org
    siegetank targets create system.xml integrator.xml \\
        --engine-version 8.6 --steps-per-frame 50000 --stage public
    siegetank streams add TARGET_ID state0.xml state1.xml
    siegetank streams download STREAM_ID -o traj.xtc
    siegetank sync TARGET_ID ala/          # only what grew, resumable

`login` keeps the CC address, CA bundle and token in a user config file
(mode 0600): $SIEGETANK_CONFIG, else $XDG_CONFIG_HOME/siegetank/config.json,
else ~/.config/siegetank/config.json. Errors are one line on stderr with the
server's message; the exit code is 1 (2 for bad usage).
"""
import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from siegetank import files as wire
from siegetank.client import Client, Progress, SiegetankError


class UsageError(Exception):
    pass


def config_path() -> str:
    if os.environ.get('SIEGETANK_CONFIG'):
        return os.environ['SIEGETANK_CONFIG']
    base = os.environ.get('XDG_CONFIG_HOME') or os.path.join(
        os.path.expanduser('~'), '.config')
    return os.path.join(base, 'siegetank', 'config.json')


def load_config() -> dict[str, Any]:
    try:
        with open(config_path()) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UsageError('cannot read %s: %s' % (config_path(), e)) from e


def save_config(conf: dict[str, Any]) -> None:
    """Write the config readable by the user only (it holds a token)."""
    path = config_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    wire.write_json(path, conf, mode=0o600)


def client(args: argparse.Namespace, need_token: bool = True) -> Client:
    conf = load_config()
    cc = args.cc or conf.get('cc')
    if not cc:
        raise UsageError('no command center: pass --cc HOST:PORT or run '
                         '`siegetank --cc HOST:PORT login` first')
    ca = args.ca or (conf.get('ca') if cc == conf.get('cc') else None)
    token = conf.get('token') if cc == conf.get('cc') else None
    if need_token and not token:
        raise UsageError('not logged in to %s: run `siegetank login` first'
                         % cc)
    return Client(cc, token=token, ca=ca)


def out(args: argparse.Namespace, data: Any, text: str | None = None
        ) -> None:
    if args.json or text is None:
        print(json.dumps(data, indent=1, sort_keys=True))
    else:
        print(text)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str],
          rule: bool = False) -> str:
    """Rows under headers in left-aligned columns (a line of dashes under
    the headers with `rule`)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    fmt = '  '.join('%%-%ds' % w for w in widths)
    lines = [fmt % tuple(headers)]
    if rule:
        lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines + [fmt % tuple(r) for r in cells])


def parse_json(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError('%s is not valid JSON: %s' % (what, e)) from e
    if not isinstance(value, dict):
        raise UsageError('%s must be a JSON object' % what)
    return value


def read_files(paths: Iterable[str]) -> dict[str, bytes]:
    try:
        return wire.read_for_upload(paths)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e


# -- commands -----------------------------------------------------------------
def cmd_login(args: argparse.Namespace) -> None:
    conf = load_config()
    cc = args.cc or conf.get('cc')
    if not cc:
        raise UsageError('pass --cc HOST:PORT to log in')
    ca = args.ca or (conf.get('ca') if cc == conf.get('cc') else None)
    c = Client(cc, ca=ca)
    if args.token:
        c.token = args.token
        c.verify_token()
    else:
        if not args.email:
            raise UsageError('pass --email (or --token)')
        password = args.password or os.environ.get('SIEGETANK_PASSWORD') \
            or getpass.getpass('password for %s: ' % args.email)
        c.generate_token(args.email, password)
    save_config({'cc': cc, 'ca': os.path.abspath(ca) if ca else None,
                 'token': c.token, 'email': args.email})
    print('logged in to %s (token saved in %s)' % (cc, config_path()))


def cmd_logout(args: argparse.Namespace) -> None:
    conf = load_config()
    conf.pop('token', None)
    save_config(conf)
    print('logged out')


def cmd_account(args: argparse.Namespace) -> None:
    c = client(args, need_token=False)
    if args.kind == 'manager':
        token = c.create_manager(args.email, args.password, args.role,
                                 args.weight)
    else:
        token = c.create_donor(args.username, args.password, args.email)
    out(args, {'token': token}, token)


def _state(ws: dict[str, Any], offline: str = 'offline') -> str:
    return ('online' if ws.get('online') else offline) \
        + (', draining' if ws.get('draining') else '')


def cmd_ws_status(args: argparse.Namespace) -> None:
    status = client(args, need_token=False).workserver_status()
    out(args, status, table(
        [(n, '%s:%s' % (s.get('url'), s.get('http_port')), _state(s))
         for n, s in sorted(status.items())], ('workserver', 'address',
                                               'status')))


def cmd_ws_drain(args: argparse.Namespace) -> None:
    client(args).drain_workserver(args.name, not args.undo)
    print('%s: %s' % (args.name, 'no longer draining' if args.undo else
                      'draining: no new work; stop or remove it once its '
                      'active count in `siegetank status` is 0'))


def _ago(t: float | None) -> str:
    if t is None:
        return 'never'
    s = max(0.0, time.time() - t)
    return '%d s ago' % s if s < 90 else '%d min ago' % (s / 60)


def status_text(st: dict[str, Any]) -> str:
    """The figures of /status (those of the dashboard) as tables."""
    ws = st['workservers']
    admin = any('detail' in w for w in ws.values())
    head = ['workserver', 'state', 'last seen', 'idle', 'active', 'stopped',
            'disk free MB']
    rows = []
    for name, w in sorted(ws.items()):
        row = [name, _state(w, 'OFFLINE'),
               _ago(w['last_seen']), w['streams']['ok'],
               w['streams']['active'], w['streams']['stopped'],
               '-' if w['disk_free_mb'] is None
               else '%.0f' % w['disk_free_mb']]
        if admin:
            d = w['detail']
            row += ['%s:%s' % (d['url'], d['http_port']), d['fails'],
                    d['frames_last_hour'], d['errors_last_hour'],
                    d['sessions_recorded']]
        rows.append(row)
    if admin:
        head += ['address', 'fails', 'frames 1h', 'errors 1h', 'sessions']
    s, pm = st['streams'], st['per_minute']
    totals = [('streams', s['total']), ('idle', s['idle']),
              ('active', s['active']), ('stopped', s['stopped']),
              ('cores active', st['cores_active']),
              ('frames, last hour', sum(st['history']['frames'])),
              ('last minute: assignments', pm['assignments']),
              ('last minute: no work (503)', pm['no_work']),
              ('last minute: frames', pm['frames']),
              ('last minute: errors', pm['errors'])]
    parts = [table(rows, head), '', table(totals, ('fleet', 'now'))]
    if st['targets']:
        parts += ['', table([(c.get('description') or '-', t, c['queued'],
                              c['active']) for t, c in
                             sorted(st['targets'].items())],
                            ('public target', 'id', 'queued', 'active'))]
    return '\n'.join(parts)


def cmd_status(args: argparse.Namespace) -> None:
    st = client(args, need_token=False).status()
    out(args, st, status_text(st))


def cmd_donor_stats(args: argparse.Namespace) -> None:
    st = client(args, need_token=False).donor_stats(args.username)
    out(args, st, table([(args.username, st['frames'], st['sessions'],
                          st['targets'], _ago(st['last_seen']))],
                        ('donor', 'frames', 'sessions', 'targets',
                         'last seen')))


def cmd_top_donors(args: argparse.Namespace) -> None:
    donors = client(args, need_token=False).top_donors(args.top)
    out(args, donors, table([(i + 1, d['username'], d['frames'],
                              d['sessions']) for i, d in enumerate(donors)],
                            ('#', 'donor', 'frames', 'sessions')))


def cmd_target_stats(args: argparse.Namespace) -> None:
    st = client(args).target_stats(args.target)
    rows = [(k, st[k]) for k in ('frames', 'sessions', 'active_cores',
                                 'donors', 'frames_last_24h')]
    rows += [('ended by ' + r, n) for r, n in
             sorted(st['by_end_reason'].items())]
    out(args, st, table(rows, (args.target, '')))


def cmd_keys_create(args: argparse.Namespace) -> None:
    made = client(args).create_core_key(args.engine, args.description)
    out(args, made, 'core key %s for %s (shown only now):\n%s'
        % (made['key_id'], args.engine, made['key']))


def cmd_keys_list(args: argparse.Namespace) -> None:
    found = client(args).core_keys()
    out(args, found, table(
        [(k, v['engine'], v['description'], _date(v['creation_date']),
          _date(v['last_used'])) for k, v in sorted(found.items())],
        ('key id', 'engine', 'description', 'created', 'last used')))


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    c = client(args)
    for key_id in args.key_ids:
        c.revoke_core_key(key_id)
        print('revoked %s' % key_id)


def _date(t: float | None) -> str:
    if t is None:
        return 'never'
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))


def cmd_targets_list(args: argparse.Namespace) -> None:
    c = client(args, need_token=False)
    ids = c.target_ids()
    if args.json:
        return out(args, ids)
    rows = []
    for tid in ids:
        info = c.load_target(tid).info()
        rows.append((tid, info.get('stage'), info.get('engine'),
                     ','.join(info.get('engine_versions') or []),
                     info.get('description', '')))
    print(table(rows, ('target', 'stage', 'engine', 'versions',
                       'description')))


def cmd_targets_info(args: argparse.Namespace) -> None:
    info = client(args, need_token=False).load_target(args.target).info()
    out(args, info, '\n'.join('%-16s %s' % (k, json.dumps(v) if isinstance(
        v, (dict, list)) else v) for k, v in sorted(info.items())))


def cmd_targets_create(args: argparse.Namespace) -> None:
    options = parse_json(args.options, '--options') if args.options else {}
    if args.steps_per_frame is not None:
        options['steps_per_frame'] = args.steps_per_frame
    t = client(args).add_target(
        options=options, engine=args.engine,
        engine_versions=args.engine_version, description=args.description,
        stage=args.stage, files=read_files(args.files),
        allowed_ws=args.allowed_ws, weight=args.weight)
    out(args, {'target_id': t.id}, t.id)


def cmd_targets_update(args: argparse.Namespace) -> None:
    fields = {}
    for key in ('stage', 'description', 'weight', 'allowed_ws'):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.engine_version is not None:
        fields['engine_versions'] = args.engine_version
    if args.options is not None:
        fields['options'] = parse_json(args.options, '--options')
    if not fields:
        raise UsageError('nothing to update: give at least one field')
    client(args).load_target(args.target).update(**fields)
    print('updated %s' % args.target)


def cmd_targets_delete(args: argparse.Namespace) -> None:
    c = client(args)
    for tid in args.targets:
        c.load_target(tid).delete()
        print('deleted %s' % tid)


def cmd_targets_download(args: argparse.Namespace) -> None:
    path = args.output or args.filename
    data = client(args).load_target(args.target).download(args.filename,
                                                          path)
    print('%s: %d bytes' % (path, len(data)))


def cmd_streams_list(args: argparse.Namespace) -> None:
    target = client(args).load_target(args.target)
    info = target.stream_info()
    if target.unreachable:
        print('siegetank: warning: workservers not answering, their streams '
              'are missing: %s' % ', '.join(target.unreachable),
              file=sys.stderr)
    out(args, info, table(
        [(sid, s.get('status'), s.get('frames'), s.get('error_count'),
          'yes' if s.get('active') else 'no', format_tags(s.get('tags')))
         for sid, s in sorted(info.items())],
        ('stream', 'status', 'frames', 'errors', 'active', 'tags')))


def format_tags(tags: dict[str, str] | None) -> str:
    return ','.join('%s=%s' % kv for kv in sorted((tags or {}).items()))


def parse_tags(pairs: Iterable[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs or ():
        name, eq, value = pair.partition('=')
        if not eq or not name:
            raise UsageError('--tag takes NAME=VALUE, not %r' % pair)
        tags[name] = value
    return tags


def cmd_streams_add(args: argparse.Namespace) -> None:
    c = client(args)
    target = c.load_target(args.target)
    tags = parse_tags(args.tag)
    ids = []
    for path in args.files:
        files = read_files([path])
        if args.name:
            files = {args.name: next(iter(files.values()))}
        ids.append(target.add_stream(files, tags))
        if not args.json:
            print(ids[-1])
    if args.json:
        out(args, ids)


def cmd_streams_info(args: argparse.Namespace) -> None:
    info = client(args).stream(args.stream).info()
    if not args.json:
        info['tags'] = format_tags(info.get('tags'))
    out(args, info, '\n'.join('%-14s %s' % kv for kv in sorted(info.items())))


def _each_stream(action: str, verb: str
                 ) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        c = client(args)
        for sid in args.streams:
            getattr(c.stream(sid), action)()
            print('%s %s' % (verb, sid))
    return run


def cmd_streams_download(args: argparse.Namespace) -> None:
    path = args.output or args.filename
    size = client(args).stream(args.stream).download(
        args.filename, path, resume=not args.no_resume,
        progress=not args.quiet)
    print('%s: %d bytes' % (path, size))


def cmd_sync(args: argparse.Namespace) -> None:
    target = client(args).load_target(args.target)
    bar = None if args.quiet else Progress('sync %s' % args.target[:8])

    def on_stream(i: int, n: int, sid: str) -> None:
        if bar:
            bar.label = 'sync %s: stream %d/%d' % (args.target[:8], i + 1, n)
    result = target.sync(args.folder, args.file or ('frames.xtc',),
                         progress=bar.update if bar else None,
                         on_stream=on_stream)
    if bar:
        bar.label = 'sync %s' % args.target[:8]
        bar.close()
    out(args, {'bytes': result['bytes'], 'grown': result['grown']},
        '%s: %d of %d streams grew, %d bytes received' % (
            args.folder, len(result['grown']), len(result['streams']),
            result['bytes']))


# -- parser -------------------------------------------------------------------
def _group(sub: Any, name: str, help: str, dest: str | None = None,
           metavar: str = 'ACTION') -> Any:
    """`siegetank NAME ACTION ...`: a command whose actions follow it."""
    group = sub.add_parser(name, help=help).add_subparsers(
        dest=dest or name + '_command', metavar=metavar)
    group.required = True
    return group


def _command(sub: Any, name: str, help: str,
             func: Callable[[argparse.Namespace], None],
             *positional: str) -> argparse.ArgumentParser:
    """A command (or action) that runs `func`, with these positional
    arguments; options are added to what it returns."""
    p = sub.add_parser(name, help=help)
    for arg in positional:
        p.add_argument(arg)
    p.set_defaults(func=func)
    return p


def _add_account_commands(sub: Any) -> None:
    acc = _group(sub, 'account', 'create accounts', dest='kind',
                 metavar='KIND')
    s = _command(acc, 'manager', 'create a manager or admin (needs an admin '
                 'login, or the CC host for the first admin)', cmd_account)
    s.add_argument('--email', required=True)
    s.add_argument('--password', required=True)
    s.add_argument('--role', choices=('manager', 'admin'), default='manager')
    s.add_argument('--weight', type=float)
    s = _command(acc, 'donor', 'create a donor', cmd_account)
    for option in ('--username', '--password', '--email'):
        s.add_argument(option, required=True)


def _add_fleet_commands(sub: Any) -> None:
    ws = _group(sub, 'ws', 'workservers')
    _command(ws, 'status', 'workservers and whether they are online',
             cmd_ws_status)
    _command(ws, 'drain', 'stop giving a workserver new work (admin); its '
             'running cores go on', cmd_ws_drain, 'name').add_argument(
        '--undo', action='store_true', help='give it work again')
    _command(sub, 'status', 'the fleet: workservers, streams, cores, '
             'per-minute figures (admin: per-WS detail)', cmd_status)
    dn = _group(sub, 'donors', 'donor stats')
    _command(dn, 'stats', 'a donor\'s frames and sessions', cmd_donor_stats,
             'username')
    _command(dn, 'top', 'the donors with the most frames',
             cmd_top_donors).add_argument('-n', '--top', type=int,
                                          default=10)
    ks = _group(sub, 'keys', 'core keys (admin)')
    _command(ks, 'create', 'a new core key for an engine', cmd_keys_create,
             'engine').add_argument('--description', default='')
    _command(ks, 'list', 'the live core keys', cmd_keys_list)
    _command(ks, 'revoke', 'revoke core keys: their cores get 401 and must '
             'be updated', cmd_keys_revoke).add_argument(
        'key_ids', nargs='+', metavar='KEY_ID')


def _add_target_commands(sub: Any) -> None:
    tg = _group(sub, 'targets', 'targets')
    _command(tg, 'list', 'your targets (public ones when logged out)',
             cmd_targets_list)
    _command(tg, 'info', 'a target\'s details', cmd_targets_info, 'target')
    s = _command(tg, 'create', 'create a target from files (each sent as '
                 'NAME.gz.b64, e.g. system.xml, integrator.xml)',
                 cmd_targets_create)
    s.add_argument('files', nargs='*', metavar='FILE')
    s.add_argument('--engine', default='openmm')
    s.add_argument('--engine-version', action='append', required=True,
                   help='repeat for several')
    s.add_argument('--options', help='JSON object of engine options')
    s.add_argument('--steps-per-frame', type=int)
    s.add_argument('--stage', choices=('private', 'beta', 'public'),
                   default='private')
    s.add_argument('--description', default='')
    s.add_argument('--allowed-ws', nargs='+', metavar='WS')
    s.add_argument('--weight', type=float)
    s = _command(tg, 'update', 'change fields of a target',
                 cmd_targets_update, 'target')
    s.add_argument('--stage', choices=('private', 'beta', 'public'))
    s.add_argument('--description')
    s.add_argument('--options', help='JSON object (replaces the options)')
    s.add_argument('--engine-version', action='append')
    s.add_argument('--allowed-ws', nargs='+', metavar='WS')
    s.add_argument('--weight', type=float)
    _command(tg, 'delete', 'delete targets and all their streams',
             cmd_targets_delete).add_argument('targets', nargs='+',
                                              metavar='TARGET')
    _command(tg, 'stats', 'a target\'s frames, sessions, donors, active '
             'cores', cmd_target_stats, 'target')
    _command(tg, 'download', 'download a target file', cmd_targets_download,
             'target', 'filename').add_argument('-o', '--output')


def _add_stream_commands(sub: Any) -> None:
    st = _group(sub, 'streams', 'streams')
    _command(st, 'list', 'a target\'s streams', cmd_streams_list, 'target')
    s = _command(st, 'add', 'add one stream per FILE (e.g. a state.xml, sent '
                 'as state.xml.gz.b64)', cmd_streams_add, 'target')
    s.add_argument('files', nargs='+', metavar='FILE')
    s.add_argument('--name', help='send each file under this wire name')
    s.add_argument('--tag', action='append', metavar='NAME=VALUE',
                   help='a provenance tag of each stream (repeatable)')
    _command(st, 'info', 'a stream\'s status and frames', cmd_streams_info,
             'stream')
    for action, verb in (('start', 'started'), ('stop', 'stopped'),
                         ('delete', 'deleted')):
        _command(st, action, '%s streams' % action,
                 _each_stream(action, verb)).add_argument(
            'streams', nargs='+', metavar='STREAM')
    s = _command(st, 'download', 'download a stream\'s committed frames '
                 '(resumes a partial file)', cmd_streams_download, 'stream')
    s.add_argument('filename', nargs='?', default='frames.xtc')
    s.add_argument('-o', '--output')
    s.add_argument('--no-resume', action='store_true',
                   help='download everything again')
    s.add_argument('-q', '--quiet', action='store_true',
                   help='no progress bar')
    s = _command(sub, 'sync', 'bring a folder up to the committed frames of '
                 'every stream of a target (only new bytes move; an '
                 'interrupted sync resumes)', cmd_sync, 'target', 'folder')
    s.add_argument('--file', action='append', metavar='NAME',
                   help='frame file of each stream (default frames.xtc; '
                   'repeatable)')
    s.add_argument('-q', '--quiet', action='store_true',
                   help='no progress bar')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='siegetank', description=__doc__.split(
        '\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cc', help='command center host:port (saved by login)')
    p.add_argument('--ca', help='CA bundle to verify the servers against '
                   '(saved by login; default: the system store)')
    p.add_argument('--json', action='store_true', help='print raw JSON')
    sub = p.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    s = _command(sub, 'login', 'log in and save the token', cmd_login)
    s.add_argument('--email')
    s.add_argument('--password', help='(default: $SIEGETANK_PASSWORD or a '
                   'prompt)')
    s.add_argument('--token', help='use an existing token instead')
    _command(sub, 'logout', 'forget the saved token', cmd_logout)
    _add_account_commands(sub)
    _add_fleet_commands(sub)
    _add_target_commands(sub)
    _add_stream_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        print('siegetank: %s' % e, file=sys.stderr)
        return 2
    except SiegetankError as e:
        print('siegetank: %s' % e, file=sys.stderr)
        return 1
    except OSError as e:
        print('siegetank: %s' % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('siegetank: interrupted', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
