"""`make demo`: the whole system on one machine with the shipped configs
(embedded Redis, generated dev certificates): start the CC and a WS, show
the WS registered and online over verified HTTPS, then shut everything down
leaving no process behind."""
import os
import signal
import subprocess
import sys
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(kind):
    log = open(os.path.join(ROOT, 'data', kind + '.log'), 'ab')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, kind + '.py'),
                             '--config', os.path.join(ROOT, kind + '.conf')],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(check, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit('demo: timed out waiting for %s' % what)


def main():
    os.makedirs(os.path.join(ROOT, 'data'), exist_ok=True)
    procs = []
    try:
        procs.append(start('cc'))
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
        ca = os.path.join(ROOT, 'certs', 'ca.pem')
        wait_for(lambda: os.path.exists(ca), 'dev certificates')
        session.verify = ca
        cc = 'https://127.0.0.1:8980'
        wait_for(lambda: session.get(cc + '/', timeout=2).ok, 'the CC')
        print('command center up at %s' % cc)
        procs.append(start('ws'))
        status = wait_for(lambda: {n: s for n, s in session.get(
            cc + '/ws/status', timeout=2).json().items() if s['online']},
            'the WS to register')
        for name, s in status.items():
            print('workserver %s online at %s:%s' % (name, s['url'],
                                                       s['http_port']))
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait(60)
        print('all servers stopped (exit codes %s)'
              % [p.returncode for p in procs])
    return 0


if __name__ == '__main__':
    sys.exit(main())
