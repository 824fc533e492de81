"""Metadata rules: the object's name and namespace, where diskhooks annotations may stand, and the
traces diskhooks leaves on a template's metadata.

Pure. A VM or bare VMI with diskhooks disks needs a name that is a valid object name (its disks live
in a directory named after it and its namespace: :func:`check_names`); diskhooks annotations go on
the VirtualMachine's own ``metadata.annotations``, never on its template
(:func:`check_template_metadata`, :func:`check_no_template_requests`). A template without diskhooks
annotations but with its plan, label or sidecar is :func:`stale_template` (it is cleaned up); a VMI
that virt-controller made from a VM is :func:`owned_by_vm` (its sizing came through the template).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from diskplan.annotations import user_annotation_keys
from diskplan.errors import Refused
from diskplan.plan import DNS_LABEL, DNS_SUBDOMAIN
from diskplan.policy import Policy
from webhook.vm.shape import VM_KIND
from webhook.vm.sidecars import own_repo_entries

MAX_NAME = 253  # an object name is a DNS subdomain: at most 253 characters


def check_names(kind: str, name: str, namespace: str) -> None:
    """The names a plan is bound to (and the disks' directory is named after) are valid."""
    if not name:
        raise Refused("metadata.name", f"a {kind} with diskhooks disks needs a name (its disks "
                      "live in a directory named after it): generateName is not supported")
    if not DNS_SUBDOMAIN.match(name) or len(name) > MAX_NAME:
        raise Refused("metadata.name", f"{name[:80]!r} is not a valid object name")
    if not DNS_LABEL.match(namespace):
        raise Refused("metadata.namespace", f"{namespace[:80]!r} is not a valid namespace name")


def valid_names(name: str, namespace: str) -> bool:
    """What :func:`check_names` admits, without an error (a plan only remembering detached disks)."""
    return bool(name and DNS_SUBDOMAIN.match(name) and len(name) <= MAX_NAME and DNS_LABEL.match(namespace))


def check_template_metadata(tmeta: Mapping[str, Any]) -> None:
    for key in ("annotations", "labels"):
        if tmeta.get(key) is not None and not isinstance(tmeta[key], Mapping):
            raise Refused(f"spec.template.metadata.{key}", "must be an object")


def check_no_template_requests(plan_meta: Mapping[str, Any]) -> None:
    for key in user_annotation_keys(plan_meta.get("annotations")):
        raise Refused(f"spec.template.metadata.annotations[{key}]", "diskhooks annotations go on the "
                      "VirtualMachine's own metadata.annotations, not on its template")


def owned_by_vm(meta: Mapping[str, Any]) -> bool:
    """A VMI that virt-controller made from a VirtualMachine (its owner reference says so)."""
    refs = meta.get("ownerReferences")
    return isinstance(refs, list) and any(isinstance(r, Mapping) and r.get("kind") == VM_KIND
                                          for r in refs)


def stale_template(tmeta: Mapping[str, Any], policy: Policy) -> bool:
    """Traces of diskhooks on a template without diskhooks annotations: plan, label, sidecar,
    or diskhooks annotations put on the template by mistake."""
    annotations = tmeta.get("annotations")
    labels = tmeta.get("labels")
    if isinstance(labels, Mapping) and K.LABEL_MANAGED in labels:
        return True
    if not isinstance(annotations, Mapping):
        return False
    if any(isinstance(k, str) and k.startswith(K.PREFIX) for k in annotations):
        return True
    return bool(own_repo_entries(annotations.get(K.ANN_HOOK_SIDECARS), policy))
