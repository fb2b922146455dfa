"""Who an error stop counts as (docs/security.md, "Cores: error stops").

A stream is STOPPED by errors only on the word of clients the CC vouches
for (`vouched` at activation: the core came with a core key, or its donor
has credited frames), each network or donor counted once: ten cheap
addresses cannot halt a public target. An anonymous client's error stop
backs the stream off instead (stream_record._DEACTIVATE): it goes back to
its queue only after a delay that doubles with each such stop since the
last checkpoint, capped. An activation without `client` (a caller that
did not say) counts as before: every error stop counts."""
from server.sessions_common import network_of


def network(client: str) -> str:
    """The voice of a CC's `client` (`donor:<name>`, `addr:<ip>` or
    `addr:<ipv6 /64>`): a donor is itself, an address its /24 (IPv4) or
    /64 (IPv6)."""
    kind, _, who = client.partition(':')
    net = network_of(who, 24) if kind == 'addr' else None
    return client if net is None else 'net:%s' % net


def voice(client: str | None, vouched: bool) -> tuple[str, bool]:
    """(what the stream's hash keeps as its client, whether its error
    stops count toward max_stream_fails)."""
    if not client:
        return '', True
    return network(client), vouched
