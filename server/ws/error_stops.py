"""Who an error stop counts as (docs/security.md, "Cores: error stops").

A stream is STOPPED by errors only on the word of clients the CC vouches
for (`vouched` at activation: the core came with a core key, or its donor
has credited frames), each network or donor counted once: ten cheap
addresses cannot halt a public target. An anonymous client's error stop
backs the stream off instead (stream_record._DEACTIVATE): it goes back to
its queue only after a delay that doubles with each such stop since the
last checkpoint, capped. An activation without `client` (a caller that
did not say) counts as before: every error stop counts."""
import ipaddress


def network(client: str) -> str:
    """The voice of a CC's `client` (`donor:<name>`, `addr:<ip>` or
    `addr:<ipv6 /64>`): a donor is itself, an address its /24 (IPv4) or
    /64 (IPv6)."""
    kind, _, who = client.partition(':')
    if kind != 'addr':
        return client
    try:
        net = ipaddress.ip_network(who, strict=False)
    except ValueError:
        return client
    if isinstance(net, ipaddress.IPv6Network) and \
            net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network(net.network_address.ipv4_mapped)
    prefix = 24 if net.version == 4 else 64
    if net.prefixlen > prefix:
        net = net.supernet(new_prefix=prefix)
    return 'net:%s' % net


def voice(client: str | None, vouched: bool) -> tuple[str, bool]:
    """(what the stream's hash keeps as its client, whether its error
    stops count toward max_stream_fails)."""
    if not client:
        return '', True
    return network(client), vouched
