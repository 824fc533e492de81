"""Hashing a base's content (I/O, reads only): SHA-256 of every byte through one fixed buffer.

Shared by prepare's inspection (:mod:`hooksidecar.prepare.observe`), the base catalog
(:mod:`hooksidecar.prepare.catalog`) and the node agent, which fills the catalog off the start path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

HASH_CHUNK = 1 << 20
_STOP_EVERY = 64  # chunks between two looks at ``should_stop`` (64 MiB, some 50 ms of hashing)


class HashingStopped(Exception):
    """Hashing was given up because ``should_stop`` said so (the node agent is stopping)."""


def hash_fd(fd: int, *, head: bytes = b"", should_stop: Callable[[], bool] | None = None) -> str:
    """SHA-256 of ``head`` followed by everything from ``fd``'s offset to its end, read through
    one ``HASH_CHUNK`` buffer (memory stays bounded for a base of any size). ``should_stop`` is
    asked every 64 MiB; when it says yes, :class:`HashingStopped` is raised."""
    digest = hashlib.sha256(head)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    chunks = 0
    while n := os.readv(fd, [buf]):
        digest.update(view[:n])
        chunks += 1
        if should_stop is not None and chunks % _STOP_EVERY == 0 and should_stop():
            raise HashingStopped()
    return digest.hexdigest()
