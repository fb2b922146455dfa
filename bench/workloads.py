"""The benchmark workloads. Each drives real servers over HTTPS with
keep-alive connections and returns plain dicts of figures; `__main__`
repeats them, compares them with the ceiling and reports."""
import asyncio
import base64
import gzip
import json
import os
import threading
import time
import uuid

import psutil

from bench import servers
from bench.httpload import Connection, Recorder, run_cores, sink_get
from server.ws.keys import Keys
from tools.testing import CC_PASS

SYSTEM = base64.b64encode(gzip.compress(b'<System/>' * 100)).decode()
STATE = base64.b64encode(gzip.compress(os.urandom(2000))).decode()


def _frame_bodies(size):
    """Two distinct frame bodies: consecutive frames must differ, or the WS
    takes the second for a retry of the first."""
    return [json.dumps({'files': {'frames.xtc.b64': base64.b64encode(
        os.urandom(size)).decode()}, 'frames': 1}).encode() for _ in range(2)]


CHECKPOINT = json.dumps({'files': {'state.xml.gz.b64': STATE},
                         'frames': 10}).encode()


def conn(port):
    return Connection('127.0.0.1', port, servers.client_ssl())


async def create_streams(port, n, clients=16, target_id=None):
    """n streams of one new target on a WS; returns (target_id, ids, rate)."""
    target_id = target_id or str(uuid.uuid4())
    auth = {'Authorization': CC_PASS}
    first = conn(port)
    status, body = await first.request('POST', '/streams', {
        'target_id': target_id, 'stream_files': {'state.xml.gz.b64': STATE},
        'target_files': {'system.xml.gz.b64': SYSTEM,
                         'integrator.xml.gz.b64': SYSTEM}}, auth)
    assert status == 200, (status, body)
    ids = [json.loads(body)['stream_id']]
    left = [n - 1]

    async def worker():
        c = conn(port)
        while left[0] > 0:
            left[0] -= 1
            s, b = await c.request('POST', '/streams', {
                'target_id': target_id,
                'stream_files': {'state.xml.gz.b64': STATE}}, auth)
            assert s == 200, (s, b)
            ids.append(json.loads(b)['stream_id'])
        await c.close()
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    await first.close()
    return target_id, ids, (n - 1) / (time.perf_counter() - t)


async def activate(port, target_id, n):
    c = conn(port)
    tokens = []
    for _ in range(n):
        s, b = await c.request('POST', '/streams/activate',
                               {'target_id': target_id},
                               {'Authorization': CC_PASS})
        assert s == 200, (s, b)
        d = json.loads(b)
        tokens.append((d['token'], d['stream_id']))
    await c.close()
    return tokens


class SimCore:
    """One simulated core on connection `c`: `send` puts a frame, then a
    checkpoint every `checkpoint_every` frames and a heartbeat when one is
    due; `acked` counts the frames a checkpoint acknowledged, `counts` the
    requests by kind."""

    def __init__(self, c, token, heartbeat_every_s, checkpoint_every=10):
        self.c = c
        self.auth = {'Authorization': token} if token else {}
        self.every, self.checkpoint_every = heartbeat_every_s, checkpoint_every
        self.beat = time.perf_counter() + heartbeat_every_s
        self.n = self.pending = self.acked = 0
        self.counts = {'frames': 0, 'checkpoints': 0, 'heartbeats': 0}

    async def _request(self, kind, method, path, body, rec):
        """Send, timed into `rec` and counted under `kind` (unless
        `rec` is None: outside the workload)."""
        t = time.perf_counter()
        s, _ = await self.c.request(method, path, body, self.auth)
        if rec is not None:
            rec.add(t, s, kind=kind)
            self.counts[kind] += 1
        return s

    async def send(self, body, rec):
        await self._request('frames', 'PUT', '/core/frame', body, rec)
        self.n += 1
        self.pending += 1
        if self.n % self.checkpoint_every == 0:
            await self.checkpoint(rec)
        if time.perf_counter() >= self.beat:
            self.beat += self.every
            await self._request('heartbeats', 'POST', '/core/heartbeat',
                                b'{}', rec)

    async def checkpoint(self, rec):
        if await self._request('checkpoints', 'PUT', '/core/checkpoint',
                               CHECKPOINT, rec) == 200:
            self.acked += self.pending
            self.pending = 0

    async def close(self):
        """Commit the tail (outside the measure), so every frame sent is
        acknowledged, and hang up."""
        if self.pending:
            await self.checkpoint(None)
        await self.c.close()


def frame_core(port, bodies, tokens, acked, heartbeat_every_s=1.0,
               sims=None):
    """A core as fast as it can: frames, a checkpoint every 10, a heartbeat
    every `heartbeat_every_s` seconds; `acked[i]` counts committed
    (acknowledged) frames; each SimCore is added to `sims` (for its
    counts)."""
    async def core(i, deadline, rec):
        sim = SimCore(conn(port), tokens[i][0] if tokens else None,
                      heartbeat_every_s)
        if sims is not None:
            sims.append(sim)
        while time.perf_counter() < deadline:
            await sim.send(bodies[sim.n % 2], rec)
        await sim.close()
        acked[i] = sim.acked
    return core


async def verify_frames(port, tokens, acked, size):
    """What each core had acknowledged = what the WS reports = what the
    download holds. Returns the number of mismatches."""
    c = conn(port)
    bad = 0
    for (_token, sid), frames in zip(tokens, acked, strict=True):
        s, b = await c.request('GET', '/streams/info/%s' % sid, b'',
                               {'Authorization': CC_PASS})
        info = json.loads(b)
        s2, n = await c.request('GET', '/streams/%s/frames.xtc' % sid, b'',
                                {'Authorization': CC_PASS}, sink=True)
        if s != 200 or info['frames'] != frames or s2 != 200 \
                or n != frames * size:
            bad += 1
    await c.close()
    return bad


def _meminfo_kb(*names):
    """Fields of /proc/meminfo in kB (Dirty, Writeback: what the page cache
    still owes the disk); {} where there is no such file."""
    try:
        with open('/proc/meminfo') as f:
            fields = dict(line.split(':', 1) for line in f)
    except OSError:
        return {}
    return {n: int(fields[n].split()[0]) for n in names if n in fields}


def _disk():
    """(bytes written, ms the devices were busy) of the whole machine's
    disks so far, from /proc/diskstats (zeros where there is none)."""
    written = busy = 0
    try:
        with open('/proc/diskstats') as f:
            for line in f:
                x = line.split()
                # whole disks only (vda, sda, nvme0n1), not partitions
                if len(x) > 12 and not x[2].startswith(('loop', 'ram')) \
                        and os.path.exists('/sys/block/%s' % x[2]):
                    written += int(x[9]) * 512
                    busy += int(x[12])
    except OSError:
        pass
    return written, busy


def measure(pids, coro, sims=None):
    """Run `coro` returning (recorder, elapsed); add server CPU per request
    (and per frame, with the SimCores in `sims`), the latency of each kind
    of request, and what the whole machine did meanwhile (CPU busy, idle
    and iowait shares, dirty page cache before and after): the evidence
    for a rep that runs slower than its neighbours."""
    cpu0 = servers.cpu_seconds(pids)
    host0 = psutil.cpu_times()
    mem0 = _meminfo_kb('Dirty', 'Writeback')
    disk0 = _disk()
    rec, elapsed = asyncio.run(coro)
    disk1 = _disk()
    cpu = servers.cpu_seconds(pids) - cpu0
    host1 = psutil.cpu_times()
    mem1 = _meminfo_kb('Dirty', 'Writeback')
    out = rec.summary(elapsed)
    out['cpu_ms_per_request'] = 1000 * cpu / max(1, out['requests'])
    out['server_cpu_share'] = cpu / elapsed / (psutil.cpu_count() or 1)
    total = sum(host1) - sum(host0)
    for field in ('idle', 'iowait', 'steal'):
        if hasattr(host1, field) and total > 0:
            out['host_%s_share' % field] = (
                getattr(host1, field) - getattr(host0, field)) / total
    out['disk_write_mb_per_s'] = (disk1[0] - disk0[0]) / 1e6 / elapsed
    out['disk_busy_share'] = (disk1[1] - disk0[1]) / 1000 / elapsed
    out['dirty_mb'] = [m.get('Dirty', 0) / 1024 for m in (mem0, mem1)]
    out['writeback_mb'] = [m.get('Writeback', 0) / 1024
                           for m in (mem0, mem1)]
    if sims:
        counts = {k: sum(sim.counts[k] for sim in sims)
                  for k in sims[0].counts}
        out.update(counts)
        out['cpu_ms_per_frame'] = 1000 * cpu / max(1, counts['frames'])
        for kind in counts:
            k = rec.summary(elapsed, kind=kind)
            out['%s_p50_ms' % kind] = k['p50_ms']
            out['%s_p99_ms' % kind] = k['p99_ms']
    return out, rec, elapsed


def frames_ws(ws, size, cores, duration):
    bodies = _frame_bodies(size)
    target, ids, _ = asyncio.run(create_streams(ws.port, cores))
    tokens = asyncio.run(activate(ws.port, target, cores))
    acked = [0] * cores
    sims = []
    r = ws.redis()
    before = _redis_figures(r)
    out, _, _ = measure(servers.server_pids(ws), run_cores(
        cores, frame_core(ws.port, bodies, tokens, acked, sims=sims),
        duration), sims)
    after = _redis_figures(r)
    r.close()
    # the INFO read between counts one command
    out['redis_commands_per_request'] = (
        after['total_commands_processed'] - before[
            'total_commands_processed'] - 1) / max(1, out['requests'])
    for key in ('aof_rewrites', 'total_forks'):
        out['redis_' + key] = after.get(key, 0) - before.get(key, 0)
    out['redis_aof_mb'] = after.get('aof_current_size', 0) / 1e6
    out['mismatches'] = asyncio.run(verify_frames(ws.port, tokens, acked,
                                                  size))
    out['frames_committed'] = sum(acked)
    return out


def _redis_figures(r):
    """The INFO fields that say what a WS's Redis did in a rep: commands,
    and whether its append-only file was rewritten (a fork)."""
    info = r.info('all')
    return {k: info.get(k, 0) for k in (
        'total_commands_processed', 'aof_rewrites',
        'total_forks', 'aof_current_size')}


def _ceiling_tokens(cores):
    """An Authorization per core, new in each run (the durable ceiling
    keeps a file per core by it)."""
    run = uuid.uuid4().hex[:8]
    return ['%s-%d' % (run, i) for i in range(cores)]


def frames_ceiling(ceiling, size, cores, duration):
    """The same cores against a ceiling; each sends its own Authorization
    (the durable ceiling keeps a file per core by it)."""
    bodies = _frame_bodies(size)
    acked = [0] * cores
    sims = []
    tokens = [(token, None) for token in _ceiling_tokens(cores)]
    out, _, _ = measure(ceiling.pids(), run_cores(
        cores, frame_core(ceiling.port, bodies, tokens, acked, sims=sims),
        duration), sims)
    return out


def _paced(port, pids, tokens, duration, frame_every_s, bodies,
           heartbeat_every_s, checkpoint_every):
    """One core per token at a volunteer's pace on the server at `port`:
    a frame every `frame_every_s` (their phases spread), a checkpoint every
    `checkpoint_every` frames, a heartbeat every `heartbeat_every_s`; every
    connection opened before the measured span. Returns (Recorder, seconds,
    CPU seconds of `pids` in the span, the SimCores)."""
    cores = len(tokens)
    sims = []

    async def core(sim, i, start, deadline, rec):
        tick = start + frame_every_s * i / cores  # spread the phases
        sim.beat = tick + heartbeat_every_s
        while True:
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
            if time.perf_counter() >= deadline:
                break
            await sim.send(bodies[sim.n % 2], rec)
            tick += frame_every_s

    async def run():
        for token in tokens:
            sims.append(SimCore(conn(port), token, heartbeat_every_s,
                                checkpoint_every))
        for i in range(0, cores, 50):  # TLS handshakes, outside the span
            await asyncio.gather(*(s.c.open() for s in sims[i:i + 50]))
        rec = Recorder()
        cpu0 = servers.cpu_seconds(pids)
        start = time.perf_counter()
        await asyncio.gather(*(core(sim, i, start, start + duration, rec)
                               for i, sim in enumerate(sims)))
        elapsed = time.perf_counter() - start
        cpu = servers.cpu_seconds(pids) - cpu0
        # all at once: one after the other, the last would wait past the
        # WS's header_timeout on a slow machine and find itself hung up
        await asyncio.gather(*(sim.close() for sim in sims))
        return rec, elapsed, cpu
    rec, elapsed, cpu = asyncio.run(run())
    return rec, elapsed, cpu, sims


def _per_core_hour(rec, elapsed, cpu, sims, **params):
    """The figures of a paced run: the server CPU per core-hour (what says
    how many volunteers one host carries), latency, errors, counts."""
    out = rec.summary(elapsed)
    core_hours = len(sims) * elapsed / 3600.0
    out.update({k: sum(sim.counts[k] for sim in sims)
                for k in sims[0].counts})
    out.update(params, cores=len(sims), seconds=elapsed, server_cpu_s=cpu,
               cpu_s_per_core_hour=cpu / core_hours,
               cores_per_cpu=3600.0 * core_hours / cpu if cpu else None)
    return out


def volunteers(ws, cores, duration, frame_every_s, size,
               heartbeat_every_s=30.0, checkpoint_every=10):
    """`cores` cores at a volunteer's pace on a WS (see _paced): the
    server CPU per core-hour, latency, errors and mismatches."""
    bodies = _frame_bodies(size)
    target, _, _ = asyncio.run(create_streams(ws.port, cores, 32))
    tokens = asyncio.run(activate(ws.port, target, cores))
    run = _paced(ws.port, servers.server_pids(ws), [t for t, _ in tokens],
                 duration, frame_every_s, bodies, heartbeat_every_s,
                 checkpoint_every)
    out = _per_core_hour(*run, size=size, frame_every_s=frame_every_s)
    out['mismatches'] = asyncio.run(verify_frames(
        ws.port, tokens, [sim.acked for sim in run[3]], size))
    return out


def volunteers_ceiling(ceiling, cores, duration, frame_every_s, size,
                       heartbeat_every_s=30.0, checkpoint_every=10):
    """The same paced cores against a ceiling (a file per core on the
    durable one, by its Authorization)."""
    return _per_core_hour(*_paced(
        ceiling.port, ceiling.pids(), _ceiling_tokens(cores), duration,
        frame_every_s, _frame_bodies(size), heartbeat_every_s,
        checkpoint_every),
        size=size, frame_every_s=frame_every_s)


def _activation_client(port, target_id, path='/streams/activate'):
    async def client(i, deadline, rec):
        c = conn(port)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            s, _ = await c.request('POST', path, {'target_id': target_id},
                                   {'Authorization': CC_PASS})
            rec.add(t, s)
            if s == 503:  # the pool ran dry: stop, it is not an error here
                rec.errors.pop()
                break
        await c.close()
    return client


def activations(port, pids, streams, clients, duration, target_id=None):
    out, _, _ = measure(pids, run_cores(
        clients, _activation_client(port, target_id or 'x'), duration))
    return out


def assignments(cc_url_port, pids, clients, duration, body):
    async def client(i, deadline, rec):
        c = conn(cc_url_port)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            s, _ = await c.request('POST', '/core/assign', body)
            rec.add(t, s)
            if s == 503:  # every stream handed out: the pool ran dry
                rec.errors.pop()
                break
        await c.close()
    out, _, _ = measure(pids, run_cores(clients, client, duration))
    return out


def commit_large_stream(ws, megabytes, frame_mb=1):
    """One stream with `megabytes` MB committed, for the download run."""
    target, ids, _ = asyncio.run(create_streams(ws.port, 1))
    [(token, sid)] = asyncio.run(activate(ws.port, target, 1))
    chunk = os.urandom(frame_mb << 20)
    bodies = [json.dumps({'files': {'frames.xtc.b64': base64.b64encode(
        chunk[:-1] + bytes([k])).decode()}}).encode() for k in range(2)]

    async def fill():
        c = conn(ws.port)
        auth = {'Authorization': token}
        for n in range(megabytes // frame_mb):
            s, _ = await c.request('PUT', '/core/frame', bodies[n % 2], auth)
            assert s == 200
            if n % 20 == 19:
                s, _ = await c.request('PUT', '/core/checkpoint', CHECKPOINT,
                                       auth)
                assert s == 200
        s, _ = await c.request('PUT', '/core/checkpoint', CHECKPOINT, auth)
        await c.close()
    asyncio.run(fill())
    return sid, (megabytes // frame_mb) * (frame_mb << 20)


def download(ws, sid, expected):
    """Download rate (MB/s) and the server's peak RSS growth meanwhile."""
    pids = servers.server_pids(ws)
    base = servers.rss_bytes(pids)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], servers.rss_bytes(pids))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample)
    sampler.start()

    try:
        t = time.perf_counter()
        cpu = time.process_time()
        s, n = sink_get('127.0.0.1', ws.port, servers.client_ssl(),
                        '/streams/%s/frames.xtc' % sid,
                        {'Authorization': CC_PASS})
        elapsed = time.perf_counter() - t
        cpu = time.process_time() - cpu
    finally:
        done.set()
        sampler.join()
    return {'status': s, 'bytes': n, 'ok': s == 200 and n == expected,
            'mb_per_s': n / elapsed / 1e6,
            'client_cpu_share': cpu / elapsed,
            'rss_growth_mb': (peak[0] - base) / 1e6}


def scale(ws, streams, clients=32):
    """Create rate and Redis memory per idle stream."""
    r = ws.redis()
    before = r.info('memory')['used_memory']
    _, ids, rate = asyncio.run(create_streams(ws.port, streams, clients))
    after = r.info('memory')['used_memory']
    r.close()
    return {'streams': len(ids), 'create_rate': rate,
            'redis_bytes_per_stream': (after - before) / len(ids)}


def sweep(ws, expiring, cores, size, duration, increment):
    """`expiring` streams activated at once and left to expire while
    `cores` keep sending frames: worst 1 s window p99 vs the overall."""
    bodies = _frame_bodies(size)
    busy_target, _, _ = asyncio.run(create_streams(ws.port, cores))
    idle_target, _, _ = asyncio.run(create_streams(ws.port, expiring, 32))

    async def activate_all():
        per = expiring // 16

        async def w():
            c = conn(ws.port)
            for _ in range(per):
                s, _ = await c.request('POST', '/streams/activate',
                                       {'target_id': idle_target},
                                       {'Authorization': CC_PASS})
                assert s == 200
            await c.close()
        await asyncio.gather(*(w() for _ in range(16)))
    t0 = time.perf_counter()
    asyncio.run(activate_all())
    activated_in = time.perf_counter() - t0
    # The busy cores start last, so that their tokens are fresh.
    tokens = asyncio.run(activate(ws.port, busy_target, cores))
    acked = [0] * cores
    expiry = t0 + activated_in + increment  # the last of them expires
    drained = []

    async def watch():
        """When the sweeps have requeued every expired stream: only the
        busy cores' streams are left active (read from the WS's Redis, so
        that watching costs the WS nothing)."""
        r = ws.redis()
        active = Keys(ws.name).active
        while time.perf_counter() < expiry + 120:
            if await asyncio.to_thread(r.scard, active) <= cores:
                drained.append(time.perf_counter() - expiry)
                break
            await asyncio.sleep(0.2)
        r.close()

    async def run():
        watcher = asyncio.ensure_future(watch())
        result = await run_cores(cores, frame_core(
            ws.port, bodies, tokens, acked, heartbeat_every_s=increment / 4),
            duration)
        await watcher
        return result
    rec, elapsed = asyncio.run(run())
    start = rec.stamps[0] - rec.latencies[0] if rec.stamps else 0
    windows = []
    t = start
    while t < start + elapsed:
        w = rec.summary(1.0, since=t, until=t + 1.0)
        if w['requests']:
            windows.append(w['p99_ms'])
        t += 1.0

    overall = rec.summary(elapsed)
    return {'expiring': expiring, 'activated_in_s': activated_in,
            'drained_s_after_expiry': drained[0] if drained else None,
            'p99_ms': overall['p99_ms'], 'worst_window_p99_ms': max(windows),
            'errors': overall['errors'],
            'error_statuses': sorted(set(rec.errors)),
            'mismatches': asyncio.run(verify_frames(ws.port, tokens, acked,
                                                    size))}


def cc_admin(cc, ws, email):
    """The token of a new admin of `cc`, once `ws` is online there."""
    deadline = time.monotonic() + 30
    while not cc.request('GET', '/ws/status').json().get(
            ws.name, {}).get('online'):
        assert time.monotonic() < deadline, 'WS never registered'
        time.sleep(0.05)
    r = cc.request('POST', '/managers', {'email': email,
                                         'password': 'bench-password',
                                         'role': 'admin'})
    assert r.status_code == 200, r.text
    return r.json()['token']


def prepare_cc_target(cc, ws, streams):
    """An admin, a public target and `streams` streams placed through the
    CC; returns the /core/assign body that matches the target and the
    placement rate (streams/s)."""
    token = cc_admin(cc, ws, 'bench@example.org')
    r = cc.request('POST', '/targets', {
        'description': 'bench', 'engine': 'openmm', 'engine_versions': ['8'],
        'stage': 'public', 'files': {'system.xml.gz.b64': SYSTEM,
                                     'integrator.xml.gz.b64': SYSTEM}},
        token=token)
    assert r.status_code == 200, r.text
    target_id = r.json()['target_id']
    left = [streams]

    async def worker():
        c = conn(cc.port)
        while left[0] > 0:
            left[0] -= 1
            s, b = await c.request('POST', '/streams', {
                'target_id': target_id,
                'files': {'state.xml.gz.b64': STATE}},
                {'Authorization': token})
            assert s == 200, (s, b)
        await c.close()

    async def fill():
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(16)))
        return time.perf_counter() - t
    elapsed = asyncio.run(fill())
    return {'engine': 'openmm', 'engine_version': '8'}, streams / elapsed


def fleet_status(cc, ws, streams, targets=20, active=1000, samples=300):
    """GET /status latency with `streams` streams on the WS, spread over
    `targets` public targets of the CC (streams made on the WS directly:
    placing 100,000 through the CC would only take longer; the CC's
    reconciliation adopts them, and only then counts them), `active` of
    them activated, once the CC has the WS's report of all of them.
    Anonymous and admin, `samples` each, one keep-alive connection."""
    admin = cc_admin(cc, ws, 'status@example.org')
    tids = []
    for _ in range(targets):
        r = cc.request('POST', '/targets', {
            'description': 'bench', 'engine': 'openmm',
            'engine_versions': ['8'], 'stage': 'public'}, token=admin)
        assert r.status_code == 200, r.text
        tids.append(r.json()['target_id'])

    async def fill():
        t = time.perf_counter()
        for i, tid in enumerate(tids):
            n = streams // targets + (i < streams % targets)
            await create_streams(ws.port, n, target_id=tid)
        return time.perf_counter() - t
    elapsed = asyncio.run(fill())
    asyncio.run(activate(ws.port, tids[0], active))

    def reported():
        st = cc.request('GET', '/status').json()
        return st['streams']['total'] == streams \
            and st['cores_active'] == active
    deadline = time.monotonic() + 120
    while not reported():
        assert time.monotonic() < deadline, 'CC never saw the WS report'
        time.sleep(0.2)

    async def sample(token):
        """/status and, interleaved on the same connection, the bare
        health check `GET /` (the floor on this machine right now)."""
        c = conn(cc.port)
        headers = {'Authorization': token} if token else {}
        times = {'/status': [], '/': []}
        for _ in range(samples):
            for path in times:
                t = time.perf_counter()
                s, b = await c.request('GET', path, headers=headers)
                times[path].append(1000 * (time.perf_counter() - t))
                assert s == 200, (s, b)
        await c.close()
        out = {}
        for path, ts in times.items():
            ts.sort()
            out[path] = (ts[len(ts) // 2], ts[int(len(ts) * 0.99) - 1],
                         ts[-1])
        return out
    anon, adm = asyncio.run(sample(None)), asyncio.run(sample(admin))
    return {'streams': streams, 'targets': targets, 'active': active,
            'create_rate': streams / elapsed,
            'median_ms': anon['/status'][0], 'p99_ms': anon['/status'][1],
            'max_ms': anon['/status'][2],
            'admin_median_ms': adm['/status'][0],
            'admin_p99_ms': adm['/status'][1],
            'health_median_ms': anon['/'][0], 'health_p99_ms': anon['/'][1]}


def commandstats(r):
    """{command: calls} of a Redis so far (INFO commandstats)."""
    return {k[len('cmdstat_'):]: v['calls'] for k, v in
            r.info('commandstats').items()}


def _diff(after, before):
    return {k: after[k] - before.get(k, 0) for k in after
            if after[k] - before.get(k, 0) > 0}


def request_costs(ws, size, cores=8, n=30, idle_connections=0):
    """Server CPU (the WS's processes with its Redis) and the WS's Redis
    commands per request of each kind a core sends: a frame PUT, a
    checkpoint PUT (measured as frame + checkpoint pairs, less the
    frames), a heartbeat, and a heartbeat on a new TLS connection (what a
    core pays whose connection was dropped while idle). `cores` cores
    send `n` of each, one kind after the other; then `idle_connections`
    more connections send one heartbeat each and stay open: the servers'
    memory per connection. The capacity model (docs/capacity.md) is built
    on these."""
    bodies = _frame_bodies(size)
    target, _, _ = asyncio.run(create_streams(ws.port, cores))
    tokens = asyncio.run(activate(ws.port, target, cores))
    pids = servers.server_pids(ws)
    r = ws.redis()
    sims = [SimCore(conn(ws.port), t, 10 ** 6, checkpoint_every=10 ** 9)
            for t, _ in tokens]
    out = {}

    async def phase(kind):
        rec = Recorder()

        async def one(sim):
            for _ in range(n):
                if kind == 'heartbeat on a new connection':
                    await sim.c.close()
                    sim.c = conn(ws.port)
                    await sim._request('heartbeats', 'POST',
                                       '/core/heartbeat', b'{}', rec)
                    continue
                if kind == 'heartbeat':
                    await sim._request('heartbeats', 'POST',
                                       '/core/heartbeat', b'{}', rec)
                    continue
                await sim.send(bodies[sim.n % 2], rec)
                if kind == 'frame+checkpoint':
                    await sim.checkpoint(rec)
        await asyncio.gather(*(one(s) for s in sims))
        return rec

    async def run():
        for s in sims:
            await s.c.open()
        for kind in ('frame', 'frame+checkpoint', 'heartbeat',
                     'heartbeat on a new connection'):
            cmd0, cpu0 = commandstats(r), servers.cpu_seconds(pids)
            rec = await phase(kind)
            cpu = servers.cpu_seconds(pids) - cpu0
            cmds = _diff(commandstats(r), cmd0)
            cmds['info'] = cmds.get('info', 0) - 1  # the read itself
            cmds = {k: v for k, v in cmds.items() if v > 0}
            per = cores * n
            out[kind] = {'cpu_ms': 1000 * cpu / per,
                         'redis_commands': sum(cmds.values()) / per,
                         'commands': {k: v / per for k, v in cmds.items()},
                         'errors': len(rec.errors)}
        # memory: idle keep-alive connections, each after one heartbeat
        rss0 = servers.rss_bytes(pids)
        idle = [SimCore(conn(ws.port), sims[i % cores].auth[
            'Authorization'], 10 ** 6) for i in range(idle_connections)]
        for i in range(0, len(idle), 50):
            await asyncio.gather(*(s._request(
                'heartbeats', 'POST', '/core/heartbeat', b'{}', None)
                for s in idle[i:i + 50]))
        out['rss_kb_per_connection'] = (servers.rss_bytes(pids) - rss0) \
            / 1024 / max(1, len(idle))
        for s in sims + idle:
            await s.close()
    asyncio.run(run())
    r.close()
    pair = out.pop('frame+checkpoint')
    out['checkpoint'] = {
        'cpu_ms': pair['cpu_ms'] - out['frame']['cpu_ms'],
        'redis_commands': pair['redis_commands']
        - out['frame']['redis_commands'],
        'commands': {k: v - out['frame']['commands'].get(k, 0)
                     for k, v in pair['commands'].items()},
        'errors': pair['errors']}
    return out


def hub_costs(cc, ws, body, assignments=200, idle_s=10.0):
    """Hub (the CC's Redis) commands per assignment and per second with
    nothing going on but the CC's background jobs on one WS; CC and WS
    CPU per assignment."""
    r = cc.redis()
    cc_pids, ws_pids = servers.server_pids(cc), servers.server_pids(ws)
    cmd0 = commandstats(r)
    time.sleep(idle_s)
    idle = _diff(commandstats(r), cmd0)
    out = {'idle_commands_per_s': (sum(idle.values()) - 1) / idle_s,
           'idle_commands': {k: v / idle_s for k, v in idle.items()}}

    async def assign():
        c = conn(cc.port)
        errors = 0
        for _ in range(assignments):
            s, _ = await c.request('POST', '/core/assign', body)
            errors += s != 200
        await c.close()
        return errors
    cmd0 = commandstats(r)
    cpu0 = [servers.cpu_seconds(p) for p in (cc_pids, ws_pids)]
    t = time.perf_counter()
    errors = asyncio.run(assign())
    elapsed = time.perf_counter() - t
    cpu = [servers.cpu_seconds(p) - c0
           for p, c0 in zip((cc_pids, ws_pids), cpu0, strict=True)]
    cmds = _diff(commandstats(r), cmd0)
    r.close()
    # less what the background jobs did meanwhile
    background = out['idle_commands_per_s'] * elapsed
    out.update(
        assign_errors=errors,
        hub_commands_per_assignment=(sum(cmds.values()) - 1 - background)
        / assignments,
        assign_commands={k: v / assignments for k, v in cmds.items()},
        cc_cpu_ms_per_assignment=1000 * cpu[0] / assignments,
        ws_cpu_ms_per_assignment=1000 * cpu[1] / assignments)
    return out
