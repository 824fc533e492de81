"""The VM/VMI mutation core (``webhook/vm/``, ``webhook/sizing.py``) and the cluster
lookups (``webhook/cluster.py``), called directly.

Inputs are the objects kube-apiserver really sent (``tests/data/kubevirt/admission/``), KubeVirt's
sample VMs and VMIs, the demo VM and the largest test VM (``tests/data/vm-kitchen-sink.yaml``).
Every successful mutation is checked by :func:`mutate`: the input is left untouched, the result
passes KubeVirt's schema and admission checks (``tests/kubevirt_schema.py``), a second call on
the result changes nothing (reinvocation, re-submission), and the VMI KubeVirt would make from the
template is admitted unchanged. Lookups come from a real :class:`FileCluster`; there is no API
server here, so :class:`KubeCluster` is only built and pointed at a closed port.
"""

from __future__ import annotations

import copy
import datetime
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.plan import Plan, PlanKeys, sign_plan, verify_plan
from diskplan.policy import Policy, load_policy
from diskplan.quantity import parse_bytes
from tests.conftest import ADMISSION, DATA, EXAMPLE_POLICY, ROOT, SAMPLES
from tests.kubevirt_schema import assert_valid_vm, assert_valid_vmi
from webhook.cluster import EMPTY_CLUSTER, Cluster, ClusterError, FileCluster, KubeCluster
from webhook.mutation import Mutation
from webhook.vm.mutate import mutate_vm, mutate_vmi

KEYS = PlanKeys(current=b"vm-mutation-test-key-0123456789abc")
OTHER_KEYS = PlanKeys(current=b"a-different-clusters-key-987654321")
GI = 1024**3
ROOT_DIR = "/var/lib/diskhooks/vms"  # hostDisks.root of examples/policy.yaml
SIDECAR = "ghcr.io/diskhooks/diskhooks-sidecar:0.1.0"
HOOKS = K.ANN_HOOK_SIDECARS
TEMPLATE_SIDECARS = f"spec.template.metadata.annotations[{HOOKS}]"

POLICY = load_policy(EXAMPLE_POLICY.read_text())
STRICT = load_policy((DATA / "policy-strict.yaml").read_text())
CLUSTER = FileCluster.from_text((DATA / "vm-cluster-objects.yaml").read_text())


# ------------------------------------------------------------------------------------------------
# inputs and helpers
# ------------------------------------------------------------------------------------------------
def review(name: str) -> dict[str, Any]:
    return dict(json.loads((ADMISSION / name).read_text())["request"])


def vm_create() -> dict[str, Any]:
    return dict(review("vm-create.json")["object"])


def sample(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((SAMPLES / name).read_text()))


def kitchen_sink() -> dict[str, Any]:
    return dict(yaml.safe_load((DATA / "vm-kitchen-sink.yaml").read_text()))


def annotate(vm: dict[str, Any], **annotations: str) -> dict[str, Any]:
    """``disks=...`` sets ``diskhooks.io/disks``, ``persist_root`` -> ``persist-root``, etc."""
    anns = vm.setdefault("metadata", {}).setdefault("annotations", {})
    for key, value in annotations.items():
        anns[K.PREFIX + key.replace("_", "-")] = value
    return vm


def tspec(vm: dict[str, Any]) -> dict[str, Any]:
    return dict(vm["spec"]["template"]["spec"])


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in spec.get("volumes", [])}


def disks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in spec["domain"]["devices"].get("disks", [])}


def tmeta(vm: dict[str, Any]) -> dict[str, Any]:
    return dict(vm["spec"]["template"].get("metadata") or {})


def sidecars(meta: dict[str, Any]) -> list[dict[str, Any]]:
    raw = (meta.get("annotations") or {}).get(HOOKS)
    return [] if raw is None else list(json.loads(raw))


def plan_of(vm: dict[str, Any], *, namespace: str = "vms") -> Plan:
    return verify_plan(tmeta(vm)["annotations"][K.ANN_PLAN], KEYS, namespace=namespace,
                       vm=vm["metadata"]["name"])


def vmi_from(vm: dict[str, Any], namespace: str = "vms") -> dict[str, Any]:
    """The VMI virt-controller makes from a VM: the template's metadata and spec, the VM's name."""
    meta = copy.deepcopy(vm["spec"]["template"].get("metadata") or {})
    meta.update(name=vm["metadata"]["name"], namespace=namespace,
                ownerReferences=[{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                  "name": vm["metadata"]["name"], "uid": "0000", "controller": True}])
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta,
            "spec": copy.deepcopy(vm["spec"]["template"]["spec"])}


def call_vm(vm: dict[str, Any], *, policy: Policy = POLICY, operation: str = "CREATE",
            old: dict[str, Any] | None = None, namespace: str = "vms", cluster: Cluster = CLUSTER,
            keys: PlanKeys = KEYS) -> Mutation:
    return mutate_vm(vm, operation=operation, old_obj=old, namespace=namespace, policy=policy,
                     plan_keys=keys, cluster=cluster)


def mutate(vm: dict[str, Any], *, policy: Policy = POLICY, operation: str = "CREATE",
           old: dict[str, Any] | None = None, namespace: str = "vms",
           cluster: Cluster = CLUSTER) -> Mutation:
    """Mutate and check what must always hold (see the module docstring)."""
    pristine = copy.deepcopy(vm)
    old_pristine = copy.deepcopy(old)
    m = call_vm(vm, policy=policy, operation=operation, old=old, namespace=namespace, cluster=cluster)
    assert vm == pristine and old == old_pristine, "the input must never be modified"
    assert_valid_vm(m.obj)
    again = call_vm(m.obj, policy=policy, operation=operation, old=old, namespace=namespace,
                    cluster=cluster)
    assert again.obj == m.obj, "a second call on the result must change nothing"
    # the user applies the same manifest again: the input, as an UPDATE of what was admitted
    resubmitted = call_vm(vm, policy=policy, operation="UPDATE", old=m.obj, namespace=namespace,
                          cluster=cluster)
    assert resubmitted.obj == m.obj, "re-submitting the same manifest must change nothing"
    if K.ANN_PLAN in (tmeta(m.obj).get("annotations") or {}):
        vmi = vmi_from(m.obj, namespace)
        verified = mutate_vmi(vmi, operation="CREATE", namespace=namespace, policy=policy,
                              plan_keys=KEYS, cluster=cluster)
        assert verified.obj == vmi, "the VMI made from the template is admitted unchanged"
        assert_valid_vmi(vmi, require_memory=False)
    return m


# ------------------------------------------------------------------------------------------------
# the real admission objects
# ------------------------------------------------------------------------------------------------
def test_vm_create_from_the_api_server() -> None:
    m = mutate(vm_create())
    assert m.warnings == ()
    spec = tspec(m.obj)
    vols, dsks = volumes(spec), disks(spec)
    assert vols["pgdata"]["hostDisk"] == {"path": f"{ROOT_DIR}/vms/pg01/pgdata.qcow2",
                                          "type": "DiskOrCreate", "capacity": "200Gi"}
    assert vols["wal"]["hostDisk"] == {"path": f"{ROOT_DIR}/vms/pg01/wal.qcow2",
                                       "type": "DiskOrCreate", "capacity": "20Gi"}
    assert dsks["pgdata"] == {"name": "pgdata", "disk": {"bus": "virtio"}}
    assert dsks["wal"] == {"name": "wal", "disk": {"bus": "scsi"}}
    assert list(vols) == ["root", "pgdata", "wal"]  # the user's volume keeps its place (index 0)
    plan = plan_of(m.obj)
    assert plan.host_dir == f"{ROOT_DIR}/vms/pg01" and plan.sidecar_image == SIDECAR
    assert [(d.name, d.size_bytes, d.bus, d.cache, d.io, d.discard) for d in plan.disks] == [
        ("pgdata", 200 * GI, "virtio", "none", "native", "unmap"),
        ("wal", 20 * GI, "scsi", "none", "native", "unmap")]
    assert plan.image_library is None and plan.persist_root is None and plan.passthrough == ()
    meta = tmeta(m.obj)
    assert meta["labels"] == {"kubevirt.io/domain": "pg01", K.LABEL_MANAGED: "true"}
    assert sidecars(meta) == [{"image": SIDECAR, "imagePullPolicy": "IfNotPresent",
                               "args": ["serve", "--version", "v1alpha3"]}]
    # profile "medium" (4 vCPUs, 8Gi) under cpuAllocationRatio 2 and no memory overcommit
    domain = spec["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 4, "threads": 1}
    assert domain["memory"] == {"guest": "8Gi"}
    assert domain["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"},
                                   "limits": {"cpu": "4", "memory": "8Gi"}}
    # nothing outside diskhooks' fields changed
    assert m.obj["metadata"] == vm_create()["metadata"]
    assert m.obj["spec"]["runStrategy"] == "Always"


def test_vm_update_from_the_api_server_grows_the_disk() -> None:
    r = review("vm-update.json")
    m = mutate(r["object"], operation="UPDATE", old=r["oldObject"])
    assert volumes(tspec(m.obj))["pgdata"]["hostDisk"]["capacity"] == "300Gi"
    assert {d.name: d.size_bytes for d in plan_of(m.obj).disks} == {"pgdata": 300 * GI, "wal": 20 * GI}
    assert any("'pgdata' grows from 200Gi to 300Gi at the next start" in w for w in m.warnings)


def test_update_of_a_mutated_vm_grows_and_keeps_positions() -> None:
    first = mutate(vm_create()).obj
    edited = annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "250Gi"}, '
                                                  '{"name": "wal", "size": "20Gi", "bus": "scsi"}]')
    m = mutate(edited, operation="UPDATE", old=first)
    assert [v["name"] for v in tspec(m.obj)["volumes"]] == ["root", "pgdata", "wal"]
    assert volumes(tspec(m.obj))["pgdata"]["hostDisk"]["capacity"] == "250Gi"
    assert any("grows from 200Gi to 250Gi" in w for w in m.warnings)


def test_vmi_create_from_the_api_server() -> None:
    obj = review("vmi-create.json")["object"]
    pristine = copy.deepcopy(obj)
    m = mutate_vmi(obj, operation="CREATE", namespace="vms", policy=POLICY, plan_keys=KEYS,
                   cluster=CLUSTER)
    assert obj == pristine
    assert_valid_vmi(m.obj)
    assert volumes(m.obj["spec"])["scratch"]["hostDisk"] == {
        "path": f"{ROOT_DIR}/vms/scratch01/scratch.qcow2", "type": "DiskOrCreate", "capacity": "50Gi"}
    plan = verify_plan(m.obj["metadata"]["annotations"][K.ANN_PLAN], KEYS, namespace="vms",
                       vm="scratch01")
    assert [d.name for d in plan.disks] == ["scratch"]
    assert m.obj["metadata"]["labels"] == {K.LABEL_MANAGED: "true"}
    assert sidecars(m.obj["metadata"])[-1]["image"] == SIDECAR
    again = mutate_vmi(m.obj, operation="CREATE", namespace="vms", policy=POLICY, plan_keys=KEYS,
                       cluster=CLUSTER)
    assert again.obj == m.obj


# ------------------------------------------------------------------------------------------------
# plain objects pass unchanged
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["01-vm-containerdisk-hostdisk-cloudinit.yaml", "05-vm-mixed-smbios.yaml"])
def test_plain_sample_vms_pass_unchanged(name: str) -> None:
    vm = sample(name)
    for op in ("CREATE", "UPDATE"):
        m = call_vm(vm, operation=op, old=vm if op == "UPDATE" else None)
        assert m.obj == vm and m.warnings == ()


@pytest.mark.parametrize("name", ["02-vmi-two-hostdisks-disk.yaml", "03-vmi-pvc-cloudinit.yaml"])
def test_plain_sample_vmis_pass_unchanged(name: str) -> None:
    vmi = sample(name)
    m = mutate_vmi(vmi, operation="CREATE", namespace="default", policy=POLICY, plan_keys=KEYS,
                   cluster=CLUSTER)
    assert m.obj == vmi and m.warnings == ()


def test_other_operations_pass_unchanged() -> None:
    vm = annotate(vm_create(), disks="{{{{ broken")
    assert call_vm(vm, operation="DELETE").obj == vm
    vmi = review("vmi-create.json")["object"]
    assert mutate_vmi(vmi, operation="UPDATE", namespace="vms", policy=POLICY, plan_keys=KEYS,
                      cluster=CLUSTER).obj == vmi


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------
def test_the_largest_vm() -> None:
    m = mutate(kitchen_sink())
    spec, meta = tspec(m.obj), tmeta(m.obj)
    plan = plan_of(m.obj)
    assert plan.vm == "db-big.prod" and plan.host_dir == f"{ROOT_DIR}/vms/db-big.prod"
    assert [d.name for d in plan.disks] == ["pgdata", "wal", "scratch", "tmp1", "tmp2", "archive"]
    pg, wal, scratch, _, tmp2, archive = plan.disks
    assert (pg.serial, pg.boot_order, pg.io, pg.cache) == ("PGDATA-01", 3, "native", "none")
    assert (wal.bus, wal.cache, wal.io, wal.discard) == ("scsi", "writeback", "threads", "ignore")
    assert scratch.backing is not None and (scratch.backing.image, scratch.backing.file,
                                            scratch.backing.format) == ("almalinux-9.4",
                                                                        "almalinux-9.4.qcow2", "qcow2")
    assert plan.image_library == "/var/lib/diskhooks/images"
    assert (tmp2.size_bytes, tmp2.io) == (10**10, "io_uring")
    assert volumes(spec)["tmp2"]["hostDisk"]["capacity"] == "10G"
    assert archive.cache == "directsync" and archive.io == "native"
    assert plan.persist_root is not None
    assert (plan.persist_root.volume, plan.persist_root.volume_index, plan.persist_root.image) == \
        ("root", 0, "quay.io/containerdisks/almalinux:9")
    assert [(p.name, p.claim, p.mode) for p in plan.passthrough] == [
        ("fast0", "node1-nvme0", "lun"), ("fast1", "node1-nvme1", "disk")]
    dsks = disks(spec)
    assert dsks["fast0"] == {"name": "fast0", "lun": {"bus": "scsi"}}
    assert dsks["fast1"] == {"name": "fast1", "disk": {"bus": "virtio"}}
    assert dsks["pgdata"] == {"name": "pgdata", "disk": {"bus": "virtio"}, "serial": "PGDATA-01",
                              "bootOrder": 3}
    assert volumes(spec)["fast0"] == {"name": "fast0", "persistentVolumeClaim": {"claimName": "node1-nvme0"}}
    # the user's own volumes and devices stay as they were
    assert volumes(spec)["legacy"]["hostDisk"]["path"] == "/mnt/legacy/db-big/legacy.img"
    assert dsks["iso"] == {"name": "iso", "cdrom": {"bus": "sata"}}
    # the allowed third-party sidecar stays first, diskhooks' is last
    assert [s["image"] for s in sidecars(meta)] == ["registry.example.com/qcow2-hook:0.1.0", SIDECAR]
    # 2 sockets x 8 cores x 2 threads, ratio 2; the user's cores/memory are overridden with warnings
    domain = spec["domain"]
    assert domain["cpu"] == {"cores": 8, "model": "host-passthrough", "sockets": 2, "threads": 2}
    assert domain["resources"]["requests"] == {"memory": "96Gi", "ephemeral-storage": "1Gi", "cpu": "16"}
    assert domain["resources"]["limits"] == {"cpu": "32", "memory": "96Gi"}
    assert any(w.startswith("spec.template.spec.domain.cpu.cores: 2 is replaced by 8") for w in m.warnings)
    assert any(w.startswith("spec.template.spec.domain.memory.guest: 4Gi is replaced by 96Gi")
               for w in m.warnings)


def test_the_demo_vm_with_the_demo_cluster() -> None:
    vm = yaml.safe_load((ROOT / "examples" / "demo" / "vm.yaml").read_text())
    cluster = FileCluster.from_text((ROOT / "examples" / "demo" / "cluster-objects.yaml").read_text())
    m = mutate(vm, cluster=cluster)
    plan = plan_of(m.obj)
    assert plan.persist_root is not None and plan.persist_root.volume_index == 0
    assert [p.mode for p in plan.passthrough] == ["lun"]


def test_a_users_allowed_sidecar_is_kept_and_ours_appended() -> None:
    vm = annotate(sample("01-vm-containerdisk-hostdisk-cloudinit.yaml"), disks="[{name: extra, size: 5Gi}]")
    m = mutate(vm)
    entries = sidecars(tmeta(m.obj))
    assert entries[0] == {"args": ["--version", "v1alpha3"], "image": "registry.example.com/qcow2-hook:0.1.0",
                          "imagePullPolicy": "IfNotPresent"}
    assert entries[1]["image"] == SIDECAR and len(entries) == 2
    # the user's own hostDisk outside diskhooks' directories is fine
    assert volumes(tspec(m.obj))["datadisk"]["hostDisk"]["path"] == "/var/lib/vm-data/fedora-data/data.img"


def test_an_older_diskhooks_sidecar_is_replaced() -> None:
    vm = annotate(vm_create())
    vm["spec"]["template"]["metadata"]["annotations"] = {HOOKS: json.dumps([
        {"image": "ghcr.io/diskhooks/diskhooks-sidecar:0.0.9", "args": ["whatever"]},
        {"image": "registry.example.com/qcow2-hook:0.1.0"},
        {"image": "ghcr.io/diskhooks/diskhooks-sidecar@sha256:" + "b" * 64}])}
    entries = sidecars(tmeta(mutate(vm).obj))
    assert [e["image"] for e in entries] == ["registry.example.com/qcow2-hook:0.1.0", SIDECAR]
    assert entries[1]["args"] == ["serve", "--version", "v1alpha3"]


def test_persist_root_uses_the_boot_disk_and_its_volume_index() -> None:
    vm = sample("01-vm-containerdisk-hostdisk-cloudinit.yaml")
    spec = vm["spec"]["template"]["spec"]
    spec["volumes"] = spec["volumes"][::-1]  # cloudinit, datadisk, rootdisk
    m = mutate(annotate(vm, persist_root="true"))
    pr = plan_of(m.obj, namespace="vms").persist_root
    assert pr is not None and (pr.volume, pr.volume_index, pr.image) == \
        ("rootdisk", 2, "quay.io/containerdisks/fedora:41")
    # no volume is added for the overlay (it would become a guest disk)
    assert [v["name"] for v in tspec(m.obj)["volumes"]] == ["cloudinitdisk", "datadisk", "rootdisk"]


def test_detaching_a_disk_on_update_keeps_its_image() -> None:
    first = mutate(vm_create()).obj
    edited = annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "200Gi"}]')
    m = mutate(edited, operation="UPDATE", old=first)
    assert "wal" not in volumes(tspec(m.obj)) and "wal" not in disks(tspec(m.obj))
    assert [d.name for d in plan_of(m.obj).disks] == ["pgdata"]
    assert any("'wal' is detached" in w and "stays on the node" in w for w in m.warnings)


def test_removing_every_annotation_cleans_up() -> None:
    vm = annotate(sample("01-vm-containerdisk-hostdisk-cloudinit.yaml"), disks="[{name: extra, size: 5Gi}]")
    first = mutate(vm).obj
    plain = copy.deepcopy(first)
    del plain["metadata"]["annotations"]
    m = mutate(plain, operation="UPDATE", old=first)
    meta = tmeta(m.obj)
    assert K.LABEL_MANAGED not in meta["labels"]
    assert [e["image"] for e in sidecars(meta)] == ["registry.example.com/qcow2-hook:0.1.0"]
    assert "extra" not in volumes(tspec(m.obj)) and "extra" not in disks(tspec(m.obj))
    assert any("'extra' is detached" in w for w in m.warnings)
    # ... and the result is the original sample again, but for a plan that only remembers the
    # detached disk's image (no disks, nothing for the launcher)
    plan = plan_of(m.obj)
    assert (plan.disks, plan.persist_root, plan.passthrough) == ((), None, ())
    assert [(d.name, d.size_bytes) for d in plan.detached] == [("extra", 5 * GI)]
    del meta["annotations"][K.ANN_PLAN]
    assert m.obj["spec"] | {"template": {"metadata": meta, "spec": tspec(m.obj)}} == \
        sample("01-vm-containerdisk-hostdisk-cloudinit.yaml")["spec"]


def test_a_clean_manifest_replacing_a_vm_keeps_its_detached_record() -> None:
    """attach 20Gi -> detach -> ``kubectl replace`` with the manifest without diskhooks
    annotations -> re-attach at 1Gi: denied, the record survives the clean replace."""
    clean = vm_create()
    del clean["metadata"]["annotations"]
    first = mutate(annotate(copy.deepcopy(clean), disks="[{name: data, size: 20Gi}, {name: logs, size: 5Gi}]")).obj
    detached = mutate(annotate(copy.deepcopy(first), disks="[{name: logs, size: 5Gi}]"),
                      operation="UPDATE", old=first).obj
    for old in (detached, first):  # in two steps, or straight from the VM with both disks
        m = mutate(copy.deepcopy(clean), operation="UPDATE", old=old)
        plan = plan_of(m.obj)
        assert (plan.disks, plan.persist_root, plan.passthrough) == ((), None, ())
        assert [(d.name, d.size_bytes) for d in plan.detached] == [("data", 20 * GI), ("logs", 5 * GI)]
        assert K.LABEL_MANAGED not in (tmeta(m.obj).get("labels") or {}) and not sidecars(tmeta(m.obj))
        small = annotate(copy.deepcopy(clean), disks="[{name: data, size: 1Gi}]")
        with pytest.raises(Refused) as exc:
            call_vm(small, operation="UPDATE", old=m.obj)
        assert exc.value.field == "diskhooks.io/disks[0].size" and "20Gi" in exc.value.reason


def test_detached_records_come_only_from_a_verified_old_plan() -> None:
    """A made-up volume at the diskhooks node path (any capacity) is dropped, never recorded:
    it cannot block a disk of that name, nor fill the 128 records; a never-admitted VM (no plan
    that verifies) records nothing."""
    first = call_vm(vm_create()).obj
    ghostly = copy.deepcopy(first)
    tspec_ = ghostly["spec"]["template"]["spec"]
    for i in range(MAX_GHOSTS):
        name = f"ghost{i}"
        tspec_["volumes"].append({"name": name, "hostDisk": {
            "path": f"{ROOT_DIR}/vms/pg01/{name}.qcow2", "type": "DiskOrCreate", "capacity": "900Ti"}})
    m = mutate(ghostly, operation="UPDATE", old=first)
    assert plan_of(m.obj).detached == () and "ghost0" not in volumes(tspec(m.obj))
    back = annotate(copy.deepcopy(m.obj), disks='[{"name": "pgdata", "size": "200Gi"}, '
                    '{"name": "ghost0", "size": "1Gi"}]')
    assert volumes(tspec(mutate(back, operation="UPDATE", old=m.obj).obj))["ghost0"]["hostDisk"]["capacity"] == "1Gi"
    # never admitted (the old object has the annotation but no plan): detaching records nothing
    unmutated = vm_create()
    edited = annotate(copy.deepcopy(unmutated), disks='[{"name": "pgdata", "size": "200Gi"}]')
    m = mutate(edited, operation="UPDATE", old=unmutated)
    assert plan_of(m.obj).detached == ()


MAX_GHOSTS = 129


def test_a_detached_record_keeps_its_size_when_max_disk_size_is_lowered() -> None:
    """pgdata 200Gi is admitted, the platform lowers maxDiskSize to 100Gi, pgdata is detached:
    its image on the node is still 200Gi, so the record stays 200Gi (it comes from a verified plan,
    within policy when written) and pgdata cannot come back planned smaller than its image. At
    200Gi it comes back grandfathered (with a warning), as an attached 200Gi disk stays; larger, it
    is refused like any disk above the lowered limit; once the limit is raised, it can grow."""
    first = mutate(vm_create()).obj
    detached = mutate(annotate(copy.deepcopy(first), disks='[{"name": "wal", "size": "20Gi"}]'),
                      policy=TIGHT, operation="UPDATE", old=first).obj
    assert _detached(detached) == [("pgdata", 200 * GI)]
    resized = mutate(annotate(copy.deepcopy(detached), profile="small"), policy=TIGHT,
                     operation="UPDATE", old=detached).obj  # carried forward unchanged
    assert _detached(resized) == [("pgdata", 200 * GI)]
    back = '[{"name": "wal", "size": "20Gi"}, {"name": "pgdata", "size": "%s"}]'
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(resized), disks=back % "100Gi"), policy=TIGHT,
                operation="UPDATE", old=resized)
    assert exc.value.field == "diskhooks.io/disks[1].size"
    assert "smaller than 200Gi" in exc.value.reason and "limit is now 100Gi" in exc.value.reason
    assert "can come back only at 200Gi" in exc.value.reason
    m = mutate(annotate(copy.deepcopy(resized), disks=back % "200Gi"), policy=TIGHT, operation="UPDATE",
               old=resized)  # as an attached 200Gi disk keeps its size under the lowered limit
    assert [(d.name, d.size_bytes) for d in plan_of(m.obj).disks] == [("wal", 20 * GI), ("pgdata", 200 * GI)]
    assert _detached(m.obj) == [] and _kept_warnings(m) == ["diskhooks.io/disks[1].size"]
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(resized), disks=back % "201Gi"), policy=TIGHT,
                operation="UPDATE", old=resized)
    assert exc.value.field == "diskhooks.io/disks[1].size"
    assert exc.value.reason.startswith("201Gi exceeds the platform limit 100Gi")
    m = mutate(annotate(copy.deepcopy(resized), disks=back % "201Gi"), operation="UPDATE", old=resized)
    assert [(d.name, d.size_bytes) for d in plan_of(m.obj).disks] == [("wal", 20 * GI), ("pgdata", 201 * GI)]
    assert _detached(m.obj) == [] and _kept_warnings(m) == []


def test_a_passthrough_cannot_take_the_name_of_a_detached_disk() -> None:
    """disk 'wal' -> passthrough 'wal' in one UPDATE (or after detaching it): a plan naming 'wal'
    both as detached and as passthrough would never verify, so the VM could never start; the
    UPDATE is denied naming the item, and another name works."""
    first = mutate(vm_create()).obj
    detached = mutate(annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "200Gi"}]'),
                      operation="UPDATE", old=first).obj
    for old in (first, detached):
        swapped = annotate(copy.deepcopy(old), disks='[{"name": "pgdata", "size": "200Gi"}]',
                           passthrough="[{name: wal, claim: node1-nvme0}]")
        with pytest.raises(Refused) as exc:
            call_vm(swapped, operation="UPDATE", old=old)
        assert exc.value.field == "diskhooks.io/passthrough[0].name"
        assert "detached disk" in exc.value.reason and "20Gi" in exc.value.reason
    renamed = annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "200Gi"}]',
                       passthrough="[{name: fast0, claim: node1-nvme0}]")
    m = mutate(renamed, operation="UPDATE", old=first)
    plan = plan_of(m.obj)
    assert [d.name for d in plan.detached] == ["wal"] and [p.name for p in plan.passthrough] == ["fast0"]


def test_changing_a_passthrough_claim_survives_reinvocation() -> None:
    """An UPDATE moving passthrough 'fast0' to another claim; the API server reinvokes the webhook
    with the mutated object and the same oldObject: the new volume is diskhooks' own (the current
    plan names it), not a user volume holding the claim. ``mutate`` checks the reinvocation."""
    first = mutate(annotate(vm_create(), passthrough="[{name: fast0, claim: node1-nvme0, mode: lun}]")).obj
    for manifest in (copy.deepcopy(first), vm_create()):  # edited in place, or a clean re-apply
        moved = annotate(manifest, passthrough="[{name: fast0, claim: node1-nvme1, mode: lun}]")
        m = mutate(moved, operation="UPDATE", old=first)
        assert volumes(tspec(m.obj))["fast0"] == {"name": "fast0",
                                                  "persistentVolumeClaim": {"claimName": "node1-nvme1"}}
        assert [(p.name, p.claim) for p in plan_of(m.obj).passthrough] == [("fast0", "node1-nvme1")]


def test_disks_left_behind_without_any_diskhooks_trace_are_detached() -> None:
    """Someone removed the annotation, the plan, the label and the sidecar by hand, but kept
    the volumes: they are recognised by their exact path and detached, not refused."""
    first = call_vm(vm_create()).obj
    manual = copy.deepcopy(first)
    del manual["metadata"]["annotations"]
    manual["spec"]["template"]["metadata"] = {"labels": {"kubevirt.io/domain": "pg01"}}
    m = mutate(manual, operation="UPDATE", old=first)
    plan_text = tmeta(m.obj)["annotations"][K.ANN_PLAN]  # remembers the detached images only
    assert m.obj["spec"] == vm_create()["spec"] | {"template": {
        "metadata": {"labels": {"kubevirt.io/domain": "pg01"}, "annotations": {K.ANN_PLAN: plan_text}},
        "spec": m.obj["spec"]["template"]["spec"]}}
    assert list(volumes(tspec(m.obj))) == ["root"] and list(disks(tspec(m.obj))) == ["root"]
    assert sum("is detached" in w for w in m.warnings) == 2
    assert [(d.name, d.size_bytes) for d in plan_of(m.obj).detached] == [("pgdata", 200 * GI), ("wal", 20 * GI)]
    # ... when only the volumes tell what was there (no old object), they are detached, but their
    # capacities (user-controlled) are never recorded
    m = mutate(manual)
    assert list(volumes(tspec(m.obj))) == ["root"] and sum("is detached" in w for w in m.warnings) == 2
    assert K.ANN_PLAN not in (tmeta(m.obj).get("annotations") or {})


def test_a_moved_root_rebuilds_the_disks_with_a_warning() -> None:
    first = mutate(vm_create()).obj
    moved = load_policy(EXAMPLE_POLICY.read_text().replace("root: /var/lib/diskhooks/vms",
                                                           "root: /data/diskhooks"))
    edited = annotate(copy.deepcopy(first), profile="small")
    m = mutate(edited, policy=moved, operation="UPDATE", old=first)
    assert volumes(tspec(m.obj))["pgdata"]["hostDisk"]["path"] == "/data/diskhooks/vms/pg01/pgdata.qcow2"
    assert any("moved hostDisks.root" in w for w in m.warnings)


def test_a_changed_container_disk_under_persist_root_warns() -> None:
    first = mutate(annotate(vm_create(), persist_root="true")).obj
    edited = copy.deepcopy(first)
    edited["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"] = "quay.io/containerdisks/almalinux:10"
    m = mutate(edited, operation="UPDATE", old=first)
    assert any("refuse to start" in w and "almalinux:9" in w for w in m.warnings)


# ------------------------------------------------------------------------------------------------
# sizing
# ------------------------------------------------------------------------------------------------
def test_sizing_alone_needs_no_plan_and_no_sidecar() -> None:
    vm = annotate(sample("05-vm-mixed-smbios.yaml"), cpu="3", memory="6Gi")
    m = mutate(vm)
    meta = tmeta(m.obj)
    assert K.ANN_PLAN not in meta.get("annotations", {}) and K.LABEL_MANAGED not in meta.get("labels", {})
    assert [e["image"] for e in sidecars(meta)] == ["quay.io/kubevirt/example-hook-sidecar:v1.5.0"]
    domain = tspec(m.obj)["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 3, "threads": 1}
    assert domain["resources"] == {"requests": {"cpu": "1500m", "memory": "6Gi"},
                                   "limits": {"cpu": "3", "memory": "6Gi"}}
    assert any("domain.memory.guest: 3Gi is replaced by 6Gi" in w for w in m.warnings)


@pytest.mark.parametrize(("cpu", "memory", "requests", "limits"), [
    ("3", "4Gi", {"cpu": "2", "memory": "2731Mi"}, {"cpu": "3", "memory": "4Gi"}),
    ("4", "6Gi", {"cpu": "2667m", "memory": "4Gi"}, {"cpu": "4", "memory": "6Gi"}),
    ("1", "1Mi", {"cpu": "667m", "memory": "1Mi"}, {"cpu": "1", "memory": "1Mi"}),
])
def test_overcommit_arithmetic(cpu: str, memory: str, requests: dict[str, str],
                               limits: dict[str, str]) -> None:
    """policy-strict: cpuAllocationRatio 1.5, memoryOvercommitPercent 150 (request rounded up to Mi)."""
    m = mutate(annotate(vm_create(), disks="[]", cpu=cpu, memory=memory), policy=STRICT)
    resources = tspec(m.obj)["domain"]["resources"]
    assert (resources["requests"], resources["limits"]) == (requests, limits)


def test_dedicated_cpus_and_hugepages_are_not_overcommitted() -> None:
    vm = annotate(vm_create(), profile="small")
    domain = vm["spec"]["template"]["spec"].setdefault("domain", {})
    domain["cpu"] = {"dedicatedCpuPlacement": True}
    domain["memory"] = {"hugepages": {"pageSize": "1Gi"}}
    resources = tspec(mutate(vm, policy=STRICT).obj)["domain"]["resources"]
    assert resources == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}


def test_the_default_profile() -> None:
    plain = sample("01-vm-containerdisk-hostdisk-cloudinit.yaml")
    del plain["spec"]["template"]["spec"]["domain"]["cpu"]
    del plain["spec"]["template"]["spec"]["domain"]["memory"]
    m = mutate(plain, policy=STRICT)
    domain = tspec(m.obj)["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 2, "threads": 1}
    assert domain["memory"] == {"guest": "4Gi"}
    assert K.ANN_PLAN not in (tmeta(m.obj).get("annotations") or {})
    # a VM that sizes itself, or uses an instancetype, is left alone
    assert call_vm(sample("01-vm-containerdisk-hostdisk-cloudinit.yaml"), policy=STRICT).obj == \
        sample("01-vm-containerdisk-hostdisk-cloudinit.yaml")
    with_type = copy.deepcopy(plain)
    with_type["spec"]["instancetype"] = {"name": "u1.medium"}
    assert call_vm(with_type, policy=STRICT).obj == with_type


def test_update_of_sizing_warns_about_the_next_start() -> None:
    first = mutate(vm_create()).obj
    m = mutate(annotate(copy.deepcopy(first), profile="large"), operation="UPDATE", old=first)
    assert tspec(m.obj)["domain"]["memory"] == {"guest": "64Gi"}
    assert any("takes effect at the next start" in w for w in m.warnings)


# ------------------------------------------------------------------------------------------------
# hostile input: every case is a denial naming the field
# ------------------------------------------------------------------------------------------------
Case = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


def _plain(**annotations: str) -> Case:
    return lambda: (annotate(vm_create(), **annotations), {})


def _with_volume(volume: dict[str, Any], *, annotations: dict[str, str] | None = None,
                 disk: bool = True) -> Case:
    def build() -> tuple[dict[str, Any], dict[str, Any]]:
        vm = vm_create()
        if annotations is not None:
            vm["metadata"]["annotations"] = annotations
        spec = vm["spec"]["template"]["spec"]
        spec["volumes"].append(volume)
        if disk:
            spec["domain"]["devices"]["disks"].append({"name": volume["name"], "disk": {"bus": "virtio"}})
        return vm, {}
    return build


def _edit(fn: Callable[[dict[str, Any]], Any], **kw: Any) -> Case:
    def build() -> tuple[dict[str, Any], dict[str, Any]]:
        vm = vm_create()
        fn(vm)
        return vm, kw
    return build


def _shrink_from_plan() -> tuple[dict[str, Any], dict[str, Any]]:
    first = call_vm(vm_create()).obj
    edited = annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "100Gi"}]')
    return edited, {"operation": "UPDATE", "old": first}


def _shrink_from_annotation() -> tuple[dict[str, Any], dict[str, Any]]:
    r = review("vm-update.json")  # the old object carries only the annotation (200Gi)
    obj = annotate(r["object"], disks='[{"name": "pgdata", "size": "150Gi"}]')
    return obj, {"operation": "UPDATE", "old": r["oldObject"]}


def _recreated_smaller() -> tuple[dict[str, Any], dict[str, Any]]:
    first = call_vm(vm_create()).obj  # a saved manifest with the plan, re-created smaller
    return annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "100Gi"}]'), {}


def _sidecars(entries: Any) -> Callable[[dict[str, Any]], None]:
    def fn(vm: dict[str, Any]) -> None:
        vm["spec"]["template"]["metadata"]["annotations"] = {
            HOOKS: entries if isinstance(entries, str) else json.dumps(entries)}
    return fn


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(vm: dict[str, Any]) -> None:
        target = vm
        *parents, last = path.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    return fn


def _boot_from(kind: str) -> Callable[[dict[str, Any]], None]:
    def fn(vm: dict[str, Any]) -> None:
        spec = vm["spec"]["template"]["spec"]
        vm["metadata"]["annotations"][K.ANN_PERSIST_ROOT] = "true"
        if kind == "pvc":
            spec["volumes"][0] = {"name": "root", "persistentVolumeClaim": {"claimName": "x"}}
        elif kind == "cdrom":
            spec["domain"]["devices"]["disks"][0] = {"name": "root", "cdrom": {"bus": "sata"}}
        elif kind == "bootorder":
            spec["volumes"].append({"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config"}})
            spec["domain"]["devices"]["disks"].append({"name": "cloudinit", "bootOrder": 1,
                                                       "disk": {"bus": "virtio"}})
        elif kind == "none":
            spec["volumes"] = []
            spec["domain"]["devices"]["disks"] = []
            vm["metadata"]["annotations"][K.ANN_DISKS] = "[]"
        elif kind == "badname":  # the overlay is named after it: it must be a DNS label
            spec["volumes"][0]["name"] = spec["domain"]["devices"]["disks"][0]["name"] = "Root_1"
    return fn


D = K.ANN_DISKS
P = K.ANN_PASSTHROUGH
VOL = "spec.template.spec.volumes[1].hostDisk.path"

HOSTILE: list[tuple[str, Case, str]] = [
    ("name with ..", _plain(disks='[{"name": "../../etc", "size": "1Gi"}]'), f"{D}[0].name"),
    ("absolute path as name", _plain(disks='[{"name": "/etc/passwd", "size": "1Gi"}]'), f"{D}[0].name"),
    ("name with a slash", _plain(disks="[{name: a/b, size: 1Gi}]"), f"{D}[0].name"),
    ("backing with ..", _plain(disks="[{name: a, size: 1Gi, backing: ../x}]"), f"{D}[0].backing"),
    ("1 MB value", _plain(disks="[" + "{name: a, size: 1Gi}," * 50000 + "]"), D),
    ("YAML alias bomb", _plain(disks="a: &a [x, x, x, x]\nb: [*a, *a, *a, *a]\n"), D),
    ("YAML tag", _plain(disks="!!python/object/apply:os.system ['id']"), D),
    ("wrong type", _plain(disks="42"), D),
    ("unknown key", _plain(disks="[{name: a, size: 1Gi, path: /etc/shadow}]"), f"{D}[0].path"),
    ("too big", _plain(disks='[{"name": "a", "size": "1Gi"}, {"name": "b", "size": "9Ti"}]'),
     f"{D}[1].size"),
    ("unknown profile", _plain(profile="gigantic"), K.ANN_PROFILE),
    ("hostDisk in another VM's directory",
     _with_volume({"name": "steal", "hostDisk": {"path": f"{ROOT_DIR}/vms/other/data.qcow2", "type": "Disk"}},
                  annotations={}), VOL),
    ("hostDisk in another namespace",
     _with_volume({"name": "steal", "hostDisk": {"path": f"{ROOT_DIR}/prod/db/data.qcow2", "type": "Disk"}}),
     VOL),
    ("hostDisk with .. into the root",
     _with_volume({"name": "steal", "hostDisk": {"path": "/var/lib/x/../diskhooks/vms/prod/db/a.qcow2",
                                                 "type": "Disk"}}), VOL),
    ("hostDisk with // into the root",
     _with_volume({"name": "steal", "hostDisk": {"path": "//var/lib/diskhooks//vms/prod/db/a.qcow2",
                                                 "type": "Disk"}}), VOL),
    ("hostDisk whose directory holds the root",
     _with_volume({"name": "steal", "hostDisk": {"path": "/var/lib/diskhooks/x.img", "type": "Disk"}}), VOL),
    ("hostDisk at /", _with_volume({"name": "steal", "hostDisk": {"path": "/x.img", "type": "Disk"}}), VOL),
    ("hostDisk in the image library",
     _with_volume({"name": "steal", "hostDisk": {"path": "/var/lib/diskhooks/images/almalinux-9.qcow2",
                                                 "type": "Disk"}}), VOL),
    ("our path under another volume name",
     _with_volume({"name": "steal", "hostDisk": {"path": f"{ROOT_DIR}/vms/pg01/pgdata.qcow2",
                                                 "type": "DiskOrCreate", "capacity": "1Gi"}}), VOL),
    ("disk named like a user volume", _plain(disks="[{name: root, size: 1Gi}]"), f"{D}[0].name"),
    ("disk named like a cdrom without volume",
     _edit(lambda vm: (vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"].append(
         {"name": "pgdata", "cdrom": {"bus": "sata"}}))), f"{D}[0].name"),
    ("boot order taken",
     _edit(lambda vm: (vm["metadata"]["annotations"].update({D: "[{name: a, size: 1Gi, bootOrder: 1}]"}),
                       vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"][0].update(bootOrder=1))),
     f"{D}[0].bootOrder"),
    ("annotations on the template",
     _edit(_set("spec.template.metadata.annotations", {D: "[{name: a, size: 1Gi}]"})),
     f"spec.template.metadata.annotations[{D}]"),
    ("generateName", _edit(lambda vm: (vm["metadata"].pop("name"),
                                       vm["metadata"].update(generateName="pg-"))), "metadata.name"),
    ("instancetype + sizing", _edit(_set("spec.instancetype", {"name": "u1.large"})), "spec.instancetype"),
    ("preference + sizing", _edit(_set("spec.preference", {"name": "fedora"})), "spec.preference"),
    ("lun not allowed", _edit(lambda vm: vm["metadata"]["annotations"].update(
        {P: "[{name: f0, claim: node1-nvme0, mode: lun}]"}), policy=STRICT), f"{P}[0].mode"),
    ("claim not found", _plain(passthrough="[{name: f0, claim: nope}]"), f"{P}[0].claim"),
    ("claim only in another namespace", _plain(passthrough="[{name: f0, claim: other-only}]"),
     f"{P}[0].claim"),
    ("PVC not Block", _plain(passthrough="[{name: f0, claim: fs-claim}]"), f"{P}[0].claim"),
    ("wrong StorageClass", _plain(passthrough="[{name: f0, claim: ceph-claim}]"), f"{P}[0].claim"),
    ("claim used by a user volume",
     _with_volume({"name": "mine", "persistentVolumeClaim": {"claimName": "node1-nvme0"}},
                  annotations={P: "[{name: f0, claim: node1-nvme0}]"}), f"{P}[0].claim"),
    ("sidecar image not allowed", _edit(_sidecars([{"image": "quay.io/evil/hook:1"}])),
     f"{TEMPLATE_SIDECARS}[0].image"),
    ("sidecar prefix trick", _edit(_sidecars([{"image": "registry.example.com/qcow2-hook:0.1.0"},
                                             {"image": "registry.example.com/qcow2-hook:0.1.0-evil"}])),
     f"{TEMPLATE_SIDECARS}[1].image"),
    ("sidecar shim with a script", _edit(_sidecars([{"args": ["--version", "v1alpha3"],
                                                    "configMap": {"name": "x", "key": "y", "hookPath": "/z"}}])),
     f"{TEMPLATE_SIDECARS}[0].image"),
    ("sidecar annotation not JSON", _edit(_sidecars("[{image: x}")), TEMPLATE_SIDECARS),
    ("sidecar annotation not a list", _edit(_sidecars({"image": "x"})), TEMPLATE_SIDECARS),
    ("shrink (old plan)", _shrink_from_plan, f"{D}[0].size"),
    ("shrink (old annotation)", _shrink_from_annotation, f"{D}[0].size"),
    ("shrink (re-created from a saved manifest)", _recreated_smaller, f"{D}[0].size"),
    ("persist-root on a PVC", _edit(_boot_from("pvc")), K.ANN_PERSIST_ROOT),
    ("persist-root on a cdrom", _edit(_boot_from("cdrom")), K.ANN_PERSIST_ROOT),
    ("persist-root: boot order picks cloud-init", _edit(_boot_from("bootorder")), K.ANN_PERSIST_ROOT),
    ("persist-root without disks", _edit(_boot_from("none")), K.ANN_PERSIST_ROOT),
    ("persist-root: boot volume not a DNS label", _edit(_boot_from("badname")), K.ANN_PERSIST_ROOT),
    ("sockets above the VM's maxSockets",
     _edit(lambda vm: (vm["metadata"]["annotations"].update({K.ANN_CPU: "{sockets: 2}"}),
                       vm["spec"]["template"]["spec"]["domain"].update(cpu={"maxSockets": 1}))), K.ANN_CPU),
    ("memory above the VM's maxGuest",
     _edit(lambda vm: vm["spec"]["template"]["spec"]["domain"].update(memory={"maxGuest": "4Gi"})),
     K.ANN_MEMORY),
    ("memory not a hugepage multiple",
     _edit(lambda vm: (vm["metadata"]["annotations"].update({K.ANN_MEMORY: "1536Mi"}),
                       vm["spec"]["template"]["spec"]["domain"].update(memory={"hugepages": {"pageSize": "1Gi"}}))),
     K.ANN_MEMORY),
    ("volumes not a list", _edit(_set("spec.template.spec.volumes", "oops")), "spec.template.spec.volumes"),
    ("a volume without a name", _edit(lambda vm: vm["spec"]["template"]["spec"]["volumes"].append({})),
     "spec.template.spec.volumes[1]"),
]


@pytest.mark.parametrize(("build", "field"), [(h[1], h[2]) for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_vms_are_refused_naming_the_field(build: Case, field: str) -> None:
    vm, kw = build()
    pristine = copy.deepcopy(vm)
    with pytest.raises(Refused) as err:
        call_vm(vm, **kw)
    assert str(err.value).startswith(field + ":"), str(err.value)
    assert vm == pristine


def test_a_few_messages_read_well() -> None:
    def message(case: Case) -> str:
        vm, kw = case()
        with pytest.raises(Refused) as err:
            call_vm(vm, **kw)
        return str(err.value)

    assert message(_plain(disks='[{"name": "a", "size": "1Gi"}, {"name": "b", "size": "9Ti"}]')) == \
        "diskhooks.io/disks[1].size: 9Ti exceeds the platform limit 2Ti"
    assert message(_shrink_from_plan) == ("diskhooks.io/disks[0].size: 100Gi is smaller than the disk's "
                                          "current size 200Gi; disks can grow but never shrink")
    assert message(_plain(passthrough="[{name: f0, claim: fs-claim}]")) == (
        "diskhooks.io/passthrough[0].claim: claim 'fs-claim' has volumeMode Filesystem; passthrough "
        "needs a Block-mode claim (a whole device)")
    assert "KubeVirt would mount /var/lib/diskhooks/vms/vms/other" in message(HOSTILE[11][1])


@pytest.mark.parametrize(("obj", "field"), [
    ([1, 2], ""),
    ({"kind": "Pod", "spec": {}}, "kind"),
    ({"apiVersion": "v1", "kind": "VirtualMachine", "spec": {}}, "apiVersion"),
    ({"kind": "VirtualMachine"}, "spec"),
    ({"kind": "VirtualMachine", "metadata": [], "spec": {}}, "metadata"),
    ({"kind": "VirtualMachine", "metadata": {"annotations": "x"}, "spec": {}}, "metadata.annotations"),
    ({"kind": "VirtualMachine", "metadata": {"name": "a", "annotations": {D: "[]"}}, "spec": {}},
     "spec.template"),
])
def test_an_object_that_is_not_a_vm_is_malformed(obj: Any, field: str) -> None:
    with pytest.raises(Malformed) as err:
        call_vm(obj)
    assert err.value.field == field


# ------------------------------------------------------------------------------------------------
# plans the webhook did not write
# ------------------------------------------------------------------------------------------------
def _forge(plan_text: str, **changes: Any) -> str:
    doc = json.loads(plan_text)
    doc.update(changes)
    return json.dumps(doc)


def test_a_forged_plan_on_the_template_is_recomputed() -> None:
    first = call_vm(vm_create()).obj
    forged = copy.deepcopy(first)
    anns = forged["spec"]["template"]["metadata"]["annotations"]
    anns[K.ANN_PLAN] = _forge(anns[K.ANN_PLAN], hostDir="/etc")
    m = mutate(forged)
    assert m.obj == first
    assert plan_of(m.obj).host_dir == f"{ROOT_DIR}/vms/pg01"


def test_a_forged_plan_without_annotations_is_stripped() -> None:
    donor = call_vm(vm_create()).obj
    vm = sample("05-vm-mixed-smbios.yaml")
    meta = vm["spec"]["template"]["metadata"]
    meta["annotations"][K.ANN_PLAN] = tmeta(donor)["annotations"][K.ANN_PLAN]
    meta["labels"] = {K.LABEL_MANAGED: "true"}
    m = mutate(vm, namespace="team-a")
    assert K.ANN_PLAN not in tmeta(m.obj)["annotations"] and "labels" not in tmeta(m.obj)
    assert m.obj["spec"] == sample("05-vm-mixed-smbios.yaml")["spec"]


@pytest.mark.parametrize(("namespace", "keys"), [("vms", OTHER_KEYS), ("other", KEYS)],
                         ids=["signed by another cluster", "copied from another namespace"])
def test_a_copied_plan_never_makes_a_users_volume_ours(namespace: str, keys: PlanKeys) -> None:
    """A plan that names the user's PVC volume ``mine`` as diskhooks passthrough: if it were
    trusted, ``mine`` would be taken over (and dropped, as no annotation asks for it)."""
    donor = annotate(vm_create(), passthrough="[{name: mine, claim: node1-nvme0}]")
    donor_obj = call_vm(donor, namespace=namespace, keys=keys).obj
    vm = annotate(vm_create(), passthrough="[]")
    vm["spec"]["template"]["spec"]["volumes"].append({"name": "mine", "persistentVolumeClaim":
                                                      {"claimName": "node1-nvme0"}})
    vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"].append({"name": "mine", "disk": {}})
    vm["spec"]["template"]["metadata"]["annotations"] = {K.ANN_PLAN: tmeta(donor_obj)["annotations"][K.ANN_PLAN]}
    m = mutate(vm)
    assert volumes(tspec(m.obj))["mine"] == {"name": "mine", "persistentVolumeClaim": {"claimName": "node1-nvme0"}}
    assert plan_of(m.obj).passthrough == ()


def test_a_plan_copied_from_another_vm_is_replaced() -> None:
    other = copy.deepcopy(vm_create())
    other["metadata"]["name"] = "other"
    donor = call_vm(other).obj
    vm = vm_create()
    vm["spec"]["template"]["metadata"]["annotations"] = {K.ANN_PLAN: tmeta(donor)["annotations"][K.ANN_PLAN]}
    plan = plan_of(mutate(vm).obj)
    assert plan.vm == "pg01" and plan.host_dir == f"{ROOT_DIR}/vms/pg01"


# ------------------------------------------------------------------------------------------------
# VMIs
# ------------------------------------------------------------------------------------------------
def _vmi_of_the_largest_vm() -> dict[str, Any]:
    return vmi_from(call_vm(kitchen_sink()).obj)


def call_vmi(vmi: dict[str, Any], *, namespace: str = "vms", policy: Policy = POLICY) -> Mutation:
    return mutate_vmi(vmi, operation="CREATE", namespace=namespace, policy=policy, plan_keys=KEYS,
                      cluster=CLUSTER)


def test_a_vmi_from_a_template_is_verified_and_admitted_unchanged() -> None:
    vmi = _vmi_of_the_largest_vm()
    assert call_vmi(vmi).obj == vmi
    assert_valid_vmi(vmi)


def test_a_vmi_from_a_template_without_the_label_gets_it() -> None:
    vmi = _vmi_of_the_largest_vm()
    del vmi["metadata"]["labels"][K.LABEL_MANAGED]
    assert call_vmi(vmi).obj["metadata"]["labels"][K.LABEL_MANAGED] == "true"


def test_a_bare_vmi_with_a_stale_label_loses_it() -> None:
    vmi = sample("02-vmi-two-hostdisks-disk.yaml")
    vmi["metadata"]["labels"][K.LABEL_MANAGED] = "true"
    assert call_vmi(vmi, namespace="default").obj == sample("02-vmi-two-hostdisks-disk.yaml")


def test_a_bare_vmi_with_annotations_and_a_forged_plan_is_recomputed() -> None:
    obj = review("vmi-create.json")["object"]
    good = call_vmi(obj).obj
    forged = copy.deepcopy(good)
    anns = forged["metadata"]["annotations"]
    anns[K.ANN_PLAN] = _forge(anns[K.ANN_PLAN], hostDir="/etc")
    assert call_vmi(forged).obj == good


def _tamper(fn: Callable[[dict[str, Any]], Any]) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        vmi = _vmi_of_the_largest_vm()
        fn(vmi)
        return vmi
    return build


def _vol(vmi: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in vmi["spec"]["volumes"] if v["name"] == name)


PLAN_FIELD = f"metadata.annotations[{K.ANN_PLAN}]"
VMI_HOSTILE: list[tuple[str, Callable[[], dict[str, Any]], str, str]] = [
    ("forged plan", _tamper(lambda v: v["metadata"]["annotations"].update(
        {K.ANN_PLAN: _forge(v["metadata"]["annotations"][K.ANN_PLAN], hostDir="/etc")})), PLAN_FIELD,
     "does not verify"),
    ("plan from another VM", _tamper(lambda v: v["metadata"].update(name="someone-else")), PLAN_FIELD,
     "made for VM"),
    ("unsigned plan", _tamper(lambda v: v["metadata"]["annotations"].update(
        {K.ANN_PLAN: json.dumps({k: x for k, x in json.loads(v["metadata"]["annotations"][K.ANN_PLAN]).items()
                                 if k != "auth"})})), PLAN_FIELD, "not signed"),
    ("plan that is not JSON", _tamper(lambda v: v["metadata"]["annotations"].update({K.ANN_PLAN: "{nope"})),
     PLAN_FIELD, "not valid JSON"),
    ("disk path moved to /etc", _tamper(lambda v: _vol(v, "pgdata")["hostDisk"].update(path="/etc/pgdata.qcow2")),
     "spec.volumes", "does not match its diskhooks plan"),
    ("disk volume removed", _tamper(lambda v: v["spec"].update(
        volumes=[x for x in v["spec"]["volumes"] if x["name"] != "wal"])), "spec.volumes", "disk 'wal'"),
    ("passthrough claim swapped", _tamper(lambda v: _vol(v, "fast0")["persistentVolumeClaim"].update(
        claimName="someone-elses-disk")), "spec.volumes", "passthrough volume 'fast0'"),
    ("persist-root image swapped", _tamper(lambda v: _vol(v, "root")["containerDisk"].update(image="evil:1")),
     "spec.volumes[0]", "persistent root"),
    ("extra hostDisk into the root", _tamper(lambda v: v["spec"]["volumes"].append(
        {"name": "steal", "hostDisk": {"path": f"{ROOT_DIR}/vms/other/x.qcow2", "type": "Disk"}})),
     "spec.volumes[", "reaches into"),
    ("diskhooks sidecar removed", _tamper(lambda v: v["metadata"]["annotations"].update(
        {HOOKS: json.dumps([{"image": "registry.example.com/qcow2-hook:0.1.0"}])})),
     f"metadata.annotations[{HOOKS}]", "qcow2 disks would reach the guest as raw"),
    ("disallowed sidecar added", _tamper(lambda v: v["metadata"]["annotations"].update(
        {HOOKS: json.dumps([{"image": "quay.io/evil/x:1"}, {"image": SIDECAR}])})),
     f"metadata.annotations[{HOOKS}][0].image", "not an allowed"),
]


@pytest.mark.parametrize(("build", "field", "reason"), [h[1:] for h in VMI_HOSTILE],
                         ids=[h[0] for h in VMI_HOSTILE])
def test_a_tampered_vmi_is_refused(build: Callable[[], dict[str, Any]], field: str, reason: str) -> None:
    vmi = build()
    with pytest.raises(Refused) as err:
        call_vmi(vmi)
    assert str(err.value).startswith(field), str(err.value)
    assert reason in err.value.reason, str(err.value)


def test_a_vmi_in_another_namespace_is_refused() -> None:
    with pytest.raises(Refused) as err:
        call_vmi(_vmi_of_the_largest_vm(), namespace="prod")
    assert "made for namespace 'vms'" in str(err.value)


def test_a_bare_vmi_with_generate_name_is_refused() -> None:
    obj = review("vmi-create.json")["object"]
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = "scratch-"
    with pytest.raises(Refused) as err:
        call_vmi(obj)
    assert err.value.field == "metadata.name" and "generateName" in err.value.reason


def test_a_vm_being_deleted_or_only_touched_by_kubevirt_passes_unchanged() -> None:
    """Finalizer and status updates must never be blocked, even when the policy was tightened
    after the VM was admitted (here: its 200Gi disk is now above the limit). A real change is
    judged by today's policy, which lets the disk keep the size its verified plan holds."""
    first = call_vm(vm_create()).obj
    tight = load_policy(EXAMPLE_POLICY.read_text().replace("maxDiskSize: 2Ti", "maxDiskSize: 100Gi"))
    touched = copy.deepcopy(first)
    touched["metadata"]["finalizers"] = ["kubevirt.io/virtualMachineControllerFinalize"]
    assert call_vm(touched, policy=tight, operation="UPDATE", old=first).obj == touched
    deleting = annotate(copy.deepcopy(first), disks="{{{ broken")
    deleting["metadata"]["deletionTimestamp"] = "2026-11-28T05:00:00Z"
    assert call_vm(deleting, policy=tight, operation="UPDATE", old=first).obj == deleting
    resized = mutate(annotate(copy.deepcopy(first), profile="small"), policy=tight, operation="UPDATE",
                     old=first)  # a real change, pgdata kept at 200Gi: admitted with a warning
    assert _kept_warnings(resized) == ["diskhooks.io/disks[0].size"]
    with pytest.raises(Refused):  # growing it above today's limit is not
        call_vm(annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "201Gi"}]'),
                policy=tight, operation="UPDATE", old=first)


def test_yaml_timestamps_from_a_manifest_file_do_not_break_the_copy() -> None:
    vm = vm_create()
    vm["metadata"]["creationTimestamp"] = datetime.datetime(2026, 11, 28, 4, 46, 28)
    m = call_vm(vm)
    assert m.obj["metadata"]["creationTimestamp"] == vm["metadata"]["creationTimestamp"]
    assert volumes(tspec(m.obj))["pgdata"]["hostDisk"]["capacity"] == "200Gi"


# ------------------------------------------------------------------------------------------------
# cluster lookups
# ------------------------------------------------------------------------------------------------
def test_file_cluster_forms() -> None:
    assert len(CLUSTER) == 8  # PVCs, StorageClasses and the Node (migration requests look Nodes up)
    pvc = CLUSTER.get_pvc("vms", "node1-nvme0")
    assert pvc is not None and pvc["spec"]["volumeMode"] == "Block"
    pvc["spec"]["volumeMode"] = "changed"
    assert CLUSTER.get_pvc("vms", "node1-nvme0")["spec"]["volumeMode"] == "Block"  # type: ignore[index]
    assert CLUSTER.get_pvc("vms", "missing") is None and CLUSTER.get_pvc("nope", "node1-nvme0") is None
    assert CLUSTER.get_storage_class("local-nvme") is not None
    demo = FileCluster.from_text((ROOT / "examples" / "demo" / "cluster-objects.yaml").read_text())
    assert demo.get_pvc("vms", "node1-nvme0") is not None  # a v1 List
    listed = FileCluster.from_text('[{"kind": "StorageClass", "metadata": {"name": "sc1"}}]')  # a JSON list
    assert listed.get_storage_class("sc1") == {"kind": "StorageClass", "metadata": {"name": "sc1"}}
    assert EMPTY_CLUSTER.get_pvc("vms", "node1-nvme0") is None and len(EMPTY_CLUSTER) == 0


@pytest.mark.parametrize(("text", "field"), [
    ("kind: PersistentVolumeClaim\nmetadata: {name: a}\n", "items[0].metadata.namespace"),
    ("- 5\n", "items[0]"),
    ("- {metadata: {name: a}}\n", "items[0].kind"),
    ("- {kind: Node}\n", "items[0].metadata.name"),  # skipped kinds still need a name
    ("- {kind: StorageClass, metadata: {name: a}}\n- {kind: StorageClass, metadata: {name: a}}\n",
     "items[1]"),
    ("{kind: List, items: 5}\n", "items"),
    ("[unclosed\n", "cluster objects"),
])
def test_file_cluster_errors_name_the_item(text: str, field: str) -> None:
    with pytest.raises(Malformed) as err:
        FileCluster.from_text(text)
    assert err.value.field == field


class _Unreachable:
    """Stands in for an API server that cannot be reached (the one fake here: no API server)."""

    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        raise ClusterError("looking up PersistentVolumeClaim failed: connection refused")

    def get_storage_class(self, name: str) -> dict[str, Any] | None:
        raise ClusterError("unreachable")


def test_a_failed_lookup_is_a_denial_naming_the_claim() -> None:
    vm = annotate(vm_create(), passthrough="[{name: f0, claim: node1-nvme0}]")
    with pytest.raises(Refused) as err:
        call_vm(vm, cluster=_Unreachable())
    assert err.value.field == f"{P}[0].claim" and "connection refused" in err.value.reason


def test_kube_cluster_against_a_closed_port() -> None:
    """No API server exists here: build the real client against a port nothing listens on and
    check that a lookup fails as a ClusterError (so the webhook denies), not with a crash."""
    from kubernetes import client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = client.Configuration(host=f"http://127.0.0.1:{port}")
    config.retries = 0
    kube = KubeCluster(client.ApiClient(config), timeout=1.0)
    with pytest.raises(ClusterError) as err:
        kube.get_pvc("vms", "node1-nvme0")
    assert "PersistentVolumeClaim vms/node1-nvme0" in str(err.value)
    vm = annotate(vm_create(), passthrough="[{name: f0, claim: node1-nvme0}]")
    with pytest.raises(Refused):
        call_vm(vm, cluster=kube)


def test_kube_cluster_in_cluster_outside_a_pod_raises() -> None:
    from kubernetes.config import ConfigException

    with pytest.raises(ConfigException):
        KubeCluster.in_cluster()


def test_plan_sizes_are_what_the_volumes_say() -> None:
    """The plan and the volume capacities agree for every disk of the largest VM."""
    m = call_vm(kitchen_sink())
    vols = volumes(tspec(m.obj))
    for d in plan_of(m.obj).disks:
        assert parse_bytes(vols[d.name]["hostDisk"]["capacity"]) == d.size_bytes


def test_a_plan_signed_by_the_previous_key_is_still_recognised() -> None:
    """After a key rotation the old plan still verifies, so passthrough volumes stay ours."""
    old_keys = PlanKeys(current=b"previous-key-0123456789abcdefghij")
    vm = annotate(vm_create(), passthrough="[{name: f0, claim: node1-nvme0}]")
    first = call_vm(vm, keys=old_keys).obj
    rotated = PlanKeys(current=KEYS.current, previous=(old_keys.current,))
    edited = annotate(copy.deepcopy(first), passthrough="[]")
    m = mutate_vm(edited, operation="UPDATE", old_obj=first, namespace="vms", policy=POLICY,
                  plan_keys=rotated, cluster=CLUSTER)
    assert "f0" not in volumes(tspec(m.obj)) and "f0" not in disks(tspec(m.obj))
    assert sign_plan(verify_plan(tmeta(m.obj)["annotations"][K.ANN_PLAN], rotated, namespace="vms",
                                 vm="pg01"), KEYS) == tmeta(m.obj)["annotations"][K.ANN_PLAN]


@pytest.mark.parametrize("kind", ["vm", "vmi"])
def test_a_plain_object_asking_for_an_unlisted_sidecar_is_denied(kind: str) -> None:
    """The Sidecar gate lets any VM owner run code in virt-launcher: in opted-in namespaces the
    allowlist holds for every VM, not only for those that use diskhooks."""
    sidecars = json.dumps([{"image": "quay.io/evil/miner:1", "args": ["--version", "v1alpha3"]}])
    if kind == "vm":
        vm = yaml.safe_load((SAMPLES / "01-vm-containerdisk-hostdisk-cloudinit.yaml").read_text())
        vm["spec"]["template"]["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"] = sidecars
        with pytest.raises(Refused) as err:
            mutate_vm(vm, operation="CREATE", old_obj=None, namespace="vms", policy=POLICY,
                      plan_keys=KEYS, cluster=EMPTY_CLUSTER)
        assert err.value.field.startswith("spec.template.metadata.annotations[hooks.kubevirt.io/hookSidecars][0]")
    else:
        vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
               "metadata": {"name": "x", "annotations": {"hooks.kubevirt.io/hookSidecars": sidecars}},
               "spec": {"domain": {"devices": {}, "memory": {"guest": "1Gi"}}}}
        with pytest.raises(Refused) as err:
            mutate_vmi(vmi, operation="CREATE", namespace="vms", policy=POLICY, plan_keys=KEYS,
                       cluster=EMPTY_CLUSTER)
        assert err.value.field.startswith("metadata.annotations[hooks.kubevirt.io/hookSidecars][0]")
    assert "quay.io/evil/miner:1" in str(err.value)


# ------------------------------------------------------------------------------------------------
# hook-sidecar entries that use the diskhooks image
# ------------------------------------------------------------------------------------------------
OURS = {"image": SIDECAR, "imagePullPolicy": "IfNotPresent", "args": ["serve", "--version", "v1alpha3"]}
NOT_OURS = {
    "command": dict(OURS, command=["python3", "-c", "import os; os.system('id')"]),
    "other args": dict(OURS, args=["--version", "v1alpha2", "--debug"]),
    "configMap script": dict(OURS, configMap={"name": "s", "key": "hook.sh", "hookPath": "/usr/bin/onDefineDomain"}),
    "pvc": dict(OURS, pvc={"name": "tools", "volumePath": "/x", "sharedComputePath": "/y"}),
    "other tag": dict(OURS, image="ghcr.io/diskhooks/diskhooks-sidecar:latest-debug"),
    "digest": dict(OURS, image="ghcr.io/diskhooks/diskhooks-sidecar@sha256:" + "b" * 64),
    "no args": {"image": SIDECAR, "imagePullPolicy": "IfNotPresent"},
    "bad pull policy": dict(OURS, imagePullPolicy="Sometimes"),
}


def _bare_vmi(entries: list[dict[str, Any]], *, escape_slashes: bool = False) -> dict[str, Any]:
    raw = json.dumps(entries)
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "evil", "annotations": {HOOKS: raw.replace("/", "\\/") if escape_slashes
                                                         else raw}},
            "spec": {"domain": {"devices": {}, "memory": {"guest": "1Gi"}}}}


@pytest.mark.parametrize("entry", list(NOT_OURS.values()), ids=list(NOT_OURS))
def test_a_bare_vmi_cannot_run_other_code_with_the_diskhooks_image(entry: dict[str, Any]) -> None:
    for escape in (False, True):
        with pytest.raises(Refused) as err:
            call_vmi(_bare_vmi([{"image": "registry.example.com/qcow2-hook:0.1.0"}, entry],
                               escape_slashes=escape))
        assert err.value.field == f"metadata.annotations[{HOOKS}][1]", str(err.value)
        assert "diskhooks image" in err.value.reason


@pytest.mark.parametrize("entry", list(NOT_OURS.values()), ids=list(NOT_OURS))
def test_a_vmi_from_a_template_cannot_swap_in_another_diskhooks_entry(entry: dict[str, Any]) -> None:
    for replace in (True, False):
        vmi = _vmi_of_the_largest_vm()
        entries = sidecars(vmi["metadata"])
        assert entries[-1] == OURS
        entries = entries[:-1] + [entry] if replace else entries + [entry]
        vmi["metadata"]["annotations"][HOOKS] = json.dumps(entries)
        with pytest.raises(Refused) as err:
            call_vmi(vmi)
        assert err.value.field == f"metadata.annotations[{HOOKS}][{len(entries) - 1}]", str(err.value)


def test_exactly_our_entry_is_accepted_on_a_bare_vmi() -> None:
    vmi = _bare_vmi([OURS])
    assert call_vmi(vmi).obj == vmi


@pytest.mark.parametrize("with_annotations", [True, False])
def test_a_hand_edited_diskhooks_entry_on_a_vm_does_not_survive(with_annotations: bool) -> None:
    vm = annotate(vm_create()) if with_annotations else sample("01-vm-containerdisk-hostdisk-cloudinit.yaml")
    for escape in (False, True):
        raw = json.dumps([NOT_OURS["command"], NOT_OURS["configMap script"]])
        vm["spec"]["template"]["metadata"]["annotations"] = {HOOKS: raw.replace("/", "\\/") if escape else raw}
        m = mutate(vm)
        assert sidecars(tmeta(m.obj)) == ([OURS] if with_annotations else [])


# ------------------------------------------------------------------------------------------------
# detached disks: the plan remembers them, so a disk cannot come back smaller
# ------------------------------------------------------------------------------------------------
TWO_DISKS = '[{name: data, size: 20Gi}, {name: logs, size: 5Gi}]'


def _detached(vm: dict[str, Any]) -> list[tuple[str, int]]:
    return [(d.name, d.size_bytes) for d in plan_of(vm).detached]


def test_a_disk_removed_then_re_added_smaller_is_denied() -> None:
    """The audit's bypass: UPDATE removing a disk, then UPDATE re-adding it smaller. The 20Gi
    image stays on the node; prepare would refuse it at the next start."""
    first = mutate(annotate(vm_create(), disks=TWO_DISKS)).obj
    removed = mutate(annotate(copy.deepcopy(first), disks="[{name: logs, size: 5Gi}]"),
                     operation="UPDATE", old=first).obj
    assert _detached(removed) == [("data", 20 * GI)] and [d.name for d in plan_of(removed).disks] == ["logs"]
    smaller = annotate(copy.deepcopy(removed), disks="[{name: logs, size: 5Gi}, {name: data, size: 1Gi}]")
    with pytest.raises(Refused) as err:
        call_vm(smaller, operation="UPDATE", old=removed)
    assert str(err.value).startswith("diskhooks.io/disks[1].size: 1Gi is smaller than 20Gi, the size of "
                                     "disk 'data' when it was detached"), str(err.value)
    # an unrelated UPDATE carries the memory forward
    later = mutate(annotate(copy.deepcopy(removed), profile="small"), operation="UPDATE", old=removed).obj
    assert _detached(later) == [("data", 20 * GI)]
    with pytest.raises(Refused):
        call_vm(annotate(copy.deepcopy(later), disks="[{name: data, size: 10Gi}]"), operation="UPDATE",
                old=later)
    # the same size or larger attaches the image again: it moves back from detached to disks
    back = mutate(annotate(copy.deepcopy(later), disks="[{name: logs, size: 5Gi}, {name: data, size: 30Gi}]"),
                  operation="UPDATE", old=later)
    assert _detached(back.obj) == [] and json.loads(tmeta(back.obj)["annotations"][K.ANN_PLAN])["version"] == 1
    assert {d.name: d.size_bytes for d in plan_of(back.obj).disks} == {"logs": 5 * GI, "data": 30 * GI}
    assert volumes(tspec(back.obj))["data"]["hostDisk"]["capacity"] == "30Gi"
    assert any("'data' is attached again" in w and "grown from 20Gi to 30Gi" in w for w in back.warnings)


def test_a_disk_cannot_come_back_smaller_after_every_annotation_was_removed() -> None:
    first = mutate(annotate(vm_create(), disks=TWO_DISKS)).obj
    bare = copy.deepcopy(first)
    del bare["metadata"]["annotations"]
    plain = mutate(bare, operation="UPDATE", old=first).obj
    assert _detached(plain) == [("data", 20 * GI), ("logs", 5 * GI)]
    meta = tmeta(plain)
    assert K.LABEL_MANAGED not in meta.get("labels", {}) and HOOKS not in meta["annotations"]
    assert "data" not in volumes(tspec(plain))
    # the VMI made from it is admitted as it is: no sidecar, no label, nothing for the launcher
    vmi = vmi_from(plain)
    assert call_vmi(vmi).obj == vmi
    again = annotate(copy.deepcopy(plain), disks="[{name: logs, size: 1Gi}]")
    with pytest.raises(Refused) as err:
        call_vm(again, operation="UPDATE", old=plain)
    assert err.value.field == "diskhooks.io/disks[0].size" and "5Gi" in err.value.reason


def test_a_version_1_plan_without_detached_disks_still_verifies() -> None:
    """Plans written before version 2 carry no ``detached`` member: they verify and parse, and
    the next UPDATE that detaches a disk writes version 2."""
    first = mutate(annotate(vm_create(), disks=TWO_DISKS)).obj
    text = tmeta(first)["annotations"][K.ANN_PLAN]
    assert json.loads(text)["version"] == 1 and "detached" not in json.loads(text)
    assert plan_of(first).detached == ()
    assert call_vmi(vmi_from(first)).obj == vmi_from(first)
    m = mutate(annotate(copy.deepcopy(first), disks="[{name: data, size: 20Gi}]"), operation="UPDATE", old=first)
    assert json.loads(tmeta(m.obj)["annotations"][K.ANN_PLAN])["version"] == 2
    assert _detached(m.obj) == [("logs", 5 * GI)]


def test_a_forged_detached_list_is_not_trusted() -> None:
    first = mutate(annotate(vm_create(), disks=TWO_DISKS)).obj
    forged = copy.deepcopy(first)
    anns = forged["spec"]["template"]["metadata"]["annotations"]
    anns[K.ANN_PLAN] = _forge(anns[K.ANN_PLAN], version=2, detached=[{"name": "x", "sizeBytes": 1}])
    assert _detached(mutate(forged).obj) == []


# ------------------------------------------------------------------------------------------------
# a VM admitted without diskhooks is repaired by its next UPDATE
# ------------------------------------------------------------------------------------------------
def _started(vm: dict[str, Any]) -> dict[str, Any]:
    """What ``virtctl start`` sends: the same VM with another runStrategy."""
    out = copy.deepcopy(vm)
    out["spec"]["runStrategy"] = "Halted" if vm["spec"].get("runStrategy") == "Always" else "Always"
    return out


def test_a_vm_admitted_unmutated_gets_its_plan_at_the_next_start() -> None:
    """Admitted while the webhook was down (failurePolicy Ignore) or before its namespace opted
    in: the first UPDATE, even one that only changes runStrategy, gives it its disks."""
    unmutated = vm_create()
    m = mutate(_started(unmutated), operation="UPDATE", old=unmutated)
    assert {d.name for d in plan_of(m.obj).disks} == {"pgdata", "wal"}
    assert volumes(tspec(m.obj))["pgdata"]["hostDisk"]["capacity"] == "200Gi"
    assert sidecars(tmeta(m.obj))[-1] == OURS and m.obj["spec"]["runStrategy"] == "Halted"
    assert call_vmi(vmi_from(m.obj)).obj == vmi_from(m.obj)
    # one that cannot get a plan under today's policy is denied rather than started without disks
    tight = load_policy(EXAMPLE_POLICY.read_text().replace("maxDiskSize: 2Ti", "maxDiskSize: 100Gi"))
    halted = copy.deepcopy(unmutated)
    halted["spec"]["runStrategy"] = "Halted"
    with pytest.raises(Refused) as err:
        call_vm(_started(halted), policy=tight, operation="UPDATE", old=halted)
    assert err.value.field == "diskhooks.io/disks[0].size"


TIGHT = load_policy(EXAMPLE_POLICY.read_text().replace("maxDiskSize: 2Ti", "maxDiskSize: 100Gi"))


def _stopped(vm: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(vm)
    out["spec"]["runStrategy"] = "Halted"
    return out


def _running_false(vm: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(vm)
    out["spec"].pop("runStrategy", None)
    out["spec"]["running"] = False
    return out


def _labelled(vm: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(vm)
    out["metadata"].setdefault("labels", {})["team"] = "x"
    return out


@pytest.mark.parametrize("edit", [_stopped, _running_false, _labelled])
def test_a_vm_that_cannot_be_repaired_can_still_be_stopped_or_edited(edit: Any) -> None:
    """A running VM admitted unmutated whose disks today's policy refuses: stopping it, a label
    or virt-controller's metadata updates are admitted unchanged, with a warning naming why."""
    unmutated = vm_create()
    assert unmutated["spec"]["runStrategy"] == "Always"
    updated = edit(unmutated)
    m = call_vm(updated, policy=TIGHT, operation="UPDATE", old=unmutated)
    assert m.obj == updated
    assert any("diskhooks.io/disks[0].size" in w and "exceeds the platform limit" in w
               and "starting the VM is denied" in w for w in m.warnings)
    # the same with a healthy plan signed with keys rotated away since: also admitted
    admitted = call_vm(vm_create()).obj
    rotated = PlanKeys(current=b"c" * 32, previous=(b"b" * 32,))
    updated = edit(admitted)
    assert call_vm(updated, policy=TIGHT, operation="UPDATE", old=admitted, keys=rotated).obj == updated


@pytest.mark.parametrize("spec", [{"runStrategy": "Always"}, {"runStrategy": "RerunOnFailure"},
                                  {"runStrategy": "Once"}, {"running": True}])
def test_a_vm_that_cannot_be_repaired_is_not_started(spec: dict[str, Any]) -> None:
    stopped = _running_false(vm_create()) if "running" in spec else _stopped(vm_create())
    started = copy.deepcopy(stopped)
    started["spec"].update(spec)
    with pytest.raises(Refused) as err:
        call_vm(started, policy=TIGHT, operation="UPDATE", old=stopped)
    assert err.value.field == "diskhooks.io/disks[0].size" and "exceeds the platform limit" in err.value.reason


def test_a_plan_behind_its_annotations_is_recomputed_at_the_next_start() -> None:
    first = call_vm(vm_create()).obj
    edited = annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "250Gi"}]')  # admitted unmutated
    m = mutate(_started(edited), operation="UPDATE", old=edited)
    assert {d.name: d.size_bytes for d in plan_of(m.obj).disks} == {"pgdata": 250 * GI}
    assert "wal" not in volumes(tspec(m.obj))


def test_an_unmutated_hand_edited_diskhooks_entry_is_dropped_at_the_next_start() -> None:
    vm = sample("01-vm-containerdisk-hostdisk-cloudinit.yaml")
    vm["spec"]["template"]["metadata"]["annotations"] = {HOOKS: json.dumps([NOT_OURS["command"]])}
    m = mutate(_started(vm), operation="UPDATE", old=vm)
    assert sidecars(tmeta(m.obj)) == []


def test_updates_of_plain_sized_or_consistent_vms_keep_the_shortcut() -> None:
    for vm in (sample("01-vm-containerdisk-hostdisk-cloudinit.yaml"),
               annotate(sample("05-vm-mixed-smbios.yaml"), cpu="3"),  # sizing only: no plan needed
               call_vm(vm_create()).obj):
        started = _started(vm)
        assert call_vm(started, operation="UPDATE", old=vm).obj == started


# ------------------------------------------------------------------------------------------------
# maxTotalPerVM counts detached disks: their images stay on the node
# ------------------------------------------------------------------------------------------------
# maxDiskSize 250Gi, maxTotalPerVM 300Gi: vm_create() holds pgdata 200Gi + wal 20Gi
SMALL_TOTAL = load_policy(EXAMPLE_POLICY.read_text().replace("maxDiskSize: 2Ti", "maxDiskSize: 250Gi")
                          .replace("maxTotalPerVM: 8Ti", "maxTotalPerVM: 300Gi"))
WAL_ONLY = '[{"name": "wal", "size": "20Gi"}]'


def test_detached_disks_count_towards_max_total_per_vm() -> None:
    """Detach pgdata (200Gi, its image stays on the node), then add a new 200Gi disk: the VM would
    hold 420Gi on the node, over maxTotalPerVM 300Gi. Denied naming diskhooks.io/disks, with what
    is attached and what the detached disks hold; re-attaching pgdata instead is counted once."""
    first = mutate(vm_create(), policy=SMALL_TOTAL).obj
    detached = mutate(annotate(copy.deepcopy(first), disks=WAL_ONLY), policy=SMALL_TOTAL,
                      operation="UPDATE", old=first).obj
    assert _detached(detached) == [("pgdata", 200 * GI)]
    for old in (detached, first):  # in two steps, or swapped in one UPDATE
        swapped = annotate(copy.deepcopy(old), disks='[{"name": "wal", "size": "20Gi"}, '
                           '{"name": "data2", "size": "200Gi"}]')
        with pytest.raises(Refused) as exc:
            call_vm(swapped, policy=SMALL_TOTAL, operation="UPDATE", old=old)
        assert exc.value.field == "diskhooks.io/disks"
        assert "420Gi" in exc.value.reason and "limit 300Gi" in exc.value.reason
        assert "220Gi attached" in exc.value.reason and "200Gi held" in exc.value.reason
        assert "pgdata 200Gi" in exc.value.reason
    # the same through a clean manifest replacing the VM (the record survives it)
    clean = vm_create()
    del clean["metadata"]["annotations"]
    replaced = mutate(copy.deepcopy(clean), policy=SMALL_TOTAL, operation="UPDATE", old=first).obj
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(clean), disks='[{"name": "new", "size": "200Gi"}]'),
                policy=SMALL_TOTAL, operation="UPDATE", old=replaced)
    assert exc.value.field == "diskhooks.io/disks" and "wal 20Gi" in exc.value.reason
    # re-attached, pgdata is counted once; what fits beside the detached image is admitted
    back = annotate(copy.deepcopy(detached), disks='[{"name": "wal", "size": "20Gi"}, '
                    '{"name": "pgdata", "size": "200Gi"}, {"name": "more", "size": "80Gi"}]')
    assert [d.name for d in plan_of(mutate(back, policy=SMALL_TOTAL, operation="UPDATE",
                                           old=detached).obj).disks] == ["wal", "pgdata", "more"]
    beside = annotate(copy.deepcopy(detached), disks='[{"name": "wal", "size": "100Gi"}]')
    assert _detached(mutate(beside, policy=SMALL_TOTAL, operation="UPDATE", old=detached).obj) \
        == [("pgdata", 200 * GI)]
    # many detached disks: the largest are named, the others counted
    many = mutate(annotate(vm_create(), disks="[" + ", ".join(f"{{name: d{i}, size: {i + 30}Gi}}"
                                                              for i in range(6)) + "]"), policy=SMALL_TOTAL).obj
    gone = mutate(annotate(copy.deepcopy(many), disks="[]"), policy=SMALL_TOTAL, operation="UPDATE", old=many).obj
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(gone), disks="[{name: new, size: 110Gi}]"), policy=SMALL_TOTAL,
                operation="UPDATE", old=gone)
    assert "110Gi attached and 195Gi held by detached disks (d5 35Gi, d4 34Gi, d3 33Gi, d2 32Gi " \
        "and 2 more)" in exc.value.reason
    # the attached disks alone, on CREATE, as before
    with pytest.raises(Refused) as exc:
        call_vm(annotate(vm_create(), disks="[" + ", ".join(f"{{name: d{i}, size: 2Ti}}"
                                                            for i in range(5)) + "]"))
    assert str(exc.value) == "diskhooks.io/disks: the disks add up to 10Ti, more than the platform " \
        "limit 8Ti per VM"


def _over_the_limit() -> dict[str, Any]:
    """A VM admitted under maxTotalPerVM 8Ti that holds 420Gi: wal 20Gi and data2 200Gi attached,
    pgdata 200Gi detached; over SMALL_TOTAL's 300Gi once detached disks count (or once the
    platform lowers the limit)."""
    first = mutate(vm_create()).obj
    detached = mutate(annotate(copy.deepcopy(first), disks=WAL_ONLY), operation="UPDATE", old=first).obj
    added = annotate(copy.deepcopy(detached), disks='[{"name": "wal", "size": "20Gi"}, '
                     '{"name": "data2", "size": "200Gi"}]')
    return mutate(added, operation="UPDATE", old=detached).obj


@pytest.mark.parametrize("edit", [
    _stopped, _labelled, _started,
    lambda vm: annotate(vm, profile="small"),  # sizing
    lambda vm: annotate(vm, disks='[{"name": "wal", "size": "20Gi", "bus": "virtio"}, '
                        '{"name": "data2", "size": "200Gi"}]'),  # driver settings
    lambda vm: annotate(vm, disks='[{"name": "data2", "size": "200Gi"}]'),  # detaching wal
    lambda vm: annotate(vm, disks='[{"name": "wal", "size": "20Gi"}, {"name": "data2", "size": "200Gi"}, '
                        '{"name": "pgdata", "size": "200Gi"}]'),  # re-attaching pgdata
], ids=["stop", "label", "start", "sizing", "bus", "detach", "re-attach"])
def test_a_vm_over_max_total_per_vm_keeps_every_update_that_does_not_grow_it(edit: Any) -> None:
    """Grandfathered: a VM that already holds more than maxTotalPerVM (detached disks count, or
    the limit was lowered) is not stranded: any UPDATE that does not increase its total is
    admitted as usual (its record carried forward); only growth beyond the limit is denied."""
    held = _over_the_limit()
    m = mutate(edit(copy.deepcopy(held)), policy=SMALL_TOTAL, operation="UPDATE", old=held)
    plan = plan_of(m.obj)
    assert sum(d.size_bytes for d in plan.disks) + sum(x.size_bytes for x in plan.detached) == 420 * GI


@pytest.mark.parametrize("disks_", [
    '[{"name": "wal", "size": "21Gi"}, {"name": "data2", "size": "200Gi"}]',  # growing a disk
    '[{"name": "wal", "size": "20Gi"}, {"name": "data2", "size": "200Gi"}, {"name": "x", "size": "1Gi"}]',
    '[{"name": "wal", "size": "20Gi"}, {"name": "data2", "size": "200Gi"}, {"name": "pgdata", "size": "201Gi"}]',
], ids=["grow", "add", "re-attach-larger"])
def test_a_vm_over_max_total_per_vm_cannot_grow(disks_: str) -> None:
    held = _over_the_limit()
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(held), disks=disks_), policy=SMALL_TOTAL, operation="UPDATE",
                old=held)
    assert exc.value.field == "diskhooks.io/disks"
    assert "limit 300Gi" in exc.value.reason and "already held 420Gi" in exc.value.reason
    # a VM over the limit by its attached disks alone (the limit was lowered) is treated alike
    lowered = load_policy(EXAMPLE_POLICY.read_text().replace("maxDiskSize: 2Ti", "maxDiskSize: 200Gi")
                          .replace("maxTotalPerVM: 8Ti", "maxTotalPerVM: 200Gi"))
    first = mutate(vm_create()).obj
    assert mutate(annotate(copy.deepcopy(first), profile="small"), policy=lowered, operation="UPDATE",
                  old=first).obj
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "200Gi"}, '
                         '{"name": "wal", "size": "21Gi"}]'), policy=lowered, operation="UPDATE", old=first)
    assert exc.value.field == "diskhooks.io/disks" and "already held 220Gi" in exc.value.reason


# ------------------------------------------------------------------------------------------------
# maxDiskSize lowered: a disk keeps the size the old object's verified plan held for it
# ------------------------------------------------------------------------------------------------
# TIGHT: maxDiskSize 100Gi (maxTotalPerVM 8Ti); vm_create() holds pgdata 200Gi + wal 20Gi (scsi)
def _kept_warnings(m: Mutation) -> list[str]:
    """The fields named by the warnings about disks kept above maxDiskSize."""
    return [w.split(": ", 1)[0] for w in m.warnings if "above the platform limit" in w]


@pytest.mark.parametrize("edit", [
    lambda vm: annotate(vm, profile="small"),  # sizing
    lambda vm: annotate(vm, disks='[{"name": "pgdata", "size": "200Gi", "bus": "sata"}, '
                        '{"name": "wal", "size": "20Gi", "bus": "scsi"}]'),  # bus
    lambda vm: annotate(vm, disks='[{"name": "pgdata", "size": "200Gi"}]'),  # detaching wal
    lambda vm: annotate(vm, disks='[{"name": "pgdata", "size": "200Gi"}, '
                        '{"name": "wal", "size": "20Gi", "bus": "scsi"}, '
                        '{"name": "small", "size": "10Gi"}]'),  # adding a disk within the limits
], ids=["sizing", "bus", "detach-other", "add-small"])
def test_a_disk_above_a_lowered_max_disk_size_keeps_its_size(edit: Any) -> None:
    """Grandfathered per disk: pgdata was admitted at 200Gi, then the platform lowered maxDiskSize
    to 100Gi. pgdata is not changing, so an UPDATE that re-plans the VM for another reason is
    admitted with pgdata still 200Gi, and a warning tells the owner its size is above the limit."""
    first = mutate(vm_create()).obj
    m = mutate(edit(copy.deepcopy(first)), policy=TIGHT, operation="UPDATE", old=first)
    assert {d.name: d.size_bytes for d in plan_of(m.obj).disks}["pgdata"] == 200 * GI
    assert volumes(tspec(m.obj))["pgdata"]["hostDisk"]["capacity"] == "200Gi"
    assert _kept_warnings(m) == ["diskhooks.io/disks[0].size"]
    (warning,) = [w for w in m.warnings if "above the platform limit" in w]
    assert warning == ("diskhooks.io/disks[0].size: disk 'pgdata' keeps 200Gi, above the platform "
                       "limit 100Gi, which was lowered after it was planned; it cannot grow until the "
                       "limit is raised")
    # the next UPDATE, from what was admitted, is grandfathered the same way (nothing ratchets)
    again = mutate(annotate(copy.deepcopy(m.obj), profile="large"), policy=TIGHT, operation="UPDATE",
                   old=m.obj)
    assert _kept_warnings(again) == ["diskhooks.io/disks[0].size"]


def test_a_disk_above_a_lowered_max_disk_size_cannot_grow_and_new_disks_stay_within_it() -> None:
    """Only what the old plan held is kept: growing pgdata (even within the old 2Ti limit), or a new
    disk name above 100Gi, is denied with the usual message; a CREATE keeps nothing."""
    first = mutate(vm_create()).obj
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "300Gi"}, '
                         '{"name": "wal", "size": "20Gi", "bus": "scsi"}]'),
                policy=TIGHT, operation="UPDATE", old=first)
    assert exc.value.field == "diskhooks.io/disks[0].size"
    assert exc.value.reason == ("300Gi exceeds the platform limit 100Gi; the disk may keep its current "
                                "200Gi, but not grow until the limit is raised")
    with pytest.raises(Refused) as exc:
        call_vm(annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "200Gi"}, '
                         '{"name": "wal", "size": "20Gi", "bus": "scsi"}, '
                         '{"name": "new", "size": "150Gi"}]'),
                policy=TIGHT, operation="UPDATE", old=first)
    assert str(exc.value) == "diskhooks.io/disks[2].size: 150Gi exceeds the platform limit 100Gi"
    with pytest.raises(Refused) as exc:  # nothing is old on a CREATE
        call_vm(vm_create(), policy=TIGHT)
    assert str(exc.value) == "diskhooks.io/disks[0].size: 200Gi exceeds the platform limit 100Gi"
    with pytest.raises(Refused) as exc:  # a disk of the kept size under another name is new
        call_vm(annotate(copy.deepcopy(first), disks='[{"name": "pgdata2", "size": "200Gi"}, '
                         '{"name": "wal", "size": "20Gi", "bus": "scsi"}]'),
                policy=TIGHT, operation="UPDATE", old=first)
    assert str(exc.value) == "diskhooks.io/disks[0].size: 200Gi exceeds the platform limit 100Gi"


def test_a_plan_behind_its_annotations_is_recomputed_with_a_disk_kept_above_the_limit() -> None:
    """wal grown to 30Gi while the webhook was not called, then the VM is started under the lowered
    limit: the plan is recomputed (as for any VM) with pgdata kept at 200Gi, not left behind."""
    first = call_vm(vm_create()).obj
    edited = annotate(copy.deepcopy(first), disks='[{"name": "pgdata", "size": "200Gi"}, '
                      '{"name": "wal", "size": "30Gi", "bus": "scsi"}]')  # admitted unmutated
    m = mutate(_started(edited), policy=TIGHT, operation="UPDATE", old=edited)
    assert {d.name: d.size_bytes for d in plan_of(m.obj).disks} == {"pgdata": 200 * GI, "wal": 30 * GI}
    assert _kept_warnings(m) == ["diskhooks.io/disks[0].size"]


def _tampered(vm: dict[str, Any]) -> dict[str, Any]:
    """``vm`` with its template's plan claiming pgdata 300Gi, the signature left as it was."""
    out = copy.deepcopy(vm)
    anns = out["spec"]["template"]["metadata"]["annotations"]
    doc = json.loads(anns[K.ANN_PLAN])
    doc["disks"][0]["sizeBytes"] = 300 * GI
    anns[K.ANN_PLAN] = json.dumps(doc)
    return out


def test_only_a_verified_old_plan_keeps_a_disk_above_a_lowered_max_disk_size() -> None:
    """Never a size from a plan that does not verify (tampered, signed with another key), from the
    old object's annotation, or from a genuine plan the user put in the new object: each of these
    UPDATEs is denied as on a CREATE."""
    first = mutate(vm_create()).obj
    foreign = call_vm(vm_create(), keys=OTHER_KEYS).obj  # a genuine plan, of another cluster
    unmutated = vm_create()  # admitted without the webhook: only the annotation says 200Gi
    for old, new in ((_tampered(first), annotate(_tampered(first), profile="small")),
                     (_tampered(first), annotate(copy.deepcopy(first), profile="small")),
                     (foreign, annotate(copy.deepcopy(foreign), profile="small")),
                     (unmutated, annotate(copy.deepcopy(first), profile="small"))):
        with pytest.raises(Refused) as exc:
            call_vm(new, policy=TIGHT, operation="UPDATE", old=old)
        assert str(exc.value) == "diskhooks.io/disks[0].size: 200Gi exceeds the platform limit 100Gi"
    with pytest.raises(Refused) as exc:  # nor the size a tampered plan claims
        call_vm(annotate(_tampered(first), disks='[{"name": "pgdata", "size": "300Gi"}, '
                         '{"name": "wal", "size": "20Gi", "bus": "scsi"}]'),
                policy=TIGHT, operation="UPDATE", old=_tampered(first))
    assert str(exc.value) == "diskhooks.io/disks[0].size: 300Gi exceeds the platform limit 100Gi"
    # the same sizing change from the genuine plan is admitted: what was denied is the old plan
    assert _kept_warnings(mutate(annotate(copy.deepcopy(first), profile="small"), policy=TIGHT,
                                 operation="UPDATE", old=first)) == ["diskhooks.io/disks[0].size"]


def test_warnings_about_disks_kept_above_max_disk_size_are_bounded() -> None:
    """Six 200Gi disks kept under a 100Gi limit: four are named, the others counted."""
    six = "[" + ", ".join(f'{{"name": "d{i}", "size": "200Gi"}}' for i in range(6)) + "]"
    first = mutate(annotate(vm_create(), disks=six)).obj
    m = mutate(annotate(copy.deepcopy(first), profile="small"), policy=TIGHT, operation="UPDATE", old=first)
    assert _kept_warnings(m) == [f"diskhooks.io/disks[{i}].size" for i in range(4)] + ["diskhooks.io/disks"]
    assert "diskhooks.io/disks: 2 more disks keep a size above the platform limit 100Gi; they cannot " \
        "grow until it is raised" in m.warnings
    assert all(len(w) < 256 for w in m.warnings)


# ------------------------------------------------------------------------------------------------
# defaultProfile on bare VMIs
# ------------------------------------------------------------------------------------------------
def _unsized_vmi(**meta: Any) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "scratch", "annotations": {}, **meta},
            "spec": {"domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
                     "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora:41"}}]}}


def test_the_default_profile_sizes_a_bare_vmi_without_annotations() -> None:
    vmi = _unsized_vmi()
    m = call_vmi(vmi, policy=STRICT)  # defaultProfile: small (2 vCPUs, 4Gi)
    domain = m.obj["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 2, "threads": 1} and domain["memory"] == {"guest": "4Gi"}
    assert m.obj["metadata"] == vmi["metadata"]  # no plan, no label, no sidecar
    assert_valid_vmi(m.obj)
    assert call_vmi(m.obj, policy=STRICT).obj == m.obj
    # a VMI made from a VM got its sizing through the template; one that sizes itself is left alone
    owned = _unsized_vmi(ownerReferences=[{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                           "name": "scratch", "uid": "0000", "controller": True}])
    assert call_vmi(owned, policy=STRICT).obj == owned
    sized = _unsized_vmi()
    sized["spec"]["domain"]["memory"] = {"guest": "1Gi"}
    assert call_vmi(sized, policy=STRICT).obj == sized
    assert call_vmi(vmi).obj == vmi  # no defaultProfile in the policy
