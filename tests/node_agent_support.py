"""What the node agent's tests against the real API server share (a pytest plugin: tests/conftest.py).

- :func:`agent_kubeconfig` (session): the agent's ServiceAccount ``diskhooks-system/diskhooks-node``
  bound to a ClusterRole with exactly :data:`AGENT_RULES`, as a kubeconfig holding a real token
  (TokenRequest, as the kubelet gets one for a Pod).
- :func:`agent_setup`: a policy file, a plan-key directory and a node root (``--host-prefix``);
  :meth:`AgentSetup.prepare_ran` leaves there the home marker prepare writes for a VMI.
- :func:`cluster`: admin-side calls in the test's namespace; :func:`agent_node`: a node name of the
  test alone (agents watch the whole cluster by node label, and namespaces of earlier tests stay).
- :func:`start_agent`: ``diskhooks-node serve`` (the installed console script) as a subprocess, its
  JSON log lines collected; stopped with SIGTERM at teardown.

Faked, because they cannot run here: KubeVirt's controllers. The tests create the VMI a VM's start
would make (owner reference, ``kubevirt.io/nodeName``, the plan annotation, ``status`` as
virt-handler writes it).
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
from tests.envtest import ControlPlane

ROOT = Path(__file__).resolve().parent.parent
ROOT_DIR = "/var/lib/diskhooks/vms"  # hostDisks.root of POLICY
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
    {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachineinstances"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    # capacity (nodeagent/nodestatus.py): read its Node, advertise diskhooks.io/storage on its status
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
]
AGENT_SCRIPT = Path(sys.executable).with_name("diskhooks-node")  # the console script pyproject installs
WAIT = 30.0
GiB = 1 << 30


# ------------------------------------------------------------------------------------------------
# objects
# ------------------------------------------------------------------------------------------------
def make_plan(namespace: str, vm: str, **sizes: int) -> Plan:
    """A plan with one qcow2 disk per ``name=bytes`` (default: ``data`` of 1 GiB)."""
    disks = tuple(PlannedDisk(name=name, size_bytes=size, bus="virtio", cache="none", io="native",
                              discard="unmap") for name, size in (sizes or {"data": GiB}).items())
    return Plan(namespace=namespace, vm=vm, host_dir=f"{ROOT_DIR}/{namespace}/{vm}", image_library=None,
                sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0", disks=disks)


def signed_plan(namespace: str, vm: str, key: bytes = PLAN_KEY, **sizes: int) -> str:
    return sign_plan(make_plan(namespace, vm, **sizes), PlanKeys(current=key))


def vm_manifest(name: str, plan: str | None, *, running: bool = True,
                home: str | None = None) -> dict[str, Any]:
    """A VirtualMachine with ``plan`` on its template (as the webhook writes it) and, with ``home``,
    the home node annotation and label (as the agent and the webhook leave them)."""
    template: dict[str, Any] = {"spec": {"domain": {"devices": {}}}}
    if plan is not None:
        template["metadata"] = {"annotations": {K.ANN_PLAN: plan}}
    meta: dict[str, Any] = {"name": name}
    if home is not None:
        meta["annotations"] = {K.ANN_NODE: home}
        meta["labels"] = {K.LABEL_NODE: home}
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta,
            "spec": {"runStrategy": "Always" if running else "Halted", "template": template}}


def vmi_manifest(vm: dict[str, Any], node: str, plan: str | None, *,
                 pod_uid: str | None = None) -> dict[str, Any]:
    """The VMI virt-controller makes for ``vm``, as virt-handler on ``node`` leaves it running
    (with ``pod_uid``: its launcher Pod in ``status.activePods``)."""
    meta = vm["metadata"]
    annotations = {} if plan is None else {K.ANN_PLAN: plan}
    status: dict[str, Any] = {"phase": "Running", "nodeName": node}
    if pod_uid is not None:
        status["activePods"] = {pod_uid: node}
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": meta["name"], "labels": {"kubevirt.io/nodeName": node},
                         "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                              "name": meta["name"], "uid": meta["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"domain": {"devices": {}}},
            "status": status}


class Cluster:
    """Admin-side calls the tests make in one namespace."""

    def __init__(self, envtest: ControlPlane, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.custom: Any = client.CustomObjectsApi(envtest.api)
        self.core: Any = client.CoreV1Api(envtest.api)

    def create_vm(self, name: str, plan: str | None, *, running: bool = True,
                  home: str | None = None) -> dict[str, Any]:
        vm: dict[str, Any] = self.custom.create_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachines",
            vm_manifest(name, plan, running=running, home=home))
        return vm

    def create_vmi(self, vm: dict[str, Any], node: str, plan: str | None, *,
                   pod_uid: str | None = None) -> dict[str, Any]:
        vmi: dict[str, Any] = self.custom.create_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachineinstances",
            vmi_manifest(vm, node, plan, pod_uid=pod_uid))
        return vmi

    def patch_vm(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        vm: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachines", name, patch,
            _content_type="application/merge-patch+json")
        return vm

    def patch_vmi(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A change to the VMI (the VMI CRD has no status subresource: status is patched as it is)."""
        vmi: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            "kubevirt.io", "v1", self.namespace, "virtualmachineinstances", name, patch,
            _content_type="application/merge-patch+json")
        return vmi

    def set_template_plan(self, name: str, plan: str) -> dict[str, Any]:
        """What the webhook's VM UPDATE leaves: a new plan on the template."""
        return self.patch_vm(name, {"spec": {"template": {"metadata": {"annotations": {K.ANN_PLAN: plan}}}}})

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

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM; the exit status (a hang past ``timeout`` fails the test)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


StartAgent = Callable[..., "AgentProcess"]  # the start_agent fixture


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT,
             agent: AgentProcess | None = None) -> Any:
    """Poll ``check`` until it returns something true; fail with the agent's log after ``timeout``."""
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


@dataclass(frozen=True)
class AgentSetup:
    kubeconfig: Path
    policy: Path
    keys_dir: Path
    host_prefix: Path

    def node_root(self) -> Path:
        """``hostDisks.root`` as the agent sees it (below ``--host-prefix``)."""
        return self.host_prefix / ROOT_DIR.lstrip("/")

    def prepare_ran(self, vmi: dict[str, Any], node: str, *,
                    written: datetime.datetime | None = None) -> Path:
        """What prepare leaves when ``vmi``'s launcher runs on ``node``: ``home.node.json`` in its
        VM's directory (named by its owner reference), with the VMI's UID and this node (the
        content of :func:`diskplan.homemarker.marker_json`, the writer prepare uses)."""
        meta = vmi["metadata"]
        vm = next(r["name"] for r in meta["ownerReferences"] if r.get("controller"))
        return self.write_marker(HomeMarker(meta["namespace"], vm, meta["uid"], node,
                                            written or datetime.datetime.now(datetime.UTC)))

    def write_marker(self, marker: HomeMarker) -> Path:
        d = self.node_root() / marker.namespace / marker.vm
        d.mkdir(parents=True, exist_ok=True)
        path = d / K.HOME_MARKER
        tmp = d / f".{K.HOME_MARKER}.tmp"
        tmp.write_bytes(marker_json(marker))
        tmp.rename(path)  # prepare publishes it atomically: the agent never reads half a marker
        return path


def make_agent_kubeconfig(envtest: ControlPlane, path: Path, *, role: str = "diskhooks-node-test") -> Path:
    """The agent's ServiceAccount bound to a ClusterRole ``role`` with exactly :data:`AGENT_RULES`,
    and a kubeconfig at ``path`` holding a real token of it."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(envtest.api)
    rbac: Any = client.RbacAuthorizationV1Api(envtest.api)
    try:
        core.create_namespace({"metadata": {"name": AGENT_NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    rbac.create_cluster_role({"metadata": {"name": role}, "rules": AGENT_RULES})
    rbac.create_cluster_role_binding({
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "namespace": AGENT_NAMESPACE, "name": AGENT_SA}]})
    return envtest.service_account_kubeconfig(AGENT_NAMESPACE, AGENT_SA, path)


def make_agent_setup(kubeconfig: Path, directory: Path) -> AgentSetup:
    """A policy file (:data:`POLICY`), a plan-key directory (:data:`PLAN_KEY`) and a node root below
    ``directory`` (made when missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    keys = directory / "plan-keys"
    keys.mkdir()
    (keys / "current").write_bytes(PLAN_KEY)
    prefix = directory / "host"
    (prefix / ROOT_DIR.lstrip("/")).mkdir(parents=True)
    return AgentSetup(kubeconfig=kubeconfig, policy=policy, keys_dir=keys, host_prefix=prefix)


def spawn_agent(setup: AgentSetup, node: str, *, host_prefix: Path | None = None,
                kubelet_pods_dir: str | None = None) -> AgentProcess:
    """``diskhooks-node serve`` (the installed console script) as a subprocess, its stderr lines
    collected by a thread; no ``KUBE*`` variable of this process reaches it."""
    assert AGENT_SCRIPT.exists(), f"{AGENT_SCRIPT} is missing: run scripts/setup.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    argv = [str(AGENT_SCRIPT), "serve", "--config", str(setup.policy), "--node-name", node,
            "--kubeconfig", str(setup.kubeconfig), "--host-prefix", str(host_prefix or setup.host_prefix),
            "--metrics-port", "0", "--plan-keys-dir", str(setup.keys_dir)]
    if kubelet_pods_dir is not None:
        argv += ["--kubelet-pods-dir", kubelet_pods_dir]
    return start_agent_process(argv, env, node)


def start_agent_process(argv: list[str], env: dict[str, str], node: str, *,
                        new_session: bool = False) -> AgentProcess:
    """Start an agent command line, its stderr lines collected by a thread."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)
    lines: list[str] = []
    assert proc.stderr is not None
    stream = proc.stderr

    def pump() -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return AgentProcess(proc, lines, node)


def end_agent(agent: AgentProcess) -> None:
    """SIGTERM, then SIGKILL after 10 s (by PID)."""
    if agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGTERM)
        try:
            agent.proc.wait(10)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait(5)


@pytest.fixture(scope="session")
def agent_kubeconfig(envtest: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_agent_kubeconfig(envtest, tmp_path_factory.mktemp("agent") / "kubeconfig")


@pytest.fixture
def agent_setup(agent_kubeconfig: Path, tmp_path: Path) -> AgentSetup:
    return make_agent_setup(agent_kubeconfig, tmp_path)


@pytest.fixture
def cluster(envtest: ControlPlane, kube_namespace: str) -> Cluster:
    return Cluster(envtest, kube_namespace)


@pytest.fixture
def agent_node() -> str:
    return f"node-a-{os.urandom(3).hex()}"


@pytest.fixture
def start_agent(agent_setup: AgentSetup, agent_node: str) -> Iterator[Callable[..., AgentProcess]]:
    """``start_agent(host_prefix=..., kubelet_pods_dir=...)``: the agent as a subprocess."""
    started: list[AgentProcess] = []

    def start(*, host_prefix: Path | None = None, kubelet_pods_dir: str | None = None) -> AgentProcess:
        agent = spawn_agent(agent_setup, agent_node, host_prefix=host_prefix,
                            kubelet_pods_dir=kubelet_pods_dir)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        end_agent(agent)
