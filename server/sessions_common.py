"""What the command center and the workservers agree on about activations
and the sessions they end in (the protocol: server/ws/sessions.py). Both
servers import these; neither writes them again."""
import ipaddress
import time
from typing import Any

# Activations one CC -> WS call may carry (the CC batches them under load;
# the WS refuses a longer list).
MAX_ACTIVATIONS = 64

# Per-minute counts are kept this long (older ones are dropped).
MINUTES_KEPT = 120

# Why a session ended, by the WS's mode of ending its activation.
REASON_OF_MODE: dict[str, str] = {
    'stop': 'stop', 'error': 'error', 'expire': 'expiry',
    'halt': 'manager_stop', 'delete': 'deletion', 'restart': 'ws_restart'}
REASONS: tuple[str, ...] = tuple(REASON_OF_MODE.values())

# The fields of one session record, as the WS reports it.
SESSION_FIELDS: tuple[str, ...] = (
    'id', 'donor', 'engine', 'core_version', 'target_id', 'stream_id',
    'start', 'end', 'reason', 'frames')


def minute(t: float | None = None) -> int:
    """The unix minute of `t` (default now): the key of per-minute counts."""
    return int((time.time() if t is None else t) // 60)


def network_of(address: str, ipv4_bits: int) -> Any:
    """The network an address (or network) counts as, for who an
    activation's `client` is: IPv4 (an IPv4-mapped IPv6 one as IPv4) cut
    to `ipv4_bits`, IPv6 to its /64 (one host often has a whole /64); a
    shorter prefix is kept. None if `address` is neither."""
    try:
        net = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return None
    if net.version == 6 and net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network(net.network_address.ipv4_mapped)
    bits = ipv4_bits if net.version == 4 else 64
    return net.supernet(new_prefix=bits) if net.prefixlen > bits else net
