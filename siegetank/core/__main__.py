"""`python -m siegetank.core`: run one or many cores until SIGINT/SIGTERM
(each checkpoints and stops its stream first) or --max-frames."""
import argparse
import logging
import os
import signal
import sys
import threading

from siegetank.core import Backoff, Core, Fatal, Heartbeats, make_engine

# The line a run prints at its end (stderr): every core's stats summed; tools
# read it (tools/adaptive_demo.py).
SUMMARY = ('core: %(frames)d frames, %(checkpoints)d checkpoints, '
           '%(streams)d streams (%(stopped_by_manager)d stopped by the '
           'manager), %(errors)d errors, %(retries)d retries')


def parse(argv):
    p = argparse.ArgumentParser(prog='python -m siegetank.core',
                                description='Siegetank reference core.')
    p.add_argument('--cc', required=True, help='command center host:port')
    p.add_argument('--ca', help='CA bundle to verify the CC and WS against '
                   '(default: the system store)')
    p.add_argument('--engine', choices=('openmm', 'synthetic'),
                   default='openmm')
    p.add_argument('--donor-token')
    p.add_argument('--core-key', default=os.environ.get('SIEGETANK_CORE_KEY'),
                   help='the core key the CC issued for this engine '
                   '(default: $SIEGETANK_CORE_KEY)')
    p.add_argument('--target-id', help='only work on this target')
    p.add_argument('--stage', choices=('beta',),
                   help='also accept beta targets')
    p.add_argument('--cores', type=int, default=1,
                   help='cores to run in this process (threads)')
    p.add_argument('--checkpoint-every', type=float, default=60.0,
                   metavar='SECONDS')
    p.add_argument('--heartbeat-every', type=float, default=60.0,
                   metavar='SECONDS')
    p.add_argument('--max-frames', type=int,
                   help='per core: checkpoint, stop and exit after this many')
    p.add_argument('--timeout', type=float, default=30.0,
                   help='seconds per HTTP request')
    p.add_argument('--backoff-first', type=float, default=1.0)
    p.add_argument('--backoff-max', type=float, default=300.0)
    p.add_argument('--platform', help='openmm: CPU, CUDA, OpenCL, Reference '
                   '(default: the fastest present)')
    p.add_argument('--threads', type=int, help='openmm CPU threads per core')
    p.add_argument('--frame-bytes', type=int, default=1024,
                   help='synthetic: bytes per frame')
    p.add_argument('--rate', type=float, default=1.0,
                   help='synthetic: frames per second per core')
    p.add_argument('-v', '--verbose', action='store_true')
    p.add_argument('-q', '--quiet', action='store_true')
    args = p.parse_args(argv)
    if args.cores < 1:
        p.error('--cores must be >= 1')
    return args


def main(argv=None):
    args = parse(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else
        logging.DEBUG if args.verbose else logging.INFO,
        format='%(asctime)s %(name)s %(levelname)s %(message)s')
    try:
        engine = make_engine(args.engine, platform=args.platform,
                             threads=args.threads,
                             frame_bytes=args.frame_bytes, rate=args.rate)
    except (ValueError, ImportError) as e:
        print('core: %s' % e, file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum, frame):
        # First signal: checkpoint and stop cleanly; a second one kills.
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    heartbeats = Heartbeats(args.ca or True, args.timeout)
    cores, fatal = [], []

    def run(core):
        try:
            core.run()
        except Fatal as e:
            fatal.append(str(e))
            stop.set()

    threads = []
    for i in range(args.cores):
        core = Core(args.cc, engine, ca=args.ca, donor_token=args.donor_token,
                    core_key=args.core_key,
                    target_id=args.target_id, stage=args.stage,
                    checkpoint_every=args.checkpoint_every,
                    heartbeat_every=args.heartbeat_every,
                    max_frames=args.max_frames, timeout=args.timeout,
                    backoff=Backoff(args.backoff_first, args.backoff_max),
                    stop=stop, heartbeats=heartbeats, name='core%d' % i)
        cores.append(core)
        t = threading.Thread(target=run, args=(core,), name=core.name)
        t.start()
        threads.append(t)
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    heartbeats.close()
    total = {k: sum(c.stats[k] for c in cores) for k in cores[0].stats}
    print(SUMMARY % total, file=sys.stderr)
    if fatal:
        print('core: %s' % fatal[0], file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
