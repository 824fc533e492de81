"""Files handed to ``qemu-img`` by descriptor, checked through that descriptor (I/O, read-only).

Inspection looks at a file, then apply runs ``qemu-img resize`` on it: by path, the file qemu-img
opened could be another one put in its place meanwhile (a qcow2 whose header names an external
data file would have qemu open, and grow, whatever file that names). So just before the call the
image (and the base it is opened with) is opened here with ``O_NOFOLLOW``, checked again through
that descriptor (a regular file; for a qcow2, a header naming no external data file, no
encryption, no unknown feature, tables within the file and, for the image, the virtual size
inspection saw), and that descriptor is what qemu-img opens (``/proc/self/fd/<n>``, see
:mod:`hooksidecar.qemuimg`): what was checked is what qemu-img reads and writes.
"""

from __future__ import annotations

import errno
import os
import stat

from diskplan import qcow2
from hooksidecar.prepare.files import HandoverError


def open_checked_image(path: str, *, shown: str, virtual_size: int) -> int:
    """A read-only descriptor of the qcow2 image at ``path`` as inspection saw it; the caller closes
    it. :class:`HandoverError` (naming ``shown``) when it is not that image any more."""
    fd = _open_regular(path, shown)
    try:
        problem = _qcow2_problem(fd, allow_backing=True)
        if problem is None:
            size = qcow2.read_header(os.pread(fd, qcow2.HEADER_READ_BYTES, 0)).virtual_size
            if size != virtual_size:
                problem = f"its virtual size is {size} bytes, not the {virtual_size} seen a moment ago"
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise HandoverError(shown, f"changed while prepare was running ({problem}); not grown, run "
                            "prepare again")
    return fd


def open_checked_base(path: str, *, shown: str, fmt: str) -> int:
    """A read-only descriptor of the library base at ``path`` (format ``fmt``), checked as above."""
    fd = _open_regular(path, shown)
    try:
        problem = _qcow2_problem(fd, allow_backing=False) if fmt == "qcow2" else None
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise HandoverError(shown, f"changed while prepare was running ({problem}); not used")
    return fd


def _open_regular(path: str, shown: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = "it became a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise HandoverError(shown, f"cannot be opened for qemu-img ({why})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HandoverError(shown, "is not a regular file any more; not used")
    return fd


def _qcow2_problem(fd: int, *, allow_backing: bool) -> str | None:
    """Why the qcow2 file open at ``fd`` must not be given to qemu-img (None: it may)."""
    try:
        head = os.pread(fd, qcow2.HEADER_READ_BYTES, 0)
        size = os.fstat(fd).st_size
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not qcow2.is_qcow2(head):
        return "it is not a qcow2 image"
    try:
        h = qcow2.read_header(head)
    except ValueError as exc:
        return f"invalid qcow2 header: {exc}"
    if h.has_external_data_file or h.encrypted or h.unknown_incompatible_features:
        return "its header names an external data file, encryption or unknown features"
    if h.backing_file is not None and not allow_backing:
        return "it has a backing file"
    return qcow2.layout_problem(h, size)
