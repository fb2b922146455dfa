"""TLS for both servers: SSL contexts, and a dev CA + server certificate
generated on first start when the configured files are missing.

All servers of one machine share one dev CA (ca.pem next to the certificate,
or the configured `ssl_ca_certs`), so a CC and its WS verify each other out of
the box. Real deployments put CA-issued files in place and nothing is made.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.disk import atomic_write

if TYPE_CHECKING:
    from server.config import Settings


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                         'Siegetank dev'),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder,
              days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)) \
                  .not_valid_after(now + datetime.timedelta(days=days))


def make_ca(cert_path: str, key_path: str) -> None:
    key = _key()
    name = _name('Siegetank development CA')
    cert = _validity(x509.CertificateBuilder(), 3650) \
        .subject_name(name).issuer_name(name).public_key(key.public_key()) \
        .serial_number(x509.random_serial_number()) \
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True) \
        .add_extension(x509.KeyUsage(False, False, False, False, False, True,
                                     True, False, False), True) \
        .sign(key, hashes.SHA256())
    atomic_write(key_path, _pem_key(key), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM),
                 mode=0o644)


def make_server_cert(cert_path: str, key_path: str, ca_cert_path: str,
                     ca_key_path: str, hosts: Sequence[str]) -> None:
    with open(ca_cert_path, 'rb') as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(ca_key_path, 'rb') as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                               ed25519.Ed25519PrivateKey)):
        raise RuntimeError('%s: not a key that signs certificates (EC, RSA '
                           'or Ed25519)' % ca_key_path)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = _key()
    cert = _validity(x509.CertificateBuilder(), 825) \
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject) \
        .public_key(key.public_key()) \
        .serial_number(x509.random_serial_number()) \
        .add_extension(x509.SubjectAlternativeName(sans), False) \
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       True) \
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]),
                       False) \
        .sign(ca_key, hashes.SHA256())
    atomic_write(key_path, _pem_key(key), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM),
                 mode=0o644)


def ensure_dev_certs(certfile: str, keyfile: str, ca_certs: str,
                     hosts: Sequence[str] = ('localhost', '127.0.0.1')
                     ) -> bool:
    """Generate what is missing: the dev CA (at `ca_certs`, its key beside
    it) and a server certificate signed by it. Returns True if anything was
    made. Safe when several servers start at once (file lock)."""
    if os.path.exists(certfile) and os.path.exists(keyfile) \
            and os.path.exists(ca_certs):
        return False
    folder = os.path.dirname(ca_certs)
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.dirname(certfile), exist_ok=True)
    with open(os.path.join(folder, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = False
        ca_key = os.path.splitext(ca_certs)[0] + '.key'
        if not os.path.exists(ca_certs):
            make_ca(ca_certs, ca_key)
            made = True
        if not (os.path.exists(certfile) and os.path.exists(keyfile)):
            if not os.path.exists(ca_key):
                raise RuntimeError('%s is missing and cannot be generated: the'
                                   ' CA %s has no key beside it' % (certfile,
                                                                   ca_certs))
            make_server_cert(certfile, keyfile, ca_certs, ca_key, list(hosts))
            made = True
        return made


class CertFiles(Protocol):
    """What a server context needs of the settings."""

    @property
    def ssl_certfile(self) -> str: ...

    @property
    def ssl_key(self) -> str: ...


def server_context(settings: CertFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.ssl_certfile, settings.ssl_key)
    return ctx


def client_context(ca_certs: str) -> ssl.SSLContext:
    """Verifies the peer server against our CA bundle; never unverified."""
    return ssl.create_default_context(cafile=ca_certs)


def ensure_for_settings(settings: Settings) -> bool:
    return ensure_dev_certs(settings.ssl_certfile, settings.ssl_key,
                            settings.ssl_ca_certs,
                            settings.dev_cert_hosts)
