"""prepare's capacity guard (I/O around :func:`diskplan.capacity.check_start`).

Runs after the decision and before anything is applied, when the Pod mutation mounted the node's
capacity directory (``<hostDisks.root>/.diskhooks/capacity``, read-only, at
``/var/run/kubevirt-private/diskhooks/capacity``; without it, e.g. a launcher admitted by an older
webhook, nothing is checked and the report says so). It gathers:

- the images the actions create or grow (:class:`~hooksidecar.prepare.actions.CreateImage`,
  :class:`~hooksidecar.prepare.actions.GrowImage`); none: the start is never refused;
- the virtual size of every image file in the VM directory now
  (:func:`hooksidecar.prepare.imagefiles.scan_vm_dir`: detached disks and persistent roots too);
- the filesystem's size and free space (``statvfs`` of the VM directory; free = what qemu, an
  unprivileged writer, may still use);
- what every other VM directory counts, from the node agent's summary (``summary.json``, read
  through no link and bounded); a summary for another node, or one that cannot be read, is not
  used and the report says why (only this VM's images are then counted);

and hands them to the pure rule. The settings (``overcommit``, ``reserve``) come from prepare's
``--overcommit`` and ``--reserve``, which the Pod mutation writes from the policy.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from diskplan import keys as K
from diskplan.capacity import (
    MAX_SUMMARY_BYTES,
    Change,
    NodeSummary,
    StartCheck,
    StartVerdict,
    check_start,
    parse_summary,
    planned_images,
)
from diskplan.capacitypolicy import CapacityPolicy
from diskplan.errors import Malformed
from diskplan.plan import Plan
from hooksidecar.prepare.actions import Action, CreateImage, GrowImage, Unchanged
from hooksidecar.prepare.files import read_bounded
from hooksidecar.prepare.imagefiles import scan_vm_dir

#: a summary older than this is still used (it is the best figure there is), with a note
STALE_AFTER = datetime.timedelta(minutes=15)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Guard:
    """The verdict (None when the capacity directory is not mounted) and the report's members."""

    verdict: StartVerdict | None
    report: dict[str, Any]


def changes_of(actions: Sequence[Action]) -> tuple[Change, ...]:
    """The images ``actions`` create or grow, by file name."""
    out = []
    for a in actions:
        if isinstance(a, CreateImage):
            out.append(Change(os.path.basename(a.path), None, a.size))
        elif isinstance(a, GrowImage):
            out.append(Change(os.path.basename(a.path), a.from_size, a.size))
    return tuple(out)


def _root_of(plan: Plan) -> str:
    tail = f"/{plan.namespace}/{plan.vm}"
    return plan.host_dir[: -len(tail)] if plan.host_dir.endswith(tail) and plan.host_dir != tail \
        else plan.host_dir


def read_summary(path: str) -> NodeSummary:
    """The summary at ``path`` (a regular file, never through a link); :class:`Malformed` or
    OSError (FileNotFoundError when there is none)."""
    fd = os.open(path, _FILE_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Malformed(K.CAPACITY_SUMMARY, "is not a regular file")
        data = read_bounded(fd, MAX_SUMMARY_BYTES)
    finally:
        os.close(fd)
    return parse_summary(data)


def _others(plan: Plan, path: str, node: str | None, now: datetime.datetime,
            notes: list[str]) -> int | None:
    try:
        summary = read_summary(path)
    except FileNotFoundError:
        notes.append("the node agent has written no capacity summary yet: other VMs' images were not "
                     "counted")
        return None
    except (OSError, Malformed) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        notes.append(f"the capacity summary cannot be used ({why}): other VMs' images were not counted")
        return None
    if node is not None and summary.node != node:
        notes.append(f"the capacity summary describes node {summary.node}, not {node}: not used")
        return None
    age = now - summary.written_at
    if age > STALE_AFTER:
        notes.append(f"the capacity summary is {int(age.total_seconds())} s old (is the node agent "
                     "running?): used as it is")
    return summary.others(plan.namespace, plan.vm)


def _own_images(plan: Plan, prefix: str, actions: Sequence[Action], notes: list[str]) -> dict[str, int]:
    try:
        scan = scan_vm_dir(prefix + K.LAUNCHER_VM_DIR)
    except OSError as exc:
        notes.append(f"the VM directory could not be listed ({exc.strerror}): only its planned images "
                     "were counted")
        own: dict[str, int] = {}
        for a in actions:
            if isinstance(a, Unchanged) and a.path.endswith(".qcow2"):
                own[os.path.basename(a.path)] = a.virtual_size
            elif isinstance(a, GrowImage):
                own[os.path.basename(a.path)] = a.from_size
        return own
    for name, why in scan.unreadable.items():
        notes.append(f"{name}: {why}")
    return {name: img.virtual_bytes for name, img in scan.images.items()}


def guard(plan: Plan, actions: Sequence[Action], *, prefix: str, node: str | None,
          capacity: CapacityPolicy, now: datetime.datetime) -> Guard:
    """Check the start against the node's capacity; see the module docstring."""
    capacity_dir = prefix + K.LAUNCHER_CAPACITY
    if not _is_dir(capacity_dir):
        return Guard(None, {"result": "not-checked", "detail": f"{K.LAUNCHER_CAPACITY} is not mounted (a "
                            "launcher admitted by a diskhooks webhook older than the capacity guard)"})
    changes = changes_of(actions)
    notes: list[str] = []
    try:
        fs = os.statvfs(prefix + K.LAUNCHER_VM_DIR)
    except OSError as exc:
        if changes:
            return Guard(StartVerdict(f"the free space of the VM directory cannot be read "
                                      f"({exc.strerror}); nothing was created or changed", {}), {})
        return Guard(None, {"result": "nothing-new"})
    others = _others(plan, f"{capacity_dir}/{K.CAPACITY_SUMMARY}", node, now, notes) if changes else None
    own = _own_images(plan, prefix, actions, notes)
    verdict = check_start(StartCheck(
        node=node, root=_root_of(plan), namespace=plan.namespace, vm=plan.vm,
        filesystem_bytes=fs.f_blocks * fs.f_frsize, free_bytes=fs.f_bavail * fs.f_frsize,
        capacity=capacity, others_bytes=others, own_images=own, planned=planned_images(plan),
        changes=changes))
    report = dict(verdict.figures)
    if notes:
        report["notes"] = notes
    return Guard(verdict, report)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
