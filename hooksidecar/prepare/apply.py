"""Carrying the actions out (I/O, writes): :func:`apply`, one summary (a JSON log line) per volume.

Creates beside the target and publishes atomically (see :mod:`hooksidecar.prepare.files`), grows with
``qemu-img resize``, writes the persistent root's base record and the base record of every
library-backed disk (always before the overlay it describes), and the home marker (before any
image: the actions put it first). Every image it leaves, created, grown
or unchanged (and the base record), is qemu's: 107:107 with mode 0660 when running as root (mode
0660 only otherwise), set through an fd opened with ``O_NOFOLLOW``; when that cannot be done the
volume fails with the reason, since qemu could not open the file and the VM would fail later with a
less clear error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from hooksidecar import qemuimg
from hooksidecar.prepare.actions import (
    Action,
    CreateImage,
    GrowImage,
    KeepBaseRecord,
    KeepHomeMarker,
    Refuse,
    Unchanged,
    WriteBaseRecord,
    WriteHomeMarker,
    WriteMarker,
)
from hooksidecar.prepare.checked import open_checked_base, open_checked_image
from hooksidecar.prepare.files import (
    HandoverError,
    create_beside,
    fsync_file,
    hand_to_qemu,
    remove_stale_tmp,
    write_json,
    write_record,
)


class ApplyError(Exception):
    def __init__(self, volume: str, reason: str) -> None:
        self.volume, self.reason = volume, reason
        super().__init__(f"volume {volume}: {reason}")


def apply(actions: Sequence[Action], *, prefix: str = "", owner: tuple[int, int] | None = None,
          binary: str = "qemu-img", report: Any = None) -> list[dict[str, Any]]:
    """Carry out ``actions`` (none may be a :class:`Refuse`). Returns one summary per volume.

    ``owner`` (uid, gid) is given to every file written. ``report`` (optional callable) gets each
    summary as soon as its volume is done. Raises :class:`ApplyError` on the first failure, after
    removing what that step half-made.
    """
    if any(isinstance(a, Refuse) for a in actions):
        raise ValueError("refused actions cannot be applied")
    summaries: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    last = {a.volume: i for i, a in enumerate(actions)}
    for i, action in enumerate(actions):
        vol = action.volume
        if vol not in summaries:
            order.append(vol)
            summaries[vol] = {"volume": vol}
        summary = summaries[vol]
        try:
            if isinstance(action, CreateImage):
                _create(action, prefix=prefix, owner=owner, binary=binary)
                summary.update(result="created", path=action.path, virtualSize=action.size)
                if action.backing is not None:
                    summary.update(backing=action.backing, backingFormat=action.backing_format)
            elif isinstance(action, GrowImage):
                remove_stale_tmp(prefix + action.path)
                _note_ownership(summary, action.path, hand_to_qemu(prefix + action.path, owner, action.path))
                _grow(action, prefix=prefix, binary=binary)
                fsync_file(prefix + action.path)
                summary.update(result="grown", path=action.path, fromSize=action.from_size,
                               virtualSize=action.size)
            elif isinstance(action, Unchanged):
                remove_stale_tmp(prefix + action.path)
                _note_ownership(summary, action.path, hand_to_qemu(prefix + action.path, owner, action.path))
                for extra in action.also:
                    remove_stale_tmp(prefix + extra)
                    _note_ownership(summary, extra, hand_to_qemu(prefix + extra, owner, extra))
                summary.setdefault("result", "unchanged")
                summary.update(path=action.path, virtualSize=action.virtual_size)
                if action.planned_size is not None:
                    summary.update(plannedSize=action.planned_size)
                    _warn(summary, larger_than_planned(action))
            elif isinstance(action, WriteMarker):
                write_json(prefix + action.path, action.record, owner=owner)
                summary.update(baseFormat=action.record["format"])
                for key, shown in (("sha256", "baseSha256"), ("imageDigest", "baseImageDigest")):
                    if key in action.record:  # a persistent root's record holds one or both
                        summary[shown] = action.record[key]
            elif isinstance(action, WriteBaseRecord):
                write_json(prefix + action.path, action.record, owner=owner)
                summary.update(baseRecord={"new": "written", "identity": "identity-updated",
                                           "adopted": "adopted"}[action.why],
                               baseSha256=action.record["sha256"], baseHashed=action.hashed)
                if action.warning is not None:
                    _warn(summary, action.warning)
            elif isinstance(action, WriteHomeMarker):
                # prepare's own record, read only by the node agent (root): qemu gets nothing here
                write_record(prefix + action.path, action.data, owner=None)
                summary.update(result="written", path=action.path, node=action.node)
                if action.warning is not None:
                    _warn(summary, action.warning)
            elif isinstance(action, KeepHomeMarker):
                remove_stale_tmp(prefix + action.path)
                summary.update(result="unchanged", path=action.path, node=action.node)
            elif isinstance(action, KeepBaseRecord):
                remove_stale_tmp(prefix + action.path)
                _note_ownership(summary, action.path, hand_to_qemu(prefix + action.path, owner, action.path))
                summary.update(baseRecord="kept", baseSha256=action.sha256, baseHashed=action.hashed)
        except qemuimg.QemuImgError as exc:
            raise ApplyError(vol, exc.reason) from None
        except HandoverError as exc:
            raise ApplyError(vol, str(exc)) from None
        except OSError as exc:
            shown = vol if isinstance(action, Refuse) else action.path
            raise ApplyError(vol, f"{shown}: {exc.strerror or exc}") from None
        if report is not None and last[vol] == i:
            report(summary)
    return [summaries[v] for v in order]


def _warn(summary: dict[str, Any], text: str) -> None:
    """Add ``text`` to the log line's ``warning`` (several are joined with "; ")."""
    summary["warning"] = f"{summary['warning']}; {text}" if "warning" in summary else text


def larger_than_planned(action: Unchanged) -> str:
    """The log line's words for an image kept although it is larger than planned."""
    return (f"{action.path} is larger than planned ({action.virtual_size} bytes, planned "
            f"{action.planned_size}): kept as it is, since diskhooks never shrinks an image; the guest "
            f"sees {action.virtual_size} bytes")


def _create(action: CreateImage, *, prefix: str, owner: tuple[int, int] | None, binary: str) -> None:
    create_beside(prefix + action.path,
                  lambda tmp: qemuimg.create(tmp, size=action.size, backing=action.backing,
                                             backing_format=action.backing_format, binary=binary),
                  owner=owner, shown=action.path)


def _grow(action: GrowImage, *, prefix: str, binary: str) -> None:
    """``qemu-img resize`` on the image (and its base) opened and checked again just before, by
    descriptor (:mod:`hooksidecar.prepare.checked`)."""
    fd = open_checked_image(prefix + action.path, shown=action.path, virtual_size=action.from_size)
    try:
        if action.backing_here is None:
            qemuimg.resize(prefix + action.path, size=action.size, binary=binary, image_fd=fd)
            return
        base_path, base_format = prefix + action.backing_here[0], action.backing_here[1]
        base_fd = open_checked_base(base_path, shown=action.backing_here[0], fmt=base_format)
        try:
            qemuimg.resize(prefix + action.path, size=action.size, backing=(base_path, base_format),
                           binary=binary, image_fd=fd, backing_fd=base_fd)
        finally:
            os.close(base_fd)
    finally:
        os.close(fd)


def _note_ownership(summary: dict[str, Any], path: str, change: str | None) -> None:
    if change is not None:
        summary.setdefault("ownership", {})[path] = change
