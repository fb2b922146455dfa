"""The real client address behind a load balancer.

A connection from an address of `trusted_proxies` (networks; none by
default) may start with a PROXY protocol header, v1 (text) or v2 (binary,
haproxy's `send-proxy-v2`), read here off the plain socket before the TLS
handshake: its source address is then the client's. Without the header, a
request from a trusted proxy that terminated TLS itself may name the client
in `X-Forwarded-For` (the rightmost address that is not a trusted proxy).
Anyone else's PROXY header reaches the TLS handshake as garbage and the
connection is closed; anyone else's `X-Forwarded-For` is ignored.

A connection from a trusted proxy is never a loopback connection (the
account bootstrap, /metrics' loopback rule): the balancer may carry anyone.
"""
import asyncio
import functools
import ipaddress
import socket
import struct

V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
V1_MAX = 107          # the longest v1 line, CRLF included (the spec's bound)
V2_MAX = 16 + 4096    # a v2 header with TLVs, at most (haproxy's are short)
POLL_S = 0.01         # wait for the rest of a header that came in pieces


class BadHeader(Exception):
    """A trusted proxy sent something that is not a PROXY header."""


class Peer(tuple):
    """A connection's address as Tornado keeps it, `(ip, port)`, with the
    trusted proxy it came through (`proxy`, None for a direct one) and
    whether a PROXY header named the client (`declared`)."""

    proxy = None
    declared = False

    @classmethod
    def through(cls, address, proxy, declared):
        peer = cls(address)
        peer.proxy, peer.declared = proxy, declared
        return peer


@functools.lru_cache(maxsize=8)
def networks(trusted):
    return tuple(ipaddress.ip_network(n, strict=False) for n in trusted)


def trusted(address, nets):
    """True if the IP `address` is inside one of the networks `nets`."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def forwarded_for(value, nets):
    """The client named by an `X-Forwarded-For` value: its rightmost
    address that is not a trusted proxy, or None (none valid)."""
    for part in reversed(value.split(',')):
        part = part.strip()
        try:
            ipaddress.ip_address(part)
        except ValueError:
            return None  # a hop we cannot read: trust nothing left of it
        if not trusted(part, nets):
            return part
    return None


def parse_v1(line):
    """(source ip, source port) of a v1 line (CRLF included), or None for
    `PROXY UNKNOWN` (the proxy's own connection, e.g. a health check)."""
    try:
        parts = line[:-2].decode('ascii').split(' ')
    except UnicodeDecodeError:
        raise BadHeader('PROXY v1 header is not ASCII') from None
    if parts[:2] == ['PROXY', 'UNKNOWN']:
        return None
    if len(parts) != 6 or parts[0] != 'PROXY' \
            or parts[1] not in ('TCP4', 'TCP6'):
        raise BadHeader('malformed PROXY v1 header')
    try:
        ip = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        port = int(parts[4])
    except ValueError:
        raise BadHeader('malformed PROXY v1 addresses') from None
    if ip.version != (4 if parts[1] == 'TCP4' else 6) \
            or not 0 <= port <= 65535:
        raise BadHeader('malformed PROXY v1 addresses')
    return str(ip), port


def parse_v2(header):
    """(source ip, source port) of a whole v2 header, or None for a LOCAL
    command or an address family other than TCP over IPv4/IPv6."""
    if len(header) < 16 or header[:12] != V2_SIGNATURE:
        raise BadHeader('malformed PROXY v2 header')
    version, command = header[12] >> 4, header[12] & 0xF
    if version != 2 or command not in (0, 1):
        raise BadHeader('unknown PROXY v2 version or command')
    body = header[16:]
    if command == 0:  # LOCAL: the proxy speaking for itself
        return None
    family = header[13]
    if family == 0x11 and len(body) >= 12:    # TCP over IPv4
        ip = socket.inet_ntop(socket.AF_INET, body[:4])
        port = struct.unpack('!H', body[8:10])[0]
    elif family == 0x21 and len(body) >= 36:  # TCP over IPv6
        ip = socket.inet_ntop(socket.AF_INET6, body[:16])
        port = struct.unpack('!H', body[32:34])[0]
    elif family in (0x11, 0x21):
        raise BadHeader('PROXY v2 addresses cut short')
    else:
        return None
    return ip, port


async def _readable(sock):
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _peek(sock, n, enough):
    """At least the bytes `enough(data)` wants (up to `n`), left unread."""
    while True:
        try:
            data = sock.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            await _readable(sock)
            continue
        if not data:
            raise ConnectionError('closed before the PROXY header')
        if enough(data):
            return data
        await asyncio.sleep(POLL_S)  # readable already: poll for the rest


def _take(sock, n):
    """Consume `n` bytes that a peek showed are there."""
    data = b''
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


async def read_header(sock):
    """The client address the PROXY header at the start of the plain socket
    `sock` names: (ip, port), None if it names none (LOCAL, UNKNOWN), or
    False if there is no header (TLS starts at once). Only the header is
    consumed; the TLS handshake after it is left unread."""
    start = await _peek(sock, 16, lambda d: len(d) >= 16 or b'\r\n' in d
                        or not (V2_SIGNATURE.startswith(d[:12])
                                or b'PROXY '.startswith(d[:6])))
    if start[:12] == V2_SIGNATURE:
        length = 16 + struct.unpack('!H', start[14:16])[0]
        if length > V2_MAX:
            raise BadHeader('PROXY v2 header over %d bytes' % V2_MAX)
        await _peek(sock, length, lambda d: len(d) >= length)
        return parse_v2(_take(sock, length))
    if start[:6] == b'PROXY ':
        data = await _peek(sock, V1_MAX, lambda d: b'\r\n' in d
                           or len(d) >= V1_MAX)
        end = data.find(b'\r\n')
        if end < 0:
            raise BadHeader('PROXY v1 header without CRLF in %d bytes'
                            % V1_MAX)
        return parse_v1(_take(sock, end + 2))
    return False
