"""Several hosts for real: Linux network namespaces made by the test, each
with its own address in 198.18.0.0/15 on one bridge, its own loopback and
embedded Redis, and a hosts file naming every host (`ip netns exec` mounts
/etc/netns/<ns>/hosts over /etc/hosts).

- cc.siegetank.test runs cc.py; ws1.siegetank.test and ws2.siegetank.test
  run ws.py, each with a certificate for its own name from one test CA and
  `external_url` set to that name;
- ws2 announces external_http_port 443 and serves on 8960 behind the
  iptables redirect of docs/deployment.md;
- lab.siegetank.test is a researcher's machine that runs the demo's flow
  (tests/multihost_flow.py): register, place, assign, frames, download.

Skipped only where namespaces cannot be created (not root)."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import unittest

from server import config, tls
from tools.testing import ROOT, tmpdir

DOMAIN = 'siegetank.test'
HOSTS = ('cc', 'ws1', 'ws2', 'lab')
CC_PORT, WS_PORT = 8980, 8960
CC_PASS = secrets.token_hex(16)


def ip(*args, ns=None):
    cmd = ['ip'] + (['-n', ns] if ns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def can_make_namespaces():
    """None, or why this machine cannot run the test (a failure: make
    setup installs iproute2 and iptables; the suite runs as root)."""
    if os.geteuid() != 0:
        return 'network namespaces need root'
    if shutil.which('ip') is None:
        return 'the ip command (iproute2) is missing'
    probe = 'stprobe%d' % os.getpid()
    try:
        ip('netns', 'add', probe)
    except subprocess.CalledProcessError as e:
        return 'cannot create a network namespace: %s' % (
            e.stderr.decode(errors='replace').strip())
    ip('netns', 'del', probe)
    return None


class TestMultiHost(unittest.TestCase):

    def setUp(self):
        reason = can_make_namespaces()
        self.assertIsNone(reason, reason)
        self.assertIsNotNone(shutil.which('iptables'),
                             'iptables is missing (make setup installs it)')
        tag = secrets.token_hex(3)
        self.ns = {h: 'st%s-%s' % (tag, h) for h in HOSTS}
        self.switch = 'st%s-sw' % tag
        # A random /24 of 198.18.0.0/15, so parallel runs do not meet.
        net = secrets.randbelow(512)
        self.addr = {h: '198.%d.%d.%d' % (18 + net // 256, net % 256, i + 1)
                     for i, h in enumerate(HOSTS)}
        self.procs = []
        self.addCleanup(self.remove_network)
        self.make_network()
        self.folder = tmpdir('multihost')
        self.ca = self.make_certs()

    # -- the network -----------------------------------------------------
    def make_network(self):
        ip('netns', 'add', self.switch)
        ip('link', 'add', 'br0', 'type', 'bridge', ns=self.switch)
        ip('link', 'set', 'br0', 'up', ns=self.switch)
        hosts = '127.0.0.1 localhost\n' + ''.join(
            '%s %s.%s\n' % (self.addr[h], h, DOMAIN) for h in HOSTS)
        for i, h in enumerate(HOSTS):
            ns = self.ns[h]
            ip('netns', 'add', ns)
            ip('link', 'add', 'eth0', 'netns', ns, 'type', 'veth', 'peer',
               'name', 'port%d' % i, 'netns', self.switch)
            ip('link', 'set', 'port%d' % i, 'master', 'br0', 'up',
               ns=self.switch)
            ip('addr', 'add', self.addr[h] + '/24', 'dev', 'eth0', ns=ns)
            ip('link', 'set', 'eth0', 'up', ns=ns)
            ip('link', 'set', 'lo', 'up', ns=ns)
            os.makedirs('/etc/netns/' + ns, exist_ok=True)
            with open('/etc/netns/%s/hosts' % ns, 'w') as f:
                # The CC host knows its own name as loopback (as Debian's
                # 127.0.1.1 line does): the first admin is made from there.
                f.write(hosts.replace(self.addr[h] + ' cc.', '127.0.0.1 cc.')
                        if h == 'cc' else hosts)

    def remove_network(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for ns in list(self.ns.values()) + [self.switch]:
            # Whatever still runs in our namespaces is ours (their Redis).
            pids = subprocess.run(['ip', 'netns', 'pids', ns],
                                  capture_output=True, text=True).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(['ip', 'netns', 'del', ns], capture_output=True)
            shutil.rmtree('/etc/netns/' + ns, ignore_errors=True)

    def in_ns(self, host, argv, name, **kw):
        log = open(os.path.join(self.folder, name + '.log'), 'ab')
        self.addCleanup(log.close)
        p = subprocess.Popen(['ip', 'netns', 'exec', self.ns[host]] + argv,
                             cwd=ROOT, stdout=kw.pop('stdout', log),
                             stderr=log, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def read_log(self, name):
        with open(os.path.join(self.folder, name + '.log'), 'rb') as f:
            return f.read().decode(errors='replace')

    # -- the hosts -------------------------------------------------------
    def make_certs(self):
        certs = os.path.join(self.folder, 'certs')
        os.makedirs(certs)
        ca = os.path.join(certs, 'ca.pem')
        tls.make_ca(ca, os.path.join(certs, 'ca.key'))
        for h in ('cc', 'ws1', 'ws2'):
            tls.make_server_cert(os.path.join(certs, h + '.pem'),
                                 os.path.join(certs, h + '.key'), ca,
                                 os.path.join(certs, 'ca.key'),
                                 ['%s.%s' % (h, DOMAIN)])
        return ca

    def conf(self, host, kind, **values):
        certs = os.path.join(self.folder, 'certs')
        values.update(name=host, ssl_certfile=os.path.join(certs,
                                                           host + '.pem'),
                      ssl_key=os.path.join(certs, host + '.key'),
                      ssl_ca_certs=self.ca, redis_options={'port': 6379},
                      data_folder=os.path.join(self.folder, host))
        path = os.path.join(self.folder, host + '.conf')
        config.write(path, values)
        config.load(path, kind)
        return path

    def start_servers(self):
        cc = self.conf('cc', 'cc', internal_http_port=CC_PORT,
                       cc_pass=CC_PASS, ws_probe_interval_in_ms=500)
        self.in_ns('cc', [sys.executable, 'cc.py', '--config', cc], 'cc')
        centers = {'hub': {'url': 'cc.%s:%d' % (DOMAIN, CC_PORT),
                           'pass': CC_PASS}}
        for host, public in (('ws1', WS_PORT), ('ws2', 443)):
            ws = self.conf(host, 'ws', internal_http_port=WS_PORT,
                           external_options={
                               'external_url': '%s.%s' % (host, DOMAIN),
                               'external_http_port': public},
                           command_centers=centers, min_free_disk_in_mb=1,
                           register_retry_max_in_s=1.0)
            self.in_ns(host, [sys.executable, 'ws.py', '--config', ws], host)
        # docs/deployment.md, step 3: public port 443 to internal_http_port
        subprocess.run(['ip', 'netns', 'exec', self.ns['ws2'], 'iptables',
                        '-t', 'nat', '-A', 'PREROUTING', '-p', 'tcp',
                        '--dport', '443', '-j', 'REDIRECT', '--to-port',
                        str(WS_PORT)], check=True, capture_output=True,
                       timeout=30)

    def flow(self, host, *args, timeout=300):
        """tests/multihost_flow.py on `host`; its stdout."""
        name = 'flow-%s-%s' % (host, args[0])
        p = self.in_ns(host, [sys.executable, '-m', 'tests.multihost_flow',
                              *args], name, stdout=subprocess.PIPE)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        self.assertEqual(p.returncode, 0, '%s failed:\n%s\n%s' % (
            name, out.decode(errors='replace'), self.read_log(name)))
        return out.decode()

    def test_demo_flow_across_hosts(self):
        self.start_servers()
        cc = 'cc.%s:%d' % (DOMAIN, CC_PORT)
        token = self.flow('cc', 'bootstrap', cc, self.ca).strip()
        report = json.loads(self.flow('lab', 'run', cc, self.ca, token, '2'))
        # registered under their real names, ws2 on its public port
        self.assertEqual(report['status'], {
            'ws1': {'url': 'ws1.' + DOMAIN, 'http_port': WS_PORT,
                    'online': True, 'draining': False},
            'ws2': {'url': 'ws2.' + DOMAIN, 'http_port': 443,
                    'online': True, 'draining': False}})
        streams = report['streams']
        self.assertEqual(sorted(s.split(':')[1] for s in streams),
                         ['ws1', 'ws1', 'ws2', 'ws2'])
        # frames reached both WS (cores went through port 443 to ws2) and
        # every committed frame came back through the CC's redirect
        with_frames = {sid.split(':')[1] for sid, s in streams.items()
                       if s['frames']}
        self.assertEqual(with_frames, {'ws1', 'ws2'})
        for sid, s in streams.items():
            self.assertEqual(s['bytes'], s['frames'] * 1024, sid)
            self.assertEqual(s['frame_numbers'],
                             list(range(1, s['frames'] + 1)), sid)
        self.assertGreater(sum(c['frames'] for c in report['cores']), 0)
        for name in ('cc', 'ws1', 'ws2'):
            self.assertNotIn('Traceback', self.read_log(name))


if __name__ == '__main__':
    unittest.main()
