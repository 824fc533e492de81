"""The decision (pure): plan + observations -> the actions for every volume.

Each volume's rules live in a file named for it: :mod:`~hooksidecar.prepare.disks` (hostDisk images,
their library bases and base records), :mod:`~hooksidecar.prepare.persist_root` (the persistent
root's overlay and base record), :mod:`~hooksidecar.prepare.home` (the home node and its marker);
the words for an unusable file in :mod:`~hooksidecar.prepare.problems`. Refusals come back as :class:`Refuse` actions; nothing is done
when there is one.
"""

from __future__ import annotations

import datetime

from diskplan import keys as K
from diskplan.plan import Plan
from hooksidecar.prepare.actions import Action, Refuse
from hooksidecar.prepare.disks import disk_actions
from hooksidecar.prepare.home import home_actions
from hooksidecar.prepare.observe import Observed
from hooksidecar.prepare.persist_root import persist_root_actions


def plan_actions(plan: Plan, observed: Observed, *, vmi_uid: str | None, node: str | None = None,
                 now: datetime.datetime | None = None) -> list[Action]:
    """What to do for every volume of ``plan`` given what is on disk. Pure.

    Refusals come back as :class:`Refuse` actions; the caller acts only when there is none.
    ``vmi_uid`` is needed when the plan has a persistent root. ``node`` is the node prepare runs
    on (None: unknown), ``now`` the time the home marker records (needed with a ``node``; an aware
datetime): the marker's action comes first
    (:mod:`~hooksidecar.prepare.home`), so no image is made before it.
    """
    actions: list[Action] = home_actions(plan, observed.home, node=node, vmi_uid=vmi_uid, now=now)
    for disk in plan.disks:
        obs = observed.disks.get(disk.name)
        if obs is None:
            actions.append(Refuse(disk.name, "was not inspected (internal error)"))
            continue
        actions.extend(disk_actions(disk, obs, plan))
    if plan.persist_root is not None:
        pobs = observed.persist_root
        if pobs is None:
            actions.append(Refuse(plan.persist_root.volume, "was not inspected (internal error)"))
        elif vmi_uid is None:
            actions.append(Refuse(plan.persist_root.volume,
                                  f"{K.ENV_VMI_UID} is not set; it names the VMI this start is for"))
        else:
            actions.extend(persist_root_actions(plan.persist_root, pobs, plan, vmi_uid))
    return actions
