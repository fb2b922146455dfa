"""The demo's flow, run by tests/test_multihost.py inside the network
namespaces it creates, where host names resolve through the hosts file of
each namespace (`ip netns exec` mounts /etc/netns/<ns>/hosts).

    python -m tests.multihost_flow bootstrap CC CA     # on the CC host
    python -m tests.multihost_flow run CC CA TOKEN N   # on a researcher's

`bootstrap` makes the first admin over the CC host's loopback and prints
its token; `run` waits for N workservers, then registers a donor, places a
target's streams, runs synthetic cores through the CC until every WS got
frames, downloads every stream through the CC and prints a JSON report.
"""
import json
import os
import sys
import tempfile
import time

from siegetank.client import Client, SiegetankError
from siegetank.core import Core, make_engine, synthetic

FRAMES = 3          # per core
FRAME_BYTES = 1024
STREAMS_PER_WS = 2


def wait(check, what, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
            if found:
                return found
        except (SiegetankError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit('timed out waiting for %s' % what)


def bootstrap(cc, ca):
    client = Client(cc, ca=ca)
    wait(lambda: client.workserver_status() is not None, 'the CC')
    print(client.create_manager('admin@lab.test', 'pw', 'admin'))


def run(cc, ca, token, n_ws):
    admin = Client(cc, token=token, ca=ca)
    status = wait(lambda: (lambda s: s if len(s) == n_ws and all(
        w['online'] for w in s.values()) else None)(
            admin.workserver_status()), 'the workservers online')
    donor = admin.create_donor('lab-donor', 'pw', 'donor@lab.test')
    target = admin.add_target(options={}, engine=synthetic.NAME,
                              engine_versions=[synthetic.VERSION],
                              description='multi-host', stage='public',
                              files={'readme.txt': b'multi-host target'})
    sids = [target.add_stream(synthetic.seed_files(str(i)))
            for i in range(STREAMS_PER_WS * n_ws)]
    assigned = []
    for _ in range(8 * n_ws):
        core = Core(cc, make_engine('synthetic', rate=20,
                                    frame_bytes=FRAME_BYTES),
                    ca=ca, donor_token=donor, target_id=target.id,
                    max_frames=FRAMES, checkpoint_every=0.1)
        core.run()
        assigned.append(core.stats)
        frames = target.stream_info()
        if {sid.split(':')[1] for sid in sids if frames[sid]['frames']} \
                == set(status):
            break
    info = target.stream_info()
    streams = {}
    folder = tempfile.mkdtemp()
    for sid in sids:
        path = os.path.join(folder, sid.replace(':', '_'))
        size = admin.stream(sid).download('frames.dat', path)
        with open(path, 'rb') as f:
            heads = [line.split()[1] for line in f if line.startswith(
                b'frame ')]
        streams[sid] = {'frames': info[sid]['frames'], 'bytes': size,
                        'frame_numbers': [int(h) for h in heads]}
    print(json.dumps({'status': status, 'streams': streams,
                      'cores': assigned, 'target': target.id}))


if __name__ == '__main__':
    if sys.argv[1] == 'bootstrap':
        bootstrap(*sys.argv[2:4])
    else:
        run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
