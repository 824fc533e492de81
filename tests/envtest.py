"""A real Kubernetes control plane for tests: etcd + kube-apiserver (+ kube-scheduler on request).

The Kubernetes ecosystem's convention (controller-runtime's envtest): the binaries are found through
``$KUBEBUILDER_ASSETS``, a directory holding ``etcd``, ``kube-apiserver`` and ``kube-scheduler``
(CI: ``.ci/run`` unpacks them; a developer runs ``setup-envtest``). The tests that use the
:func:`envtest` fixture are skipped, with that reason, only when the variable is unset; a variable
that points at a directory without the binaries is an error.

What runs: etcd and kube-apiserver on free loopback ports, with their own PKI made here (a CA, the
API server's serving certificate for 127.0.0.1, an admin client certificate in ``system:masters``,
the service-account signing key), RBAC authorization, the Mutating/ValidatingAdmissionWebhook
plugins on, and KubeVirt's CRDs from ``tests/data/kubevirt/crds/`` installed and Established. No
controller-manager, no kubelet, no KubeVirt controllers: objects are stored, validated and admitted
for real, and nothing acts on them. So a namespace gets no ``default`` ServiceAccount by itself
(:meth:`ControlPlane.namespace` creates it) and a deleted namespace stays ``Terminating``.

One control plane per test session (start: ~5-12 s); one namespace per test
(:func:`kube_namespace`). Stopping sends SIGTERM to each process, waits, then SIGKILLs what is left,
by PID.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ASSETS_ENV = "KUBEBUILDER_ASSETS"
CRDS = Path(__file__).resolve().parent / "data" / "kubevirt" / "crds" / "kubevirt-crds.yaml"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 25.0  # the API server can take ~20 s to exit on SIGTERM
SKIP_REASON = (f"{ASSETS_ENV} is not set: it names a directory with the envtest binaries etcd, "
               "kube-apiserver and kube-scheduler: KUBEBUILDER_ASSETS=$(setup-envtest use 1.36 -p path) "
               "with controller-runtime's setup-envtest; this project's CI unpacks them in .ci/run)")


class EnvtestError(RuntimeError):
    """The control plane could not be started; the message says which part and its log's tail."""


# ------------------------------------------------------------------------------------------------
# PKI
# ------------------------------------------------------------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class Pki:
    """Files of the control plane's PKI (PEM)."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    scheduler_cert: Path
    scheduler_key: Path
    sa_key: Path  # service-account token signing key (private)
    sa_pub: Path


def make_pki(directory: Path) -> Pki:
    """A CA, the API server's certificate (127.0.0.1, localhost), client certificates for the
    admin (group ``system:masters``) and the scheduler, and the service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)
    ca_key = _key()
    ca_name = _name("envtest-ca")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True, crl_sign=True,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def issue(stem: str, subject: x509.Name, usage: x509.ObjectIdentifier,
              sans: Sequence[x509.GeneralName] = ()) -> tuple[Path, Path]:
        key = _key()
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    ca_path, ca_key_path = directory / "ca.crt", directory / "ca.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key_path, ca_key)
    serving = issue("apiserver", _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH,
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    admin = issue("admin", _name("admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH)
    scheduler = issue("scheduler", _name("system:kube-scheduler"), ExtendedKeyUsageOID.CLIENT_AUTH)
    sa_key = _key()
    sa_key_path, sa_pub_path = directory / "sa.key", directory / "sa.pub"
    _write_key(sa_key_path, sa_key)
    sa_pub_path.write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Pki(ca_cert=ca_path, ca_key=ca_key_path, serving_cert=serving[0], serving_key=serving[1],
               admin_cert=admin[0], admin_key=admin[1], scheduler_cert=scheduler[0],
               scheduler_key=scheduler[1], sa_key=sa_key_path, sa_pub=sa_pub_path)


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise EnvtestError(f"{self.name} exited with status {self.popen.returncode}; the end of "
                               f"{self.log}:\n{_tail(self.log)}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL (by PID)."""
        if self.popen.poll() is not None:
            return
        try:
            os.kill(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        except ProcessLookupError:
            pass


def _spawn(name: str, argv: Sequence[str], log: Path) -> _Process:
    with open(log, "wb") as out:
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    return _Process(name, popen, log)


def kubeconfig_text(*, server: str, ca_file: Path, user: str, cert_file: Path | None = None,
                    key_file: Path | None = None, token: str | None = None) -> str:
    """A kubeconfig with one cluster, one user (client certificate or bearer token), one context."""
    creds: dict[str, str] = {}
    if cert_file is not None and key_file is not None:
        creds = {"client-certificate": str(cert_file), "client-key": str(key_file)}
    if token is not None:
        creds["token"] = token
    doc = {"apiVersion": "v1", "kind": "Config",
           "clusters": [{"name": "envtest", "cluster": {"server": server,
                                                       "certificate-authority": str(ca_file)}}],
           "users": [{"name": user, "user": creds}],
           "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": user}}],
           "current-context": "envtest"}
    return yaml.safe_dump(doc, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# the control plane
# ------------------------------------------------------------------------------------------------
@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver (see the module docstring).

    - ``kubeconfig``: the admin's kubeconfig file (client certificate, ``system:masters``).
    - ``api``: an admin ``kubernetes.client.ApiClient``.
    - :meth:`client` / :meth:`service_account_client`: clients that impersonate someone else.
    - :meth:`namespace`: a fresh namespace with its ``default`` ServiceAccount.
    - :meth:`service_account_kubeconfig`: a kubeconfig with a real token of a ServiceAccount.
    - :meth:`start_scheduler`: kube-scheduler, started on the first call.
    """

    workdir: Path
    assets: Path
    pki: Pki
    server: str
    kubeconfig: Path
    api: Any  # kubernetes.client.ApiClient
    _processes: list[_Process] = field(default_factory=list)
    _clients: list[Any] = field(default_factory=list)

    # --- clients --------------------------------------------------------------------------------
    def configuration(self) -> Any:
        from kubernetes import client

        conf = client.Configuration()
        conf.host = self.server
        conf.ssl_ca_cert = str(self.pki.ca_cert)
        conf.cert_file = str(self.pki.admin_cert)
        conf.key_file = str(self.pki.admin_key)
        conf.verify_ssl = True
        return conf

    def client(self, user: str | None = None, *, group: str | None = None) -> Any:
        """An ApiClient with the admin certificate; with ``user``, every request impersonates that
        user (``Impersonate-User``; a ServiceAccount's name ``system:serviceaccount:NS:NAME`` gets
        its groups from the API server) and, with ``group``, that one group. The client sends one
        header per name, so one group at most."""
        from kubernetes import client

        api = client.ApiClient(self.configuration())
        if user is not None:
            api.set_default_header("Impersonate-User", user)
        if group is not None:
            if user is None:
                raise ValueError("impersonating a group needs a user too")
            api.set_default_header("Impersonate-Group", group)
        self._clients.append(api)
        return api

    def service_account_client(self, namespace: str, name: str) -> Any:
        """An ApiClient acting as the ServiceAccount ``namespace/name`` (by impersonation)."""
        return self.client(f"system:serviceaccount:{namespace}:{name}")

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path, *,
                                   expiration_seconds: int = 3600) -> Path:
        """Create the ServiceAccount if missing, ask the API server for a token of it (TokenRequest,
        as the kubelet does for a Pod) and write a kubeconfig using that token to ``path``."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core: Any = client.CoreV1Api(self.api)  # dict bodies: the client serialises them as they are
        try:
            core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": expiration_seconds}}
        answer = core.create_namespaced_service_account_token(name, namespace, request)
        token = answer.status.token
        path.write_text(kubeconfig_text(server=self.server, ca_file=self.pki.ca_cert,
                                        user=f"{namespace}-{name}", token=token))
        path.chmod(0o600)
        return path

    def namespace(self, prefix: str = "t") -> str:
        """Create a namespace ``<prefix>-<random>`` and its ``default`` ServiceAccount (no
        controller-manager makes it here)."""
        from kubernetes import client

        name = f"{prefix[:40]}-{secrets.token_hex(4)}"
        core: Any = client.CoreV1Api(self.api)
        core.create_namespace({"metadata": {"name": name}})
        core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
        return name

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace (it stays Terminating: no controller empties it)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            client.CoreV1Api(self.api).delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- processes ------------------------------------------------------------------------------
    def start_scheduler(self) -> None:
        """Start kube-scheduler (once); it binds Pods to Nodes for real."""
        if any(p.name == "kube-scheduler" for p in self._processes):
            return
        kc = self.workdir / "scheduler.kubeconfig"
        kc.write_text(kubeconfig_text(server=self.server, ca_file=self.pki.ca_cert,
                                      user="kube-scheduler", cert_file=self.pki.scheduler_cert,
                                      key_file=self.pki.scheduler_key))
        proc = _spawn("kube-scheduler", [
            str(self.assets / "kube-scheduler"), "--kubeconfig", str(kc),
            "--authentication-kubeconfig", str(kc), "--authorization-kubeconfig", str(kc),
            "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "0",
        ], self.workdir / "scheduler.log")
        self._processes.append(proc)
        time.sleep(0.5)
        proc.check_alive()

    def stop(self) -> None:
        """Stop every process, newest first (scheduler, API server, etcd)."""
        for api in self._clients:
            try:
                api.close()
            except Exception:  # noqa: BLE001, S110 - a client's pool may already be gone
                pass
        self._clients.clear()
        for proc in reversed(self._processes):
            proc.stop()
        self._processes.clear()


def _ssl_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return ctx


def _wait_ready(server: str, pki: Pki, apiserver: _Process, etcd: _Process) -> None:
    ctx = _ssl_context(pki)
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        etcd.check_alive()
        apiserver.check_alive()
        try:
            with urllib.request.urlopen(f"{server}/readyz", context=ctx, timeout=5) as resp:
                if resp.read() == b"ok":
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(0.3)
    raise EnvtestError(f"kube-apiserver was not ready within {START_TIMEOUT:.0f} s ({last}); the end "
                       f"of {apiserver.log}:\n{_tail(apiserver.log)}")


def install_crds(api: Any, path: Path = CRDS, *, timeout: float = START_TIMEOUT) -> list[str]:
    """Create every CustomResourceDefinition of the multi-document YAML ``path`` (an existing one
    is kept) and wait until each is Established and served; returns their names."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.load_all(f, Loader=loader)
                if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]
    ext: Any = client.ApiextensionsV1Api(api)
    names = []
    for doc in docs:
        names.append(doc["metadata"]["name"])
        try:
            ext.create_custom_resource_definition(doc)
        except ApiException as exc:
            if exc.status != 409:
                raise
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            crd = ext.read_custom_resource_definition(name)
            conditions = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                pending.discard(name)
        if pending:
            time.sleep(0.2)
    if pending:
        raise EnvtestError(f"CRDs not Established within {timeout:.0f} s: {', '.join(sorted(pending))}")
    # discovery lags a moment behind Established: wait until every group version serves its kinds
    served = {(doc["spec"]["group"], v["name"]) for doc in docs for v in doc["spec"]["versions"]
              if v.get("served")}
    for group, version in sorted(served):
        while True:
            try:
                client.CustomObjectsApi(api).get_api_resources(group, version)
                break
            except ApiException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return names


def start_control_plane(assets: Path, workdir: Path) -> ControlPlane:
    """Start etcd and kube-apiserver from ``assets`` in ``workdir`` and install KubeVirt's CRDs."""
    for binary in ("etcd", "kube-apiserver"):
        if not os.access(assets / binary, os.X_OK):
            raise EnvtestError(f"{ASSETS_ENV}={assets}: no executable {binary} there")
    workdir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(workdir / "pki")
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text(server=server, ca_file=pki.ca_cert, user="admin",
                                          cert_file=pki.admin_cert, key_file=pki.admin_key))
    processes: list[_Process] = []
    try:
        etcd = _spawn("etcd", [
            str(assets / "etcd"), "--data-dir", str(workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--unsafe-no-fsync",
        ], workdir / "etcd.log")
        processes.append(etcd)
        apiserver = _spawn("kube-apiserver", [
            str(assets / "kube-apiserver"), "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(api_port),
            "--tls-cert-file", str(pki.serving_cert), "--tls-private-key-file", str(pki.serving_key),
            "--client-ca-file", str(pki.ca_cert), "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(pki.sa_pub),
            "--service-account-signing-key-file", str(pki.sa_key),
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--enable-admission-plugins",
            "NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
            "--endpoint-reconciler-type", "none", "--allow-privileged",
        ], workdir / "apiserver.log")
        processes.append(apiserver)
        _wait_ready(server, pki, apiserver, etcd)
        plane = ControlPlane(workdir=workdir, assets=assets, pki=pki, server=server,
                             kubeconfig=kubeconfig, api=None, _processes=processes)
        plane.api = plane.client()
        install_crds(plane.api)
        return plane
    except BaseException:
        for proc in reversed(processes):
            proc.stop()
        raise


@pytest.fixture(scope="session")
def envtest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane (skipped only when ``$KUBEBUILDER_ASSETS`` is unset)."""
    assets = os.environ.get(ASSETS_ENV, "")
    if not assets:
        pytest.skip(SKIP_REASON)
    plane = start_control_plane(Path(assets), tmp_path_factory.mktemp("envtest"))
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube_namespace(envtest: ControlPlane) -> Iterator[str]:
    """A fresh namespace for one test, with its ``default`` ServiceAccount; deleted afterwards."""
    name = envtest.namespace()
    try:
        yield name
    finally:
        envtest.delete_namespace(name)
