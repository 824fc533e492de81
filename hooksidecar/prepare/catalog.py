"""The node's base catalog as files (I/O): read an entry; hash a library base into it under its lock.

The catalog directory is ``<hostDisks.root>/.diskhooks/catalog/`` on the node (prepare sees it at
:data:`diskplan.keys.LAUNCHER_BASE_CATALOG`; the node agent under its host prefix). Per library
file ``<f>``: the entry ``<f>.entry.json`` (:mod:`diskplan.basecatalog`; mode 0644, root's) and the
lock file ``<f>.lock`` (mode 0600, never removed while the file exists), on which whoever hashes
``<f>`` holds an exclusive ``flock``. Entries are written beside their name and renamed into place
(``.<entry>.tmp-<hex>``, flushed, then the directory flushed), so a reader sees the old entry or
the new one, never a part.

:func:`content_of` is prepare's way in (a base whose record does not vouch for it): the entry, if it
describes the base exactly as it is now; else, under the lock, the entry another process may just
have written; else the base is hashed here and the entry written. :func:`hash_for_catalog` is the
hashing both producers share: the identity taken before and after every byte is read, and the
result fit for the catalog only when the file was quiet (:func:`diskplan.basecatalog.is_quiet`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from diskplan import basecatalog, baserecord
from diskplan import keys as K
from diskplan.basecatalog import CatalogEntry
from diskplan.errors import Malformed
from hooksidecar.prepare.basehash import hash_fd
from hooksidecar.prepare.files import TMP_INFIX as _TMP_INFIX
from hooksidecar.prepare.files import replace_atomically

ENTRY_MODE = 0o644
LOCK_MODE = 0o600
TMP_INFIX = _TMP_INFIX  # in the temporary names entries are made under
#: How long prepare waits for another process (prepare or the agent) hashing the same base: a
#: minute, plus the time to read the file at 25 MB/s (a holder at a 500m CPU limit on a slow disk).
#: Past it, prepare hashes the base itself (without the lock, writing no entry).
LOCK_WAIT_BASE_S = 60.0
LOCK_WAIT_BYTES_PER_S = 25e6
_POLL_FIRST_S, _POLL_MAX_S = 0.005, 0.1

Outcome = Literal["hit", "waited", "written", "hashed"]


@dataclass(frozen=True)
class Hashed:
    """One hashing of a base: its identity before and after every byte was read, the digest, and
    whether the file had been quiet at the start (only then may the result become an entry)."""

    before: Mapping[str, int]
    after: Mapping[str, int]
    sha256: str
    quiet: bool
    ended: datetime.datetime

    @property
    def steady(self) -> bool:
        return dict(self.before) == dict(self.after)


@dataclass(frozen=True)
class Lookup:
    """What :func:`content_of` found. ``outcome``: ``hit`` (an entry matched at once), ``waited``
    (an entry another process wrote while this one waited for the lock), ``written`` (hashed here,
    entry written), ``hashed`` (hashed here, no entry: ``note`` says why). ``problem`` is set when
    the base could not be hashed (it changed while read, or cannot be read)."""

    identity: Mapping[str, int] | None = None
    sha256: str | None = None
    outcome: Outcome = "hashed"
    note: str | None = None
    problem: str | None = None

    @property
    def hashed(self) -> bool:
        return self.outcome in ("written", "hashed") and self.problem is None


# ------------------------------------------------------------------------------------------------
# entries
# ------------------------------------------------------------------------------------------------
def read_entry(catalog_dir: str, file: str) -> tuple[CatalogEntry | None, str | None]:
    """The entry of ``file`` (None and why not: missing, a link, unreadable, malformed)."""
    path = f"{catalog_dir}/{K.catalog_entry_name(file)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "no entry"
    except OSError as exc:
        return None, ("the entry is a symbolic link" if exc.errno == errno.ELOOP
                      else f"the entry cannot be read ({exc.strerror})")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "the entry is not a regular file"
        data = os.read(fd, basecatalog.MAX_ENTRY_BYTES + 1)
    except OSError as exc:
        return None, f"the entry cannot be read ({exc.strerror})"
    finally:
        os.close(fd)
    try:
        return basecatalog.parse_entry(data, file=file), None
    except Malformed as exc:
        return None, f"the entry is not usable ({exc})"


def write_entry(catalog_dir: str, entry: CatalogEntry) -> None:
    """Publish ``entry`` atomically (temporary name, flushed, renamed, directory flushed)."""
    replace_atomically(f"{catalog_dir}/{K.catalog_entry_name(entry.file)}", basecatalog.entry_json(entry),
                       mode=ENTRY_MODE, seal=lambda fd: os.fchmod(fd, ENTRY_MODE))  # whatever the umask


# ------------------------------------------------------------------------------------------------
# the lock
# ------------------------------------------------------------------------------------------------
@contextmanager
def file_lock(catalog_dir: str, file: str, *, wait_s: float) -> Iterator[bool]:
    """Hold the exclusive lock of ``file``'s entry; yields True when held, False when ``wait_s``
    passed first (0: one try). Raises ``OSError`` when the lock file cannot be opened (no catalog
    directory, read-only). The lock file is opened without following links and re-checked after
    locking (still the file at its name), so a lock file removed meanwhile is not trusted."""
    path = f"{catalog_dir}/{K.catalog_lock_name(file)}"
    deadline = time.monotonic() + wait_s
    pause = _POLL_FIRST_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOCK_MODE)
        held = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(pause)
                    pause = min(pause * 2, _POLL_MAX_S)
            if held and not _still_named(fd, path):
                continue  # removed (base gone) while we waited: lock the file now at the name
            yield held
            return
        finally:
            os.close(fd)  # releases the lock


def _still_named(fd: int, path: str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


# ------------------------------------------------------------------------------------------------
# hashing and looking up
# ------------------------------------------------------------------------------------------------
def hash_for_catalog(fd: int, *, should_stop: Callable[[], bool] | None = None,
                     quiet_ns: int = basecatalog.QUIET_NS) -> Hashed:
    """Hash the whole file behind ``fd`` (from offset 0) with its identity before and after.
    ``quiet`` says whether its ctime was ``quiet_ns`` old when the first identity was taken."""
    before = baserecord.identity_of(os.fstat(fd))
    quiet = basecatalog.is_quiet(before, now_ns=time.time_ns(), quiet_ns=quiet_ns)
    os.lseek(fd, 0, os.SEEK_SET)
    digest = hash_fd(fd, should_stop=should_stop)
    after = baserecord.identity_of(os.fstat(fd))
    return Hashed(before, after, digest, quiet, datetime.datetime.now(datetime.UTC))


def entry_of(file: str, hashed: Hashed, *, by: str) -> CatalogEntry:
    return CatalogEntry(file=file, identity=dict(hashed.before), sha256=hashed.sha256,
                        hashed_at=hashed.ended, hashed_by=by)


def lock_wait_s(size: int) -> float:
    return LOCK_WAIT_BASE_S + size / LOCK_WAIT_BYTES_PER_S


def content_of(fd: int, *, file: str, catalog_dir: str | None) -> Lookup:
    """The SHA-256 of the library base ``file`` open at ``fd``, for prepare: from the catalog when
    an entry describes the file exactly as it is now, else hashed here (and, when the catalog can
    be written and the file was quiet, recorded for every later start on this node).

    Many prepares starting at once on one base: the first takes the lock and hashes, the others
    wait for it and then find its entry, so the base is read once."""
    now = baserecord.identity_of(os.fstat(fd))
    if catalog_dir is None:
        return _hash_here(fd, None, note="no catalog directory is mounted")
    entry, _ = read_entry(catalog_dir, file)
    if entry is not None and basecatalog.mismatch(entry, file=file, identity=now) is None:
        return Lookup(now, entry.sha256, "hit")
    try:
        with file_lock(catalog_dir, file, wait_s=lock_wait_s(now["size"])) as held:
            if not held:
                return _hash_here(fd, None, note="another process held the catalog lock too long")
            entry, _ = read_entry(catalog_dir, file)
            now = baserecord.identity_of(os.fstat(fd))
            if entry is not None and basecatalog.mismatch(entry, file=file, identity=now) is None:
                return Lookup(now, entry.sha256, "waited")
            _wait_until_quiet(now)
            return _hash_here(fd, catalog_dir, file=file)
    except OSError as exc:
        return _hash_here(fd, None, note=f"the catalog lock cannot be taken ({exc.strerror or exc})")


def _wait_until_quiet(identity: Mapping[str, int]) -> None:
    """A base changed less than the quiet period ago (copied in just now): wait out the rest of it
    (at most 2 s, and only then), so the hash can become an entry."""
    left = basecatalog.QUIET_NS - (time.time_ns() - identity["ctimeNs"])
    if left > 0:
        time.sleep(min(left, basecatalog.QUIET_NS) / 1e9)


def _hash_here(fd: int, catalog_dir: str | None, *, file: str = "", note: str | None = None) -> Lookup:
    try:
        h = hash_for_catalog(fd)
    except OSError as exc:
        return Lookup(problem=f"cannot be read: {exc.strerror or exc}")
    if not h.steady:
        return Lookup(problem="changed while prepare was reading it ("
                      f"{baserecord.identity_changes(h.before, h.after)}); is it being replaced? "
                      "Restart the VM once the image library is settled")
    if catalog_dir is None:
        return Lookup(h.before, h.sha256, "hashed", note=note)
    if not h.quiet:
        return Lookup(h.before, h.sha256, "hashed", note="the base was still changing (its ctime is "
                      "less than the quiet period old); not recorded in the catalog")
    try:
        write_entry(catalog_dir, entry_of(file, h, by="prepare"))
    except OSError as exc:
        return Lookup(h.before, h.sha256, "hashed",
                      note=f"the catalog entry cannot be written ({exc.strerror or exc})")
    return Lookup(h.before, h.sha256, "written")
