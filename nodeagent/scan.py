"""Home markers on this node: find ``<root>/<ns>/<vm>/home.node.json`` and read one.

I/O only, no decision (``nodeagent.home`` decides). The tree belongs to prepare and, below each VM
directory, to the VM's launcher (uid 107), so nothing read here is trusted: only directory names
that are Kubernetes names are entered (a namespace is a DNS label, a VM a DNS subdomain), no
symbolic link is followed (``O_NOFOLLOW`` on every component, ``dir_fd``-relative opens), the marker
must be a regular file and is read with a bound (``diskplan.homemarker.MAX_MARKER_BYTES``).
:func:`vm_dirs` is that walk of ``<root>/<ns>/<vm>/``, shared with the capacity account
(``nodeagent.capacity.scan_root``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from diskplan import keys as K
from diskplan.errors import Malformed
from diskplan.homemarker import MAX_MARKER_BYTES, HomeMarker, parse_marker
from diskplan.plan import DNS_LABEL, DNS_SUBDOMAIN
from hooksidecar.prepare.files import read_bounded

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class MarkerError(Exception):
    """A marker that cannot be used; the message says why (for the log)."""


@dataclass(frozen=True)
class MarkerPlace:
    """A VM directory that holds a marker file: ``<root>/<namespace>/<vm>/home.node.json``."""

    namespace: str
    vm: str


def host_path(prefix: str, path: str) -> str:
    """``path`` (absolute, as on the node) below ``prefix`` (``--host-prefix``; "" or "/": none)."""
    clean = prefix.rstrip("/")
    return clean + path if clean else path


def _subdirs(fd: int) -> Iterator[str]:
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield entry.name


def vm_dirs(root: str) -> Iterator[tuple[str, str, int]]:
    """Every ``<namespace>/<vm>`` directory under ``root`` whose names are Kubernetes names, sorted,
    as ``(namespace, vm, ns_fd)``: ``ns_fd`` is the namespace directory's fd (opened with
    ``O_NOFOLLOW``), valid until the next item; open the VM directory relative to it. No link is
    followed; a missing ``root`` yields nothing; a namespace directory that cannot be read is passed
    over."""
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        for ns in sorted(_subdirs(root_fd)):
            if not DNS_LABEL.match(ns):
                continue
            try:
                ns_fd = os.open(ns, _DIR_FLAGS, dir_fd=root_fd)
            except OSError:
                continue
            try:
                for vm in sorted(_subdirs(ns_fd)):
                    if DNS_SUBDOMAIN.match(vm):
                        yield ns, vm, ns_fd
            finally:
                os.close(ns_fd)
    finally:
        os.close(root_fd)


def find_markers(root: str) -> Iterator[MarkerPlace]:
    """Every ``<namespace>/<vm>`` under ``root`` (the node path of ``hostDisks.root``) that holds a
    ``home.node.json`` entry, in no particular order. A missing ``root`` yields nothing; a
    directory that cannot be read is passed over."""
    for ns, vm, ns_fd in vm_dirs(root):
        try:
            st = os.stat(f"{vm}/{K.HOME_MARKER}", dir_fd=ns_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield MarkerPlace(ns, vm)


def read_marker(root: str, place: MarkerPlace) -> HomeMarker:
    """The marker of ``place`` under ``root``, read now; :class:`MarkerError` with the reason."""
    if not DNS_LABEL.match(place.namespace) or not DNS_SUBDOMAIN.match(place.vm):
        raise MarkerError(f"{place.namespace}/{place.vm}: not a namespace/VM name")
    where = f"{root}/{place.namespace}/{place.vm}/{K.HOME_MARKER}"
    fds: list[int] = []
    try:
        fd = os.open(root, _DIR_FLAGS)
        fds.append(fd)
        for part in (place.namespace, place.vm):
            fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            fds.append(fd)
        fd = os.open(K.HOME_MARKER, _FILE_FLAGS, dir_fd=fd)
        fds.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MarkerError(f"{where}: not a regular file")
        data = read_bounded(fd, MAX_MARKER_BYTES)
    except FileNotFoundError:
        raise MarkerError(f"{where}: gone") from None
    except OSError as exc:
        raise MarkerError(f"{where}: cannot be read: {exc.strerror or exc} (a symbolic link is never "
                          "followed)") from None
    finally:
        for fd in reversed(fds):
            os.close(fd)
    try:
        return parse_marker(data)
    except Malformed as exc:
        raise MarkerError(f"{where}: {exc}") from None


def marker_or_why(root: str, namespace: str, vm: str) -> HomeMarker | str:
    """This node's home marker of ``namespace/vm`` under ``root`` (:func:`read_marker`), or why there
    is none (the form :func:`nodeagent.home.marker_vouches` takes)."""
    try:
        return read_marker(root, MarkerPlace(namespace, vm))
    except MarkerError as exc:
        return str(exc)
