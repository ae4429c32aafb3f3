"""A throwaway CA and certificates for the TLS tests (the `cryptography` package, a dev dependency)."""
from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.coordinator.local import LocalTLS


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: str, name: str = "ca") -> tuple[str, object, object]:
    """(PEM path, certificate, key) of a fresh CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(f"rlgrid test {name}")).issuer_name(_name(f"rlgrid test {name}"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _write(os.path.join(directory, f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM)), cert, key


def make_leaf(directory: str, name: str, ca_cert, ca_key, dns: tuple[str, ...] = ("localhost",),
              ips: tuple[str, ...] = ("127.0.0.1", "::1")) -> tuple[str, str]:
    """(cert PEM, key PEM) for `dns` and `ips` (default: this host's loopback names), usable as server and
    as client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (_write(os.path.join(directory, f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM)),
            _write(os.path.join(directory, f"{name}-key.pem"), _key_pem(key)))


def make_local_tls(directory: str) -> LocalTLS:
    """A CA and one localhost certificate signed by it, as a LocalCluster uses them."""
    os.makedirs(directory, exist_ok=True)
    ca, ca_cert, ca_key = make_ca(directory)
    cert, key = make_leaf(directory, "service", ca_cert, ca_key)
    return LocalTLS(ca=ca, cert=cert, key=key)
