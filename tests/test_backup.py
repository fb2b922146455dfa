"""Backup and restore (tools/backup.py, docs/operations.md) with real
processes: a WS's data folder and the hub store are backed up while
synthetic cores work (the streams spread over this WS and a second one,
which stays up); both hosts are then lost (SIGKILL), a new CC starts
on the restored hub store and a new WS, with a fresh Redis, on the
restored data folder. Every frame acknowledged before the backup downloads
byte for byte, the accounts and targets are there; what was acknowledged
after the backup is what a restore loses."""
import os
import re
import shutil
import sys
import unittest

import requests

from server import store
from tools import backup, upgrade
from tools.testing import ServerProcess, tmpdir, wait_for


def restored(old, data_folder):
    """A server like `old` (same name, port, settings) on `data_folder`,
    with a Redis of its own on a new port."""
    with open(old.conf_path) as f:
        text = f.read()
    text = text.replace(repr(old.settings.data_folder),
                        repr(data_folder))
    text = re.sub(r"redis_options = \{'port': \d+",
                  "redis_options = {'port': %d" % store.free_port(), text)
    return ServerProcess(old.kind, conf_text=text)


class TestBackupRestore(unittest.TestCase):

    def test_ws_and_hub_under_load(self):
        run = upgrade.Upgrade(seed=2)
        try:
            run.start()
            run.progress(30)
            with run.ledger.lock:
                before = dict(run.ledger.acked)
            folder = tmpdir('backup')
            ws_copy = os.path.join(folder, 'ws')
            result = backup.backup_ws(run.ws.settings.data_folder,
                                      ws_copy)
            rdb = backup.backup_hub(
                store.RedisServer.from_settings(run.cc.settings).url,
                os.path.join(folder, 'hub.rdb'))
            # The streams spread over two WS; this one is backed up.
            mine = [s for s in run.streams if s.endswith(':' + run.ws.name)]
            self.assertTrue(mine)
            self.assertGreaterEqual(result['streams'], len(mine))
            run.progress(20)   # acknowledged after the backup
            run.stop_clients()
            with run.ledger.lock:
                after = sum(run.ledger.acked[s] for s in mine)
            # Both hosts are lost.
            run.ws.kill()
            run.cc.kill()
            cc = restored(run.cc, os.path.join(tmpdir('cc-new'), 'data'))
            self.assertEqual(backup.restore_hub(rdb, os.path.join(
                cc.settings.data_folder, 'redis')) > 0, True)
            ws_data = os.path.join(tmpdir('ws-new'), 'data')
            shutil.copytree(ws_copy, ws_data)
            ws = restored(run.ws, ws_data)
            self.assertEqual((cc.name, cc.port, ws.name, ws.port),
                             (run.cc.name, run.cc.port, run.ws.name,
                              run.ws.port))
            run.cc, run.ws = cc, ws
            cc.start()
            ws.start()
            run.wait_healthy()
            # The hub: the admin's token, the targets.
            r = run.cc_call(run.http, 'GET', '/targets')
            self.assertEqual(r.status_code, 200, r.text)
            self.assertLessEqual({run.target, run.scratch_target},
                                 set(r.json()['targets']))
            # Every frame acknowledged before the backup, byte for byte.
            with run.ledger.lock:
                run.ledger.acked.clear()
                run.ledger.acked.update(before)
            run.verified.clear()
            for sid in run.streams:
                self.assertTrue(wait_for(lambda sid=sid: run.check_download(
                    run.http, sid, quiet=True, full=True),
                    'a download of %s' % sid, 60,
                    errors=(requests.RequestException,)))
            self.assertEqual(run.ledger.failures, [])
            back = sum(run.verified[s] for s in mine)
            first = sum(before.get(s, 0) for s in mine)
            sys.stderr.write(
                'the restored WS\'s %d streams: %d frames acknowledged '
                'before the backup, %d downloaded after the restore, %d '
                'acknowledged by the end (%d lost with the hosts)\n'
                % (len(mine), first, back, after, after - back))
            self.assertGreaterEqual(back, first)
        finally:
            run.stop()
