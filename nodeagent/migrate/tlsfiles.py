"""The agents' mutual TLS: contexts from a directory of PEM files (the chart's Secret).

``<dir>/ca.crt`` (the CA every agent's certificate is signed by: the chart's CA), ``<dir>/tls.crt``
and ``<dir>/tls.key`` (this agent's certificate and key: both ``serverAuth`` and ``clientAuth``,
with the DNS name :data:`PEER_NAME`). Both ends require TLS 1.3 and a certificate from that CA; the
client checks the server's name is :data:`PEER_NAME` (every agent shares one identity: who is who
comes from the API server, see docs/MIGRATION.md). The files are read at every connection, so a
renewed Secret is used as soon as the kubelet updates the mount.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PEER_NAME = "diskhooks-node-migration"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"


class TlsFilesError(Exception):
    """The directory does not hold usable files (the message names the file and the reason)."""


@dataclass(frozen=True)
class TlsFiles:
    directory: str

    @property
    def ca(self) -> str:
        return os.path.join(self.directory, CA_FILE)

    @property
    def cert(self) -> str:
        return os.path.join(self.directory, CERT_FILE)

    @property
    def key(self) -> str:
        return os.path.join(self.directory, KEY_FILE)

    def missing(self) -> list[str]:
        return [p for p in (self.ca, self.cert, self.key) if not os.path.isfile(p)]

    def _context(self, purpose: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        for path, what in ((self.ca, "CA"), (self.cert, "certificate"), (self.key, "key")):
            if not os.path.isfile(path):
                raise TlsFilesError(f"{path}: the migration TLS {what} is missing")
        try:
            ctx.load_verify_locations(cafile=self.ca)
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFilesError(f"{self.directory}: the migration TLS files are not usable: "
                                f"{getattr(exc, 'reason', None) or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Requires a client certificate signed by the CA."""
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server's certificate against the CA and the name :data:`PEER_NAME`."""
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = True
        return ctx


def peer_is_agent(cert: Mapping[str, Any] | None) -> bool:
    """Whether a verified peer certificate (``getpeercert()``) names :data:`PEER_NAME`: the CA may
    sign other certificates too (cert-manager's CA Issuer signs the webhook's), and only the agents'
    one gets in."""
    if not cert:
        return False
    names = cert.get("subjectAltName") or ()
    return any(kind == "DNS" and value == PEER_NAME for kind, value in names)
