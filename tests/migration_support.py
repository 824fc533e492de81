"""What the cold-migration tests share: two nodes on one machine, their agents, the webhook, TLS.

Two node agents (``diskhooks-node serve`` subprocesses) stand in for two nodes: each has its own
``--node-name``, ``--host-prefix`` (its node's filesystem) and loopback address (127.0.0.2 and
127.0.0.3, the InternalIP of its Node object), the same migration port. The real kube-apiserver
(envtest) stores the VMs, Nodes and Events; the real webhook (``webhook.cli serve``, registered by a
MutatingWebhookConfiguration) admits every VM write, with Nodes from a cluster-objects file. The
user is a ServiceAccount ``alice`` with RBAC rights on VMs (a kubeconfig with a real token), the
agents the chart's ServiceAccount. Real rsync, real TLS (a CA and an agent certificate made here).

Faked, because they cannot run here: KubeVirt's controllers and the launcher. The VM directory is
made as prepare leaves it (qcow2 images made by qemu-img, one on a library base with its base record,
a persistent root overlay and its record, the home marker), not by a VM start.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from diskplan import keys as K
from diskplan.homemarker import HomeMarker, marker_json
from nodeagent.migrate.tlsfiles import PEER_NAME
from tests.envtest import ControlPlane, free_port
from tests.node_agent_support import AGENT_NAMESPACE, AGENT_SA, AgentProcess, start_agent_process

ROOT = Path(__file__).resolve().parent.parent
VMS_ROOT = "/var/lib/diskhooks/vms"
LIBRARY = "/var/lib/diskhooks/images"
POLICY = f"""hostDisks:
  root: {VMS_ROOT}
  imageLibrary: {LIBRARY}
sidecar:
  image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0
nodeAgent:
  serviceAccount: {AGENT_NAMESPACE}/{AGENT_SA}
"""
PLAN_KEY = b"migration-test-plan-key-0123456789abcdef"
AGENT_SCRIPT = Path(sys.executable).with_name("diskhooks-node")
COMMAND = Path(sys.executable).with_name("kubectl-diskhooks")
GROUP, VERSION = "kubevirt.io", "v1"
MiB, GiB = 1 << 20, 1 << 30
BASE_FILE = "base-a.qcow2"


# ------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------
def make_tls(directory: Path, *, name: str = PEER_NAME, ca: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """``ca.crt``, ``tls.crt``, ``tls.key`` in ``directory``: a CA (new, or ``ca`` = (cert, key)) and
    an agent certificate for ``name`` with serverAuth and clientAuth. Returns the CA."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test-ca-{secrets.token_hex(3)}")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        ca = (ca_cert, ca_key)
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (directory / "tls.key").chmod(0o600)
    return ca


# ------------------------------------------------------------------------------------------------
# a node's files
# ------------------------------------------------------------------------------------------------
def qimg(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qio(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, text=True)


def write_random(path: Path, offset: int, length: int) -> None:
    """Random bytes (incompressible) at ``offset`` of the guest view of qcow2 ``path``."""
    raw = path.with_suffix(".chunk")
    raw.write_bytes(os.urandom(length))
    try:
        qio(path, f"write -s {raw} {offset} {length}")  # -s: the buffer filled from that file
    finally:
        raw.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class NodeFiles:
    """One node's filesystem (``--host-prefix``)."""

    prefix: Path

    @property
    def root(self) -> Path:
        return self.prefix / VMS_ROOT.lstrip("/")

    @property
    def library(self) -> Path:
        return self.prefix / LIBRARY.lstrip("/")

    def vm_dir(self, namespace: str, vm: str) -> Path:
        return self.root / namespace / vm

    def kept(self, namespace: str) -> Path:
        return self.root / ".diskhooks" / "migrate" / "kept" / namespace

    def staging(self, namespace: str, vm: str) -> Path:
        return self.root / ".diskhooks" / "migrate" / "incoming" / namespace / vm


def make_base(library: Path, *, seed: bytes = b"base") -> Path:
    """A library base (qcow2, 64 MiB virtual, 8 MiB written) with content fixed by ``seed``."""
    library.mkdir(parents=True, exist_ok=True)
    base = library / BASE_FILE
    qimg("create", "-q", "-f", "qcow2", str(base), str(64 * MiB))
    pattern = hashlib.sha256(seed).digest()[0]
    qio(base, f"write -P {pattern} 0 8M")
    return base


def make_vm_dir(node: NodeFiles, namespace: str, vm: str, *, node_name: str, data_mib: int = 48,
                data_size: int = GiB) -> Path:
    """A VM directory as prepare leaves it after a first start on ``node_name``: ``data.qcow2``
    (``data_size`` virtual, ``data_mib`` MiB of random data in four places), ``logs.qcow2`` on the
    library base with ``logs.base.json``, a persistent root overlay with its record, the marker."""
    d = node.vm_dir(namespace, vm)
    d.mkdir(parents=True)
    data = d / "data.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(data), str(data_size))
    quarter = max(1, data_mib // 4) * MiB
    for i in range(4):
        write_random(data, i * (data_size // 4), quarter)
    base = node.library / BASE_FILE
    logs = d / "logs.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(logs), str(256 * MiB))
    write_random(logs, 16 * MiB, 4 * MiB)
    qimg("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", f"{K.LAUNCHER_IMAGE_LIBRARY}/{BASE_FILE}",
         str(logs))
    st = base.stat()
    record = {"base": "base-a", "file": BASE_FILE, "format": "qcow2", "virtualSize": 64 * MiB,
              "sha256": sha256_file(base), "overlay": "logs.qcow2",
              "identity": {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                           "mtimeNs": st.st_mtime_ns, "ctimeNs": st.st_ctime_ns}}
    (d / "logs.base.json").write_text(json.dumps(record, sort_keys=True, indent=1) + "\n")
    root = d / "persist-root.rootdisk.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(root), str(128 * MiB))
    write_random(root, 0, 4 * MiB)
    qimg("rebase", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", K.container_disk_path(0), str(root))
    (d / "persist-root.rootdisk.base.json").write_text(json.dumps({
        "image": "quay.io/containerdisks/fedora:41", "sha256": "ab" * 32, "format": "raw",
        "virtualSize": 128 * MiB, "vmiUID": "0d5c0000-1111-2222-3333-444455556666",
        "overlay": "persist-root.rootdisk.qcow2"}, sort_keys=True, indent=1) + "\n")
    marker = HomeMarker(namespace=namespace, vm=vm, vmi_uid="0d5c0000-1111-2222-3333-444455556666",
                        node=node_name, written_at=datetime.datetime.now(datetime.UTC))
    (d / K.HOME_MARKER).write_bytes(marker_json(marker))
    for f in d.iterdir():
        f.chmod(0o660)
    return d


def allocated(directory: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())


def compare_images(a: Path, a_library: Path, b: Path, b_library: Path) -> None:
    """``qemu-img compare`` of two qcow2 images (guest view), each with its own node's base when it
    has one (the header names the launcher's path, which only exists in a launcher)."""
    def spec(path: Path, library: Path) -> str:
        info = json.loads(qimg("info", "-U", "--output=json", str(path)))
        doc: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}}
        backing = info.get("backing-filename")
        if backing and backing.startswith(K.LAUNCHER_IMAGE_LIBRARY):
            doc["backing"] = {"driver": "qcow2", "file": {
                "driver": "file", "filename": str(library / backing.rsplit("/", 1)[1])}}
        elif backing:
            doc["backing"] = None  # a containerDisk: compare the overlays' own clusters
        return "json:" + json.dumps(doc)

    out = subprocess.run(["qemu-img", "compare", "-U", spec(a, a_library), spec(b, b_library)],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0, f"qemu-img compare {a} {b}: {out.stdout}{out.stderr}"


# ------------------------------------------------------------------------------------------------
# the cluster: webhook, user, nodes
# ------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    plane: ControlPlane
    namespace: str
    work: Path
    policy: Path
    keys_dir: Path
    agent_kubeconfig: Path
    alice_kubeconfig: Path
    tls_dir: Path
    port: int
    nodes: dict[str, str]  # node name -> address
    webhook: subprocess.Popen[bytes]
    cleanup: list[Any] = field(default_factory=list)

    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.plane.api)

    def vm(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom().get_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                                          "virtualmachines", name)
        return obj

    def annotations(self, name: str) -> dict[str, Any]:
        return dict(self.vm(name)["metadata"].get("annotations") or {})

    def status(self, name: str) -> dict[str, Any] | None:
        text = self.annotations(name).get("diskhooks.io/migration-status")
        return json.loads(text) if text else None

    def events(self, vm: str) -> list[str]:
        from kubernetes import client

        found = client.CoreV1Api(self.plane.api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={vm}").items
        return [str(e.reason) for e in found]

    def create_vm(self, name: str, *, running: bool = False) -> dict[str, Any]:
        """Through the webhook, as alice: two disks (one on the library base) and a persistent root."""
        from kubernetes import client

        api = _alice_api(self)
        try:
            custom: Any = client.CustomObjectsApi(api)
            vm: dict[str, Any] = custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "virtualmachines", vm_manifest(name, running=running))
        finally:
            api.close()
        return vm

    def alice_patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """A merge patch as alice (through the webhook)."""
        from kubernetes import client

        api = _alice_api(self)
        try:
            custom: Any = client.CustomObjectsApi(api)
            out: dict[str, Any] = custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "virtualmachines", name, body,
                _content_type="application/merge-patch+json")
        finally:
            api.close()
        return out

    def agent_patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes import client

        api = self.plane.service_account_client(AGENT_NAMESPACE, AGENT_SA)
        custom: Any = client.CustomObjectsApi(api)
        out: dict[str, Any] = custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "virtualmachines", name, body,
            _content_type="application/merge-patch+json")
        return out


def _alice_api(setup: Setup) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(setup.alice_kubeconfig))


def vm_manifest(name: str, *, running: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "annotations": {
            K.ANN_DISKS: "[{name: data, size: 1Gi}, {name: logs, size: 256Mi, backing: base-a}]",
            K.ANN_PERSIST_ROOT: "true"}},
        "spec": {"runStrategy": "Always" if running else "Halted", "template": {
            "metadata": {"labels": {"kubevirt.io/domain": name}},
            "spec": {"domain": {"devices": {"disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}]},
                                "resources": {"requests": {"memory": "1Gi"}}},
                     "volumes": [{"name": "rootdisk",
                                  "containerDisk": {"image": "quay.io/containerdisks/fedora:41"}}]}}},
    }


def _webhook(work: Path, policy: Path, keys: Path, nodes: dict[str, str]) -> tuple[subprocess.Popen[bytes], int,
                                                                                  Path]:
    objects = work / "cluster-objects.yaml"
    objects.write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}} for n in nodes]))
    port = free_port()
    tls = work / "webhook-tls"
    log = open(work / "webhook.log", "wb")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "webhook.cli", "serve", "--config", str(policy), "--self-signed",
         "--tls-dir", str(tls), "--bind-address", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--plan-keys-dir", str(keys), "--cluster-objects", str(objects), "--drain-seconds", "0"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (tls / "ca.crt").exists():
        assert proc.poll() is None, (work / "webhook.log").read_text()
        assert time.monotonic() < deadline, "the webhook did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    return proc, port, tls


def _configuration(name: str, port: int, tls: Path) -> dict[str, Any]:
    common = {"admissionReviewVersions": ["v1"], "sideEffects": "None", "timeoutSeconds": 10,
              "failurePolicy": "Fail", "reinvocationPolicy": "IfNeeded",
              "namespaceSelector": {"matchLabels": {"diskhooks.io/enabled": "true"}},
              "clientConfig": {"url": f"https://127.0.0.1:{port}/mutate",
                               "caBundle": base64.b64encode((tls / "ca.crt").read_bytes()).decode()}}
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{"name": "vm.diskhooks.io", **common, "rules": [
                {"apiGroups": [GROUP], "apiVersions": [VERSION], "resources": ["virtualmachines"],
                 "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}]}]}


@pytest.fixture
def migration_setup(envtest: ControlPlane, agent_kubeconfig: Path, tmp_path: Path) -> Iterator[Setup]:
    """A namespace with the webhook on, alice's kubeconfig, two Nodes (127.0.0.2, 127.0.0.3), TLS."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(envtest.api)
    rbac: Any = client.RbacAuthorizationV1Api(envtest.api)
    admission: Any = client.AdmissionregistrationV1Api(envtest.api)
    namespace = envtest.namespace("mig")
    core.patch_namespace(namespace, {"metadata": {"labels": {"diskhooks.io/enabled": "true"}}})
    suffix = secrets.token_hex(3)
    nodes = {f"node-a-{suffix}": "127.0.0.2", f"node-b-{suffix}": "127.0.0.3"}
    for name, address in nodes.items():
        core.create_node({"metadata": {"name": name}})
        core.patch_node_status(name, {"status": {"addresses": [{"type": "InternalIP", "address": address},
                                                               {"type": "Hostname", "address": name}]}})
    role = f"dh-mig-user-{suffix}"
    rbac.create_cluster_role({"metadata": {"name": role}, "rules": [
        {"apiGroups": [GROUP], "resources": ["virtualmachines"],
         "verbs": ["get", "list", "watch", "create", "update", "patch"]},
        {"apiGroups": [GROUP], "resources": ["virtualmachineinstances"], "verbs": ["get"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "alice-moves-vms"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": namespace}]})
    alice = envtest.service_account_kubeconfig(namespace, "alice", tmp_path / "alice.kubeconfig")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    keys = tmp_path / "plan-keys"
    keys.mkdir()
    (keys / "current").write_bytes(PLAN_KEY)
    tls_dir = tmp_path / "migration-tls"
    make_tls(tls_dir)
    hook, hook_port, hook_tls = _webhook(tmp_path, policy, keys, nodes)
    config = f"diskhooks-migration-{suffix}"
    admission.create_mutating_webhook_configuration(_configuration(config, hook_port, hook_tls))
    setup = Setup(plane=envtest, namespace=namespace, work=tmp_path, policy=policy, keys_dir=keys,
                  agent_kubeconfig=agent_kubeconfig, alice_kubeconfig=alice, tls_dir=tls_dir,
                  port=free_port(), nodes=nodes, webhook=hook)
    try:
        _wait_until_admitted(setup)
        yield setup
    finally:
        try:
            admission.delete_mutating_webhook_configuration(config)
        except ApiException:
            pass
        hook.terminate()
        try:
            hook.wait(20)
        except subprocess.TimeoutExpired:
            hook.kill()
            hook.wait(10)
        rbac.delete_cluster_role(role)
        for name in nodes:
            try:
                core.delete_node(name)
            except ApiException:
                pass
        envtest.delete_namespace(namespace)


def _wait_until_admitted(setup: Setup) -> None:
    """The API server picks a new webhook configuration up a moment later: dry-run creates until one
    comes back with a plan."""
    deadline = time.monotonic() + 30
    while True:
        probe = setup.custom().create_namespaced_custom_object(GROUP, VERSION, setup.namespace, "virtualmachines",
                                                               vm_manifest("probe"), dry_run="All")
        if K.ANN_PLAN in (probe["spec"]["template"]["metadata"].get("annotations") or {}):
            return
        assert time.monotonic() < deadline, "the API server never called the webhook"
        time.sleep(0.3)


# ------------------------------------------------------------------------------------------------
# the agents
# ------------------------------------------------------------------------------------------------
class Agents:
    """``start(node, files)``: that node's agent; killed or stopped at teardown."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.started: list[AgentProcess] = []

    def start(self, node: str, files: NodeFiles, *, tls_dir: Path | None = None,
              extra: tuple[str, ...] = (), wrap: tuple[str, ...] = (), policy: Path | None = None) -> AgentProcess:
        """``policy``: this agent's own policy file (default: the one the webhook serves)."""
        s = self.setup
        files.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        argv = [*wrap, str(AGENT_SCRIPT), "serve", "--config", str(policy or s.policy), "--node-name", node,
                "--kubeconfig", str(s.agent_kubeconfig), "--host-prefix", str(files.prefix),
                "--metrics-port", "0", "--plan-keys-dir", str(s.keys_dir),
                "--migration-tls-dir", str(tls_dir or s.tls_dir), "--migration-address", s.nodes[node],
                "--migration-port", str(s.port), *extra]
        agent = start_agent_process(argv, env, node, new_session=True)
        self.started.append(agent)
        return agent

    def kill(self, agent: AgentProcess) -> None:
        """SIGKILL the agent's whole process group (its rsync children too, as a node crash would)."""
        try:
            os.killpg(agent.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.proc.wait(10)

    def stop_all(self) -> None:
        for agent in self.started:
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
                try:
                    agent.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.kill(agent)


@pytest.fixture
def agents(migration_setup: Setup) -> Iterator[Agents]:
    a = Agents(migration_setup)
    try:
        yield a
    finally:
        a.stop_all()


def wait_for(what: str, check: Any, timeout: float = 60.0, *agents: AgentProcess) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {a.node} ---\n" + a.stderr_text()[-5000:] for a in agents)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{logs}")
        time.sleep(0.2)


def run_command(setup: Setup, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """``kubectl-diskhooks`` (the console script) with alice's kubeconfig."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    return subprocess.run([str(COMMAND), *args, "--kubeconfig", str(setup.alice_kubeconfig)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def start_command(setup: Setup, *args: str) -> subprocess.Popen[str]:
    """``kubectl-diskhooks`` in the background (alice's kubeconfig); ``.communicate()`` to end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    return subprocess.Popen([str(COMMAND), *args, "--kubeconfig", str(setup.alice_kubeconfig)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def policy_with_capacity(setup: Setup, name: str, capacity: str) -> Path:
    """A copy of the policy with ``hostDisks.capacity`` set to ``capacity`` (flow YAML), for one agent."""
    path = setup.work / name
    path.write_text(POLICY.replace("sidecar:", f"  capacity: {capacity}\nsidecar:", 1))
    return path


def file_hashes(directory: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(directory.iterdir()) if f.is_file()}


def tmpfs_wrap(mountpoint: Path, size_mib: int) -> tuple[str, ...]:
    """Run the agent in its own mount namespace with a ``size_mib`` tmpfs on ``mountpoint`` (a small
    target filesystem; the machine's mounts are not touched)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    return ("unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o size={size_mib}M tmpfs "$0" && exec "$@"', str(mountpoint))
