"""The slow-rep probe: does a checkpoint's fsync wait for data that some
earlier, unrelated write left in the page cache?

Writes `--mb` MB to one file without any fsync (as a run of frame PUTs
does), then times a small checkpoint-like commit (write a new file, fsync
it and its folder) every `--every` seconds for `--seconds`, beside the
kernel's Dirty and Writeback figures. On Linux the dirty data is written
back once it is dirty_expire_centisecs old (30 s by default): in that
window the commits of whatever runs then wait behind it.

`python -m bench.writeback [--dir D] [--mb 400] [--seconds 50]`"""
import argparse
import os
import shutil
import tempfile
import time

from bench.ceiling import commit_file
from bench.workloads import _disk, _meminfo_kb


def commit(folder, n, body=b'x' * 2000):
    path = os.path.join(folder, 'ckpt.%d' % n)
    t = time.perf_counter()
    commit_file(folder, path, body)
    os.unlink(path)
    return 1000 * (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dir', help='a folder on the disk to probe '
                   '(default: a new one under the system temp folder)')
    p.add_argument('--mb', type=int, default=400)
    p.add_argument('--seconds', type=float, default=50.0)
    p.add_argument('--every', type=float, default=0.1)
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix='writeback-', dir=args.dir)
    try:
        with open('/proc/sys/vm/dirty_expire_centisecs') as f:
            print('dirty_expire_centisecs', f.read().strip())
        chunk = os.urandom(100_000)
        t0 = time.perf_counter()
        with open(os.path.join(folder, 'frames'), 'wb') as f:
            for _ in range(args.mb * 10):
                f.write(chunk)
        print('wrote %d MB unsynced in %.1f s; now a commit every %.2f s'
              % (args.mb, time.perf_counter() - t0, args.every))
        print('%6s %9s %9s %9s %9s %9s' % ('t s', 'commits', 'p50 ms',
                                           'max ms', 'dirty MB', 'wb MB/s'))
        n = 0
        second, lat = int(time.perf_counter() - t0), []
        disk = _disk()[0]
        while time.perf_counter() - t0 < args.seconds:
            lat.append(commit(folder, n))
            n += 1
            now = int(time.perf_counter() - t0)
            if now != second:
                lat.sort()
                written = _disk()[0]
                print('%6d %9d %9.1f %9.1f %9.0f %9.0f' % (
                    second, len(lat), lat[len(lat) // 2], lat[-1],
                    _meminfo_kb('Dirty').get('Dirty', 0) / 1024,
                    (written - disk) / 1e6), flush=True)
                second, lat, disk = now, [], written
            time.sleep(args.every)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
