"""Backups of a running workserver and of the hub store, and the hub's
restore (docs/operations.md, "Backup and restore").

    python -m tools.backup ws DATA_FOLDER DEST
        The committed state of a WS, while it runs: targets, and every
        stream's stream.json, seed, error log and committed chunks; not
        buffers (frames since the last checkpoint: the core sends them
        again), temporary directories, the trash, its Redis (an index the
        WS rebuilds from the disk on start) or its metrics. DEST is a
        ready data folder: start a WS of the same name on it.
    python -m tools.backup hub REDIS_URL DEST.rdb
        BGSAVE on the hub Redis (a snapshot of one instant), then a copy of
        its RDB file: run it on the Redis host (the file is read there).
    python -m tools.backup restore-hub DEST.rdb REDIS_FOLDER [AOF_NAME]
        Turns the RDB into the AOF a Redis started with appendonly yes
        loads (REDIS_FOLDER: the embedded Redis's data_folder/redis, or the
        hub Redis's dir), through a redis-server of its own on loopback.

Why a plain copy of a running WS is consistent: the WS never changes a
committed chunk; a chunk, a stream and a target appear by one rename of a
finished directory, and stream.json is replaced by one rename. A copy sees
each whole or not at all. A stream deleted (or a newest, unacknowledged
chunk rolled back) while it is copied is left out.
"""
import os
import shutil
import subprocess
import sys
import time

import redis
from server import store
from server.ws.storage import CHUNK

TOP = ('streams', 'targets')   # streams first: a target outlives them


class Vanished(Exception):
    pass


def _copy_file(src, dst):
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        raise Vanished(src) from None


def _copy_tree(src, dst, skip=lambda name: False):
    try:
        names = sorted(os.listdir(src))
    except FileNotFoundError:
        raise Vanished(src) from None
    os.makedirs(dst, exist_ok=True)
    for name in names:
        if '.tmp-' in name or skip(name):
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            _copy_tree(s, d)
        else:
            _copy_file(s, d)


def _copy_stream(src, dst):
    _copy_tree(src, dst, skip=lambda n: n in ('buffer', 'chunks'))
    chunks = os.path.join(src, 'chunks')
    if not os.path.isdir(chunks):
        return
    for name in sorted(os.listdir(chunks)):
        if not CHUNK.fullmatch(name):
            continue
        tmp = os.path.join(dst, 'chunks', '.tmp-' + name)
        try:
            _copy_tree(os.path.join(chunks, name), tmp)
        except Vanished:   # rolled back: never acknowledged
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        os.rename(tmp, os.path.join(dst, 'chunks', name))


def backup_ws(data_folder, dest):
    """Copy the committed state of the WS at `data_folder` to `dest` (a
    new folder); returns {'streams': n, 'left_out': [deleted meanwhile]}."""
    os.makedirs(dest, mode=0o700)
    left_out, n = [], 0
    for top in TOP:
        src_top, dst_top = (os.path.join(data_folder, top),
                            os.path.join(dest, top))
        os.makedirs(dst_top)
        for name in sorted(os.listdir(src_top)):
            if name.startswith('.tmp-'):
                continue
            src, dst = os.path.join(src_top, name), os.path.join(dst_top,
                                                                 name)
            try:
                if top == 'streams':
                    _copy_stream(src, dst)
                    n += 1
                else:
                    _copy_tree(src, dst)
            except Vanished:
                shutil.rmtree(dst, ignore_errors=True)
                left_out.append('%s/%s' % (top, name))
    return {'streams': n, 'left_out': left_out}


def _persistence(client):
    return client.info('persistence')


def backup_hub(url, dest, timeout=600):
    """BGSAVE, wait for it, copy the RDB to `dest`."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        before = _persistence(client)['rdb_last_bgsave_status'], \
            client.lastsave()
        while _persistence(client)['rdb_bgsave_in_progress']:
            time.sleep(0.1)   # someone else's BGSAVE: ours comes after
        started = time.time()
        client.bgsave()
        deadline = time.monotonic() + timeout
        while True:
            info = _persistence(client)
            if not info['rdb_bgsave_in_progress'] and \
                    client.lastsave().timestamp() >= int(started):
                break
            if time.monotonic() > deadline:
                raise RuntimeError('BGSAVE did not finish in %ss' % timeout)
            time.sleep(0.1)
        if info['rdb_last_bgsave_status'] != 'ok':
            raise RuntimeError('BGSAVE failed (was %s at %s)' % before)
        folder = client.config_get('dir')['dir']
        name = client.config_get('dbfilename')['dbfilename']
    finally:
        client.close()
    shutil.copy2(os.path.join(folder, name), dest)
    return dest


def restore_hub(rdb, folder, appendfilename='appendonly.aof', timeout=600):
    """Load `rdb` into a redis-server of our own with its files in
    `folder`, switch AOF on (Redis writes the whole data set to the AOF)
    and shut it down: `folder` is then what a Redis with appendonly yes
    starts from."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(folder, appendfilename)):
        raise RuntimeError('%s already holds an AOF' % folder)
    shutil.copy2(rdb, os.path.join(folder, 'dump.rdb'))
    port = store.free_port()
    process = subprocess.Popen(
        [store.find_redis_binary(), '--port', str(port),
         '--bind', '127.0.0.1', '--dir', folder, '--dbfilename', 'dump.rdb',
         '--appendonly', 'no', '--appendfilename', appendfilename,
         '--save', '', '--daemonize', 'no'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if not _persistence(client)['loading']:
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError('redis-server did not load %s' % rdb)
            time.sleep(0.05)
        keys = client.dbsize()
        client.config_set('appendonly', 'yes')
        while True:
            info = _persistence(client)
            if info['aof_enabled'] and not info['aof_rewrite_in_progress'] \
                    and not info['aof_rewrite_scheduled']:
                break
            if time.monotonic() > deadline:
                raise RuntimeError('the AOF rewrite did not finish')
            time.sleep(0.05)
        if info['aof_last_bgrewrite_status'] != 'ok':
            raise RuntimeError('the AOF rewrite failed')
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
        process.wait(60)
    os.unlink(os.path.join(folder, 'dump.rdb'))
    return keys


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == 'ws':
        print(backup_ws(args[1], args[2]))
    elif len(args) == 3 and args[0] == 'hub':
        print(backup_hub(args[1], args[2]))
    elif len(args) in (3, 4) and args[0] == 'restore-hub':
        print('%d keys restored' % restore_hub(*args[1:]))
    else:
        print(__doc__.split('\n\n')[1], file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
