"""Placement by the stock kube-scheduler on ``diskhooks.io/storage`` (docs/CAPACITY.md), for real:
kube-apiserver and kube-scheduler (envtest), three Node objects, one ``diskhooks-node serve`` per
node (a subprocess with its own ``--node-name`` and ``--host-prefix``) whose ``hostDisks.root`` is a
tmpfs of 10, 20 and 40 GiB (a filesystem of that size; qcow2 images are sparse, so it costs no
memory), and virt-launcher Pods made by the real Pod mutation from KubeVirt's own launcher Pod.

Faked, because they cannot run here: the kubelet (the Nodes' status is written by the test: Ready,
the not-ready taint removed, the resources a KubeVirt node offers), KubeVirt's controllers (the
test creates the VMI a start makes and sets it running on the node the scheduler chose) and the
launcher itself (what prepare leaves on the chosen node, the images and the home marker, is made
with qemu-img and the marker writer prepare uses). kube-scheduler decides every placement.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.homemarker import HomeMarker
from diskplan.plan import PlanKeys, sign_plan
from diskplan.policy import load_policy
from tests.conftest import ADMISSION
from tests.envtest import ControlPlane
from tests.node_agent_support import (
    PLAN_KEY,
    POLICY,
    ROOT_DIR,
    AgentProcess,
    AgentSetup,
    end_agent,
    make_agent_setup,
    make_plan,
    spawn_agent,
    wait_for,
)
from webhook.pod_mutation import mutate_pod

GiB = 1 << 30
KEYS = PlanKeys(current=PLAN_KEY)
#: the Pod mutation's policy: the agent's, naming the agent (only then do Pods request storage)
WEBHOOK_POLICY = load_policy(POLICY + "nodeAgent: {serviceAccount: diskhooks-system/diskhooks-node}\n")
#: what a KubeVirt node offers besides our resource (the sample launcher Pod asks for these)
NODE_RESOURCES = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi",
                  "devices.kubevirt.io/kvm": "1k", "devices.kubevirt.io/tun": "1k",
                  "devices.kubevirt.io/vhost-net": "1k"}


def qemu_img() -> str:
    import shutil

    exe = shutil.which("qemu-img")
    assert exe is not None, "qemu-img is required (apt-get install -y qemu-utils)"
    return exe


@dataclass
class NodeUnderTest:
    name: str
    gib: int
    setup: AgentSetup
    agent: AgentProcess | None = None

    @property
    def root(self) -> Path:
        return self.setup.node_root()


class World:
    """The cluster side of the test: Nodes, VMs, VMIs and launcher Pods in one namespace."""

    def __init__(self, envtest: ControlPlane, namespace: str, tag: str) -> None:
        from kubernetes import client

        self.core: Any = client.CoreV1Api(envtest.api)
        self.custom: Any = client.CustomObjectsApi(envtest.api)
        self.namespace = namespace
        self.tag = tag  # a label on our Nodes, in every Pod's nodeSelector: other tests' Nodes are not ours
        self.nodes: dict[str, NodeUnderTest] = {}

    # --- Nodes ---------------------------------------------------------------------------------
    def add_node(self, node: NodeUnderTest) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.core.create_node({"metadata": {"name": node.name, "labels": {
            "kubernetes.io/hostname": node.name, "kubernetes.io/arch": "amd64",
            "kubevirt.io/schedulable": "true", "machine-type.node.kubevirt.io/q35": "true",
            "diskhooks.io/capacity-test": self.tag}}})
        self.nodes[node.name] = node
        # TaintNodesByCondition gave it node.kubernetes.io/not-ready: the kubelet would clear it
        self.core.patch_node(node.name, {"spec": {"taints": None}},
                             _content_type="application/merge-patch+json")
        self.core.patch_node_status(node.name, {"status": {
            "capacity": NODE_RESOURCES, "allocatable": NODE_RESOURCES,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "played by the test", "lastHeartbeatTime": now,
                            "lastTransitionTime": now}]}}, _content_type="application/merge-patch+json")

    def advertised(self, node: str) -> tuple[str | None, str | None]:
        status = self.core.read_node(node).status
        return ((status.capacity or {}).get(K.RESOURCE_STORAGE),
                (status.allocatable or {}).get(K.RESOURCE_STORAGE))

    def wait_advertised(self, node: NodeUnderTest, gib: int) -> None:
        wait_for(f"{node.name} advertising {gib} GiB", lambda: self.advertised(node.name) == (str(gib), str(gib)),
                 agent=node.agent)

    # --- a VM start ----------------------------------------------------------------------------
    def create_vm(self, name: str, plan: str) -> dict[str, Any]:
        vm: dict[str, Any] = self.custom.create_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachines",
            {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
             "spec": {"runStrategy": "Always", "template": {
                 "metadata": {"annotations": {K.ANN_PLAN: plan}}, "spec": {"domain": {"devices": {}}}}}})
        return vm

    def create_vmi(self, vm: dict[str, Any], plan: str) -> dict[str, Any]:
        """The VMI virt-controller makes for ``vm`` (not scheduled yet)."""
        meta = vm["metadata"]
        vmi: dict[str, Any] = self.custom.create_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachineinstances",
            {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
             "metadata": {"name": meta["name"], "annotations": {K.ANN_PLAN: plan},
                          "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                               "name": meta["name"], "uid": meta["uid"], "controller": True,
                                               "blockOwnerDeletion": True}]},
             "spec": {"domain": {"devices": {}}}, "status": {"phase": "Scheduling"}})
        return vmi

    def launcher_pod(self, vmi: dict[str, Any], plan: str, *, home: str | None = None) -> dict[str, Any]:
        """KubeVirt's launcher Pod for ``vmi`` (tests/data's real one, renamed), through the real Pod
        mutation; with ``home``, the required affinity the VM's template carries to its home node."""
        review = json.loads((ADMISSION / "virt-launcher-pod-create.json").read_text())
        pod: dict[str, Any] = copy.deepcopy(review["request"]["object"])
        name = vmi["metadata"]["name"]
        meta = pod["metadata"]
        for member in ("generateName", "managedFields", "uid", "resourceVersion", "creationTimestamp"):
            meta.pop(member, None)
        meta.update(name=f"virt-launcher-{name}-{os.urandom(2).hex()}", namespace=self.namespace)
        meta["labels"].update({K.LABEL_CREATED_BY: vmi["metadata"]["uid"], "kubevirt.io/domain": name,
                               "vm.kubevirt.io/name": name, "vmi.kubevirt.io/id": name,
                               K.LABEL_MANAGED: K.LABEL_MANAGED_VALUE})
        meta["annotations"].update({K.ANN_DOMAIN: name, K.ANN_PLAN: plan, K.ANN_HOOK_SIDECARS: json.dumps(
            [{"image": WEBHOOK_POLICY.sidecar.image, "imagePullPolicy": "IfNotPresent",
              "args": ["serve", "--version", "v1alpha3"]}])})
        spec = pod["spec"]
        spec["hostname"] = name
        spec.pop("priority", None)
        spec["nodeSelector"]["diskhooks.io/capacity-test"] = self.tag
        for v in spec["volumes"]:
            if v["name"] == "datadisk":
                v["hostPath"]["path"] = f"{ROOT_DIR}/{self.namespace}/{name}"
        for c in spec["containers"]:
            if c["name"] == "hook-sidecar-0":
                c["image"] = WEBHOOK_POLICY.sidecar.image
                c["args"] = ["serve", "--version", "v1alpha3"]
        if home is not None:
            terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"]
            for term in terms:
                term["matchExpressions"].append({"key": "kubernetes.io/hostname", "operator": "In",
                                                 "values": [home]})
        mutated = mutate_pod(pod, namespace=self.namespace, policy=WEBHOOK_POLICY, plan_keys=KEYS).obj
        created: dict[str, Any] = self.core.api_client.sanitize_for_serialization(
            self.core.create_namespaced_pod(self.namespace, mutated))
        return created

    def bound_to(self, pod: dict[str, Any]) -> str | None:
        node: str | None = self.core.read_namespaced_pod(pod["metadata"]["name"], self.namespace).spec.node_name
        return node

    def wait_bound(self, pod: dict[str, Any]) -> str:
        node: str = wait_for(f"{pod['metadata']['name']} bound", lambda: self.bound_to(pod))
        return node

    def wait_unschedulable(self, pod: dict[str, Any]) -> str:
        message: str = wait_for(f"{pod['metadata']['name']} found unschedulable",
                                lambda: self.unschedulable(pod))
        return message

    def unschedulable(self, pod: dict[str, Any]) -> str | None:
        """The scheduler's message when it found no node for ``pod``."""
        status = self.core.read_namespaced_pod(pod["metadata"]["name"], self.namespace).status
        for c in status.conditions or []:
            if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                message: str = c.message or ""
                return message
        return None

    def run_here(self, vmi: dict[str, Any], pod: dict[str, Any], node: NodeUnderTest,
                 disks: dict[str, int]) -> None:
        """What follows the binding: prepare leaves the images and the home marker on the node, and
        the VMI runs there (its node label, phase and launcher Pod)."""
        name, uid = vmi["metadata"]["name"], vmi["metadata"]["uid"]
        d = node.root / self.namespace / name
        d.mkdir(parents=True, exist_ok=True)
        for disk, size in disks.items():
            image = d / f"{disk}.qcow2"
            if not image.exists():
                subprocess.run([qemu_img(), "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
        node.setup.write_marker(HomeMarker(self.namespace, name, uid, node.name,
                                           datetime.datetime.now(datetime.UTC)))
        self.custom.patch_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachineinstances", name,
            {"metadata": {"labels": {"kubevirt.io/nodeName": node.name}},
             "status": {"phase": "Running", "nodeName": node.name,
                        "activePods": {pod["metadata"]["uid"]: node.name}}},
            _content_type="application/merge-patch+json")

    def stop(self, vmi: dict[str, Any], pod: dict[str, Any]) -> None:
        self.core.delete_namespaced_pod(pod["metadata"]["name"], self.namespace, grace_period_seconds=0)
        self.custom.delete_namespaced_custom_object("kubevirt.io", "v1", self.namespace,
                                                    "virtualmachineinstances", vmi["metadata"]["name"])

    def play_webhook_label(self, vm: str, node: str) -> None:
        """The agent recorded the home (annotation); the webhook mirrors it into the VM label."""
        wait_for(f"the home of {vm}", lambda: (self.vm(vm)["metadata"].get("annotations") or {}).get(K.ANN_NODE)
                 == node, agent=self.nodes[node].agent)
        self.custom.patch_namespaced_custom_object("kubevirt.io", "v1", self.namespace, "virtualmachines", vm,
                                                   {"metadata": {"labels": {K.LABEL_NODE: node}}},
                                                   _content_type="application/merge-patch+json")

    def vm(self, name: str) -> dict[str, Any]:
        vm: dict[str, Any] = self.custom.get_namespaced_custom_object("kubevirt.io", "v1", self.namespace,
                                                                      "virtualmachines", name)
        return vm


@pytest.fixture
def world(envtest: ControlPlane, kube_namespace: str, agent_kubeconfig: Path,
          tmp_path: Path) -> Iterator[Callable[[dict[str, int]], World]]:
    """``world({"a": 10, ...})``: Nodes ``cap-<x>-<tag>`` with a ``<gib>`` GiB tmpfs root each and their
    agents running; everything removed and unmounted at teardown."""
    envtest.start_scheduler()
    tag = os.urandom(3).hex()
    made: list[World] = []
    mounts: list[Path] = []

    def make(sizes: dict[str, int]) -> World:
        w = World(envtest, kube_namespace, tag)
        made.append(w)
        for short, gib in sizes.items():
            name = f"cap-{short}-{tag}"
            setup = make_agent_setup(agent_kubeconfig, tmp_path / name)
            root = setup.node_root()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={gib}g,mode=0755", "tmpfs", str(root)],
                           check=True, capture_output=True)
            mounts.append(root)
            node = NodeUnderTest(name, gib, setup)
            w.add_node(node)
            node.agent = spawn_agent(setup, name)
        return w

    yield make
    for w in made:
        for node in w.nodes.values():
            if node.agent is not None:
                end_agent(node.agent)
            try:
                w.core.delete_node(node.name)
            except Exception:  # noqa: BLE001, S110 - gone already
                pass
        for pod in w.core.list_namespaced_pod(w.namespace).items:
            w.core.delete_namespaced_pod(pod.metadata.name, w.namespace, grace_period_seconds=0)
    for root in reversed(mounts):
        subprocess.run(["umount", str(root)], check=False, capture_output=True)


def metric_is(agent: AgentProcess, name: str, value: float, **labels: str) -> None:
    wait_for(f"{name}{labels or ''} == {value} on {agent.node}", lambda: agent.metric(name, **labels) == value,
             agent=agent)


def first_start(w: World, vm: str, gib: int) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A VM's first start (no home): its VM, VMI and launcher Pod; the plan's text."""
    plan = sign_plan(make_plan(w.namespace, vm, datadisk=gib * GiB), KEYS)
    vm_obj = w.create_vm(vm, plan)
    vmi = w.create_vmi(vm_obj, plan)
    return vmi, w.launcher_pod(vmi, plan), plan


def test_launchers_are_placed_only_where_their_disks_fit(world: Callable[[dict[str, int]], World]) -> None:
    w = world({"a": 10, "b": 20, "c": 40})
    a, b, c = (w.nodes[n] for n in sorted(w.nodes))
    for node in (a, b, c):
        w.wait_advertised(node, node.gib)  # empty: the whole filesystem (overcommit 1)

    placed: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    # each fits on exactly one node at its turn: 35 -> c (room 5), 15 -> b (room 5), 8 -> a (room 2)
    for vm, gib, expected in (("vm35", 35, c), ("vm15", 15, b), ("vm8", 8, a)):
        vmi, pod, _ = first_start(w, vm, gib)
        init = next(x for x in pod["spec"]["initContainers"] if x["name"] == K.PREPARE_CONTAINER)
        assert init["resources"]["requests"][K.RESOURCE_STORAGE] == str(gib)
        bound = w.wait_bound(pod)
        assert bound == expected.name, f"{vm} ({gib} GiB) went to {bound}, not {expected.name}"
        w.run_here(vmi, pod, expected, {"datadisk": gib * GiB})
        placed[vm] = (vmi, pod)
    # running first starts hold their own requests: every node still advertises its whole size,
    # held by the Pods plus the room left (the scheduler subtracts the Pods' requests itself)
    for node, held in ((a, 8), (b, 15), (c, 35)):
        w.wait_advertised(node, node.gib)
        assert node.agent is not None
        metric_is(node.agent, "diskhooks_node_held_gib", held)
        assert node.agent.metric("diskhooks_node_planned_bytes", state="running") == held * GiB

    # fits nowhere: Pending, with the scheduler naming the resource
    for vm, gib in (("vm6", 6), ("vm50", 50)):
        _, pod, _ = first_start(w, vm, gib)
        message = w.wait_unschedulable(pod)
        assert f"Insufficient {K.RESOURCE_STORAGE}" in message, message
        assert w.bound_to(pod) is None
        events = w.core.list_namespaced_event(w.namespace, field_selector=f"involvedObject.name={pod['metadata']['name']}")
        assert any(e.reason == "FailedScheduling" and K.RESOURCE_STORAGE in (e.message or "")
                   for e in events.items)

    # a stopped VM's images keep their space: vm35 stops on c; c advertises 5 (no Pod holds
    # anything now), so the scheduler still sees 5 GiB of room there, not 40
    w.play_webhook_label("vm35", c.name)
    vmi35, pod35 = placed["vm35"]
    w.stop(vmi35, pod35)
    w.wait_advertised(c, 5)
    assert c.agent is not None
    metric_is(c.agent, "diskhooks_node_planned_bytes", 35 * GiB, state="stopped")
    _, pod7, _ = first_start(w, "vm7", 7)
    assert f"Insufficient {K.RESOURCE_STORAGE}" in w.wait_unschedulable(pod7)

    # ... and it starts again on its home node, where its 35 GiB already are: the Pod requests
    # nothing, so a node with 5 GiB of room takes it
    homed = sign_plan(replace(make_plan(w.namespace, "vm35", datadisk=35 * GiB), node=c.name), KEYS)
    vmi = w.create_vmi(w.vm("vm35"), homed)
    pod = w.launcher_pod(vmi, homed, home=c.name)
    init = next(x for x in pod["spec"]["initContainers"] if x["name"] == K.PREPARE_CONTAINER)
    assert K.RESOURCE_STORAGE not in init["resources"]["requests"]
    assert w.wait_bound(pod) == c.name
    w.run_here(vmi, pod, c, {"datadisk": 35 * GiB})
    w.wait_advertised(c, 5)

    # an orphan: vm15 stops, then its VM is deleted; its images stay, counted, listed and reported
    w.play_webhook_label("vm15", b.name)
    vmi15, pod15 = placed["vm15"]
    w.stop(vmi15, pod15)
    w.custom.delete_namespaced_custom_object("kubevirt.io", "v1", w.namespace, "virtualmachines", "vm15")
    assert b.agent is not None
    metric_is(b.agent, "diskhooks_node_orphan_directories", 1)
    assert b.agent.metric("diskhooks_node_orphan_bytes", namespace=w.namespace, vm="vm15") == 15 * GiB
    w.wait_advertised(b, 5)
    assert (b.root / w.namespace / "vm15" / "datadisk.qcow2").exists()  # never deleted

    def orphan_events() -> list[Any]:
        found = w.core.list_namespaced_event("default", field_selector=f"involvedObject.name={b.name}").items
        return [e for e in found if e.reason == K.EVENT_ORPHANED_VM_DIRECTORY]

    event = wait_for("the orphan's Event on the Node", orphan_events)[0]
    assert event.type == "Warning" and event.involved_object.kind == "Node"
    assert f"VM {w.namespace}/vm15, which no longer exists: 15.00 GiB planned" in event.message
    assert [r for r in b.agent.records("capacity.orphan") if r["vm"] == "vm15"]
