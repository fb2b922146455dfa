"""The workserver's side of the CC link: register with every configured CC
(retrying with backoff while it is unreachable, then refreshing now and then
so a CC that lost its registry learns us again), and say goodbye on a clean
shutdown."""
import asyncio
import logging

from server import peer

log = logging.getLogger('siegetank.ws.registration')

REFRESH_IN_S = 60.0


def _url(cc):
    return 'https://%s' % cc['url']


async def register_forever(app, cc_name, cc):
    """Runs until cancelled."""
    ext = app.config.external_options
    body = {'name': app.config.name, 'url': ext['external_url'],
            'http_port': ext['external_http_port']}
    delay = 1.0
    while True:
        try:
            reply = await peer.call(app.client_ssl, 'PUT',
                                    _url(cc) + '/ws/register', body,
                                    auth=cc['pass'], timeout=10)
            if reply.code == 200:
                if delay:
                    log.info('registered with command center %s', cc_name)
                delay = 0
                await asyncio.sleep(REFRESH_IN_S)
                continue
            log.error('command center %s refused registration: %d %s',
                      cc_name, reply.code, reply.error)
        except peer.PeerError as e:
            log.warning('command center %s unreachable: %s', cc_name, e)
        delay = min(max(delay * 2, 1.0), app.config.register_retry_max_in_s)
        await asyncio.sleep(delay)


async def disconnect_all(app):
    async def bye(cc_name, cc):
        try:
            await peer.call(app.client_ssl, 'PUT', _url(cc) + '/ws/disconnect',
                            {'name': app.config.name}, auth=cc['pass'],
                            timeout=3)
        except peer.PeerError as e:
            log.warning('could not disconnect from %s: %s', cc_name, e)
    await asyncio.gather(*(bye(n, cc) for n, cc in
                           app.config.command_centers.items()))
