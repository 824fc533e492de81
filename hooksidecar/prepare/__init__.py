"""The prepare step: make the qcow2 images a plan needs before KubeVirt would make raw ones.

Runs as the ``diskhooks-prepare`` init container of a virt-launcher pod
(``diskhooks-sidecar prepare --plan-from-env | --plan FILE [--path-prefix DIR] [--node-name NAME]``),
with the pod's hostDisk volumes mounted read-write at their launcher paths, the VM directory
read-write, the image library read-only and, for a persistent root, KubeVirt's image volume of the
containerDisk read-only.

Three layers, in this order, each in its own module:

1. :func:`~hooksidecar.prepare.observe.inspect` (:mod:`~hooksidecar.prepare.observe`, I/O,
   read-only): what is on disk for every planned image, an :class:`Observed`.
2. :func:`~hooksidecar.prepare.decide.plan_actions` (:mod:`~hooksidecar.prepare.decide`, pure):
   plan + observations -> a list of actions (:mod:`~hooksidecar.prepare.actions`), one or more per
   volume: create, grow, unchanged, or refuse. Nothing is done when any volume is refused. The rules
   live in :mod:`~hooksidecar.prepare.disks` (hostDisk images, library bases, base records),
   :mod:`~hooksidecar.prepare.persist_root` (the persistent root),
   :mod:`~hooksidecar.prepare.home` (the home node: never on another node than the plan's, and the
   ``home.node.json`` marker, written before any image) and
   :mod:`~hooksidecar.prepare.problems` (why an existing file cannot be used).
3. :func:`~hooksidecar.prepare.apply.apply` (:mod:`~hooksidecar.prepare.apply`, I/O, writes):
   carries the actions out, through :mod:`~hooksidecar.prepare.files` (create beside and publish
   atomically, records, fsync, handing a file to qemu).

:mod:`~hooksidecar.prepare.cli` reads argv and the environment and runs the three (exit status: 0
done, 1 refused or failed, 2 unreadable plan or bad arguments/environment), holding an exclusive
``flock`` on the VM directory meanwhile (:mod:`~hooksidecar.prepare.lock`): two runs for one VM
never overlap, the second finds what the first made.
"""

from __future__ import annotations

from hooksidecar.prepare.actions import Refuse, Unchanged, WriteMarker
from hooksidecar.prepare.apply import ApplyError, apply
from hooksidecar.prepare.cli import main
from hooksidecar.prepare.decide import plan_actions
from hooksidecar.prepare.observe import (
                                         BaseObservation,
                                         DiskObservation,
                                         FileState,
                                         MarkerState,
                                         Observed,
                                         PersistObservation,
                                         inspect,
                                         inspect_base_content,
                                         make_base_record,
                                         read_marker,
)
from hooksidecar.prepare.persist_root import marker_record

__all__ = ["ApplyError", "BaseObservation", "DiskObservation", "FileState", "MarkerState", "Observed",
           "PersistObservation", "Refuse", "Unchanged", "WriteMarker", "apply", "inspect",
           "inspect_base_content", "main", "make_base_record", "marker_record", "plan_actions",
           "read_marker"]
