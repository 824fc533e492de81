"""Files prepare writes (I/O): made beside their final name and published atomically, given to qemu.

No half-made file is ever left under its final name: a new image or record is made under a
temporary name beside it (``.<name>.tmp-<hex>``), given mode 0660 and qemu's owner and flushed
through an fd opened with ``O_NOFOLLOW``, then published without replacing a file that appeared
meanwhile (records: replaced atomically), and the directory is flushed. Temporary names a killed run
left beside a file are removed whenever that file is acted on. :func:`hand_to_qemu` gives an
existing file to qemu's user (107:107, mode 0660 when running as root; mode 0660 only otherwise).
:func:`read_bounded` reads a small file someone else wrote (a summary, a marker) with a bound.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from typing import Any

from diskplan import keys as K

IMAGE_MODE = 0o660
TMP_INFIX = ".tmp-"


def create_beside(final: str, make: Callable[[str], None], *, owner: tuple[int, int] | None,
                  shown: str) -> None:
    """Have ``make`` write a new file at a temporary name beside ``final``, give it to qemu's
    ``owner`` with mode 0660, flush it and publish it as ``final``; on any failure the temporary
    file is removed and ``final`` is left as it was. ``shown`` is the name errors use."""
    remove_stale_tmp(final)
    tmp = _tmp_name(final)
    try:
        make(tmp)
        _seal_new_file(tmp, owner, shown)
        _publish(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(final))


def write_json(final: str, record: Mapping[str, Any], *, owner: tuple[int, int] | None) -> None:
    write_record(final, (json.dumps(record, sort_keys=True, indent=1) + "\n").encode(), owner=owner)


def write_record(final: str, data: bytes, *, owner: tuple[int, int] | None) -> None:
    """Write a small record (``data``) as ``final``: a new temporary file beside it (``O_EXCL``,
    ``O_NOFOLLOW``, mode 0660, ``owner`` when given), flushed, renamed over ``final`` atomically,
    then the directory flushed. On failure the temporary file is removed and ``final`` kept."""
    remove_stale_tmp(final)
    replace_atomically(final, data, mode=IMAGE_MODE, seal=lambda fd: _give_new_fd_to_qemu(fd, owner, final))


def replace_atomically(final: str, data: bytes, *, mode: int, seal: Callable[[int], None]) -> None:
    """Publish ``data`` as ``final``: a new temporary file beside it (``O_EXCL``, ``O_NOFOLLOW``,
    created with ``mode``), given its mode and owner by ``seal`` (called with the new file's fd
    before anything is written), flushed, renamed over ``final`` atomically, then the directory
    flushed. On failure the temporary file is removed and ``final`` kept."""
    tmp = _tmp_name(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            seal(fd)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(final))


def remove_stale_tmp(final: str) -> None:
    """Remove temporary files a killed earlier run left beside ``final`` (only our own names),
    including one still linked to ``final`` (killed between publishing and unlinking)."""
    head, name = os.path.split(final)
    pattern = re.compile(r"^\." + re.escape(name) + re.escape(TMP_INFIX) + r"[0-9a-f]{16}$")
    try:
        entries = os.listdir(head)
    except OSError:
        return
    for entry in entries:
        if pattern.match(entry):
            path = f"{head}/{entry}"
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass


def read_bounded(fd: int, limit: int) -> bytes:
    """What ``fd`` holds, read to its end but never more than ``limit + 1`` bytes (one past the
    limit, so the caller can tell a file that is too large from one that fits)."""
    data = b""
    while len(data) <= limit:
        chunk = os.read(fd, limit + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data


class HandoverError(Exception):
    """A file that cannot be given to qemu; ``path`` is the launcher path shown to the user."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def hand_to_qemu(path: str, owner: tuple[int, int] | None, shown: str) -> str | None:
    """Make the existing file at ``path`` usable by qemu: owned by ``owner`` (when given, i.e. when
    running as root) with mode 0660. Works on an fd opened with ``O_NOFOLLOW``, so a link put in
    its place is never followed. Returns what changed (``"0:0 0600 -> 107:107 0660"``), None when
    nothing did; raises :class:`HandoverError` with the reason when it cannot be done.

    The init container has CHOWN but not FOWNER: only a file's owner may change its mode, so a file
    of another owner is first taken (chown to this process's uid), then given its mode, then given
    to qemu.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HandoverError(shown, f"cannot be opened to give it to qemu ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandoverError(shown, "is not a regular file")
        before = f"{st.st_uid}:{st.st_gid} {stat.S_IMODE(st.st_mode):04o}"
        want_owner = owner is None or (st.st_uid, st.st_gid) == owner
        if want_owner and stat.S_IMODE(st.st_mode) == IMAGE_MODE:
            return None
        who = "" if owner is None else f" {owner[0]}:{owner[1]}"
        try:
            if stat.S_IMODE(st.st_mode) != IMAGE_MODE:
                if st.st_uid != os.geteuid() and owner is not None:
                    os.fchown(fd, os.geteuid(), -1)
                os.fchmod(fd, IMAGE_MODE)
            if owner is not None:
                os.fchown(fd, *owner)
        except OSError as exc:
            raise HandoverError(shown, f"is {before} and cannot be given to qemu's{who} with mode "
                                f"{IMAGE_MODE:04o} ({exc.strerror}), so qemu could not open it; the "
                                f"{K.PREPARE_CONTAINER} init container needs the CHOWN capability, or "
                                "fix the file's owner and mode on the node") from None
        st = os.fstat(fd)
        after = f"{st.st_uid}:{st.st_gid} {stat.S_IMODE(st.st_mode):04o}"
        if stat.S_IMODE(st.st_mode) != IMAGE_MODE or (owner is not None and (st.st_uid, st.st_gid) != owner):
            raise HandoverError(shown, f"is still {after} after giving it to qemu's{who} with mode "
                                f"{IMAGE_MODE:04o} (does the filesystem ignore chown/chmod?), so qemu "
                                "could not open it")
        return f"{before} -> {after}"
    finally:
        os.close(fd)


def _tmp_name(final: str) -> str:
    head, name = os.path.split(final)
    return f"{head}/.{name}{TMP_INFIX}{secrets.token_hex(8)}"


def _seal_new_file(path: str, owner: tuple[int, int] | None, shown: str) -> None:
    """Give the file just made at ``path`` mode 0660 and ``owner``, and flush it, all
    through one fd opened with ``O_NOFOLLOW``: a link put in its place is never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "was replaced by a symbolic link while prepare was creating it; "
                          "not followed, not used", shown) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "was replaced by something other than a regular file while "
                          "prepare was creating it; not used", shown)
        _give_new_fd_to_qemu(fd, owner, shown)
        os.fsync(fd)
    finally:
        os.close(fd)


def _give_new_fd_to_qemu(fd: int, owner: tuple[int, int] | None, shown: str) -> None:
    """Mode 0660 and, when given, ``owner`` for a file this process just made (so it may chmod it)."""
    os.fchmod(fd, IMAGE_MODE)
    if owner is not None:
        try:
            os.fchown(fd, *owner)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot give it to qemu's {owner[0]}:{owner[1]} "
                          f"({exc.strerror}); the init container needs the CHOWN capability",
                          shown) from None


def _publish(tmp: str, final: str) -> None:
    """Give ``tmp`` the name ``final`` atomically, never replacing a file that appeared meanwhile."""
    try:
        os.link(tmp, final, follow_symlinks=False)
    except FileExistsError:
        raise OSError(errno.EEXIST, "appeared while prepare was creating it; not replaced",
                      final) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(final):  # a filesystem without hard links: rename after a check
            raise OSError(errno.EEXIST, "appeared while prepare was creating it; not replaced",
                          final) from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def fsync_file(path: str) -> None:
    _fsync(path, os.O_NOFOLLOW)


def _fsync_dir(path: str) -> None:
    _fsync(path, os.O_DIRECTORY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
