"""A real CC with real workservers (cc.py / ws.py processes, embedded Redis,
test certs) for the client, CLI and OpenMM end-to-end tests, plus helpers
to run cores against it."""
from siegetank.client import Client
from siegetank.core import Core, make_engine, synthetic
from tools.testing import ServerProcess, certs, command_centers, wait_for


class Cluster:
    """One CC and `n_ws` workservers; `admin` is a Client logged in as the
    bootstrap admin (created from loopback without a token)."""

    def __init__(self, n_ws=1, cc_values=None, **ws_values):
        self.cc = ServerProcess('cc', **(cc_values or {}))
        self.ws = []
        self.n_ws = n_ws
        self.ws_values = ws_values

    def start(self):
        try:
            self.cc.start()
            for _ in range(self.n_ws):
                ws = ServerProcess('ws',
                                   command_centers=command_centers(self.cc),
                                   **self.ws_values)
                self.ws.append(ws.start())
            self.address = '127.0.0.1:%d' % self.cc.port
            self.ca = certs()['ca']
            anon = self.client()
            wait_for(lambda: sum(s['online'] for s in
                                 anon.workserver_status().values())
                     == self.n_ws, 'workservers online')
            self.admin = self.client()
            self.admin.token = self.admin.create_manager(
                'admin@test.org', 'admin-pass', 'admin')
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, token=None):
        return Client(self.address, token=token, ca=certs()['ca'])

    def stop(self):
        for ws in self.ws:
            ws.stop()
        self.cc.stop()

    def synthetic_target(self, client=None, streams=1, stage='public'):
        """A public synthetic target with `streams` streams: (Target, ids)."""
        client = client or self.admin
        target = client.add_target(options={}, engine='synthetic',
                                   engine_versions=[synthetic.VERSION],
                                   description='synthetic', stage=stage,
                                   files={'readme.txt': b'synthetic target'})
        ids = [target.add_stream(synthetic.seed_files(str(i)))
               for i in range(streams)]
        return target, ids

    def run_core(self, target_id, frames, engine=None, **kw):
        """Run one core in this process until it sent `frames` frames (and
        checkpointed and stopped); returns its stats."""
        core = Core(self.address, engine or make_engine('synthetic',
                                                        rate=1000),
                    ca=self.ca, target_id=target_id, max_frames=frames,
                    **kw)
        return core.run()

