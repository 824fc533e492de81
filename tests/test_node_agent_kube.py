"""The node agent against a real kube-apiserver (envtest, ``tests/envtest.py``).

``diskhooks-node serve`` (the installed console script) runs as a subprocess, as the DaemonSet runs it, with a ServiceAccount token
(TokenRequest) bound to a ClusterRole holding only what the agent needs (:data:`AGENT_RULES`), a
policy file, a plan-key directory and ``--host-prefix`` pointing at a temporary node root.

Faked, because they cannot run here: KubeVirt's controllers. The tests create the VMI a
VirtualMachine's start would make (owner reference, ``kubevirt.io/nodeName`` label, the template's
plan annotation, ``status`` as virt-handler writes it) and the home marker prepare would leave.
No webhook is registered: what it adds to these objects is not the agent's concern.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.homemarker import HomeMarker, marker_json
from diskplan.plan import Plan, PlanKeys, PlannedDisk, sign_plan
from tests.conftest import ROOT
from tests.envtest import ControlPlane

ROOT_DIR = "/var/lib/diskhooks/vms"  # hostDisks.root of the policy below
POLICY = f"""hostDisks:
  root: {ROOT_DIR}
sidecar:
  image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0
"""
PLAN_KEY = b"node-agent-test-key-0123456789abcdef"
OTHER_KEY = b"someone-elses-key-0123456789abcdef!!"
AGENT_NAMESPACE = "diskhooks-system"
AGENT_SA = "diskhooks-node"
AGENT_RULES = [
    {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachineinstances"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
WAIT = 30.0
AGENT_SCRIPT = Path(sys.executable).with_name("diskhooks-node")  # the console script pyproject installs


# ------------------------------------------------------------------------------------------------
# objects
# ------------------------------------------------------------------------------------------------
def signed_plan(namespace: str, vm: str, key: bytes = PLAN_KEY) -> str:
    plan = Plan(namespace=namespace, vm=vm, host_dir=f"{ROOT_DIR}/{namespace}/{vm}", image_library=None,
                sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
                disks=(PlannedDisk(name="data", size_bytes=1 << 30, bus="virtio", cache="none", io="native",
                                   discard="unmap"),))
    return sign_plan(plan, PlanKeys(current=key))


def vm_manifest(name: str, plan: str | None, *, running: bool = True) -> dict[str, Any]:
    template: dict[str, Any] = {"spec": {"domain": {"devices": {}}}}
    if plan is not None:
        template["metadata"] = {"annotations": {K.ANN_PLAN: plan}}
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"runStrategy": "Always" if running else "Halted", "template": template}}


def vmi_manifest(vm: dict[str, Any], node: str, plan: str | None) -> dict[str, Any]:
    """The VMI virt-controller makes for ``vm``, as virt-handler on ``node`` leaves it running."""
    meta = vm["metadata"]
    annotations = {} if plan is None else {K.ANN_PLAN: plan}
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": meta["name"], "labels": {"kubevirt.io/nodeName": node},
                         "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                              "name": meta["name"], "uid": meta["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"domain": {"devices": {}}},
            "status": {"phase": "Running", "nodeName": node}}


class Cluster:
    """Admin-side calls the tests make."""

    def __init__(self, envtest: ControlPlane, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.custom: Any = client.CustomObjectsApi(envtest.api)
        self.core: Any = client.CoreV1Api(envtest.api)

    def create_vm(self, name: str, plan: str | None, *, running: bool = True) -> dict[str, Any]:
        vm: dict[str, Any] = self.custom.create_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachines", vm_manifest(name, plan, running=running))
        return vm

    def create_vmi(self, vm: dict[str, Any], node: str, plan: str | None) -> dict[str, Any]:
        vmi: dict[str, Any] = self.custom.create_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachineinstances", vmi_manifest(vm, node, plan))
        return vmi

    def vm(self, name: str) -> dict[str, Any]:
        vm: dict[str, Any] = self.custom.get_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachines", name)
        return vm

    def home(self, name: str) -> str | None:
        value = (self.vm(name)["metadata"].get("annotations") or {}).get(K.ANN_NODE)
        return value if isinstance(value, str) else None

    def events(self, vm: str, reason: str | None = None) -> list[Any]:
        found = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={vm}").items
        return [e for e in found if reason is None or e.reason == reason]


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT, agent: AgentProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if agent is not None and agent.proc.poll() is not None:
            raise AssertionError(f"the agent exited ({agent.proc.returncode}) while waiting for {what}:\n"
                                 + agent.stderr_text())
        if time.monotonic() > deadline:
            tail = "" if agent is None else "\nagent log:\n" + agent.stderr_text()[-4000:]
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------
# the agent process
# ------------------------------------------------------------------------------------------------
@dataclass
class AgentProcess:
    proc: subprocess.Popen[str]
    lines: list[str]
    node: str

    def stderr_text(self) -> str:
        return "\n".join(self.lines)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
        return out

    @property
    def port(self) -> int:
        serving = wait_for("the serving log line", lambda: self.records("serving"), agent=self)
        port: int = serving[0]["metricsPort"]
        return port

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``/metrics`` (0 when absent)."""
        _, text = self.get("/metrics")
        want = {"node": self.node, **labels}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if got == want:
                return float(m.group(3))
        return 0.0


@dataclass(frozen=True)
class AgentSetup:
    kubeconfig: Path
    policy: Path
    keys_dir: Path
    host_prefix: Path

    def node_root(self) -> Path:
        return self.host_prefix / ROOT_DIR.lstrip("/")


@pytest.fixture(scope="session")
def agent_kubeconfig(envtest: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's ServiceAccount with exactly :data:`AGENT_RULES`, as a token kubeconfig."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(envtest.api)
    rbac: Any = client.RbacAuthorizationV1Api(envtest.api)
    try:
        core.create_namespace({"metadata": {"name": AGENT_NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    rbac.create_cluster_role({"metadata": {"name": "diskhooks-node-test"}, "rules": AGENT_RULES})
    rbac.create_cluster_role_binding({
        "metadata": {"name": "diskhooks-node-test"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "diskhooks-node-test"},
        "subjects": [{"kind": "ServiceAccount", "namespace": AGENT_NAMESPACE, "name": AGENT_SA}]})
    return envtest.service_account_kubeconfig(AGENT_NAMESPACE, AGENT_SA,
                                              tmp_path_factory.mktemp("agent") / "kubeconfig")


@pytest.fixture
def setup(agent_kubeconfig: Path, tmp_path: Path) -> AgentSetup:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    keys = tmp_path / "plan-keys"
    keys.mkdir()
    (keys / "current").write_bytes(PLAN_KEY)
    prefix = tmp_path / "host"
    (prefix / ROOT_DIR.lstrip("/")).mkdir(parents=True)
    return AgentSetup(kubeconfig=agent_kubeconfig, policy=policy, keys_dir=keys, host_prefix=prefix)


@pytest.fixture
def cluster(envtest: ControlPlane, kube_namespace: str) -> Cluster:
    return Cluster(envtest, kube_namespace)


@pytest.fixture
def node() -> str:
    """A node name of this test alone (every agent watches the whole cluster by its node label)."""
    return f"node-a-{os.urandom(3).hex()}"


@pytest.fixture
def start_agent(setup: AgentSetup, node: str) -> Iterator[Callable[[], AgentProcess]]:
    started: list[AgentProcess] = []

    def start() -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        proc = subprocess.Popen(
            [str(AGENT_SCRIPT), "serve", "--config", str(setup.policy), "--node-name", node,
             "--kubeconfig", str(setup.kubeconfig), "--host-prefix", str(setup.host_prefix),
             "--metrics-port", "0", "--plan-keys-dir", str(setup.keys_dir)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        lines: list[str] = []
        assert proc.stderr is not None
        stream = proc.stderr

        def pump() -> None:
            for line in stream:
                lines.append(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        agent = AgentProcess(proc, lines, node)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGTERM)
            try:
                agent.proc.wait(10)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait(5)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_home_recorded_from_a_running_vmi_and_not_from_an_untrusted_plan(
        cluster: Cluster, start_agent: Callable[[], AgentProcess], node: str) -> None:
    """A VMI on this node with a signed plan gives its VM a home and an Event; forged, unsigned and
    missing plans give nothing. One VMI exists before the agent starts (seen by the list), one is
    created after (seen by the watch)."""
    ns = cluster.namespace
    before = cluster.create_vm("before", signed_plan(ns, "before"))
    cluster.create_vmi(before, node, signed_plan(ns, "before"))
    forged = cluster.create_vm("forged", signed_plan(ns, "forged"))
    cluster.create_vmi(forged, node, signed_plan(ns, "forged", key=OTHER_KEY))
    unsigned = cluster.create_vm("unsigned", None)
    doc = json.loads(signed_plan(ns, "unsigned"))
    del doc["auth"]
    cluster.create_vmi(unsigned, node, json.dumps(doc))
    copied = cluster.create_vm("copied", None)  # a valid plan of another VM, copied onto this VMI
    cluster.create_vmi(copied, node, signed_plan(ns, "before"))

    agent = start_agent()
    wait_for("the home of VM 'before'", lambda: cluster.home("before") == node, agent=agent)
    recorded = wait_for("a HomeNodeRecorded event", lambda: cluster.events("before", K.EVENT_HOME_NODE_RECORDED),
                        agent=agent)
    assert recorded[0].type == "Normal" and node in recorded[0].message
    assert recorded[0].involved_object.uid == before["metadata"]["uid"]
    assert cluster.vm("before")["metadata"]["labels"][K.LABEL_NODE] == node

    after = cluster.create_vm("after", signed_plan(ns, "after"))
    cluster.create_vmi(after, node, signed_plan(ns, "after"))
    wait_for("the home of VM 'after' (from the watch)", lambda: cluster.home("after") == node, agent=agent)

    wait_for("three refused plans", lambda: agent.metric(
        "diskhooks_node_home_decisions_total", source="vmi", outcome="plan-refused") >= 3, agent=agent)
    for name in ("forged", "unsigned", "copied"):
        assert cluster.home(name) is None, name
        assert cluster.events(name) == [], name
    refused = {r["vm"]: r["reason"] for r in agent.records("home.skipped") if r.get("code") == "plan-refused"}
    assert "does not verify" in refused["forged"]
    assert "not signed" in refused["unsigned"]
    assert "made for VM 'before'" in refused["copied"]
    assert agent.metric("diskhooks_node_homes_recorded_total", source="vmi") == 2


def test_marker_of_a_stopped_vm_records_its_home_and_an_older_marker_is_an_orphan(
        cluster: Cluster, setup: AgentSetup, start_agent: Callable[[], AgentProcess], node: str) -> None:
    """A stopped VM (no VMI) whose directory holds prepare's marker gets its home at the agent's
    start scan; a marker older than its VM (a deleted VM's leftover), a marker of another node and
    a marker of a VM that does not exist are not claimed."""
    ns = cluster.namespace
    stopped = cluster.create_vm("stopped", signed_plan(ns, "stopped"), running=False)
    reused = cluster.create_vm("reused", signed_plan(ns, "reused"), running=False)
    moved = cluster.create_vm("moved", signed_plan(ns, "moved"), running=False)
    created = {name: datetime.datetime.fromisoformat(vm["metadata"]["creationTimestamp"])
               for name, vm in (("stopped", stopped), ("reused", reused), ("moved", moved))}

    def marker(vm: str, written: datetime.datetime, on: str = node) -> None:
        d = setup.node_root() / ns / vm
        d.mkdir(parents=True)
        (d / K.HOME_MARKER).write_bytes(marker_json(HomeMarker(ns, vm, "3f1e7a52-0000-4000-8000-000000000001",
                                                               on, written)))

    marker("stopped", created["stopped"] + datetime.timedelta(seconds=1))
    marker("reused", created["reused"] - datetime.timedelta(hours=1))
    marker("moved", created["moved"] + datetime.timedelta(seconds=1), on="node-b")
    marker("deleted", created["stopped"])

    agent = start_agent()
    wait_for("the home of VM 'stopped'", lambda: cluster.home("stopped") == node, agent=agent)
    event = wait_for("a HomeNodeRecorded event",
                     lambda: cluster.events("stopped", K.EVENT_HOME_NODE_RECORDED), agent=agent)[0]
    assert "home marker" in event.message
    wait_for("two orphans and one foreign marker", lambda: (
        agent.metric("diskhooks_node_home_decisions_total", source="marker", outcome="orphan") >= 2
        and agent.metric("diskhooks_node_home_decisions_total", source="marker",
                         outcome="marker-other-node") >= 1), agent=agent)
    assert cluster.home("reused") is None and cluster.events("reused") == []
    assert cluster.home("moved") is None and cluster.events("moved") == []
    orphans = {r["vm"]: r["reason"] for r in agent.records("home.skipped") if r.get("code") == "orphan"}
    assert "older than the VirtualMachine" in orphans["reused"]
    assert "no VirtualMachine of that name" in orphans["deleted"]
    assert agent.metric("diskhooks_node_homes_recorded_total", source="marker") == 1


def test_a_vmi_on_another_nodes_vm_is_a_warning_and_changes_nothing(
        cluster: Cluster, start_agent: Callable[[], AgentProcess], node: str, envtest: ControlPlane) -> None:
    """A VMI runs here but its VM's home is another node: one Warning Event, the home is kept."""
    ns = cluster.namespace
    vm = cluster.create_vm("elsewhere", signed_plan(ns, "elsewhere"))
    vm = cluster.custom.patch_namespaced_custom_object(
        "kubevirt.io", "v1", ns, "virtualmachines", "elsewhere",
        {"metadata": {"annotations": {K.ANN_NODE: "node-b"}}},
        _content_type="application/merge-patch+json")
    cluster.create_vmi(vm, node, signed_plan(ns, "elsewhere"))
    agent = start_agent()
    warning = wait_for("a HomeNodeConflict event", lambda: cluster.events("elsewhere", "HomeNodeConflict"),
                       agent=agent)[0]
    assert warning.type == "Warning" and "node-b" in warning.message
    assert cluster.home("elsewhere") == "node-b"
    assert cluster.events("elsewhere", K.EVENT_HOME_NODE_RECORDED) == []


def test_serves_metrics_and_health_and_stops_on_sigterm(
        cluster: Cluster, start_agent: Callable[[], AgentProcess], node: str) -> None:
    """``/healthz`` and ``/readyz`` answer 200 once both watches listed, ``/metrics`` has the node's
    figures, and SIGTERM ends the process with status 0 (bounded wait: it must not hang)."""
    ns = cluster.namespace
    vm = cluster.create_vm("counted", signed_plan(ns, "counted"))
    cluster.create_vmi(vm, node, signed_plan(ns, "counted"))
    agent = start_agent()
    wait_for("the home of VM 'counted'", lambda: cluster.home("counted") == node, agent=agent)
    wait_for("/readyz", lambda: agent.get("/readyz")[0] == 200, agent=agent)
    assert agent.get("/healthz") == (200, "ok\n")
    assert agent.get("/nothing")[0] == 404
    wait_for("the VM counted at home", lambda: agent.metric("diskhooks_node_vms") == 1, agent=agent)
    assert agent.metric("diskhooks_node_vmis") == 1
    assert agent.metric("diskhooks_node_images") == 1
    assert agent.metric("diskhooks_node_reconcile_seconds_count", kind="vmi") >= 1
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=10) == 0
    assert agent.records("stopped")[-1]["clean"] is True
