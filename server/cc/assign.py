"""POST /core/assign: hand a core a stream to work on.

1. Candidates: targets of the `public` stage index (plus `beta` when the
   core asks for it), or just `target_id` when given; `private` never.
   Keep those whose engine matches and whose engine_versions contain the
   core's engine_version, and that have streams on an online WS.
2. Order the candidates by weighted random sampling without replacement
   (key u ** (1 / weight), largest first), so each is tried first with
   probability proportional to its weight.
3. For a target, order its online WS the same way, weighted by how many of
   the target's streams each holds, and ask each to activate a stream
   (`POST /streams/activate`, atomic on the WS, so concurrent cores never
   share a stream). A WS that fails or has nothing free is skipped.
4. First success wins: `{token, uri, url, options}`. Nothing anywhere: 503.
"""
import json
import logging
import random

from server import peer
from server.cc import accounts, keys, targets, workservers
from server.web import APIError, APIHandler

log = logging.getLogger('siegetank.cc.assign')


def weighted_order(weights):
    """Items of {item: weight > 0} in a random order where each position is
    filled with probability proportional to weight (Efraimidis-Spirakis)."""
    keyed = [(random.random() ** (1.0 / w), item)
             for item, w in weights.items() if w > 0]
    keyed.sort(reverse=True)
    return [item for _, item in keyed]


async def candidates(redis, engine, version, stages, target_id=None):
    """[(target_id, weight, options, {online ws: stream count})] of the
    targets that could serve, read in one round trip."""
    if target_id is not None:
        ids = [target_id]
    else:
        ids = sorted(await redis.sunion(*[keys.stage_targets(s)
                                          for s in stages]))
    online = set(await workservers.online(redis))
    pipe = redis.pipeline(transaction=False)
    for tid in ids:
        pipe.hmget(keys.target(tid), 'engine', 'engine_versions', 'stage',
                   'weight', 'options')
        pipe.hgetall(keys.target_ws(tid))
    replies = await pipe.execute()
    result = []
    for i, tid in enumerate(ids):
        (t_engine, versions, stage, weight, options), counts = \
            replies[2 * i], replies[2 * i + 1]
        if t_engine != engine or stage not in stages \
                or version not in json.loads(versions):
            continue
        ws_counts = {w: int(c) for w, c in counts.items()
                     if w in online and int(c) > 0}
        if ws_counts:
            result.append((tid, float(weight), json.loads(options),
                           ws_counts))
    return result


async def activate(app, ws, target_id, donor):
    """A token from `ws` for a free stream of the target, or None."""
    body = {'target_id': target_id}
    if donor is not None:
        body['donor_id'] = donor
    try:
        reply = await workservers.request(app, ws, 'POST', '/streams/activate',
                                          body)
    except peer.PeerError as e:
        log.info('activate on %s failed: %s', ws, e)
        return None
    if reply.code == 200 and isinstance(reply.body, dict) \
            and isinstance(reply.body.get('token'), str):
        return reply.body['token']
    if reply.code != 503:
        log.warning('activate on %s answered %d %s', ws, reply.code,
                    reply.error)
    return None


async def assign(app, engine, version, stages, donor, target_id=None):
    """The assignment reply, or None when nothing is free."""
    found = {tid: (weight, options, ws_counts) for tid, weight, options,
             ws_counts in await candidates(app.redis, engine, version,
                                           stages, target_id)}
    for tid in weighted_order({tid: c[0] for tid, c in found.items()}):
        _, options, ws_counts = found[tid]
        for ws in weighted_order(ws_counts):
            base = await workservers.base_url(app.redis, ws)
            token = await activate(app, ws, tid, donor) if base else None
            if token is None:
                continue
            url = base + '/core/start'
            return {'token': token, 'uri': url, 'url': url,
                    'options': options}
    return None


class AssignHandler(APIHandler):
    async def post(self):
        engine = self.field('engine', str, check=targets.ENGINE.match)
        version = self.field('engine_version', str,
                             check=lambda v: 0 < len(v) <= 64)
        self.field('core_version', str, None)
        stage = self.field('stage', str, 'public',
                           check=lambda s: s in ('public', 'beta'))
        donor_token = self.field('donor_token', (str, type(None)), None)
        target_id = self.field('target_id', (str, type(None)), None)
        stages = ('public', 'beta') if stage == 'beta' else ('public',)
        if target_id is not None:
            targets.check_target_id(target_id)
            target = await targets.load(self.redis, target_id)
            if target is None:
                raise APIError(404, 'no such target %s' % target_id)
            if target['stage'] == 'private':
                raise APIError(403, 'target %s is private' % target_id)
            # Naming a beta target is asking for beta.
            stages = ('public', 'beta')
        donor = None
        if donor_token:
            donor = await accounts.donor_of(self.redis, donor_token)
            if donor is None:
                raise APIError(401, 'unknown donor token')
        reply = await assign(self.application, engine, version, stages,
                             donor, target_id)
        if reply is None:
            raise APIError(503, 'no stream available for %s %s'
                           % (engine, version))
        self.write_json(reply)


default_handlers = [
    (r'/core/assign', AssignHandler),
]
