"""Kubernetes Events the agent puts on a VirtualMachine: the body, built purely.

Reasons (``diskplan.keys``): ``HomeNodeRecorded`` (Normal), ``DiskExpanded`` (Normal),
``DiskExpandFailed`` (Warning), and ``HomeNodeConflict`` (Warning: a VMI runs on a node that is not
its VM's home). An ``events.k8s.io/v1`` Event (the same objects ``kubectl describe vm`` and
``kubectl get events`` list; the core/v1 view shows ``note`` as the message and ``regarding`` as
the involved object). The events.k8s.io client is used rather than core/v1's because loading
CoreV1Api (every core model) costs the agent about 20 MiB of memory. The clock is handed in.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

REPORTING_CONTROLLER = "diskhooks.io/node-agent"
EVENT_HOME_NODE_CONFLICT = "HomeNodeConflict"
NORMAL = "Normal"
WARNING = "Warning"
ACTIONS = {"HomeNodeRecorded": "RecordHomeNode", EVENT_HOME_NODE_CONFLICT: "RecordHomeNode",
           "DiskExpanded": "ExpandDisk", "DiskExpandFailed": "ExpandDisk"}
MAX_NOTE_BYTES = 1024  # the API server's limit on note (UTF-8 bytes)
MAX_REPORTING_INSTANCE = 128  # the API server's limit


def _cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes (cut on a character boundary, ``...`` marking the cut)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit - 3].decode("utf-8", "ignore") + "..."


def event_name(name: str, suffix: str) -> str:
    """``<name>.<suffix>``, the object's name cut to 200 characters and never ending the cut in a
    ``.`` or ``-`` (a DNS subdomain's labels end in an alphanumeric: ``pg-.x`` or ``pg..x`` would be
    refused)."""
    return f"{name[:200].rstrip('.-')}.{suffix[:40]}"


def event_body(vm: Mapping[str, Any], *, reason: str, message: str, event_type: str, node: str,
               now: datetime.datetime, suffix: str) -> dict[str, Any]:
    """An events.k8s.io/v1 Event about ``vm`` (its namespace, name, uid and resourceVersion), named
    ``<vm>.<suffix>`` (from the caller: a unique hex string, or for ``HomeNodeRecorded`` one fixed
    by the VM's UID and the node, ``nodeagent.homeevent.recorded_event_suffix``; events.k8s.io
    refuses a ``generateName`` ending in a dot), reported by this node's agent."""
    raw = vm.get("metadata")
    meta: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    regarding = {"apiVersion": str(vm.get("apiVersion") or "kubevirt.io/v1"), "kind": "VirtualMachine",
                 "namespace": namespace, "name": name}
    for member in ("uid", "resourceVersion"):
        if isinstance(meta.get(member), str):
            regarding[member] = meta[member]
    return {
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": event_name(name, suffix), "namespace": namespace},
        "eventTime": now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": node[:MAX_REPORTING_INSTANCE],
        "action": ACTIONS.get(reason, reason)[:128],
        "reason": reason[:128], "note": _cut(message, MAX_NOTE_BYTES), "type": event_type,
        "regarding": regarding,
    }
