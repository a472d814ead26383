"""A grid PKI made for a test: a CA, a host certificate for 127.0.0.1, and X.509
proxies (RFC 3820), as iDDS's users and the PanDA server hold them.

iDDS's REST API authenticates a caller by the DN of the certificate TLS
verified (mod_ssl's ``SSL_CLIENT_S_DN``) against its ``allow_users``. What a
client presents is a proxy: a short-lived certificate issued by the user's own
certificate, whose subject is the user's DN plus one ``/CN=<number>``, in
one PEM file with its key and the user's certificate, the file
``X509_USER_PROXY`` names and idds-client sends as both certificate and key.
The server must accept proxies when it verifies (OpenSSL's
``X509_V_FLAG_ALLOW_PROXY_CERTS``; Apache does it through mod_gridsite).

DNs are written in OpenSSL's legacy one-line form (``/DC=org/DC=example/CN=..``),
as the grid's Apache servers export them (``SSLOptions +LegacyDNStringFormat``)
and as iDDS's and PanDA's own DN handling reads them.

``GridPki.make(directory)`` writes everything there (keys readable by the
owner only) and returns the paths and DNs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Organisation of the test PKI's names: what iDDS's allow list matches.
BASE_DN = (("DC", "org"), ("DC", "swf-testbed"), ("OU", "tests"))
# RFC 3820's proxyCertInfo extension: the proxy inherits all the issuer's rights
# (SEQUENCE { SEQUENCE { OID id-ppl-inheritAll 1.3.6.1.5.5.7.21.1 } }).
PROXY_CERT_INFO_OID = "1.3.6.1.5.5.7.1.14"
PROXY_CERT_INFO_INHERIT_ALL = bytes.fromhex("300c300a06082b06010505071501")


@dataclass(frozen=True)
class ProxyCredential:
    """A user's proxy: ``path`` holds the proxy certificate, its key and the
    user's certificate; ``user_dn`` is the user's DN, ``dn`` the proxy's (what
    a server sees)."""

    path: Path
    user_dn: str
    dn: str


@dataclass(frozen=True)
class GridPki:
    ca: Path  # the CA's certificate (PEM): what servers and clients trust
    server_cert: Path  # the host certificate, for 127.0.0.1 and localhost
    server_key: Path
    user: ProxyCredential  # the service's operator, who creates iDDS's tasks
    panda: ProxyCredential  # the PanDA server's own credential, for its relay to iDDS

    @classmethod
    def make(cls, directory: Path, *, valid_for: dt.timedelta = dt.timedelta(days=1)) -> GridPki:
        # cryptography comes with Prefect (and with idds-server in .venv-peers);
        # imported here as only the tests and the demo make certificates.
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name((*BASE_DN, ("CN", "swf-testbed test CA")))
        ca = _sign(
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name),
            ca_key.public_key(),
            ca_key,
            now,
            valid_for * 2,
            [
                (x509.BasicConstraints(ca=True, path_length=None), True),
                (_usage(key_cert_sign=True), True),
                (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
            ],
        )
        _write(directory / "ca.pem", _pem(ca))

        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _sign(
            x509.CertificateBuilder()
            .subject_name(_name((*BASE_DN, ("CN", "127.0.0.1"))))
            .issuer_name(ca_name),
            server_key.public_key(),
            ca_key,
            now,
            valid_for,
            [
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (_usage(), True),
                (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
                (
                    x509.SubjectAlternativeName(
                        [
                            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                            x509.DNSName("localhost"),
                        ]
                    ),
                    False,
                ),
            ],
        )
        _write(directory / "hostcert.pem", _pem(server))
        _write(directory / "hostkey.pem", _key_pem(server_key), private=True)

        def proxy(common_name: str, file_name: str) -> ProxyCredential:
            return _proxy(
                directory / file_name,
                (*BASE_DN, ("CN", common_name)),
                ca_name,
                ca_key,
                now,
                valid_for,
            )

        return cls(
            directory / "ca.pem",
            directory / "hostcert.pem",
            directory / "hostkey.pem",
            proxy("swf-panda-workers operator", "x509up_operator"),
            proxy("pandasrv1.swf-testbed.org", "x509up_panda"),
        )


def legacy_dn(rdns: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"/{kind}={value}" for kind, value in rdns)


def _proxy(
    path: Path,
    user_rdns: tuple[tuple[str, str], ...],
    ca_name: Any,
    ca_key: Any,
    now: dt.datetime,
    valid_for: dt.timedelta,
) -> ProxyCredential:
    """A user certificate issued by the CA, and a proxy issued by it (subject:
    the user's plus /CN=<serial>, as voms-proxy-init makes them), in one file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    user_key = ec.generate_private_key(ec.SECP256R1())
    user_name = _name(user_rdns)
    user = _sign(
        x509.CertificateBuilder().subject_name(user_name).issuer_name(ca_name),
        user_key.public_key(),
        ca_key,
        now,
        valid_for,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_usage(), True),
            (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ],
    )
    proxy_serial = secrets.randbelow(2**31 - 1) + 1
    proxy_rdns = (*user_rdns, ("CN", str(proxy_serial)))
    proxy_key = ec.generate_private_key(ec.SECP256R1())
    proxy = _sign(
        x509.CertificateBuilder().subject_name(_name(proxy_rdns)).issuer_name(user_name),
        proxy_key.public_key(),
        user_key,
        now,
        min(valid_for, dt.timedelta(hours=12)),
        [
            (_usage(), True),
            (
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier(PROXY_CERT_INFO_OID), PROXY_CERT_INFO_INHERIT_ALL
                ),
                True,
            ),
        ],
        serial=proxy_serial,
    )
    # As grid-proxy-init writes it: the proxy, its key, then the issuing certificate.
    _write(path, _pem(proxy) + _key_pem(proxy_key) + _pem(user), private=True)
    return ProxyCredential(path, legacy_dn(user_rdns), legacy_dn(proxy_rdns))


def _name(rdns: tuple[tuple[str, str], ...]) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    oids = {
        "DC": NameOID.DOMAIN_COMPONENT,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "CN": NameOID.COMMON_NAME,
    }
    return x509.Name([x509.NameAttribute(oids[kind], value) for kind, value in rdns])


def _usage(key_cert_sign: bool = False) -> Any:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(
    builder: Any,
    public_key: Any,
    issuer_key: Any,
    now: dt.datetime,
    valid_for: dt.timedelta,
    extensions: list[tuple[Any, bool]],
    serial: int | None = None,
) -> Any:
    """``serial``: a proxy's is its last CN; other certificates get a random one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    builder = (
        builder.public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + valid_for)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    pem: bytes = certificate.public_bytes(Encoding.PEM)
    return pem


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    pem: bytes = key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())
    return pem


def _write(path: Path, content: bytes, private: bool = False) -> None:
    """Write a file; a private one is readable by its owner only from the first byte."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(content)
