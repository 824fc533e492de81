"""TLS for the webhook: a self-signed CA and serving certificate, and a server context that follows
the certificate files as they change.

Transport layer: key generation, file writes and ``ssl`` contexts; no admission decisions.

- :func:`generate_self_signed` writes ``ca.crt``, ``tls.crt`` and ``tls.key`` (ECDSA P-256, the
  serving certificate signed by the CA, SANs for localhost, 127.0.0.1, ::1 and the names given).
  Files are written beside and renamed into place, so a running server never reads half a file.
  The CA's private key is never written: the CA signs exactly one certificate.
- :class:`CertReloader` hands out a server :class:`ssl.SSLContext` (TLS 1.2 or newer) for each new
  connection and rebuilds it when the certificate or key file changes (stat by resolved path, at
  most once per ``interval``: a cert-manager or Helm rotation of a mounted Secret swaps the
  ``..data`` symlink). A pair that does not load (a key that does not match the certificate
  halfway through a non-atomic rotation) keeps the previous context until a good pair appears.
  gunicorn calls its ``ssl_context`` hook for every accepted connection, which is where
  :meth:`CertReloader.context` plugs in (``webhook/cli.py``); any other server can use
  :meth:`CertReloader.attach` (an SNI callback that swaps the context during the handshake).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import math
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webhook.reload import Stamp, stamp

log = logging.getLogger(__name__)

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "::1")


def generate_self_signed(directory: Path | str, *, hostnames: Sequence[str],
                         days: int = 365) -> tuple[Path, Path, Path]:
    """Create a CA and a serving certificate it signs, in ``directory``.

    ``hostnames`` are DNS names or IP addresses for the certificate's subjectAltName (localhost,
    127.0.0.1 and ::1 are always added). Returns ``(ca_path, cert_path, key_path)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*DEFAULT_HOSTNAMES, *hostnames]))
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diskhooks webhook CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if
                                                    not _is_ip(names[0]) else "diskhooks-webhook")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_path, cert_path, key_path = directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE
    _write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), mode=0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write_atomic(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return ca_path, cert_path, key_path


def reusable_self_signed(directory: Path | str, *, hostnames: Sequence[str],
                         min_days_left: int = 30) -> tuple[Path, Path, Path] | None:
    """The files of an earlier :func:`generate_self_signed` in ``directory`` if they can serve
    ``hostnames`` for at least ``min_days_left`` more days and load as a pair; else None."""
    directory = Path(directory)
    paths = (directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)
    if not all(p.is_file() for p in paths):
        return None
    try:
        cert = x509.load_pem_x509_certificate(paths[1].read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
        have |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
        wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n
                  for n in (*DEFAULT_HOSTNAMES, *hostnames)}
        left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        if not wanted <= have or left < dt.timedelta(days=min_days_left):
            return None
        server_context(paths[1], paths[2])
        ssl.create_default_context(cafile=str(paths[0]))
    except (ValueError, OSError, ssl.SSLError, x509.ExtensionNotFound):
        return None
    return paths


def server_context(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """A server-side context: TLS 1.2+, Python's secure default ciphers, no client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return ctx


class CertReloader:
    """A server context that follows ``cert_file``/``key_file`` (see the module docstring)."""

    def __init__(self, cert_file: Path | str, key_file: Path | str, *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps = self._stamp()
        self._context = server_context(self.cert_file, self.key_file)  # fails loudly at start
        self._checked = clock()
        self.generation = 1
        self.error: str | None = None
        self._watcher_pid: int | None = None

    def _stamp(self) -> tuple[Stamp, Stamp]:
        return stamp(self.cert_file), stamp(self.key_file)

    def context(self) -> ssl.SSLContext:
        """The context for a new connection, rebuilt first if the files changed."""
        now = self._clock()
        if now - self._checked >= self._interval:
            self.check(now)
        return self._context

    def check(self, now: float | None = None) -> None:
        """Stat the files now and rebuild the context if they changed (one caller at a time)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = self._clock() if now is None else now
            stamps = self._stamp()
            if stamps != self._stamps or self.error is not None:
                self._stamps = stamps
                self._reload()
        finally:
            self._lock.release()

    def watch(self) -> None:
        """Check every ``interval`` seconds in a daemon thread of this process as well, so that a
        gunicorn worker that accepts no connection for a while still follows every good pair (as
        ``webhook.reload.WatchedFiles.watch`` does for the policy). Called in each worker after the
        fork; a second call in the same process does nothing."""
        if self._watcher_pid == os.getpid() or not math.isfinite(self._interval):
            return
        self._watcher_pid = os.getpid()
        threading.Thread(target=self._watch_loop, name="watch TLS certificate", daemon=True).start()

    def _watch_loop(self) -> None:
        pause = max(self._interval, 0.05)
        while True:
            time.sleep(pause)
            try:
                self.check()
            except Exception:  # never let the watcher die; new connections still check
                log.exception("checking the TLS certificate for changes failed")

    def _reload(self) -> None:
        try:
            ctx = server_context(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            error = f"TLS certificate {self.cert_file} / key {self.key_file}: {exc}"
            if error != self.error:
                log.error("TLS reload failed, still serving the previous certificate: %s", error)
            self.error = error
            return
        self._context = ctx
        self.error = None
        self.generation += 1
        log.info("reloaded the TLS certificate %s (version %d)", self.cert_file, self.generation)

    def attach(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        """Make sockets wrapped with ``ctx`` use this reloader's current context per handshake."""
        def swap(sock: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
            sock.context = self.context()
        ctx.sni_callback = swap
        return ctx


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _general_name(name: str) -> x509.GeneralName:
    if _is_ip(name):
        return x509.IPAddress(ipaddress.ip_address(name))
    return x509.DNSName(name)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
