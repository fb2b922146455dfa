"""`make demo`: the whole system on one machine with real molecular
dynamics flowing through it.

1. writes confs for one CC and two WS under data/demo/ (the shipped cc.conf
   and ws.conf as the base; free ports, a fresh dev CA and certificates,
   embedded Redis) and starts them;
2. creates an admin (loopback bootstrap) and a donor, builds alanine
   dipeptide in water with OpenMM and makes it a public target with 4
   streams (different random velocities);
3. runs 3 OpenMM cores with a live display of committed frames per stream,
   SIGKILLs one (a replacement takes the fourth stream) and shows the dead
   core's stream expire and go back in the queue, then stops the cores
   (each checkpoints first);
4. downloads every stream's trajectory through the CC (redirected to its
   WS), checks each with mdtraj (frames = the WS's committed frames, time
   strictly increasing) and prints a summary;
5. shuts everything down and checks that no process is left.

`make demo-cluster` (`python -m tools.demo --cluster`) runs the same job
on two CC processes sharing one embedded Redis (data/demo-cluster/): the
target is created through one CC and its streams added through the other,
cores are sent through both, one CC is SIGKILLed mid-run (its jobs lease
passes to the other, new cores go through the other) and the job completes.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import requests

from server import config
from server.processes import alive
from siegetank.cli import table
from siegetank.client import SiegetankError
from tools.testing import ROOT, TimedOut, wait_for

CLUSTER = '--cluster' in sys.argv[1:]
RUN = os.path.join(ROOT, 'data', 'demo-cluster' if CLUSTER else 'demo')
CC_NAMES = ('cc-a', 'cc-b') if CLUSTER else ('cc',)
CORE_SECONDS = 60          # how long the cores run in total
KILL_AT = 20               # seconds into the run: one core is SIGKILLed
HEARTBEAT_INCREMENT = 10   # WS: a silent core's stream expires after this
STEPS_PER_FRAME = 50       # 0.1 ps per frame with 2 fs steps
STREAMS = 4
CORES = 3
DONORS = ('demo-donor', 'demo-donor-2')

T0 = time.monotonic()


def say(text):
    print('[%5.1fs] %s' % (time.monotonic() - T0, text), flush=True)


def base_conf(kind):
    """The shipped conf's values (paths are replaced by the demo)."""
    return config.read_values(os.path.join(ROOT, kind + '.conf'))


def write_conf(path, kind, values):
    config.write(path, values, 'Written by tools.demo from the shipped '
                 '%s.conf' % kind)


class Procs:
    """Every process the demo starts, each in its own process group, so
    nothing outlives the demo. Logs go to `folder`/<name>.log."""

    def __init__(self, folder=RUN):
        self.folder = folder
        self.all = []

    def start(self, name, argv, env=None):
        log = open(os.path.join(self.folder, name + '.log'), 'ab')
        p = subprocess.Popen(argv, cwd=ROOT, stdout=log,
                             env=dict(os.environ, **(env or {})),
                             stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        p.demo_name, p.demo_log = name, log
        self.all.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=60):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        p.demo_log.close()
        return p.returncode

    def stop_all(self):
        for p in reversed(self.all):
            if p.poll() is None:
                self.stop(p, timeout=30)


# A server still starting refuses or answers oddly: keep polling.
STARTING = (requests.RequestException, SiegetankError, OSError, ValueError)


def cc_address(conf):
    return '127.0.0.1:%d' % conf['internal_http_port']


def setup_servers(procs, ws_names=('firebat', 'marauder'), shared=None,
                  cc_settings=None):
    """Confs (under procs.folder), certificates, the CC (one per name in
    CC_NAMES, all on the Redis `shared` when given, an embedded Redis
    each otherwise; `cc_settings` over the shipped cc.conf) and the named
    WS; returns (address of the first CC,
    CA, confs of the CCs then the WS)."""
    from server import store, tls
    run = procs.folder
    certs = os.path.join(run, 'certs')
    ca = os.path.join(certs, 'ca.pem')
    for who in ('cc', 'ws'):
        tls.ensure_dev_certs(os.path.join(certs, who + '.pem'),
                             os.path.join(certs, who + '.key'), ca)
    cc_pass = os.urandom(16).hex()
    ccs = []
    for label in CC_NAMES:
        cc = base_conf('cc')
        cc.update(internal_http_port=store.free_port(),
                  redis_options={'port': store.free_port()},
                  data_folder=os.path.join(run, label),
                  ssl_certfile=os.path.join(certs, 'cc.pem'),
                  ssl_key=os.path.join(certs, 'cc.key'), ssl_ca_certs=ca,
                  cc_pass=cc_pass, ws_probe_interval_in_ms=1000,
                  stats_interval_in_ms=1000, num_processes=1)
        if shared is not None:
            cc.update(redis_url=shared.url, redis_options=None)
        cc.update(cc_settings or {})
        write_conf(os.path.join(run, label + '.conf'), 'cc', cc)
        ccs.append(cc)
    ws_confs = []
    for i, name in enumerate(ws_names):
        ws = base_conf('ws')
        port = store.free_port()
        ws.update(name=name, internal_http_port=port,
                  external_options={'external_url': '127.0.0.1',
                                    'external_http_port': port},
                  redis_options={'port': store.free_port(),
                                 'appendfilename': name + '.aof'},
                  data_folder=os.path.join(run, 'ws-' + name),
                  ssl_certfile=os.path.join(certs, 'ws.pem'),
                  ssl_key=os.path.join(certs, 'ws.key'), ssl_ca_certs=ca,
                  command_centers={ccs[0]['name']: {
                      'url': cc_address(ccs[i % len(ccs)]),
                      'pass': cc_pass}},
                  heartbeat_increment=HEARTBEAT_INCREMENT,
                  pulse_frequency_in_ms=500, min_free_disk_in_mb=64,
                  num_processes=1)
        write_conf(os.path.join(run, 'ws-%s.conf' % name), 'ws', ws)
        ws_confs.append(ws)

    from siegetank.client import Client
    for label, cc in zip(CC_NAMES, ccs, strict=True):
        address = cc_address(cc)
        anon = Client(address, ca=ca)
        procs.start(label, [sys.executable, 'cc.py', '--config',
                            os.path.join(run, label + '.conf')])
        wait_for(lambda anon=anon, address=address: anon.session.get(
            'https://%s/' % address, verify=ca, timeout=2).ok,
            'the command center', errors=STARTING, interval=0.1)
        say('command center %s up at https://%s (%s, dev CA %s)' % (
            label, address, 'Redis shared by every CC at %s' % shared.url
            if shared else 'embedded Redis on port %d'
            % cc['redis_options']['port'], os.path.relpath(ca, ROOT)))
    say('dashboard while the demo runs: https://%s/dashboard (the browser '
        'must trust %s; or run `siegetank --cc %s --ca %s status`)'
        % (cc_address(ccs[-1]), os.path.relpath(ca, ROOT),
           cc_address(ccs[-1]), os.path.relpath(ca, ROOT)))
    for ws in ws_confs:
        procs.start('ws-' + ws['name'],
                    [sys.executable, 'ws.py', '--config',
                     os.path.join(run, 'ws-%s.conf' % ws['name'])])
    status = wait_for(lambda: (lambda s: s if len(s) == len(ws_confs) and
                               all(w['online'] for w in s.values())
                               else None)(anon.workserver_status()),
                      'the workservers to register', errors=STARTING,
                      interval=0.1)
    say('workservers online: %s' % ', '.join(
        '%s at %s:%s (registered through %s)' % (
            n, s['url'], s['http_port'], CC_NAMES[i % len(CC_NAMES)])
        for i, (n, s) in enumerate(sorted(status.items()))))
    return cc_address(ccs[0]), ca, ccs + ws_confs


def start_core(procs, n, address, ca, donor, key):
    """An OpenMM core with the core key (from the environment, not argv);
    `donor` None runs it anonymously."""
    argv = [sys.executable, '-m', 'siegetank.core', '--cc', address,
            '--ca', ca, '--engine', 'openmm', '--platform', 'CPU',
            '--threads', '1', '--checkpoint-every', '5',
            '--heartbeat-every', '2']
    if donor:
        argv += ['--donor-token', donor]
    return procs.start('core%d' % n, argv, {'SIEGETANK_CORE_KEY': key})


def stream_of(core):
    """The stream a core process last said it works on (from its log)."""
    with open(os.path.join(RUN, core.demo_name + '.log')) as f:
        found = re.findall(r'working on stream (\S+)', f.read())
    return found[-1] if found else None


def show(target, labels):
    info = target.stream_info()
    cells = []
    for sid, label in labels.items():
        s = info.get(sid, {})
        cells.append('%s %4d%s' % (label, s.get('frames', 0),
                                   '*' if s.get('active') else ' '))
    say('  ' + ' | '.join(cells))
    return info


def run_cores(procs, target, labels, address, ca, donors, key):
    """3 cores on 4 streams (of donors[i], None = anonymous); one core is
    SIGKILLed and an anonymous replacement takes the stream nobody had,
    while the dead core's stream waits for its heartbeat to expire and
    goes back in the queue."""
    say('starting %d OpenMM cores (CPU platform, 1 thread each); committed '
        'frames per stream, * = a core is on it:' % CORES)
    cores = [start_core(procs, i + 1, address, ca, donors[i], key)
             for i in range(CORES)]
    started = time.monotonic()
    killed = victim = expired = None
    while time.monotonic() - started < CORE_SECONDS:
        time.sleep(3)
        info = show(target, labels)
        for c in cores:
            if c.poll() is not None and c is not killed:
                raise SystemExit('demo: %s exited with %s, see %s.log' % (
                    c.demo_name, c.returncode, c.demo_name))
        if killed is None and time.monotonic() - started >= KILL_AT:
            killed = cores[-1]
            victim = stream_of(killed)
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
            killed_at = time.monotonic()
            say('SIGKILLed %s while on stream %s (%d committed frames): no '
                'checkpoint, no /core/stop; the WS keeps %s active until it '
                'misses heartbeats for %d s' % (
                    killed.demo_name, labels.get(victim, victim),
                    info.get(victim, {}).get('frames', 0),
                    labels.get(victim, victim), HEARTBEAT_INCREMENT))
            spare = start_core(procs, CORES + 1, address, ca, None, key)
            cores.append(spare)
            wait_for(lambda spare=spare: stream_of(spare),
                     'the new core to start',
                     errors=STARTING, interval=0.1)
            say('started %s as a replacement: it got stream %s, the only '
                'one free' % (spare.demo_name,
                              labels.get(stream_of(spare))))
        elif killed is not None and expired is None and victim in info \
                and not info[victim]['active']:
            expired = time.monotonic()
            say('stream %s expired %.0f s after the kill: deactivated, its '
                'uncommitted frames dropped, back in the queue with its %d '
                'committed frames and last checkpoint for the next core' % (
                    labels[victim], expired - killed_at,
                    info[victim]['frames']))
    if expired is None:
        raise SystemExit('demo: the killed core\'s stream did not expire')
    say('stopping the cores with SIGTERM: each checkpoints, then calls '
        '/core/stop')
    for c in cores:
        if c is not killed:
            code = procs.stop(c)
            if code != 0:
                raise SystemExit('demo: %s exited with %s' % (c.demo_name,
                                                              code))
    show(target, labels)


def run_cluster_cores(procs, target, labels, addresses, ca, donor, key,
                      shared):
    """3 cores on 4 streams, two sent through cc-a and one through cc-b.
    cc-a is SIGKILLed mid-run: its cores keep working (they talk to their
    WS), the jobs lease passes to cc-b, and a fourth core gets the free
    stream through cc-b."""
    from server import lease, store
    from server.cc import keys
    redis = store.connect_sync(shared.url)
    ccs = {p.demo_name: p for p in procs.all if p.demo_name in CC_NAMES}

    def holder():
        return lease.holder(redis, keys.JOBS_LEASE,
                            {n: p.pid for n, p in ccs.items()})
    say('the jobs lease (WS probes, deletion replays) is held by %s'
        % wait_for(holder, 'a CC holding the jobs lease'))
    say('starting %d OpenMM cores, core1 and core2 through cc-a, core3 '
        'through cc-b; committed frames per stream, * = a core is on it:'
        % CORES)
    cores = [start_core(procs, i + 1, addresses[0 if i < 2 else 1], ca,
                        donor, key) for i in range(CORES)]
    wait_for(lambda: all(stream_of(c) for c in cores), 'the cores to start',
             errors=STARTING, interval=0.1)
    started = time.monotonic()
    killed = False
    while time.monotonic() - started < CORE_SECONDS:
        time.sleep(3)
        show(target, labels)
        for c in cores:
            if c.poll() is not None:
                raise SystemExit('demo: %s exited with %s, see %s.log' % (
                    c.demo_name, c.returncode, c.demo_name))
        if not killed and time.monotonic() - started >= KILL_AT:
            killed = True
            victim = ccs['cc-a']
            os.killpg(victim.pid, signal.SIGKILL)   # its workers too
            killed_at = time.monotonic()
            procs.stop(victim)
            say('SIGKILLed command center cc-a; core1 and core2, assigned '
                'through it, keep working with their WS')
            wait_for(lambda: holder() == 'cc-b', 'the lease to pass')
            say('the jobs lease passed to cc-b %.1f s after the kill'
                % (time.monotonic() - killed_at))
            spare = start_core(procs, CORES + 1, addresses[1], ca, donor,
                               key)
            cores.append(spare)
            wait_for(lambda spare=spare: stream_of(spare),
                     'the new core to start',
                     errors=STARTING, interval=0.1)
            say('started %s through cc-b: it got stream %s, the only one '
                'free' % (spare.demo_name, labels.get(stream_of(spare))))
    redis.close()
    say('stopping the cores with SIGTERM: each checkpoints, then calls '
        '/core/stop')
    for c in cores:
        code = procs.stop(c)
        if code != 0:
            raise SystemExit('demo: %s exited with %s' % (c.demo_name, code))
    show(target, labels)


def verify(client, target, labels, built, summary):
    import mdtraj
    import numpy as np
    folder = os.path.join(RUN, 'trajectories')
    os.makedirs(folder)
    info = target.stream_info()
    top = os.path.join(built, 'topology.pdb')
    rows, problems = [], []
    for sid, label in labels.items():
        path = os.path.join(folder, '%s.xtc' % label)
        size = client.stream(sid).download('frames.xtc', path)
        committed = info[sid]['frames']
        if committed == 0:
            read, t_end, increasing = 0, 0.0, None
            if size:
                problems.append('%s: bytes without frames' % label)
        else:
            traj = mdtraj.load(path, top=top)
            read = traj.n_frames
            t_end = float(traj.time[-1])
            increasing = bool(np.all(np.diff(traj.time) > 0))
            if not increasing:
                problems.append('%s: time not strictly increasing' % label)
            if abs(t_end - read * summary['ps_per_frame']) > 1e-3:
                problems.append('%s: time has gaps' % label)
        if read != committed:
            problems.append('%s: mdtraj read %d frames, the WS committed %d'
                            % (label, read, committed))
        rows.append((label, sid.split(':')[0][:8], sid.split(':')[1],
                     committed, read, '%.1f' % t_end, size,
                     {None: '-', True: 'yes', False: 'NO'}[increasing],
                     'never assigned' if committed == 0 else
                     ('ok' if read == committed else 'MISMATCH')))
    headers = ('stream', 'id', 'ws', 'WS frames', 'mdtraj frames',
               'sim ps', 'bytes', 't increasing', 'check')
    print(table(rows, headers, rule=True))
    return rows, problems


def print_stats(client, target, committed):
    """The CC's stats of the demo's donors and target, once every session
    has reached it (its frames = the frames the WS committed)."""
    try:
        wait_for(lambda: client.target_stats(target.id)['frames']
                 == committed, 'the stats to record every session', 30,
                 errors=STARTING, interval=0.2)
    except TimedOut as e:
        return [str(e)]
    print(table([(name, s['frames'], s['sessions'], s['targets'])
                 for name, s in ((n, client.donor_stats(n))
                                 for n in DONORS)],
                ('donor', 'frames', 'sessions', 'targets'), rule=True))
    st = client.target_stats(target.id)
    print(table([(target.id[:8], st['frames'], st['sessions'], st['donors'],
                  st['frames_last_24h'], ', '.join(
                      '%s %d' % kv for kv in sorted(
                          st['by_end_reason'].items())))],
                ('target', 'frames', 'sessions', 'donors', 'last 24 h',
                 'sessions ended by'), rule=True))
    anonymous = committed - sum(client.donor_stats(n)['frames']
                                for n in DONORS)
    say('stats: %d frames in %d sessions, %d frames by the anonymous core; '
        'they agree with the %d frames the workservers committed'
        % (st['frames'], st['sessions'], anonymous, committed))
    return []



def check_nothing_left(procs, confs):
    left = [p.demo_name for p in procs.all if p.poll() is None]
    for p in procs.all:
        try:
            os.killpg(p.pid, 0)     # anything left in its process group?
            left.append('process group of %s' % p.demo_name)
        except ProcessLookupError:
            pass
    for conf in confs:
        pidfile = os.path.join(conf['data_folder'], 'redis', 'redis.pid')
        try:
            with open(pidfile) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            continue
        if alive(pid):
            left.append('redis of %s (pid %d)' % (conf['name'], pid))
    return left


def main():
    from server import store
    from siegetank import build_target
    from siegetank.client import Client
    shutil.rmtree(RUN, ignore_errors=True)
    os.makedirs(RUN)
    say('run folder %s' % os.path.relpath(RUN, ROOT))
    procs = Procs()
    confs = []
    shared = None
    try:
        if CLUSTER:
            shared = store.RedisServer(os.path.join(RUN, 'redis'),
                                       store.free_port()).start()
        _, ca, confs = setup_servers(procs, shared=shared)
        addresses = [cc_address(c) for c in confs[:len(CC_NAMES)]]
        address = addresses[-1]   # cc-b in the cluster: it stays up
        admin = Client(addresses[0], ca=ca)
        admin.token = admin.create_manager('admin@demo.local',
                                           os.urandom(8).hex(), 'admin')
        other = Client(address, ca=ca, token=admin.token)
        donors = [other.create_donor(name, os.urandom(8).hex(),
                                     name + '@demo.local')
                  for name in DONORS]
        key = admin.create_core_key('openmm', 'demo cores')
        say('admin admin@demo.local created (loopback bootstrap, no token) '
            'through %s; donors %s created by the admin through %s; core '
            'key %s for openmm (the CC requires core keys)'
            % (CC_NAMES[0], ', '.join(DONORS), CC_NAMES[-1], key['key_id']))
        built = os.path.join(RUN, 'target')
        summary = build_target.build(built, streams=STREAMS,
                                     steps_per_frame=STEPS_PER_FRAME)
        say('built with OpenMM %s: alanine dipeptide in %d TIP3P waters '
            '(%d atoms, PME), %g ps per frame, %d streams with different '
            'random velocities' % (build_target.engine_version(),
                                   summary['waters'], summary['atoms'],
                                   summary['ps_per_frame'], STREAMS))
        target, sids = build_target.upload(admin, built, stage='public',
                                           stream_client=other)
        target = other.load_target(target.id)
        labels = {sid: 'S%d' % (i + 1) for i, sid in enumerate(sids)}
        say('public target %s created through %s, streams added through %s'
            ': %s' % (target.id, CC_NAMES[0], CC_NAMES[-1], ', '.join(
                '%s=%s@%s' % (labels[s], s[:8], s.split(':')[1])
                for s in sids)))
        if CLUSTER:
            run_cluster_cores(procs, target, labels, addresses, ca,
                              donors[0], key['key'], shared)
        else:
            run_cores(procs, target, labels, address, ca,
                      [donors[0], donors[0], donors[1]], key['key'])
        say('downloading every stream\'s frames.xtc through %s (307 to a '
            'signed WS URL) and reading it with mdtraj:' % CC_NAMES[-1])
        rows, problems = verify(other, target, labels, built, summary)
        frames = sum(r[3] for r in rows)
        say('%d frames (%.1f ps of MD) committed and verified by mdtraj '
            'across %d streams' % (frames, frames * summary['ps_per_frame'],
                                   sum(1 for r in rows if r[3])))
        problems += print_stats(other, target, frames)
        if problems or frames == 0:
            for p in problems or ['no frames were produced']:
                print('demo: FAILED: %s' % p)
            return 1
    except (SiegetankError, TimedOut) as e:
        print('demo: FAILED: %s' % e)
        return 1
    finally:
        for p in procs.all:
            if p.demo_name.startswith('core') and p.poll() is None:
                procs.stop(p)
        procs.stop_all()
        if shared is not None:
            shared.stop()
        left = check_nothing_left(procs, confs)
        if shared is not None and alive(shared.process.pid):
            left.append('the shared redis (pid %d)' % shared.process.pid)
        say('servers stopped; %s' % ('processes left: %s' % ', '.join(left)
                                     if left else 'no process left behind'))
    say('demo finished in %.0f s (logs and data in %s)' % (
        time.monotonic() - T0, os.path.relpath(RUN, ROOT)))
    return 1 if left else 0


if __name__ == '__main__':
    sys.exit(main())
