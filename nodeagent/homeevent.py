"""The ``HomeNodeRecorded`` Event, sent once even when the agent dies between the home and the Event. Pure.

The agent records a home with one PATCH of the VM and then creates the Event. Killed in between,
it left the VM homed without its Event, and nothing sent it later (the VM is homed: there is
nothing more to record). So:

- the Event's name is fixed by the VM's UID and the node (``<vm>.home-<20 hex>``,
  :func:`recorded_event_suffix`): creating it a second time is refused with 409 AlreadyExists,
  which counts as sent, so there are never two Events for one record;
- the home patch is made under its own field manager, :data:`HOME_FIELD_MANAGER`, which nothing
  else uses. The API server's ``metadata.managedFields`` entry of that manager then tells when the
  home was recorded (its ``time``: set when the manager changes a field) and that the record still
  stands (it owns ``metadata.annotations[diskhooks.io/node]``; a migration's handover, made under
  another manager, takes that field over);
- the agent's VM reconcile (at the agent's start, at every resync, at every change of the VM) sends
  the Event of a VM homed on this node whose home was recorded less than
  :data:`RECORDED_EVENT_WINDOW` ago (:func:`recorded_event_due`) and which this process has not
  sent yet. Older records are left alone: their Event has either been sent or would be past the
  API server's ``--event-ttl`` (1 h by default) soon anyway, and a restart then costs no API call
  per homed VM, only one per VM recorded in the last minutes.

No I/O, no clock: the time is handed in.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from diskplan.errors import DiskhooksError
from diskplan.homemarker import parse_time
from nodeagent.home import home_of, meta_of

HOME_FIELD_MANAGER = "diskhooks-node-agent-home"  # the home patch's fieldManager, and only its
RECORDED_EVENT_WINDOW = datetime.timedelta(minutes=10)  # well inside the default --event-ttl (1 h)
_ANNOTATION_FIELD = f"f:{K.ANN_NODE}"


def recorded_event_suffix(vm_uid: str, node: str) -> str:
    """The fixed part of the ``HomeNodeRecorded`` Event's name for the VM ``vm_uid`` homed on
    ``node`` (``nodeagent.events.event_body`` puts it after the VM's name)."""
    digest = hashlib.sha256(f"{vm_uid}\n{node}".encode()).hexdigest()
    return f"home-{digest[:20]}"


def _covers_home(entry: Mapping[str, Any]) -> bool:
    fields = entry.get("fieldsV1")
    meta = fields.get("f:metadata") if isinstance(fields, Mapping) else None
    annotations = meta.get("f:annotations") if isinstance(meta, Mapping) else None
    return isinstance(annotations, Mapping) and _ANNOTATION_FIELD in annotations


def home_record_entries(managed_fields: Any) -> list[dict[str, Any]]:
    """The entries of ``metadata.managedFields`` that say the agent recorded the home: those of
    :data:`HOME_FIELD_MANAGER` (a merge patch: operation ``Update``, on the object itself, not a
    subresource) owning the home annotation, cut to what :func:`home_recorded_at` reads (the watch
    cache keeps these and no other managed fields)."""
    if not isinstance(managed_fields, list):
        return []
    return [{"manager": HOME_FIELD_MANAGER, "operation": "Update", "time": entry.get("time"),
             "fieldsV1": {"f:metadata": {"f:annotations": {_ANNOTATION_FIELD: {}}}}}
            for entry in managed_fields
            if isinstance(entry, Mapping) and entry.get("manager") == HOME_FIELD_MANAGER
            and entry.get("operation") == "Update" and not entry.get("subresource")
            and _covers_home(entry)]


def home_recorded_at(vm: Mapping[str, Any]) -> datetime.datetime | None:
    """When the agent recorded the VM's current home (the latest such entry's ``time``), or None
    when its home annotation was not written by the agent's home patch or no time is readable."""
    times = []
    for entry in home_record_entries(meta_of(vm).get("managedFields")):
        try:
            times.append(parse_time(entry["time"], field="metadata.managedFields[].time"))
        except DiskhooksError:
            continue
    return max(times, default=None)


def recorded_event_due(vm: Mapping[str, Any], *, node: str, now: datetime.datetime,
                       window: datetime.timedelta = RECORDED_EVENT_WINDOW) -> datetime.datetime | None:
    """The time the agent recorded this node as ``vm``'s home, when that was less than ``window``
    before ``now`` (its ``HomeNodeRecorded`` Event may be missing: create it, 409 meaning it is
    there); None when no Event is due: another home, none, a record older than ``window`` or not
    made by the agent's home patch, a VM without a UID or being deleted. A record time after
    ``now`` (the API server's clock ahead of this node's) counts as recent."""
    meta = meta_of(vm)
    if home_of(vm) != node or not isinstance(meta.get("uid"), str) or not meta["uid"] \
            or meta.get("deletionTimestamp"):
        return None
    at = home_recorded_at(vm)
    if at is None or now - at > window:
        return None
    return at


def late_message(node: str, at: datetime.datetime) -> str:
    """The note of a ``HomeNodeRecorded`` Event sent after the record (the agent did not send it
    then: it was stopped, or the API server refused the Event)."""
    return (f"home node recorded: {node} (at {at.strftime('%Y-%m-%dT%H:%M:%SZ')}; this Event is "
            "sent late: the agent recording it did not send it then)")
