"""The two error families shared by every diskhooks layer.

- :class:`Refused` — the input is understood but not acceptable (an admission denial, a gRPC
  FAILED_PRECONDITION/INVALID_ARGUMENT, a non-zero prepare exit). It always names the field and why.
- :class:`Malformed` — the request itself cannot be read (HTTP 400, gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations


class DiskhooksError(Exception):
    """Base of both families; ``field`` is a path such as ``diskhooks.io/disks[1].size``."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


class Refused(DiskhooksError):
    """The object or request is refused: it names the field and the reason."""


class Malformed(DiskhooksError):
    """The request cannot be read at all (not JSON, not an AdmissionReview, no object...)."""
