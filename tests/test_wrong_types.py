"""Wrongly typed fields anywhere the webhook reads: a denial naming the field, never an internal error.

Walks real objects — a VM using every diskhooks feature (as the user wrote it, and as the webhook
mutated it), the VMI KubeVirt makes from it, a bare VMI with annotations and the managed
virt-launcher Pod — and puts a value of the wrong type at every field in turn (the object under
admission, and for UPDATEs the old object too). Each variant goes through the real admission
layer (:func:`webhook.admission.admit`) with the real cores: it must be admitted or denied with a
message ``<field path>: <reason>``; an internal error (status 500, a traceback in the log) fails.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import jsonpatch
import pytest

from diskplan import keys as K
from diskplan.plan import PersistRoot, Plan, PlanKeys, PlannedDisk, sign_plan
from diskplan.policy import Policy, load_policy
from tests.conftest import ADMISSION, EXAMPLE_POLICY, ROOT
from webhook import admission
from webhook.admission import admit, patch_of
from webhook.cluster import FileCluster

KEYS = PlanKeys(current=b"wrong-types-test-key-0123456789abc")
POLICY = load_policy(EXAMPLE_POLICY.read_text())
CLUSTER = FileCluster.from_text((ROOT / "examples" / "demo" / "cluster-objects.yaml").read_text())
#: values of the wrong type (and a few of the right type but wrong shape) put at every field
GARBAGE: tuple[Any, ...] = (None, 5, True, "x", [], {}, [None], ["a"], {"a": 1}, [{"name": ["x"]}],
                            {"name": {"a": 1}})
FIELD = re.compile(r"^\S+$")  # a field path: no spaces (``spec.template.spec.volumes[1].name``)


def review(obj: Any, *, kind: str, old: Any = None) -> dict[str, Any]:
    group = "" if kind == "Pod" else "kubevirt.io"
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "wrong-types", "kind": {"group": group, "version": "v1", "kind": kind},
        "namespace": "vms", "name": "pg01", "operation": "UPDATE" if old is not None else "CREATE",
        "object": obj, "oldObject": old}}


def decide(obj: Any, *, kind: str, old: Any = None, route: admission.Route = "mutate",
           policy: Policy = POLICY) -> admission.Outcome:
    return admit(review(obj, kind=kind, old=old), route=route, policy=policy,
                 plan_keys=KEYS, cluster=CLUSTER)


def applied(obj: dict[str, Any], outcome: admission.Outcome) -> dict[str, Any]:
    assert outcome.response["response"]["allowed"], outcome.response["response"].get("status")
    ops = patch_of(outcome.response)
    return jsonpatch.apply_patch(obj, ops) if ops else obj


# ------------------------------------------------------------------------------------------------
# the objects
# ------------------------------------------------------------------------------------------------
def user_vm() -> dict[str, Any]:
    """A VM with every diskhooks annotation and every kind of user volume beside them."""
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "pg01", "namespace": "vms", "labels": {"app": "pg"}, "annotations": {
            K.ANN_DISKS: "[{name: data, size: 20Gi, bootOrder: 2, serial: d1}, "
                         "{name: scratch, size: 1Gi, backing: almalinux-9}]",
            K.ANN_PERSIST_ROOT: "true",
            K.ANN_PASSTHROUGH: "[{name: p0, claim: node1-nvme0, mode: lun}]",
            K.ANN_CPU: "{sockets: 1, cores: 2}", K.ANN_MEMORY: "2Gi"}},
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": {"kubevirt.io/domain": "pg01"}, "annotations": {
                K.ANN_HOOK_SIDECARS: json.dumps([{"image": "registry.example.com/qcow2-hook:0.1.0",
                                                  "args": ["--version", "v1alpha3"]}])}},
            "spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}, "bootOrder": 1},
                                                 {"name": "u", "disk": {"bus": "virtio"}}],
                                       "interfaces": [{"name": "default", "masquerade": {}, "bootOrder": 3}]},
                           "cpu": {"cores": 1, "maxSockets": 2}, "memory": {"guest": "1Gi", "maxGuest": "4Gi"},
                           "resources": {"requests": {"memory": "1Gi", "cpu": "1"}, "limits": {"cpu": "2"}}},
                "networks": [{"name": "default", "pod": {}}],
                "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/almalinux:9"}},
                            {"name": "u", "persistentVolumeClaim": {"claimName": "c"}},
                            {"name": "h", "hostDisk": {"path": "/data/x.img", "type": "Disk"}}]}}}}


def mutated_vm() -> dict[str, Any]:
    vm = user_vm()
    return applied(vm, decide(vm, kind="VirtualMachine"))


def vmi_of(vm: dict[str, Any]) -> dict[str, Any]:
    meta = copy.deepcopy(vm["spec"]["template"]["metadata"])
    meta.update(name=vm["metadata"]["name"], namespace="vms")
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta,
            "spec": copy.deepcopy(vm["spec"]["template"]["spec"])}


def bare_vmi() -> dict[str, Any]:
    vm = user_vm()
    vmi = vmi_of(vm)
    vmi["metadata"]["annotations"].update(vm["metadata"]["annotations"])
    return vmi


def launcher_pod() -> dict[str, Any]:
    """The real virt-launcher Pod of sample 01, as it arrives for a VM the webhook mutated."""
    pod: dict[str, Any] = json.loads((ADMISSION / "virt-launcher-pod-create.json").read_text())["request"]["object"]
    plan = Plan(namespace="vms", vm="fedora-data", host_dir="/var/lib/diskhooks/vms/vms/fedora-data",
                image_library=None, sidecar_image=POLICY.sidecar.image,
                disks=(PlannedDisk("datadisk", 10 << 30, "virtio", "none", "native", "unmap"),),
                persist_root=PersistRoot("rootdisk", "quay.io/containerdisks/fedora:41", 0))
    pod["metadata"]["labels"][K.LABEL_MANAGED] = K.LABEL_MANAGED_VALUE
    pod["metadata"]["annotations"][K.ANN_PLAN] = sign_plan(plan, KEYS)
    for v in pod["spec"]["volumes"]:
        if v["name"] == "datadisk":
            v["hostPath"]["path"] = plan.host_dir
    for c in pod["spec"]["containers"]:
        if c["name"] == "hook-sidecar-0":
            c["image"] = plan.sidecar_image
    return pod


# ------------------------------------------------------------------------------------------------
# the walk
# ------------------------------------------------------------------------------------------------
def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, (*prefix, i))


def variants(obj: dict[str, Any], keep: Callable[[tuple[Any, ...]], bool] = lambda path: True
             ) -> Iterator[tuple[str, dict[str, Any]]]:
    """``obj`` with one field replaced by a wrongly typed value, for every field and value."""
    for path in paths(obj):
        if not path or path[0] in ("apiVersion", "kind") or not keep(path):
            continue
        for value in GARBAGE:
            yield f"{'.'.join(map(str, path))} = {json.dumps(value)}", replaced(obj, path, value)


def replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``obj`` with the field at ``path`` set to ``value``: copies along the path only (the cores
    never modify their input, which the other tests check)."""
    if not path:
        return copy.deepcopy(value)
    out = copy.copy(obj)
    out[path[0]] = replaced(obj[path[0]], path[1:], value)
    return out


def problems(cases: Iterator[tuple[str, admission.Outcome]]) -> list[str]:
    out = []
    for label, outcome in cases:
        response = outcome.response["response"]
        if outcome.result == "error":
            out.append(f"{label}: internal error {outcome.error!r}")
        elif not response["allowed"]:
            message = response["status"].get("message", "")
            field, sep, reason = message.partition(": ")
            if not (sep and FIELD.match(field) and reason):
                out.append(f"{label}: denial without a field path: {message!r}")
    return out


def test_the_objects_are_admitted_as_they_are() -> None:
    """The walk starts from objects that pass, so every denial comes from the substitution."""
    vm = mutated_vm()
    assert patch_of(decide(vm, kind="VirtualMachine").response) == []
    assert decide(vmi_of(vm), kind="VirtualMachineInstance").result == "allowed"
    assert decide(bare_vmi(), kind="VirtualMachineInstance").result == "patched"
    assert decide(launcher_pod(), kind="Pod", route="mutate-pod").result == "patched"


def test_a_vm_with_a_wrongly_typed_field() -> None:
    old = mutated_vm()
    found = problems(
        (f"{name} {label} ({op})", decide(obj, kind="VirtualMachine", old=prev))
        for name, src in (("as written", user_vm()), ("as mutated", old))
        for label, obj in variants(src)
        for op, prev in (("CREATE", None), ("UPDATE", old)))
    assert found == [], f"{len(found)} problems:\n" + "\n".join(found)


def test_an_update_whose_old_object_has_a_wrongly_typed_field() -> None:
    new = mutated_vm()
    found = problems((f"old {label}", decide(new, kind="VirtualMachine", old=old))
                     for label, old in variants(mutated_vm()))
    assert found == [], f"{len(found)} problems:\n" + "\n".join(found)


@pytest.mark.parametrize("which", ["from the template", "bare with annotations"])
def test_a_vmi_with_a_wrongly_typed_field(which: str) -> None:
    src = vmi_of(mutated_vm()) if which == "from the template" else bare_vmi()
    found = problems((label, decide(obj, kind="VirtualMachineInstance")) for label, obj in variants(src))
    assert found == [], f"{len(found)} problems:\n" + "\n".join(found)


def read_by_the_pod_core(path: tuple[Any, ...]) -> bool:
    """The Pod is large; of its containers the core reads only name, image and volumeMounts, and
    of its metadata only the labels and annotations (the rest of the walk would only cost time)."""
    if path[:2] in (("spec", "containers"), ("spec", "initContainers")):
        return len(path) < 4 or path[3] in ("name", "image", "volumeMounts")
    return not (len(path) >= 3 and path[0] == "metadata" and path[1] not in ("labels", "annotations"))


def test_a_launcher_pod_with_a_wrongly_typed_field() -> None:
    found = problems((label, decide(obj, kind="Pod", route="mutate-pod"))
                     for label, obj in variants(launcher_pod(), keep=read_by_the_pod_core))
    assert found == [], f"{len(found)} problems:\n" + "\n".join(found)
