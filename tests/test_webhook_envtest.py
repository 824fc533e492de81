"""The served webhook registered with a real kube-apiserver (envtest), as a cluster runs it.

``python -m webhook.cli serve --self-signed`` (gunicorn, TLS) on a loopback port, registered by a
MutatingWebhookConfiguration (``clientConfig.url`` + ``caBundle``, VM CREATE/UPDATE and VMI CREATE,
``namespaceSelector`` on ``diskhooks.io/enabled``, ``sideEffects: None``, ``failurePolicy: Fail``,
``reinvocationPolicy: IfNeeded``, as the chart writes it). The API server calls it for real, with
the requester's ``userInfo``; the test acts as a plain user with RBAC rights on VMs and as the node
agent's ServiceAccount by impersonation (``tests/envtest.py``). Nothing here is faked; what does
not run is KubeVirt's controllers (no VMI is made from a VM), the scheduler and kubelets.

The home node end to end: a diskhooks VM is mutated (plan, sidecar); the agent's merge patch of
``diskhooks.io/node`` gives the VM the label, the required node affinity and a plan naming the
node; the plain user may neither set nor change it (the webhook's denial, with the rule, reaches
them through the API server), and a user's update that omits it keeps it.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.plan import Plan, PlanKeys, verify_plan
from tests.conftest import EXAMPLE_POLICY, ROOT
from tests.envtest import ControlPlane, free_port
from webhook.vm.home import REQUIRED, home_expression

GROUP, VERSION, PLURAL = "kubevirt.io", "v1", "virtualmachines"
PLAN_KEY = b"envtest-plan-key-0123456789abcdef"
AGENT_NAME = "diskhooks-node"
ALICE = "alice"
NODE_FIELD = f"metadata.annotations[{K.ANN_NODE}]"
START_TIMEOUT = 60.0


class Webhook:
    """The real webhook server (self-signed TLS) with a policy naming ``agent_ns/diskhooks-node``
    as the node agent."""

    def __init__(self, work: Path, agent_ns: str) -> None:
        self.work = work
        self.port = free_port()
        self.tls_dir = work / "tls"
        keys = work / "plan-keys"
        keys.mkdir()
        (keys / "current").write_bytes(PLAN_KEY + b"\n")
        policy = work / "policy.yaml"
        text = EXAMPLE_POLICY.read_text()
        assert "serviceAccount: diskhooks-system/diskhooks-node" in text
        policy.write_text(text.replace("serviceAccount: diskhooks-system/diskhooks-node",
                                       f"serviceAccount: {agent_ns}/{AGENT_NAME}"))
        self.log_path = work / "webhook.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "webhook.cli", "serve", "--config", str(policy), "--self-signed",
             "--tls-dir", str(self.tls_dir), "--bind-address", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--plan-keys-dir", str(keys), "--drain-seconds", "0",
             "--cluster-objects", str(ROOT / "examples" / "demo" / "cluster-objects.yaml")],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.tls_dir / "ca.crt").exists() or not self._ready():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, f"the webhook did not start:\n{self.log_path.read_text()}"
            time.sleep(0.1)

    def _ready(self) -> bool:
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/readyz", context=ctx,
                                        timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    @property
    def ca_bundle(self) -> str:
        return base64.b64encode((self.tls_dir / "ca.crt").read_bytes()).decode()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def webhook_configuration(name: str, hook: Webhook) -> dict[str, Any]:
    common = {"admissionReviewVersions": ["v1"], "sideEffects": "None", "timeoutSeconds": 10,
              "failurePolicy": "Fail", "reinvocationPolicy": "IfNeeded",
              "namespaceSelector": {"matchLabels": {"diskhooks.io/enabled": "true"}},
              "clientConfig": {"url": f"https://127.0.0.1:{hook.port}/mutate", "caBundle": hook.ca_bundle}}
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {"name": "vm.diskhooks.io", **common, "rules": [
                    {"apiGroups": [GROUP], "apiVersions": [VERSION], "resources": [PLURAL],
                     "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}]},
                {"name": "vmi.diskhooks.io", **common, "rules": [
                    {"apiGroups": [GROUP], "apiVersions": [VERSION],
                     "resources": ["virtualmachineinstances"], "operations": ["CREATE"],
                     "scope": "Namespaced"}]},
            ]}


def new_vm(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "annotations": {K.ANN_DISKS: "[{name: data, size: 2Gi}]"}},
        "spec": {"runStrategy": "Halted", "template": {
            "metadata": {"labels": {"kubevirt.io/domain": name}},
            "spec": {"domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                                "resources": {"requests": {"memory": "1Gi"}}},
                     "volumes": [{"name": "root",
                                  "containerDisk": {"image": "quay.io/containerdisks/fedora:41"}}]}}},
    }


class Cluster:
    """What one module's tests share: the API server, the webhook, a namespace, two identities."""

    def __init__(self, plane: ControlPlane, namespace: str, agent_ns: str) -> None:
        from kubernetes import client

        self.plane, self.namespace, self.agent_ns = plane, namespace, agent_ns
        self.agent_user = f"system:serviceaccount:{agent_ns}:{AGENT_NAME}"
        self.admin: Any = client.CustomObjectsApi(plane.api)
        self.alice: Any = client.CustomObjectsApi(plane.client(ALICE))
        self.agent: Any = client.CustomObjectsApi(plane.service_account_client(agent_ns, AGENT_NAME))

    def get(self, name: str) -> dict[str, Any]:
        vm: dict[str, Any] = self.admin.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                     name)
        return vm

    def create(self, api: Any, vm: dict[str, Any], **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, vm,
                                                                  **kw)
        return out

    def patch(self, api: Any, name: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                                 body)
        return out


@pytest.fixture(scope="module")
def cluster(envtest: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from kubernetes import client

    core: Any = client.CoreV1Api(envtest.api)
    rbac: Any = client.RbacAuthorizationV1Api(envtest.api)
    admission: Any = client.AdmissionregistrationV1Api(envtest.api)
    agent_ns = envtest.namespace("dh-agent")
    namespace = envtest.namespace("vms")
    core.patch_namespace(namespace, {"metadata": {"labels": {"diskhooks.io/enabled": "true"}}})
    core.create_namespaced_service_account(agent_ns, {"metadata": {"name": AGENT_NAME}})
    suffix = secrets.token_hex(4)
    role = f"dh-envtest-vm-editor-{suffix}"
    agent_role = f"dh-envtest-agent-{suffix}"
    rbac.create_cluster_role({"metadata": {"name": role}, "rules": [
        {"apiGroups": [GROUP], "resources": [PLURAL],
         "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "alice-edits-vms"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": ALICE}]})
    # what the chart grants the agent: read VMs, patch them (RBAC cannot narrow patch to metadata)
    rbac.create_cluster_role({"metadata": {"name": agent_role}, "rules": [
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]}]})
    rbac.create_cluster_role_binding({
        "metadata": {"name": agent_role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": agent_role},
        "subjects": [{"kind": "ServiceAccount", "name": AGENT_NAME, "namespace": agent_ns}]})
    hook = Webhook(tmp_path_factory.mktemp("webhook"), agent_ns)
    config = f"diskhooks-envtest-{suffix}"
    try:
        admission.create_mutating_webhook_configuration(webhook_configuration(config, hook))
        c = Cluster(envtest, namespace, agent_ns)
        _wait_until_called(c)
        yield c
    finally:
        try:
            admission.delete_mutating_webhook_configuration(config)
        finally:
            hook.stop()
            rbac.delete_cluster_role_binding(agent_role)
            rbac.delete_cluster_role(agent_role)
            rbac.delete_cluster_role(role)
            envtest.delete_namespace(namespace)
            envtest.delete_namespace(agent_ns)


def _wait_until_called(c: Cluster) -> None:
    """The API server picks a new webhook configuration up a moment later: probe with dry-run
    creates until one comes back mutated."""
    deadline = time.monotonic() + 30
    while True:
        probe = c.create(c.admin, new_vm("probe"), dry_run="All")
        if K.ANN_PLAN in (probe["spec"]["template"]["metadata"].get("annotations") or {}):
            return
        assert time.monotonic() < deadline, "the API server never called the webhook"
        time.sleep(0.3)


def plan_of(vm: dict[str, Any], namespace: str) -> Plan:
    return verify_plan(vm["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN],
                       PlanKeys(current=PLAN_KEY), namespace=namespace, vm=vm["metadata"]["name"])


def required_terms(vm: dict[str, Any]) -> list[Any]:
    aff = vm["spec"]["template"]["spec"].get("affinity") or {}
    return list(((aff.get("nodeAffinity") or {}).get(REQUIRED) or {}).get("nodeSelectorTerms") or [])


def denial(call: Any) -> tuple[int, str]:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as err:
        call()
    body = json.loads(err.value.body or "{}")
    return int(err.value.status), str(body["message"])


# ------------------------------------------------------------------------------------------------
def test_a_diskhooks_vm_is_mutated_by_the_served_webhook(cluster: Cluster) -> None:
    vm = cluster.create(cluster.alice, new_vm("pg01"))
    plan = plan_of(vm, cluster.namespace)
    assert [d.name for d in plan.disks] == ["data"] and plan.node is None
    tmeta = vm["spec"]["template"]["metadata"]
    assert tmeta["labels"][K.LABEL_MANAGED] == K.LABEL_MANAGED_VALUE
    assert json.loads(tmeta["annotations"][K.ANN_HOOK_SIDECARS])[-1]["args"] == ["serve", "--version",
                                                                                   "v1alpha3"]
    assert K.LABEL_NODE not in (vm["metadata"].get("labels") or {})


def test_the_agent_records_the_home_node(cluster: Cluster) -> None:
    cluster.create(cluster.alice, new_vm("pg02"))
    vm = cluster.patch(cluster.agent, "pg02", {"metadata": {"annotations": {K.ANN_NODE: "node-a"}}})
    assert vm["metadata"]["annotations"][K.ANN_NODE] == "node-a"
    assert vm["metadata"]["labels"][K.LABEL_NODE] == "node-a"
    assert required_terms(vm) == [{"matchExpressions": [home_expression("node-a")]}]
    plan = plan_of(vm, cluster.namespace)
    assert plan.node == "node-a" and plan.version == 3
    assert cluster.get("pg02") == vm  # stored as the webhook made it
    # the agent may change nothing else (RBAC lets it patch anything; the webhook does not)
    status, message = denial(lambda: cluster.patch(cluster.agent, "pg02", {
        "metadata": {"annotations": {K.ANN_NODE: "node-b"}}, "spec": {"runStrategy": "Always"}}))
    assert status == 403
    assert f"{NODE_FIELD}: the diskhooks node agent ({cluster.agent_user}) may change only this " \
        "annotation of a VirtualMachine, but this update also changes spec.runStrategy" in message
    assert cluster.get("pg02") == vm


def test_a_plain_user_may_not_set_or_change_it(cluster: Cluster) -> None:
    rule = (f"{NODE_FIELD}: only the diskhooks node agent ({cluster.agent_user}) may set the home node; "
            "move a VM with kubectl diskhooks migrate")
    created = cluster.create(cluster.alice, new_vm("pg03"))
    status, message = denial(lambda: cluster.patch(cluster.alice, "pg03", {
        "metadata": {"annotations": {K.ANN_NODE: "node-a"}}}))
    assert status == 403 and 'admission webhook "vm.diskhooks.io" denied the request' in message
    assert rule in message
    assert cluster.get("pg03") == created
    homed = cluster.patch(cluster.agent, "pg03", {"metadata": {"annotations": {K.ANN_NODE: "node-a"}}})
    status, message = denial(lambda: cluster.patch(cluster.alice, "pg03", {
        "metadata": {"annotations": {K.ANN_NODE: "node-b"}}}))
    assert status == 403 and rule in message
    status, message = denial(lambda: cluster.create(cluster.alice, {
        **new_vm("pg04"), "metadata": {"name": "pg04", "annotations": {K.ANN_NODE: "node-a"}}}))
    assert status == 403 and rule in message
    assert cluster.get("pg03") == homed


def test_a_users_update_omitting_it_keeps_it(cluster: Cluster) -> None:
    from kubernetes import client

    cluster.create(cluster.alice, new_vm("pg05"))
    homed = cluster.patch(cluster.agent, "pg05", {"metadata": {"annotations": {K.ANN_NODE: "node-a"}}})
    replacement = new_vm("pg05")  # kubectl replace of the original manifest, with a new label
    replacement["metadata"]["resourceVersion"] = homed["metadata"]["resourceVersion"]
    replacement["metadata"]["labels"] = {"team": "db", K.LABEL_NODE: "node-x"}
    api: Any = client.CustomObjectsApi(cluster.plane.client(ALICE))
    vm, status, headers = api.replace_namespaced_custom_object_with_http_info(
        GROUP, VERSION, cluster.namespace, PLURAL, "pg05", replacement)
    assert status == 200
    assert vm["metadata"]["annotations"][K.ANN_NODE] == "node-a"
    assert vm["metadata"]["labels"] == {"team": "db", K.LABEL_NODE: "node-a"}
    assert required_terms(vm) == required_terms(homed)
    assert plan_of(vm, cluster.namespace).node == "node-a"
    warning = str((headers or {}).get("Warning", ""))
    assert f"{NODE_FIELD}: this update omits the VM's home node" in warning
