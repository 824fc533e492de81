"""The image files of one VM directory, as the capacity accounting counts them (I/O, read-only).

:func:`scan_vm_dir` lists a VM directory (``<hostDisks.root>/<ns>/<vm>``, or prepare's mount of it)
and reads, for every image file, its virtual size from its qcow2 header
(:func:`diskplan.qcow2.read_header` on the first 64 KiB; a file that is not qcow2, or whose header
cannot be read, counts its length) and the bytes it occupies. An image file is a regular file named
``*.qcow2`` that does not start with a dot (prepare's temporary files do): the disks
``<disk>.qcow2``, detached ones included, and persistent roots ``persist-root.<volume>.qcow2``.
Every other regular file (records, the home marker) only adds to the allocated bytes. Nothing is
followed: the directory is opened with ``O_NOFOLLOW``, entries are ``lstat``-ed and opened
relative to it with ``O_NOFOLLOW``; links and special files are passed over.

Shared by prepare (its own VM directory) and the node agent (every directory under the root);
a :class:`HeaderCache` lets the agent skip reading a header whose file did not change (same device,
inode, size, mtime and ctime).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from diskplan import qcow2
from diskplan.capacity import ImageFile

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
IMAGE_SUFFIX = ".qcow2"

Identity = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


class HeaderCache:
    """Virtual sizes by file identity. It keeps what the current and the previous pass saw:
    :meth:`next_pass` forgets files not seen since, so a grown or removed image leaves nothing
    behind (its old identity is never looked up again)."""

    def __init__(self) -> None:
        self._old: dict[Identity, int] = {}
        self._new: dict[Identity, int] = {}

    def lookup(self, ident: Identity) -> int | None:
        size = self._new.get(ident)
        if size is None:
            size = self._old.get(ident)
            if size is not None:
                self._new[ident] = size
        return size

    def store(self, ident: Identity, size: int) -> None:
        self._new[ident] = size

    def next_pass(self) -> None:
        self._old, self._new = self._new, {}

    def __len__(self) -> int:
        return len(self._new.keys() | self._old.keys())


@dataclass(frozen=True)
class DirScan:
    images: dict[str, ImageFile] = field(default_factory=dict)
    other_allocated: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # image files counted by their length: why


def is_image_name(name: str) -> bool:
    return name.endswith(IMAGE_SUFFIX) and not name.startswith(".") and len(name) > len(IMAGE_SUFFIX)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def virtual_size(fd: int, size: int) -> tuple[int, str | None]:
    """The virtual size of the open image ``fd`` of ``size`` bytes: its qcow2 header's, else
    ``size``, with why (None when the header was read)."""
    head = os.pread(fd, qcow2.HEADER_READ_BYTES, 0)
    if not qcow2.is_qcow2(head):
        return size, None  # raw: its length is its virtual size
    try:
        return qcow2.read_header(head).virtual_size, None
    except ValueError as exc:
        return size, f"not a readable qcow2 header ({exc}): counted by its length"


def scan_vm_dir(path: str | None = None, *, dir_fd: int | None = None, name: str | None = None,
                cache: HeaderCache | None = None) -> DirScan:
    """Scan the directory at ``path``, or the entry ``name`` of the open directory ``dir_fd``.
    Raises OSError when the directory itself cannot be opened (a missing one: FileNotFoundError)."""
    if path is not None:
        fd = os.open(path, _DIR_FLAGS)
    else:
        assert dir_fd is not None and name is not None
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        return _scan(fd, cache)
    finally:
        os.close(fd)


def _scan(fd: int, cache: HeaderCache | None) -> DirScan:
    out = DirScan()
    other = 0
    with os.scandir(fd) as entries:
        names = sorted(e.name for e in entries)
    for entry in names:
        try:
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue  # gone since the listing
        if not stat.S_ISREG(st.st_mode):
            continue
        allocated = st.st_blocks * 512
        if not is_image_name(entry):
            other += allocated
            continue
        ident = _identity(st)
        known = cache.lookup(ident) if cache is not None else None
        if known is not None:
            out.images[entry] = ImageFile(known, allocated)
            continue
        try:
            ffd = os.open(entry, _FILE_FLAGS, dir_fd=fd)
        except OSError as exc:
            out.images[entry] = ImageFile(st.st_size, allocated)
            out.unreadable[entry] = f"cannot be opened ({exc.strerror}): counted by its length"
            continue
        try:
            now = os.fstat(ffd)
            if not stat.S_ISREG(now.st_mode):
                continue
            size, why = virtual_size(ffd, now.st_size)
        except OSError as exc:
            size, why = st.st_size, f"cannot be read ({exc.strerror}): counted by its length"
        finally:
            os.close(ffd)
        out.images[entry] = ImageFile(size, allocated)
        if why is not None:
            out.unreadable[entry] = why
        elif cache is not None:
            cache.store(_identity(now), size)
    return DirScan(images=out.images, other_allocated=other, unreadable=out.unreadable)
