"""Slim copies of VMIs and VMs for the watch caches: only what the agent's decisions read. Pure.

A VMI as the API server sends it is 5-20 KiB of JSON (``managedFields``, the whole domain spec,
status conditions); hundreds of them per node would dominate the agent's memory. The copies keep
identity (name, namespace, uid, resourceVersion, creation and deletion times, owner references),
the diskhooks annotations and labels, KubeVirt's node label, and: for a VMI its phase, node and
``activePods``; for a VM the template's diskhooks annotations (the plan) and, of its
``managedFields``, only the agent's home record (``nodeagent.homeevent.home_record_entries``: when
the home was recorded, for the ``HomeNodeRecorded`` Event's catch-up).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from nodeagent.home import LABEL_VMI_NODE
from nodeagent.homeevent import home_record_entries

_META = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp",
         "ownerReferences")
_VMI_STATUS = ("phase", "nodeName", "activePods")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _ours(values: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in _mapping(values).items()
            if isinstance(k, str) and (k.startswith(K.PREFIX) or k in extra)}


def _slim_meta(meta: Any) -> dict[str, Any]:
    meta = _mapping(meta)
    out = {k: meta[k] for k in _META if k in meta}
    out["labels"] = _ours(meta.get("labels"), (LABEL_VMI_NODE,))
    out["annotations"] = _ours(meta.get("annotations"))
    return out


def slim_vmi(vmi: Mapping[str, Any]) -> dict[str, Any]:
    status = _mapping(vmi.get("status"))
    return {"apiVersion": vmi.get("apiVersion"), "kind": vmi.get("kind"),
            "metadata": _slim_meta(vmi.get("metadata")),
            "status": {k: status[k] for k in _VMI_STATUS if k in status}}


def slim_vm(vm: Mapping[str, Any]) -> dict[str, Any]:
    template = _mapping(_mapping(vm.get("spec")).get("template"))
    meta = _slim_meta(vm.get("metadata"))
    recorded = home_record_entries(_mapping(vm.get("metadata")).get("managedFields"))
    if recorded:
        meta["managedFields"] = recorded
    return {"apiVersion": vm.get("apiVersion"), "kind": vm.get("kind"), "metadata": meta,
            "spec": {"template": {"metadata": {
                "annotations": _ours(_mapping(template.get("metadata")).get("annotations"))}}}}


def active_pods_on(vmi: Mapping[str, Any], node: str) -> list[str]:
    """UIDs of the VMI's launcher Pods on ``node`` (``status.activePods``: pod UID -> node name)."""
    pods = _mapping(_mapping(vmi.get("status")).get("activePods"))
    return sorted(uid for uid, where in pods.items() if isinstance(uid, str) and where == node)
