"""The home node (pure): whether prepare may run on this node at all, and the home marker.

A VM's images live on one node. Once the node agent has recorded that node (``diskhooks.io/node``),
the plan names it (plan version 3, ``node``) and the VM carries a required node affinity for it;
prepare checks it once more against the node it runs on (``$DISKHOOKS_NODE_NAME``, from the
downward API's ``spec.nodeName``) and refuses before it touches anything when they differ
(:func:`wrong_node`): on any other node it would make new, empty images and the VM would boot
without its data.

The home marker ``home.node.json`` (:mod:`diskplan.homemarker`) in the VM directory records the
node that made the images, for the node agent (it finds VMs that started and stopped before it saw
them). :func:`home_actions` decides what to do with it, only when the node is known and the plan
has something on the node (disks or a persistent root); its action comes before every image's, so
no image exists without a marker:

- no marker (a first start, or images made before markers existed): written;
- a marker naming this node and this VMI: left as it is (the init container restarted); naming
  another VMI (a new start): rewritten for this one, once per start. The node agent takes a VMI as
  started here only when this marker names its UID (the home record, and the first start after a
  cold migration, which frees the old node's kept copy: docs/MIGRATION.md), and before a home is
  recorded a fresh time keeps the marker from looking older than the VM (the agent takes an older
  marker for one a deleted VM of the same name left);
- a marker naming another node: when the plan names this node as the home (the images were moved
  here, or the node was renamed), replaced with a warning; when the plan names no home yet,
  refused: the directory says the images were made on another node (a directory shared between
  nodes, or a renamed node) and diskhooks does not guess which is right;
- a marker that cannot be read, or names another VM: replaced with a warning (a link or a special
  file in its place is refused, never written over).
"""

from __future__ import annotations

import datetime

from diskplan import keys as K
from diskplan.errors import Malformed
from diskplan.homemarker import HomeMarker, marker_json
from diskplan.plan import Plan
from hooksidecar.prepare.actions import Action, KeepHomeMarker, Refuse, WriteHomeMarker
from hooksidecar.prepare.observe import HomeObservation

MARKER_PATH = f"{K.LAUNCHER_VM_DIR}/{K.HOME_MARKER}"  # as the prepare container sees it
VOLUME = K.HOME_MARKER  # what its log line and refusals are named after
MIGRATE_HINT = "kubectl diskhooks migrate"


def wrong_node(plan: Plan, node: str | None) -> str | None:
    """Why prepare must not run here: the plan names a home node and this is another node (or an
    unknown one). None when it may run."""
    if plan.node is None or plan.node == node:
        return None
    here = f"node {node}" if node else f"an unknown node (${K.ENV_NODE_NAME} is not set)"
    return (f"the images of VM {plan.namespace}/{plan.vm} live on node {plan.node}, its home node, but "
            f"this launcher runs on {here}; nothing was created or changed (new images here would be "
            f"empty). The VM is pinned to {plan.node} by its node affinity: start it there (is the "
            f"node Ready and schedulable?), or move it with {MIGRATE_HINT}")


def needs_marker(plan: Plan) -> bool:
    """Whether the plan has anything on the node, so that prepare has the VM directory mounted."""
    return bool(plan.disks or plan.persist_root is not None)


def home_actions(plan: Plan, obs: HomeObservation, *, node: str | None, vmi_uid: str | None,
                 now: datetime.datetime | None) -> list[Action]:
    """What to do with the home marker (see the module doc). Nothing without a known node or
    without anything on the node; a refusal when the plan's home is another node. ``now`` (aware)
    is what the marker records; it must be given with a ``node``."""
    problem = wrong_node(plan, node)
    if problem is not None:
        return [Refuse(VOLUME, problem)]
    if node is None or not needs_marker(plan):
        return []
    node_file = f"{plan.host_dir}/{K.HOME_MARKER}"
    if obs.kind == "unmounted":
        return [Refuse(VOLUME, f"the VM directory {K.LAUNCHER_VM_DIR} is not mounted in the "
                       f"{K.PREPARE_CONTAINER} init container: check that the pod has the hostPath volume "
                       f"{K.POD_VOLUME_VM_DIR!r} (path {plan.host_dir}) and its mount")]
    if now is None:
        raise ValueError("home_actions: a node was given without the time to record")
    if vmi_uid is None:
        return [Refuse(VOLUME, f"{K.ENV_VMI_UID} is not set; the home marker records the VMI this start "
                       "is for")]
    try:
        data = marker_json(HomeMarker(namespace=plan.namespace, vm=plan.vm, vmi_uid=vmi_uid, node=node,
                                      written_at=now))
    except (Malformed, ValueError) as exc:
        return [Refuse(VOLUME, f"cannot record the home node: {exc}")]
    if obs.kind == "missing":
        return [WriteHomeMarker(VOLUME, MARKER_PATH, data, node)]
    if obs.kind == "invalid":
        if not obs.replaceable:
            return [Refuse(VOLUME, f"{MARKER_PATH} (node file {node_file}) {obs.detail}; remove it on "
                           "the node")]
        return [WriteHomeMarker(VOLUME, MARKER_PATH, data, node,
                                warning=f"{node_file} {obs.detail}: replaced")]
    marker = obs.marker
    assert marker is not None
    if (marker.namespace, marker.vm) != (plan.namespace, plan.vm):
        return [WriteHomeMarker(VOLUME, MARKER_PATH, data, node, warning=(
            f"{node_file} named VM {marker.namespace}/{marker.vm}, not {plan.namespace}/{plan.vm}: "
            "replaced"))]
    if marker.node == node:
        if marker.vmi_uid != vmi_uid:
            # a new start: the marker names the VMI prepare ran for, the node agent's only proof
            # that a VMI labelled for this node really started here (see the module doc)
            return [WriteHomeMarker(VOLUME, MARKER_PATH, data, node)]
        return [KeepHomeMarker(VOLUME, MARKER_PATH, node)]
    if plan.node == node:
        return [WriteHomeMarker(VOLUME, MARKER_PATH, data, node, warning=(
            f"{node_file} named node {marker.node}; this VM's home node is now {node}: replaced"))]
    return [Refuse(VOLUME, (
        f"{node_file} says the images of VM {plan.namespace}/{plan.vm} were made on node "
        f"{marker.node}, but this is node {node} and the VM has no home node yet; nothing was created "
        f"or changed. Start the VM on {marker.node} (the diskhooks node agent then records it as the "
        "home and pins the VM there); if this directory is shared between nodes or the node was "
        f"renamed, a platform admin removes {node_file} on the node"))]
