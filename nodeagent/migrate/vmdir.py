"""The VM directory on a node, for a migration: what it holds, hashes, and the moves around it.

I/O. The directory ``<root>/<namespace>/<vm>/`` belongs to prepare and the VM's launcher, so
nothing in it is trusted: entries are ``lstat``-ed and never followed, files are opened with
``O_NOFOLLOW``, and anything but a regular file with a plain name refuses the move (naming it)
instead of being copied or skipped silently. Names with a leading dot are temporary files (prepare's,
rsync's partial directory) and stay behind.

Places below ``<root>/.diskhooks/migrate/`` (a namespace is a DNS label: the leading dot never meets
one, and the node agent's marker scan never enters it):

- ``incoming/<ns>/<vm>/``: the target's staging directory (rsync's destination) and
  ``incoming/<ns>/<vm>.json``, its record (:class:`Incoming`);
- ``kept/<ns>/<vm>.<id>/``: the source's copy after a migration, until it is deleted.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from diskplan import keys as K
from diskplan.baserecord import MAX_RECORD_BYTES, record_problem
from diskplan.errors import Malformed
from diskplan.homemarker import MAX_MARKER_BYTES, HomeMarker, marker_json, parse_marker
from diskplan.migration import Base, FileEntry, is_movable_name

MIGRATE_SUBDIR = ".diskhooks/migrate"
HASH_CHUNK = 4 << 20
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class DirError(Exception):
    """The directory cannot be moved as it is (the message names the entry and why)."""


def vm_dir(root: str, namespace: str, vm: str) -> str:
    return f"{root.rstrip('/')}/{namespace}/{vm}"


def migrate_root(root: str) -> str:
    return f"{root.rstrip('/')}/{MIGRATE_SUBDIR}"


def staging_dir(root: str, namespace: str, vm: str) -> str:
    return f"{migrate_root(root)}/incoming/{namespace}/{vm}"


def incoming_record(root: str, namespace: str, vm: str) -> str:
    return f"{migrate_root(root)}/incoming/{namespace}/{vm}.json"


def kept_dir(root: str, namespace: str, vm: str, ident: str) -> str:
    return f"{migrate_root(root)}/kept/{namespace}/{vm}.{ident}"


# ------------------------------------------------------------------------------------------------
# what the directory holds
# ------------------------------------------------------------------------------------------------
def list_files(directory: str, *, skip: Iterable[str] = ()) -> list[FileEntry]:
    """The files that move with the directory (sorted by name), without hashes. Raises
    :class:`DirError` for a link, a subdirectory, a device or an odd name, and ``FileNotFoundError``
    when the directory is missing."""
    out = []
    skipped = set(skip)
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name in skipped:
                continue
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else \
                    "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise DirError(f"{directory}/{entry.name} is {kind}; a VM directory holds only files "
                               "(move it away, then migrate again)")
            if not is_movable_name(entry.name):
                raise DirError(f"{directory}/{entry.name[:80]!r}: not a plain file name; rename or "
                               "move it away, then migrate again")
            out.append(FileEntry(name=entry.name, size=st.st_size, allocated=st.st_blocks * 512))
    return sorted(out, key=lambda f: f.name)


def with_virtual_sizes(directory: str, files: Iterable[FileEntry]) -> list[FileEntry]:
    """``files`` with each image's virtual size (``virtual``: its qcow2 header's, else its length,
    as the node agent's capacity pass counts it), for the target's capacity check at preflight. A
    file that cannot be read keeps none (the target then counts its length)."""
    from hooksidecar.prepare.imagefiles import is_image_name, virtual_size

    out = []
    for f in files:
        if is_image_name(f.name):
            try:
                fd = os.open(f"{directory}/{f.name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                out.append(f)
                continue
            try:
                f = replace(f, virtual=virtual_size(fd, os.fstat(fd).st_size)[0])
            except OSError:
                pass
            finally:
                os.close(fd)
        out.append(f)
    return out


@dataclass(frozen=True)
class Hashed:
    sha256: str
    identity: tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(path: str, *, should_stop: Callable[[], bool] | None = None) -> Hashed:
    """SHA-256 of a regular file (opened without following links) and its identity before reading;
    raises :class:`DirError` if it changed while read, ``InterruptedError`` when stopped."""
    fd = os.open(path, _FILE_FLAGS)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise DirError(f"{path} is not a regular file")
        h = hashlib.sha256()
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while True:
            if should_stop is not None and should_stop():
                raise InterruptedError(f"hashing {path} was stopped")
            n = os.readv(fd, [buf])
            if not n:
                break
            h.update(view[:n])
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if identity(before) != identity(after):
        raise DirError(f"{path} changed while it was read (is the VM running?)")
    return Hashed(h.hexdigest(), identity(before))


def read_small(path: str, limit: int) -> bytes:
    fd = os.open(path, _FILE_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DirError(f"{path} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise DirError(f"{path} is larger than {limit} bytes")
    return data


def bases_of(directory: str, files: Iterable[FileEntry]) -> list[Base]:
    """The library bases the directory's disks were made on, from each ``<disk>.base.json``
    (persistent roots' records name a containerDisk, which comes with the VM's image: not here)."""
    out: dict[str, Base] = {}
    for f in files:
        if not f.name.endswith(".base.json") or f.name.startswith("persist-root."):
            continue
        path = f"{directory}/{f.name}"
        try:
            doc = json.loads(read_small(path, MAX_RECORD_BYTES))
        except (ValueError, OSError) as exc:
            raise DirError(f"{path}: the base record cannot be read ({exc})") from None
        problem = record_problem(doc)
        if problem is not None:
            raise DirError(f"{path}: the base record {problem}")
        out[doc["file"]] = Base(file=doc["file"], sha256=doc["sha256"])
    return [out[k] for k in sorted(out)]


# ------------------------------------------------------------------------------------------------
# writing on the target
# ------------------------------------------------------------------------------------------------
def rewrite_marker(path: str, node: str, now: datetime.datetime) -> bool:
    """Point the home marker at ``path`` (if any) to ``node``, written now; False when there is
    none. Written beside it and renamed over it (atomic), flushed."""
    try:
        data = read_small(path, MAX_MARKER_BYTES)
    except FileNotFoundError:
        return False
    try:
        old = parse_marker(data)
    except Malformed as exc:
        raise DirError(f"{path}: the home marker is not usable ({exc})") from None
    new = HomeMarker(namespace=old.namespace, vm=old.vm, vmi_uid=old.vmi_uid, node=node, written_at=now)
    st = os.lstat(path)
    tmp = f"{os.path.dirname(path)}/.{K.HOME_MARKER}.tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 stat.S_IMODE(st.st_mode))
    try:
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            pass
        os.write(fd, marker_json(new))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return True


def fsync_path(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY if directory else _FILE_FLAGS) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(directory: str, names: Iterable[str]) -> None:
    """Flush every named file and the directory: the copy survives a crash of the node."""
    for name in names:
        fsync_path(f"{directory}/{name}")
    fsync_path(directory, directory=True)


def make_dirs(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)


def remove_tree(path: str) -> None:
    """Remove a directory this agent made (staging, a kept copy); missing is fine."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def rename_no_replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` where ``dst`` must not exist (``FileExistsError`` otherwise), then
    flush both parent directories."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", dst)
    make_dirs(os.path.dirname(dst))
    os.rename(src, dst)
    fsync_path(os.path.dirname(dst), directory=True)
    if os.path.dirname(src) != os.path.dirname(dst):
        fsync_path(os.path.dirname(src), directory=True)


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def allocated_bytes(directory: str) -> int:
    """Bytes on disk below ``directory`` (files only, links not followed); 0 when missing."""
    total = 0
    for top, dirs, files in os.walk(directory, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


# ------------------------------------------------------------------------------------------------
# small JSON records of this agent's own
# ------------------------------------------------------------------------------------------------
def write_record(path: str, doc: Mapping[str, Any]) -> None:
    make_dirs(os.path.dirname(path))
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(dict(doc), sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path), directory=True)


def read_record(path: str) -> dict[str, Any] | None:
    """The record, None when missing or unreadable (a broken record is treated as absent)."""
    try:
        doc = json.loads(read_small(path, 64 * 1024))
    except (OSError, ValueError, DirError):
        return None
    return doc if isinstance(doc, dict) else None


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
