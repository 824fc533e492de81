"""TLS: the self-signed CA and serving certificate, the server context, and certificate rotation.

Real TLS handshakes over loopback sockets; the server here is a small threaded TLS server that
takes its context from :class:`webhook.tls.CertReloader` exactly as gunicorn's ``ssl_context``
hook does (one call per accepted connection). Rotation under the real gunicorn server is tested in
``tests/test_server.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from webhook.tls import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    CertReloader,
    generate_self_signed,
    reusable_self_signed,
    server_context,
)


class TinyTLSServer:
    """Accepts connections, wraps each with ``context_for_connection()``, answers one line."""

    def __init__(self, context_for_connection: Callable[[], ssl.SSLContext]) -> None:
        self._context = context_for_connection
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self._context().wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello\n")
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.close()


def peer_cert(port: int, ca: Path, *, hostname: str = "localhost") -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=hostname) as tls:
        der = tls.getpeercert(binary_form=True)
        assert tls.recv(16) == b"hello\n"
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.fixture()
def certs(tmp_path: Path) -> tuple[Path, Path, Path]:
    return generate_self_signed(tmp_path / "tls", hostnames=["diskhooks-webhook.diskhooks.svc",
                                                             "10.1.2.3"])


def test_generated_files_verify_as_a_chain(certs: tuple[Path, Path, Path]) -> None:
    ca_path, cert_path, key_path = certs
    assert (ca_path.name, cert_path.name, key_path.name) == (CA_FILE, CERT_FILE, KEY_FILE)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in ca_path.parent.iterdir()) == [CA_FILE, CERT_FILE, KEY_FILE], \
        "the CA's private key must not be written"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(sans.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "diskhooks-webhook.diskhooks.svc"} <= dns
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_handshake_verifies_hostnames_against_the_ca(certs: tuple[Path, Path, Path]) -> None:
    ca_path, cert_path, key_path = certs
    server = TinyTLSServer(lambda: server_context(cert_path, key_path))
    try:
        for name in ("localhost", "127.0.0.1", "diskhooks-webhook.diskhooks.svc"):
            peer_cert(server.port, ca_path, hostname=name)
        with pytest.raises(ssl.SSLCertVerificationError):
            peer_cert(server.port, ca_path, hostname="other.example.com")
    finally:
        server.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_server_refuses_tls_below_1_2(certs: tuple[Path, Path, Path]) -> None:
    ca_path, cert_path, key_path = certs
    ctx = server_context(cert_path, key_path)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    server = TinyTLSServer(lambda: ctx)
    try:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cafile=str(ca_path))
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the *client* offer TLS 1.1: the server says no
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                pytest.raises(ssl.SSLError), old.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(16)
        peer_cert(server.port, ca_path)  # a TLS 1.2+ client still gets in
    finally:
        server.close()


def _rotate(into: Path, tmp: Path, name: str) -> tuple[Path, x509.Certificate]:
    """Make a new CA + cert in ``tmp/name`` and move cert and key over the served files."""
    ca, cert, key = generate_self_signed(tmp / name, hostnames=[])
    os.replace(key, into / KEY_FILE)
    os.replace(cert, into / CERT_FILE)
    return ca, x509.load_pem_x509_certificate((into / CERT_FILE).read_bytes())


def test_rotated_files_are_served_to_the_next_connection(tmp_path: Path,
                                                          certs: tuple[Path, Path, Path]) -> None:
    ca_a, cert_path, key_path = certs
    reloader = CertReloader(cert_path, key_path, interval=0)
    server = TinyTLSServer(reloader.context)
    try:
        first = peer_cert(server.port, ca_a)
        ca_b, cert_b = _rotate(cert_path.parent, tmp_path, "b")
        second = peer_cert(server.port, ca_b)
        assert second.serial_number == cert_b.serial_number != first.serial_number
        with pytest.raises(ssl.SSLCertVerificationError):
            peer_cert(server.port, ca_a)
        assert reloader.generation == 2 and reloader.error is None
    finally:
        server.close()


def test_a_half_rotated_pair_keeps_the_previous_certificate(tmp_path: Path,
                                                            certs: tuple[Path, Path, Path]) -> None:
    """A key that does not match the certificate (a rotation caught halfway) is not used."""
    ca_a, cert_path, key_path = certs
    reloader = CertReloader(cert_path, key_path, interval=0)
    server = TinyTLSServer(reloader.context)
    try:
        before = peer_cert(server.port, ca_a)
        _, other_cert, other_key = generate_self_signed(tmp_path / "other", hostnames=[])
        os.replace(other_key, key_path)  # new key, old certificate
        assert peer_cert(server.port, ca_a).serial_number == before.serial_number
        assert reloader.error is not None and "key" in reloader.error
        os.replace(other_cert, cert_path)  # the rotation completes: the new pair is served
        after = peer_cert(server.port, tmp_path / "other" / CA_FILE)
        assert after.serial_number != before.serial_number
        assert reloader.error is None
    finally:
        server.close()


def test_sni_callback_swaps_in_the_current_context(tmp_path: Path,
                                                   certs: tuple[Path, Path, Path]) -> None:
    """For servers that wrap every socket with one fixed context: ``attach`` swaps it per handshake."""
    ca_a, cert_path, key_path = certs
    reloader = CertReloader(cert_path, key_path, interval=0)
    fixed = reloader.attach(server_context(cert_path, key_path))
    server = TinyTLSServer(lambda: fixed)
    try:
        peer_cert(server.port, ca_a)
        ca_b, cert_b = _rotate(cert_path.parent, tmp_path, "b")
        assert peer_cert(server.port, ca_b).serial_number == cert_b.serial_number
    finally:
        server.close()


def test_reusable_self_signed(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    assert reusable_self_signed(d, hostnames=[]) is None
    paths = generate_self_signed(d, hostnames=["svc.ns.svc"])
    assert reusable_self_signed(d, hostnames=["svc.ns.svc"]) == paths
    assert reusable_self_signed(d, hostnames=["another.name"]) is None  # not in the SANs
    assert reusable_self_signed(d, hostnames=[], min_days_left=400) is None  # expires too soon
    shutil.copy(generate_self_signed(tmp_path / "x", hostnames=[])[2], d / KEY_FILE)
    assert reusable_self_signed(d, hostnames=[]) is None  # key does not match
