"""The test grid PKI: proxies shaped as grid-proxy-init writes them, which a
server verifies only when it accepts proxies (as iDDS's Apache does through
mod_gridsite), and iDDS's auth configuration made of their DNs."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from cryptography import x509

from swf_testbed.peers.grid_pki import GridPki
from swf_testbed.peers.idds_rest_app import auth_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> GridPki:
    return GridPki.make(tmp_path_factory.mktemp("pki"))


def test_a_proxy_file_holds_the_proxy_its_key_and_the_user_certificate(pki: GridPki) -> None:
    text = pki.user.path.read_text()
    assert text.count("BEGIN CERTIFICATE") == 2 and text.count("PRIVATE KEY-----") == 2
    proxy, user = x509.load_pem_x509_certificates(text.encode())
    assert proxy.issuer == user.subject
    assert pki.user.dn.startswith(pki.user.user_dn + "/CN=")
    assert pki.user.dn.rsplit("/CN=", 1)[1] == str(proxy.serial_number)
    assert (pki.user.path.stat().st_mode & 0o777) == 0o600
    assert pki.user.dn != pki.panda.dn


def _handshake(pki: GridPki, allow_proxies: bool) -> dict | None:
    """A TLS handshake over a socket pair: the client presents the operator's
    proxy; the peer certificate the server verified (None: refused)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki.server_cert, pki.server_key)
    server_context.load_verify_locations(pki.ca)
    server_context.verify_mode = ssl.CERT_REQUIRED
    if allow_proxies:
        server_context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    client_context = ssl.create_default_context(cafile=str(pki.ca))
    client_context.load_cert_chain(pki.user.path, pki.user.path)
    left, right = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_context.wrap_socket(left, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
        except ssl.SSLError as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(right, server_hostname="127.0.0.1") as tls:
            tls.recv(1)  # TLS 1.3: the server's verdict on the client comes after
    except (ssl.SSLError, OSError):
        pass  # the server's side says what happened
    thread.join(timeout=10)
    peer = seen.get("peer")
    return peer if isinstance(peer, dict) else None


def test_a_server_verifies_the_proxy_only_when_it_accepts_proxies(pki: GridPki) -> None:
    peer = _handshake(pki, allow_proxies=True)
    assert peer is not None
    common_names = [value for rdn in peer["subject"] for key, value in rdn if key == "commonName"]
    assert common_names == ["swf-panda-workers operator", pki.user.dn.rsplit("/CN=", 1)[1]]
    assert _handshake(pki, allow_proxies=False) is None


def test_idds_auth_configuration_lists_the_dns(pki: GridPki) -> None:
    text = auth_config([pki.user.user_dn, pki.panda.user_dn], [pki.panda.user_dn])
    assert f"allow_users = {pki.user.user_dn},{pki.panda.user_dn}\n" in text
    assert f"super_users = {pki.panda.user_dn}\n" in text
    with pytest.raises(ValueError, match="comma"):
        auth_config(["CN=a,DC=b"], [])
