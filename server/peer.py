"""HTTPS calls from one server to another (CC <-> WS): non-blocking, bounded
in time, the peer's certificate verified against our CA bundle."""
import json

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest


class PeerError(Exception):
    """The peer could not be reached or did not answer in time (it counts
    as a failure of that peer), or answered with something that is not
    JSON."""


class PeerReply:
    def __init__(self, code, body, headers=None):
        self.code = code
        self.body = body
        self.headers = headers or {}

    @property
    def error(self):
        if isinstance(self.body, dict):
            return self.body.get('error', '')
        return ''


async def call(ssl_ctx, method, url, body=None, auth=None, timeout=10.0,
               raw=False):
    """`method` `url` with a JSON body; returns a PeerReply (any HTTP status).
    Raises PeerError when the peer is unreachable or times out."""
    headers = {'Content-Type': 'application/json'}
    if auth is not None:
        headers['Authorization'] = auth
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    elif method in ('PUT', 'POST'):
        data = b'{}'
    request = HTTPRequest(url, method=method, headers=headers, body=data,
                          ssl_options=ssl_ctx, connect_timeout=timeout,
                          request_timeout=timeout, follow_redirects=False,
                          decompress_response=True)
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except HTTPClientError as e:  # pragma: no cover - raise_error=False
        response = e.response
    except Exception as e:  # connection refused, TLS failure, DNS
        raise PeerError('%s %s: %s' % (method, url, e))
    if response.code == 599:
        raise PeerError('%s %s: %s' % (method, url, response.error))
    if raw:
        return PeerReply(response.code, response.body, response.headers)
    try:
        parsed = json.loads(response.body) if response.body else {}
    except ValueError:
        raise PeerError('%s %s: reply is not JSON (HTTP %d)'
                        % (method, url, response.code))
    return PeerReply(response.code, parsed, response.headers)
