"""Kubernetes Events the agent puts on a VirtualMachine: the body, built purely.

Reasons (``diskplan.keys``): ``HomeNodeRecorded`` (Normal), ``DiskExpanded`` (Normal),
``DiskExpandFailed`` (Warning), and ``HomeNodeConflict`` (Warning: a VMI runs on a node that is not
its VM's home). A core/v1 Event, as ``kubectl describe vm`` lists them; the clock is handed in.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from diskplan.homemarker import format_time

COMPONENT = "diskhooks-node"
REPORTING_COMPONENT = "diskhooks.io/node-agent"
EVENT_HOME_NODE_CONFLICT = "HomeNodeConflict"
NORMAL = "Normal"
WARNING = "Warning"
MAX_MESSAGE = 1024  # Kubernetes allows more; a reason longer than this is cut with an ellipsis
MAX_REPORTING_INSTANCE = 128  # the API server's limit


def event_body(vm: Mapping[str, Any], *, reason: str, message: str, event_type: str, node: str,
               now: datetime.datetime) -> dict[str, Any]:
    """A core/v1 Event about ``vm`` (its namespace, name, uid and resourceVersion), named by the
    API server (``generateName``)."""
    raw = vm.get("metadata")
    meta: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    involved = {"apiVersion": str(vm.get("apiVersion") or "kubevirt.io/v1"), "kind": "VirtualMachine",
                "namespace": namespace, "name": name}
    for src, dst in (("uid", "uid"), ("resourceVersion", "resourceVersion")):
        if isinstance(meta.get(src), str):
            involved[dst] = meta[src]
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    stamp = format_time(now.replace(microsecond=0))
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name[:200]}.", "namespace": namespace},
        "involvedObject": involved,
        "reason": reason, "message": message, "type": event_type,
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": node[:MAX_REPORTING_INSTANCE],
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }
