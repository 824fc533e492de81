"""One prepare at a time per VM: an exclusive ``flock`` on the VM's directory (I/O).

Two prepare runs for the same VM can overlap (the VM restarted while its previous launcher Pod is
still being torn down, a prepare container restarted while the first one still runs). Both would
look, find an image missing and create it; the second to publish would find the first one's image
in its place and fail ("appeared while prepare was creating it"), and with it the VM's start. So
prepare takes an exclusive lock on the VM directory (``<hostDisks.root>/<ns>/<vm>``, mounted
read-write at ``K.LAUNCHER_VM_DIR``) before it looks at anything and holds it until it is done: a
second run waits (and says so on stderr), then finds the images made and leaves them as they are.

The lock is on the directory itself (an fd opened ``O_RDONLY | O_DIRECTORY | O_NOFOLLOW``), so no
file is created for it; it belongs to the process, so a killed run releases it at once. A VM
directory that is not mounted (a plan with nothing on the node) is not locked; one that cannot be
opened as a directory is not locked either, and inspection then refuses it with the reason.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def vm_lock(path: str, *, waiting: Callable[[], None]) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the directory ``path`` for the ``with`` block; ``waiting`` is
    called once before blocking when another process holds it. Yields whether a lock is held."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock
