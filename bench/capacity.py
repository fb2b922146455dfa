"""The capacity model of docs/capacity.md, computed from measured costs:
`python -m bench.capacity [results.json of a run with --only costs]`.

Every figure it prints comes from the measured per-request costs and the
assumptions in PACES and HOST below (each named in docs/capacity.md);
change them here, not in the document."""
import argparse
import json
import math
import os

from bench import servers

# Requests per core-hour at a real core's pace: a frame every 3 minutes; a
# heartbeat every 60 s (the 2014 C++ core's heartbeat_interval_, our
# core's --heartbeat-every); a checkpoint every 7200 s (the 2014 core's
# --checkpoint default) or, with our core's --checkpoint-every 60 checked
# after each frame, after every frame.
PACES = {
    '2014 core': {'frames': 20, 'heartbeats': 60, 'checkpoints': 0.5},
    'our core': {'frames': 20, 'heartbeats': 60, 'checkpoints': 20},
}
ASSIGNMENTS_PER_CORE_DAY = 4    # a core session of 6 hours
FRAME_KB = 100                  # decoded XTC frame of a ~50k-atom system
STATE_MB = 2.0                  # its state.xml.gz (kept as sent: base64)
HEARTBEAT_WIRE_B = 400          # request and reply, headers included
HOST = {
    'cpus': 8, 'cpu_target': 0.5,       # half the CPUs: room for peaks
    'disk_tb': 32, 'retention_days': 30,
    'memory_gb': 32, 'memory_target': 0.5,
    'fsyncs_per_s': 670,                # measured lower bound (see doc)
}
FSYNCS_PER_CHECKPOINT = 4       # the WS today: a chunk, then chunks/
HUB_OPS_PER_S = 100_000         # one Redis core, simple commands
STORM_S = 600                   # every core re-assigned within 10 minutes
SCALES = (10_000, 100_000, 1_000_000)


def per_core(costs, pace, size='ws_100k'):
    """What one core costs a WS per hour, and what it stores per day."""
    ws = costs[size]
    cpu = sum(pace[k] * ws[kind]['cpu_ms'] for k, kind in (
        ('frames', 'frame'), ('heartbeats', 'heartbeat'),
        ('checkpoints', 'checkpoint'))) / 1000
    redis = sum(pace[k] * ws[kind]['redis_commands'] for k, kind in (
        ('frames', 'frame'), ('heartbeats', 'heartbeat'),
        ('checkpoints', 'checkpoint')))
    state_stored = STATE_MB * 4 / 3 * 1e6
    disk_day = 24 * (pace['frames'] * FRAME_KB * 1e3
                     + pace['checkpoints'] * state_stored)
    wire_day = 24 * (pace['frames'] * FRAME_KB * 1e3 * 4 / 3
                     + pace['checkpoints'] * state_stored
                     + pace['heartbeats'] * HEARTBEAT_WIRE_B)
    return {'cpu_s_per_hour': cpu, 'redis_per_hour': redis,
            'checkpoints_per_hour': pace['checkpoints'],
            'disk_bytes_per_day': disk_day, 'wire_bytes_per_day': wire_day}


def scale(costs, pace, cores):
    c = per_core(costs, pace)
    hub = costs['hub']
    limits = {
        'CPU': cores * c['cpu_s_per_hour'] / 3600
        / (HOST['cpus'] * HOST['cpu_target']),
        'disk': cores * c['disk_bytes_per_day'] * HOST['retention_days']
        / (HOST['disk_tb'] * 1e12),
        'fsyncs': cores * c['checkpoints_per_hour'] / 3600
        * FSYNCS_PER_CHECKPOINT / HOST['fsyncs_per_s'],
        'memory': cores * max(costs[size]['rss_kb_per_connection']
                              for size in ('ws_10k', 'ws_100k')) * 1024
        / (HOST['memory_gb'] * 1e9 * HOST['memory_target']),
    }
    first = max(limits, key=limits.get)
    ws_hosts = max(2, math.ceil(limits[first]))
    assign_per_s = cores * ASSIGNMENTS_PER_CORE_DAY / 86400
    storm_per_s = cores / STORM_S
    cc_cpu = (hub['cc_cpu_ms_per_assignment'] / 1000
              / (HOST['cpus'] * HOST['cpu_target']))
    return {
        'cores': cores, 'ws_hosts': ws_hosts, 'ws_limits': limits,
        'ws_first': first,
        'ws_redis_per_s_per_host': cores / ws_hosts * c['redis_per_hour']
        / 3600,
        'cc_hosts': max(2, math.ceil(assign_per_s * cc_cpu)),
        'cc_hosts_storm': max(2, math.ceil(storm_per_s * cc_cpu)),
        'hub_per_s': assign_per_s * hub['hub_commands_per_assignment']
        + ws_hosts * hub['idle_commands_per_s'],
        'hub_per_s_storm': storm_per_s * hub['hub_commands_per_assignment']
        + ws_hosts * hub['idle_commands_per_s'],
        'disk_tb_per_day': cores * c['disk_bytes_per_day'] / 1e12,
        'disk_tb_per_ws_per_day': cores * c['disk_bytes_per_day'] / 1e12
        / ws_hosts,
        'wire_gbit_s': cores * c['wire_bytes_per_day'] * 8 / 86400 / 1e9,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('results', nargs='?', default=os.path.join(
        servers.ROOT, 'bench', 'results', 'results.json'))
    args = p.parse_args(argv)
    with open(args.results) as f:
        costs = json.load(f)['costs']
    for name, pace in PACES.items():
        c = per_core(costs, pace)
        print('\n%s: %s per core-hour; per core: %.2f s WS CPU/hour, %.0f '
              'WS Redis commands/hour, %.0f MB stored/day, %.0f MB on the '
              'wire/day' % (name, pace, c['cpu_s_per_hour'],
                             c['redis_per_hour'],
                             c['disk_bytes_per_day'] / 1e6,
                             c['wire_bytes_per_day'] / 1e6))
        print('| cores | WS hosts (first limit; CPU / disk / fsync / memory '
              'in hosts) | WS Redis cmd/s per WS | CC hosts (storm) | hub '
              'cmd/s (storm) | stored TB/day (per WS) | inbound Gbit/s |')
        print('|---|---|---|---|---|---|---|')
        for n in SCALES:
            s = scale(costs, pace, n)
            lim = s['ws_limits']
            print('| %s | %d (%s; %.1f / %.1f / %.1f / %.1f) | %s | %d (%d) '
                  '| %s (%s) | %.1f (%.2f) | %.2f |' % (
                      format(n, ','), s['ws_hosts'], s['ws_first'],
                      lim['CPU'], lim['disk'], lim['fsyncs'], lim['memory'],
                      format(round(s['ws_redis_per_s_per_host']), ','),
                      s['cc_hosts'], s['cc_hosts_storm'],
                      format(round(s['hub_per_s']), ','),
                      format(round(s['hub_per_s_storm']), ','),
                      s['disk_tb_per_day'], s['disk_tb_per_ws_per_day'],
                      s['wire_gbit_s']))


if __name__ == '__main__':
    main()
