"""CC -> WS activations, coalesced per WS.

While a call to a WS is in flight, the activations asked of it meanwhile
wait and go together in the next call (`POST /streams/activate` with
`activations`: each is its own atomic step on the WS, all sent to its
Redis at once). At low load every call carries one activation, in the
single form; under load one call carries many, so the HTTP cost of an
assignment on both sides shrinks as the load grows (the call was about
1 ms of WS CPU and a round trip per assignment). An activation waits at
most for the call before its own.
"""
import asyncio
import logging

from server import peer
from server.cc import workservers
from server.sessions_common import MAX_ACTIVATIONS

log = logging.getLogger('siegetank.cc.activations')


class Activations:
    """One per process (`app.activations`)."""

    def __init__(self, app):
        self.app = app
        self.pending = {}    # ws name -> [(base url, body, future)]
        self.sending = {}    # ws name -> the task sending its calls

    async def activate(self, ws, base, body):
        """(token, session id or None) of an activation of `body`
        ({target_id, client, ...}) on `ws` (at `base`), or None (nothing
        free, or the WS failed)."""
        future = asyncio.get_running_loop().create_future()
        self.pending.setdefault(ws, []).append((base, body, future))
        if ws not in self.sending:
            self.sending[ws] = asyncio.ensure_future(self._send_all(ws))
        return await future

    async def _send_all(self, ws):
        try:
            while self.pending.get(ws):
                batch = self.pending[ws][:MAX_ACTIVATIONS]
                del self.pending[ws][:MAX_ACTIVATIONS]
                try:
                    tokens = await self._call(ws, batch)
                except Exception:
                    log.exception('activations on %s failed', ws)
                    tokens = [None] * len(batch)
                for (_, _, future), token in zip(batch, tokens, strict=True):
                    if not future.done():
                        future.set_result(token)
        finally:
            del self.sending[ws]
            for _, _, future in self.pending.pop(ws, []):  # cancelled
                if not future.done():
                    future.set_result(None)

    async def _call(self, ws, batch):
        base = batch[0][0]
        body = batch[0][1] if len(batch) == 1 else {
            'activations': [b for _, b, _ in batch]}
        try:
            reply = await workservers.request(
                self.app, ws, 'POST', '/streams/activate', body, base=base)
        except peer.PeerError as e:
            log.info('activate on %s failed: %s', ws, e)
            return [None] * len(batch)
        if reply.code != 200:
            if reply.code != 503:
                log.warning('activate on %s answered %d %s', ws, reply.code,
                            reply.error)
            return [None] * len(batch)
        results = [reply.body] if len(batch) == 1 else \
            reply.body.get('activations') if isinstance(reply.body, dict) \
            else None
        if not isinstance(results, list) or len(results) != len(batch):
            log.warning('activate on %s answered %d results for %d',
                        ws, len(results or []), len(batch))
            return [None] * len(batch)
        return [(r['token'], r.get('session')
                 if isinstance(r.get('session'), str) else None)
                if isinstance(r, dict) and isinstance(r.get('token'), str)
                else None for r in results]
