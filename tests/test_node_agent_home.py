"""The home-node decisions (nodeagent/home.py), table by table: pure, no API server."""

from __future__ import annotations

import copy
import datetime
import json
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.homemarker import HomeMarker
from diskplan.plan import Passthrough, Plan, PlanKeys, PlannedDisk, sign_plan
from nodeagent.home import (
    ALREADY,
    CONFLICT,
    RECORD,
    SKIP,
    decide_from_marker,
    decide_from_vmi,
    home_patch,
    owner_vm,
)

KEYS = PlanKeys(current=b"home-decision-test-key-0123456789")
OTHER = PlanKeys(current=b"another-key-entirely-0123456789ab")
NODE = "node-a"
NS, NAME, VM_UID = "vms", "pg01", "11111111-2222-4333-8444-555555555555"
CREATED = "2026-03-01T10:00:00Z"


def plan(namespace: str = NS, vm: str = NAME, *, disks: bool = True, keys: PlanKeys = KEYS) -> str:
    p = Plan(namespace=namespace, vm=vm, host_dir=f"/var/lib/diskhooks/vms/{namespace}/{vm}",
             image_library=None, sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
             disks=(PlannedDisk("data", 1 << 30, "virtio", "none", "native", "unmap"),) if disks else (),
             passthrough=() if disks else (Passthrough("fast", "nvme-claim", "disk"),))
    return sign_plan(p, keys)


def vm(*, home: str | None = None, template_plan: str | None = None, uid: str = VM_UID,
       deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": NAME, "namespace": NS, "uid": uid, "resourceVersion": "42",
                            "creationTimestamp": CREATED, "annotations": {}}
    if home is not None:
        meta["annotations"][K.ANN_NODE] = home
    if deleting:
        meta["deletionTimestamp"] = "2026-03-01T11:00:00Z"
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta,
            "spec": {"template": {"metadata": {"annotations": {K.ANN_PLAN: template_plan or plan()}}}}}


def vmi(*, node: str = NODE, plan_text: str | None = None, owner: dict[str, Any] | None = None,
        owned: bool = True) -> dict[str, Any]:
    ref = owner or {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": NAME, "uid": VM_UID,
                    "controller": True}
    meta: dict[str, Any] = {"name": NAME, "namespace": NS, "uid": VMI_UID,
                            "labels": {"kubevirt.io/nodeName": node},
                            "annotations": {K.ANN_PLAN: plan_text if plan_text is not None else plan()}}
    if owned:
        meta["ownerReferences"] = [ref]
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta}


VMI_UID = "vmi-uid-1"


def prepared(*, vmi_uid: str = VMI_UID, node: str = NODE, name: str = NAME) -> HomeMarker:
    """The marker prepare leaves in the VM's directory when the VMI's launcher ran on ``node``."""
    return HomeMarker(namespace=NS, vm=name, vmi_uid=vmi_uid, node=node,
                      written_at=datetime.datetime(2026, 3, 1, 10, 5, tzinfo=datetime.UTC))


def unsigned() -> str:
    doc = json.loads(plan())
    del doc["auth"]
    return json.dumps(doc)


@pytest.mark.parametrize(("the_vmi", "the_vm", "action", "code", "words"), [
    (vmi(), vm(), RECORD, "record", "home node recorded: node-a"),
    (vmi(), vm(home=NODE), ALREADY, "already", "this node already"),
    (vmi(), vm(home="node-b"), CONFLICT, "conflict", "home node is node-b"),
    (vmi(), vm(home="Not A Node!"), CONFLICT, "conflict", "home node is 'Not A Node!'"),
    (vmi(node="node-b"), vm(), SKIP, "other-node", "scheduled on 'node-b'"),
    (vmi(owned=False), vm(), SKIP, "bare-vmi", "without a VirtualMachine"),
    (vmi(), None, SKIP, "no-vm", "does not exist"),
    (vmi(), vm(uid="another-uid"), SKIP, "vm-replaced", "deleted and created again"),
    (vmi(), vm(deleting=True), SKIP, "vm-deleting", "being deleted"),
    (vmi(plan_text=plan(keys=OTHER)), vm(), SKIP, "plan-refused", "does not verify"),
    (vmi(plan_text=unsigned()), vm(), SKIP, "plan-refused", "not signed"),
    (vmi(plan_text=plan(vm="other")), vm(), SKIP, "plan-refused", "made for VM 'other'"),
    (vmi(plan_text=plan(namespace="prod")), vm(), SKIP, "plan-refused", "made for namespace 'prod'"),
    (vmi(plan_text="{not json"), vm(), SKIP, "plan-refused", "not valid JSON"),
    (vmi(plan_text=plan(disks=False)), vm(), SKIP, "nothing-on-node", "no image on the node"),
])
def test_decide_from_vmi(the_vmi: dict[str, Any], the_vm: dict[str, Any] | None, action: str, code: str,
                         words: str) -> None:
    """With prepare's marker for this VMI on this node: the VMI's own facts decide."""
    before = copy.deepcopy((the_vmi, the_vm))
    d = decide_from_vmi(the_vmi, the_vm, node=NODE, keys=KEYS, marker=prepared())
    assert (d.action, d.code) == (action, code), d.reason
    assert words in d.reason
    assert (the_vmi, the_vm) == before  # inputs untouched


@pytest.mark.parametrize(("the_marker", "code", "words"), [
    ("/root/vms/pg01/home.node.json: gone", "no-marker", "no usable home marker for VM vms/pg01 (/root"),
    (prepared(vmi_uid="an-earlier-vmi"), "marker-other-vmi", "written for VMI an-earlier-vmi"),
    (prepared(node="node-b"), "marker-other-node", "written on node node-b"),
    (prepared(name="other"), "marker-misplaced", "names VM vms/other"),
])
@pytest.mark.parametrize("home", [None, "node-b"])
def test_a_vmi_without_prepares_marker_records_nothing(the_marker: HomeMarker | str, code: str, words: str,
                                                       home: str | None) -> None:
    """The forged VMI: everything on it says it runs here with its VM's valid plan (its labels,
    owner reference and annotations are whatever its creator wrote), but prepare never ran for it
    on this node. No home is recorded, and no conflict is claimed for a VM homed elsewhere."""
    d = decide_from_vmi(vmi(), vm(home=home), node=NODE, keys=KEYS, marker=the_marker)
    assert (d.action, d.code) == (SKIP, code), d.reason
    assert words in d.reason and "only prepare's marker proves" in d.reason
    assert (d.namespace, d.vm, d.home) == (NS, NAME, home)


def test_a_vm_already_at_home_here_needs_no_marker() -> None:
    d = decide_from_vmi(vmi(), vm(home=NODE), node=NODE, keys=KEYS, marker="gone")
    assert (d.action, d.code) == (ALREADY, "already")


def test_a_vmi_without_a_uid_is_never_vouched_for() -> None:
    the_vmi = vmi()
    del the_vmi["metadata"]["uid"]
    d = decide_from_vmi(the_vmi, vm(), node=NODE, keys=KEYS, marker=prepared())
    assert (d.action, d.code) == (SKIP, "marker-other-vmi")


def test_a_vmi_without_its_plan_annotation_is_skipped() -> None:
    the_vmi = vmi()
    del the_vmi["metadata"]["annotations"][K.ANN_PLAN]
    assert decide_from_vmi(the_vmi, vm(), node=NODE, keys=KEYS, marker=prepared()).code == "no-plan"


def test_a_record_carries_what_the_patch_and_event_need() -> None:
    d = decide_from_vmi(vmi(), vm(), node=NODE, keys=KEYS, marker=prepared())
    assert (d.namespace, d.vm, d.vm_uid, d.resource_version, d.home) == (NS, NAME, VM_UID, "42", None)
    assert d.plan is not None and d.plan.disks[0].name == "data"


@pytest.mark.parametrize(("ref", "expected"), [
    ({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "a", "uid": "u", "controller": True},
     ("a", "u")),
    ({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "a", "uid": "u"}, None),
    ({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachinePool", "name": "a", "uid": "u",
      "controller": True}, None),
    ({"apiVersion": "example.com/v1", "kind": "VirtualMachine", "name": "a", "uid": "u", "controller": True},
     None),
    ({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "", "uid": "u", "controller": True},
     None),
    ("not a mapping", None),
])
def test_owner_vm_is_the_controlling_kubevirt_vm(ref: Any, expected: tuple[str, str] | None) -> None:
    assert owner_vm({"metadata": {"ownerReferences": [ref]}}) == expected


def marker(*, written: str = "2026-03-01T10:05:00Z", node: str = NODE, namespace: str = NS,
           name: str = NAME) -> HomeMarker:
    when = datetime.datetime.fromisoformat(written)
    return HomeMarker(namespace=namespace, vm=name, vmi_uid="vmi-uid-0", node=node, written_at=when)


@pytest.mark.parametrize(("the_marker", "the_vm", "action", "code", "words"), [
    (marker(), vm(), RECORD, "record", "home marker of VMI vmi-uid-0"),
    (marker(), vm(home=NODE), ALREADY, "already", "already"),
    (marker(), vm(home="node-b"), CONFLICT, "conflict", "node-b"),
    # written in the VM's first second (creationTimestamp has whole seconds): still its own
    (marker(written="2026-03-01T10:00:00.900Z"), vm(), RECORD, "record", "recorded"),
    (marker(written="2026-03-01T09:59:59.999Z"), vm(), SKIP, "orphan", "older than the VirtualMachine"),
    (marker(), None, SKIP, "orphan", "no VirtualMachine of that name"),
    (marker(node="node-b"), vm(), SKIP, "marker-other-node", "written on node node-b"),
    (marker(name="other"), vm(), SKIP, "marker-misplaced", "names vms/other"),
    (marker(), vm(deleting=True), SKIP, "vm-deleting", "being deleted"),
    (marker(), vm(template_plan=plan(keys=OTHER)), SKIP, "plan-refused", "does not verify"),
    (marker(), vm(template_plan=plan(disks=False)), SKIP, "nothing-on-node", "no image"),
])
def test_decide_from_marker(the_marker: HomeMarker, the_vm: dict[str, Any] | None, action: str, code: str,
                            words: str) -> None:
    d = decide_from_marker(the_marker, the_vm, node=NODE, namespace=NS, vm_name=NAME, keys=KEYS)
    assert (d.action, d.code) == (action, code), d.reason
    assert words in d.reason


def test_a_vm_without_a_readable_creation_time_is_not_claimed() -> None:
    the_vm = vm()
    the_vm["metadata"]["creationTimestamp"] = "yesterday"
    d = decide_from_marker(marker(), the_vm, node=NODE, namespace=NS, vm_name=NAME, keys=KEYS)
    assert (d.action, d.code) == (SKIP, "malformed")


def test_home_patch_sets_annotation_and_label_under_the_version_read() -> None:
    assert home_patch(NODE, "42") == {"metadata": {"annotations": {K.ANN_NODE: NODE},
                                                   "labels": {K.LABEL_NODE: NODE}, "resourceVersion": "42"}}
    assert "resourceVersion" not in home_patch(NODE, None)["metadata"]
