"""Fuzzing both servers from their OpenAPI documents (`make fuzz`).

A real cc.py and a real ws.py are started on loopback with generated certs
(tools/testing.py), with an admin, a donor, a public target with streams
and a live core token. Then every operation of docs/openapi.yaml (CC) and
docs/openapi-ws.yaml (WS) gets requests that schemathesis generates from
its schema, valid and invalid alike, in turn until the budget is spent.
Credentials are the right ones for the operation most of the time, missing
or wrong otherwise; path ids are often those of real targets and streams.

The run fails on any reply >= 500 and on any traceback in the servers'
logs, but for a 503 that the document gives for that operation, with the
`{"error"}` body and the headers (Retry-After) it promises: that is a
documented answer (no stream free, stream busy, store down), counted
apart. It prints the figures. `python -m tools.fuzz --requests N`.
"""
import argparse
import collections
import concurrent.futures
import functools
import os
import random
import sys
import threading
import time
import uuid

import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tools import testing

DOCS = {'cc': os.path.join(testing.ROOT, 'docs', 'openapi.yaml'),
        'ws': os.path.join(testing.ROOT, 'docs', 'openapi-ws.yaml')}
ENGINE, VERSION = 'openmm', 'fuzz-1'
BATCH = 25  # requests per operation and generation mode in one turn
CONCURRENCY = 8  # requests in flight


class World:
    """The servers and the things a request may name or present."""

    def __init__(self):
        self.cc = testing.ServerProcess('cc', bind_address='127.0.0.1',
                                        log_level='debug',
                                        ws_timeout_in_s=3.0)
        self.ws = None
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = testing.certs()['ca']
        self.targets, self.streams = [], []
        self.core_token = None

    def start(self):
        self.cc.start()
        self.ws = testing.ServerProcess(
            'ws', bind_address='127.0.0.1', log_level='debug',
            command_centers=testing.command_centers(self.cc))
        self.ws.start()
        testing.wait_for(lambda: testing.online(self.cc, self.ws.name),
                         'the WS online')
        self.admin = self.cc.request('POST', '/managers', {
            'email': 'admin@fuzz.org', 'password': 'pw',
            'role': 'admin'}).json()['token']
        self.donor = self.cc.request('POST', '/donors', {
            'username': 'fuzzer', 'email': 'd@fuzz.org',
            'password': 'pw'}, token=self.admin).json()['token']
        for _ in range(2):
            tid = self.cc.request('POST', '/targets', {
                'engine': ENGINE, 'engine_versions': [VERSION],
                'stage': 'public', 'description': 'fuzz',
                'files': {'system.xml.b64': testing.b64(b'<System/>')}},
                token=self.admin).json()['target_id']
            self.targets.append(tid)
            for i in range(4):
                self.streams.append(self.cc.request('POST', '/streams', {
                    'target_id': tid, 'files': {
                        'state.xml.b64': testing.b64(b'<State %d/>' % i)}},
                    token=self.admin).json()['stream_id'])
        self.refresh_core_token()
        return self

    def stop(self):
        for server in (self.ws, self.cc):
            if server is not None:
                server.stop()

    def refresh_core_token(self):
        """A live core token (the fuzzer's stops and deletions end them);
        the old one stays when none comes (429, 503, slow)."""
        try:
            r = self.cc.request('POST', '/core/assign', {
                'engine': ENGINE, 'engine_version': VERSION,
                'donor_token': self.donor})
            if r.status_code == 200:
                self.core_token = r.json()['token']
                self.session.get(r.json()['url'], headers={
                    'Authorization': self.core_token}, timeout=30)
        except requests.RequestException:
            pass

    def credential(self, kind, scheme, n):
        """Mostly the right credential for `scheme`; sometimes none or a
        wrong one (n counts the requests)."""
        if n % 10 == 7:
            return None
        if n % 10 == 8:
            return random.choice(['nope', 'Bearer ', '\u00e9', 'x' * 300])
        return {'managerToken': self.admin, 'coreToken': self.core_token,
                'ccPass': 'test-cc-pass'}.get(scheme)

    def real_ids(self, case):
        """Half the time, name a real target or stream. A registration
        with the right pass names a loopback address: a workserver's name
        pointing at an arbitrary host would only measure the CC's patience
        with unreachable peers (its calls to them time out)."""
        body = case.body
        if case.path == '/ws/register' and isinstance(body, dict) \
                and random.random() < 0.8:
            body['url'] = '127.0.0.1'
        params = case.path_parameters or {}
        if random.random() < 0.5:
            if 'target_id' in params:
                params['target_id'] = random.choice(self.targets)
            if 'stream_id' in params:
                params['stream_id'] = random.choice(self.streams)
            if 'name' in params:
                params['name'] = self.ws.name


def operations(kind):
    schema = schemathesis.openapi.from_path(DOCS[kind])
    return [r.ok() for r in schema.get_all_operations()]


@functools.cache
def document(kind):
    with open(DOCS[kind]) as f:
        return yaml.safe_load(f)


def documented_503(kind, operation):
    """The headers a 503 of `operation` must carry, or None when its
    document gives it no 503."""
    reply = operation.definition.raw.get('responses', {}).get('503')
    if reply is None:
        return None
    if '$ref' in reply:
        doc = document(kind)
        for part in reply['$ref'].lstrip('#/').split('/'):
            doc = doc[part]
        reply = doc
    return sorted(name for name, header in reply.get('headers', {}).items()
                  if header.get('required'))


def undocumented(r, headers_503):
    """Why reply `r` is a failure, or None for a documented 503."""
    if r.status_code != 503 or headers_503 is None:
        return 'undocumented'
    try:
        body = r.json()
    except ValueError:
        return 'body not JSON'
    if not (isinstance(body, dict) and isinstance(body.get('error'), str)):
        return 'body without {"error"}'
    missing = [h for h in headers_503 if h not in r.headers]
    return 'missing %s' % ', '.join(missing) if missing else None


def scheme_of(operation):
    """The security scheme an operation asks for first, or None."""
    for requirement in operation.definition.raw.get('security', []):
        for name in requirement:
            return name
    return None


class Run:
    """Requests are generated in this thread (hypothesis) and sent by
    `CONCURRENCY` threads, so slow operations (scrypt) overlap."""

    def __init__(self, world, budget):
        self.world = world
        self.budget = budget
        self.submitted = 0
        self.sent = 0
        self.codes = collections.Counter()
        self.documented_503 = 0
        self.failures = []
        self.strategies = {}
        self.time_in = collections.Counter()  # seconds per operation
        self.lock = threading.Lock()
        self.local = threading.local()
        self.pool = concurrent.futures.ThreadPoolExecutor(CONCURRENCY)

    def session(self):
        if not hasattr(self.local, 'session'):
            self.local.session = requests.Session()
            self.local.session.trust_env = False
            self.local.session.verify = testing.certs()['ca']
        return self.local.session

    def submit(self, kind, operation, case):
        """Fill in ids and credentials and queue the request."""
        world = self.world
        base = (world.cc if kind == 'cc' else world.ws).url
        world.real_ids(case)
        kwargs = case.as_transport_kwargs(base_url=base)
        headers = kwargs.pop('headers', {})
        headers.pop('Authorization', None)
        token = world.credential(kind, scheme_of(operation), self.submitted)
        if token is not None:
            headers['Authorization'] = token
        self.submitted += 1
        if self.submitted % 50 == 0:
            world.refresh_core_token()
        name = '%s %s %s' % (kind, operation.method.upper(), operation.path)
        self.pool.submit(self.send, name, headers, kwargs,
                         documented_503(kind, operation))

    def send(self, name, headers, kwargs, headers_503):
        started = time.monotonic()
        try:
            r = self.session().request(headers=headers, timeout=60,
                                       allow_redirects=False, **kwargs)
            code = r.status_code
        except requests.RequestException as e:
            code = 'error: %s' % type(e).__name__
            r = None
        label = code if isinstance(code, str) else '%dxx' % (code // 100)
        with self.lock:
            self.sent += 1
            self.time_in[name] += time.monotonic() - started
            self.codes[label] += 1
            why = ('no reply' if r is None else undocumented(r, headers_503)
                   if code >= 500 else None)
            if why is None and r is not None and code == 503:
                self.documented_503 += 1
            elif why is not None:
                self.failures.append('%s %s -> %s (%s) %s' % (
                    name, kwargs['url'], code, why,
                    r.text[:200] if r is not None else ''))
        if os.environ.get('FUZZ_TRACE'):
            print(name, kwargs['url'], code,
                  r.text[:100] if r is not None else '')

    def turn(self, kind, operation, mode):
        """BATCH generated requests to one operation; False if the mode
        has nothing to generate for it (no invalid form of `GET /`)."""
        left = min(BATCH, self.budget - self.submitted)
        if left <= 0:
            return True
        key = (kind, operation.path, operation.method, mode)
        if key not in self.strategies:
            self.strategies[key] = operation.as_strategy(
                generation_mode=mode)

        # Hypothesis draws from the run's seed too; and an operation with
        # nothing left to generate (Unsatisfiable) is dropped without
        # hypothesis printing a seed of its own as for a failure.
        @seed(random.getrandbits(64))
        @settings(max_examples=left, deadline=None, database=None,
                  derandomize=False, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(self.strategies[key])
        def go(case):
            if self.submitted < self.budget:
                self.submit(kind, operation, case)
        try:
            go()
        except Unsatisfiable:
            return False
        return True

    def run(self):
        plan = [(kind, op, mode) for kind in ('cc', 'ws')
                for op in operations(kind)
                for mode in (GenerationMode.POSITIVE,
                             GenerationMode.NEGATIVE)]
        try:
            while plan and self.submitted < self.budget:
                plan = [step for step in plan if self.turn(*step)]
        finally:
            self.pool.shutdown(wait=True)


TRACEBACK = '\nTraceback (most recent call last):\n'


def tracebacks(server):
    """The tracebacks a server logged (a line of their own, not a fuzzed
    string in an access line that happens to say 'Traceback')."""
    text = '\n' + server.read_log()
    return [chunk[:1500] for chunk in text.split(TRACEBACK)[1:]]


def fuzz(budget, out=sys.stdout):
    """Run `budget` requests; returns (Run, [traceback excerpts])."""
    world = World().start()
    started = time.monotonic()
    try:
        run = Run(world, budget)
        run.run()
    finally:
        world.stop()
    found = tracebacks(world.cc) + tracebacks(world.ws)
    elapsed = time.monotonic() - started
    print('fuzz: %d requests in %.0f s over %d CC and %d WS operations; '
          'replies by class: %s (documented 503s: %d); failures (other '
          '5xx, bad 503s, errors): %d; tracebacks in server logs: %d' % (
              run.sent, elapsed, len(operations('cc')),
              len(operations('ws')),
              ', '.join('%s: %d' % kv for kv in sorted(
                  run.codes.items(), key=str)),
              run.documented_503, len(run.failures), len(found)), file=out)
    print('fuzz: slowest operations (s in all): %s' % ', '.join(
        '%s %.0f' % kv for kv in run.time_in.most_common(5)), file=out)
    for line in run.failures[:20]:
        print('  ' + line, file=out)
    for tb in found[:5]:
        print(TRACEBACK.strip() + '\n' + tb, file=out)
    return run, found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--requests', type=int, default=10000)
    parser.add_argument('--seed', type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else uuid.uuid4().int % 10**6
    random.seed(seed)
    print('fuzz: seed %d' % seed)
    run, found = fuzz(args.requests)
    return 1 if run.failures or found or run.sent < args.requests else 0


if __name__ == '__main__':
    sys.exit(main())
