"""The real webhook server: ``python -m webhook.cli serve --self-signed`` (gunicorn, 2 gthread
workers, TLS) on a free loopback port, talked to exactly as kube-apiserver does: ``POST
/mutate?timeout=5s`` with ``Content-Type: application/json`` on a kept-alive TLS connection
verified against the generated CA, bodies taken from ``tests/data/kubevirt/admission/``.

The one thing played here is the API server itself (no cluster on this machine). The policy file
is mounted the way the kubelet mounts a ConfigMap (a ``..data`` symlink swapped atomically), so the
reload tests see what a ConfigMap update does. One server serves the whole module.

The end of the module also tests ``webhook/reload.py`` on its own (no server).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from diskplan import keys as K
from diskplan.plan import PlanKeys, verify_plan
from tests.conftest import ADMISSION, EXAMPLE_POLICY, ROOT
from tests.test_admission import assert_vm_mutated
from webhook.tls import CERT_FILE, KEY_FILE, generate_self_signed

RELOAD_INTERVAL = 0.2
SIDECAR_IMAGE = yaml.safe_load(EXAMPLE_POLICY.read_text())["sidecar"]["image"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


class ConfigMapDir:
    """A directory laid out like a kubelet-mounted ConfigMap: ``policy.yaml -> ..data/policy.yaml``,
    ``..data -> ..<version>``; :meth:`update` swaps ``..data`` atomically as the kubelet does."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        root.mkdir()
        self.version = 0
        self.update(text)
        (root / "policy.yaml").symlink_to("..data/policy.yaml")
        self.path = root / "policy.yaml"

    def update(self, text: str) -> None:
        self.version += 1
        version_dir = self.root / f"..v{self.version}"
        version_dir.mkdir()
        (version_dir / "policy.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version_dir.name)
        os.replace(tmp, self.root / "..data")


class Server:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.tls_dir = work / "tls"
        self.keys_dir = work / "plan-keys"
        self.keys_dir.mkdir()
        (self.keys_dir / "current").write_text("server-test-key-0123456789abcdef\n")
        self.policy = ConfigMapDir(work / "policy", EXAMPLE_POLICY.read_text())
        self.log_path = work / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
        cmd = [sys.executable, "-m", "webhook.cli", "serve", "--config", str(self.policy.path),
               "--self-signed", "--tls-dir", str(self.tls_dir), "--bind-address", "127.0.0.1",
               "--port", str(self.port), "--workers", "2", "--plan-keys-dir", str(self.keys_dir),
               "--reload-interval", str(RELOAD_INTERVAL), "--drain-seconds", "0",
               "--cluster-objects", str(ROOT / "examples" / "demo" / "cluster-objects.yaml")]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, "the webhook answering /readyz", timeout=30)

    @property
    def ca(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def plan_keys(self) -> PlanKeys:
        return PlanKeys(current=(self.keys_dir / "current").read_bytes().strip())

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        if not self.ca.exists():
            return False
        try:
            return self.get(self.connect(), "/readyz")[0] == 200
        except (OSError, ssl.SSLError):
            return False

    def connect(self, ca: Path | None = None) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(ca or self.ca))
        return http.client.HTTPSConnection("localhost", self.port, context=ctx, timeout=10)

    @staticmethod
    def get(conn: http.client.HTTPSConnection, path: str) -> tuple[int, bytes]:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()

    @staticmethod
    def post(conn: http.client.HTTPSConnection, path: str, body: bytes,
             content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type") == "application/json", data[:200]
        return resp.status, json.loads(data)

    def review(self, conn: http.client.HTTPSConnection, review: dict[str, Any],
               path: str = "/mutate") -> dict[str, Any]:
        status, body = self.post(conn, f"{path}?timeout=5s", json.dumps(review).encode())
        assert status == 200, body
        assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
        assert body["response"]["uid"] == review["request"]["uid"]
        return dict(body["response"])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("webhook-server"))
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert "Shutting down" in srv.log_path.read_text()


def sample(name: str) -> dict[str, Any]:
    return dict(json.loads((ADMISSION / name).read_text()))


def applied(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    out: dict[str, Any] = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(response["patch"])))
    return out


# ------------------------------------------------------------------------------------------------
def test_reviews_as_the_api_server_sends_them(server: Server) -> None:
    conn = server.connect()
    keys = server.plan_keys

    create = sample("vm-create.json")
    resp = server.review(conn, create)
    sock = conn.sock
    assert resp["allowed"] is True
    vm = applied(create["request"]["object"], resp)
    assert_vm_mutated(vm, namespace="vms", name="pg01", plan_keys=keys, sidecar_image=SIDECAR_IMAGE,
                      disks={"pgdata": "200Gi", "wal": "20Gi"})

    dry = sample("vm-create-dryrun.json")
    dry_vm = applied(dry["request"]["object"], server.review(conn, dry))
    assert dry_vm["spec"] == vm["spec"]

    update = sample("vm-update.json")
    updated = applied(update["request"]["object"], server.review(conn, update))
    assert_vm_mutated(updated, namespace="vms", name="pg01", plan_keys=keys,
                      sidecar_image=SIDECAR_IMAGE, disks={"pgdata": "300Gi", "wal": "20Gi"})

    vmi_review = sample("vmi-create.json")
    vmi = applied(vmi_review["request"]["object"], server.review(conn, vmi_review))
    plan = verify_plan(vmi["metadata"]["annotations"][K.ANN_PLAN], keys, namespace="vms",
                       vm=vmi["metadata"]["name"])
    assert [d.name for d in plan.disks] == ["scratch"]

    pod_review = sample("virt-launcher-pod-create.json")
    pod_resp = server.review(conn, pod_review, path="/mutate-pod")
    assert pod_resp["allowed"] is True and "patch" not in pod_resp  # no diskhooks plan: untouched

    # reinvocation with the mutated object: nothing more to do
    again = sample("vm-create.json")
    again["request"]["object"] = vm
    assert "patch" not in server.review(conn, again)
    assert conn.sock is sock, "the kept-alive connection was not reused"
    conn.close()


def _review_envelope(obj: dict[str, Any], *, kind: str, group: str, resource: str,
                     uid: str) -> dict[str, Any]:
    gvk = {"group": group, "version": "v1", "kind": kind}
    gvr = {"group": group, "version": "v1", "resource": resource}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": gvk, "resource": gvr, "requestKind": gvk,
                        "requestResource": gvr, "name": obj["metadata"].get("name", ""),
                        "namespace": "vms", "operation": "CREATE", "userInfo": {"username": "t"},
                        "object": obj, "oldObject": None, "dryRun": False}}


def test_vm_to_vmi_to_launcher_pod(server: Server) -> None:
    """The demo VM (disks, a backing base, persist-root, a passthrough lun looked up in the
    server's --cluster-objects) through /mutate; the VMI virt-controller makes from it; then its
    launcher Pod (examples/demo/launcher-pod.yaml) through /mutate-pod gets the prepare init
    container. A Pod whose plan was edited is denied."""
    conn = server.connect()
    vm = yaml.safe_load((ROOT / "examples" / "demo" / "vm.yaml").read_text())
    resp = server.review(conn, _review_envelope(vm, kind="VirtualMachine", group="kubevirt.io",
                                                resource="virtualmachines", uid="vm-1"))
    assert resp["allowed"] is True, resp
    vm = applied(vm, resp)
    tmeta = vm["spec"]["template"]["metadata"]
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {**tmeta, "name": "pg01", "namespace": "vms"},
           "spec": vm["spec"]["template"]["spec"]}
    resp = server.review(conn, _review_envelope(vmi, kind="VirtualMachineInstance",
                                                group="kubevirt.io",
                                                resource="virtualmachineinstances", uid="vmi-1"))
    assert resp["allowed"] is True and "patch" not in resp, resp

    pod = yaml.safe_load((ROOT / "examples" / "demo" / "launcher-pod.yaml").read_text())
    pod["metadata"]["labels"].update(tmeta.get("labels", {}))
    pod["metadata"]["annotations"].update(tmeta.get("annotations", {}))
    resp = server.review(conn, _review_envelope(pod, kind="Pod", group="", resource="pods",
                                                uid="pod-1"), path="/mutate-pod")
    assert resp["allowed"] is True, resp
    mutated = applied(pod, resp)
    init = {c["name"]: c for c in mutated["spec"].get("initContainers", [])}
    assert init[K.PREPARE_CONTAINER]["image"] == SIDECAR_IMAGE

    forged = json.loads(tmeta["annotations"][K.ANN_PLAN])
    forged["hostDir"] = "/etc"
    pod["metadata"]["annotations"][K.ANN_PLAN] = json.dumps(forged)
    resp = server.review(conn, _review_envelope(pod, kind="Pod", group="", resource="pods",
                                                uid="pod-2"), path="/mutate-pod")
    assert resp["allowed"] is False and K.ANN_PLAN in resp["status"]["message"]
    conn.close()


def test_malformed_requests_get_4xx_never_500(server: Server) -> None:
    conn = server.connect()
    good = sample("vm-create.json")
    no_uid = sample("vm-create.json")
    del no_uid["request"]["uid"]
    bad_object = sample("vm-create.json")
    bad_object["request"]["object"] = "not an object"
    wrong_api = dict(sample("vm-create.json"), apiVersion="admission.k8s.io/v1beta1")
    cases: list[tuple[bytes, str, int, str | None]] = [
        (b"{this is not json", "application/json", 400, ""),
        (b"\xff\xfe\x00garbage", "application/json", 400, ""),
        (b"[" * 200_000, "application/json", 400, ""),
        (json.dumps(wrong_api).encode(), "application/json", 400, "apiVersion"),
        (json.dumps(no_uid).encode(), "application/json", 400, "request.uid"),
        (json.dumps(bad_object).encode(), "application/json", 400, "request.object"),
        (json.dumps(good).encode(), "text/plain", 415, "Content-Type"),
        (b'{"apiVersion": "admission.k8s.io/v1", "pad": "' + b"x" * 5_000_000 + b'"}',
         "application/json", 413, None),
    ]
    for body, ctype, status, field in cases:
        got, answer = server.post(conn, "/mutate?timeout=5s", body, ctype)
        assert got == status, (body[:60], answer)
        assert answer["error"]
        if field is not None:
            assert answer["field"] == field, answer
    # the same connection still serves a good review
    assert server.review(conn, good)["allowed"] is True
    conn.close()


def test_hostile_annotations_are_denied_with_the_field(server: Server) -> None:
    conn = server.connect()
    cases = {
        '[{"name": "pgdata", "size": "9Ti"}]': "diskhooks.io/disks[0].size",
        '[{"name": "x/../../etc", "size": "1Gi"}]': "diskhooks.io/disks[0].name",
        '[{"name": "a", "size": "1Gi"}, {"name": "a", "size": "1Gi"}]': "diskhooks.io/disks[1].name",
    }
    for value, field in cases.items():
        review = sample("vm-create.json")
        review["request"]["object"]["metadata"]["annotations"][K.ANN_DISKS] = value
        resp = server.review(conn, review)
        assert resp["allowed"] is False and "patch" not in resp
        assert resp["status"]["message"].startswith(field + ": "), resp["status"]
    conn.close()


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_health_readiness_and_metrics(server: Server) -> None:
    conn = server.connect()
    assert server.get(conn, "/healthz") == (200, b"ok\n")
    status, body = server.get(conn, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert json.loads(body)["planKeySigning"] == "current"  # no rotation waiting for its time

    def scrape() -> str:
        code, data = server.get(conn, "/metrics")
        assert code == 200
        return data.decode()

    labels = {"route": "mutate", "kind": "VirtualMachine", "operation": "CREATE"}
    before = scrape()
    server.review(conn, sample("vm-create.json"))
    denied = sample("vm-create.json")
    denied["request"]["object"]["metadata"]["annotations"][K.ANN_DISKS] = '[{"name": "d", "size": "9Ti"}]'
    server.review(conn, denied)
    server.post(conn, "/mutate", b"nope")
    # new connections land on either worker: the numbers are merged over both
    for _ in range(4):
        other = server.connect()
        server.review(other, sample("vm-create.json"))
        other.close()
    after = scrape()

    def delta(name: str, **lab: str) -> float:
        return _metric(after, name, **lab) - _metric(before, name, **lab)

    assert delta("diskhooks_admission_requests_total", result="patched", **labels) == 5
    assert delta("diskhooks_admission_requests_total", result="denied", **labels) == 1
    assert delta("diskhooks_admission_requests_total", route="mutate", result="malformed") == 1
    assert delta("diskhooks_admission_denials_total", kind="VirtualMachine") == 1
    assert delta("diskhooks_admission_duration_seconds_count", kind="VirtualMachine",
                 operation="CREATE") == 6
    assert "# TYPE diskhooks_admission_duration_seconds histogram" in after
    conn.close()


def test_policy_reload_and_a_broken_policy(server: Server) -> None:
    conn = server.connect()
    original = EXAMPLE_POLICY.read_text()
    strict = original.replace("maxDiskSize: 2Ti", "maxDiskSize: 100Gi")
    assert strict != original

    def create_denied() -> bool:
        c = server.connect()  # a new connection: any worker
        resp = server.review(c, sample("vm-create.json"))
        c.close()
        return resp["allowed"] is False

    def readyz() -> tuple[int, dict[str, Any]]:
        c = server.connect()
        code, body = server.get(c, "/readyz")
        c.close()
        return code, json.loads(body)

    try:
        server.policy.update(strict)
        wait_until(create_denied, "the new policy in use")
        time.sleep(3 * RELOAD_INTERVAL)  # every worker has checked by now
        for _ in range(4):
            assert create_denied()
        resp = server.review(conn, sample("vm-create.json"))
        assert resp["status"]["message"].startswith("diskhooks.io/disks[0].size")

        server.policy.update(original.replace("hostDisks:", "hostDisks:\n  bogusKey: 1", 1))
        wait_until(lambda: "stale" in readyz()[1], "/readyz reporting the broken policy")
        time.sleep(3 * RELOAD_INTERVAL)
        for _ in range(4):
            # still ready: every replica reads the same ConfigMap, a 503 would empty the Service
            code, body = readyz()
            assert code == 200 and body["ready"] is True
            assert any("bogusKey" in e for e in body["stale"]), body
            assert create_denied(), "the last good policy (maxDiskSize 100Gi) must stay in use"
    finally:
        server.policy.update(original)
    wait_until(lambda: "stale" not in readyz()[1] and not create_denied(), "recovery with a good policy")
    time.sleep(3 * RELOAD_INTERVAL)
    for _ in range(4):
        code, body = readyz()
        assert code == 200 and "stale" not in body
    conn.close()


def test_certificate_rotation_reaches_the_next_connection(server: Server, tmp_path: Path) -> None:
    old_conn = server.connect()
    assert server.get(old_conn, "/healthz")[0] == 200
    new_ca, new_cert, new_key = generate_self_signed(tmp_path / "rotated", hostnames=[])
    serial = x509.load_pem_x509_certificate(new_cert.read_bytes()).serial_number
    old_ca = tmp_path / "old-ca.crt"
    shutil.copy(server.ca, old_ca)
    os.replace(new_key, server.tls_dir / KEY_FILE)
    os.replace(new_cert, server.tls_dir / CERT_FILE)

    def new_cert_served() -> bool:
        c = server.connect(new_ca)
        try:
            ok = server.get(c, "/healthz")[0] == 200
        except ssl.SSLCertVerificationError:
            return False
        assert isinstance(c.sock, ssl.SSLSocket)
        der = c.sock.getpeercert(binary_form=True)
        c.close()
        assert der is not None
        return ok and x509.load_der_x509_certificate(der).serial_number == serial

    wait_until(new_cert_served, "the rotated certificate on a new connection")
    time.sleep(3 * RELOAD_INTERVAL)
    for _ in range(4):
        assert new_cert_served()
        with pytest.raises(ssl.SSLCertVerificationError):
            server.get(server.connect(old_ca), "/healthz")
    # a connection opened before the rotation keeps working
    assert server.get(old_conn, "/healthz")[0] == 200
    old_conn.close()
    shutil.copy(new_ca, server.ca)  # later tests trust the new CA


def test_plan_key_rotation(server: Server) -> None:
    """New ``current`` with the old key as ``previous``: new plans are signed with the new key."""
    old_key = (server.keys_dir / "current").read_bytes().strip()
    new_key = b"rotated-plan-key-abcdef0123456789"
    (server.keys_dir / "previous.tmp").write_bytes(old_key)
    os.replace(server.keys_dir / "previous.tmp", server.keys_dir / "previous")
    (server.keys_dir / "current.tmp").write_bytes(new_key + b"\n")
    os.replace(server.keys_dir / "current.tmp", server.keys_dir / "current")

    def signed_with_new_key() -> bool:
        c = server.connect()
        review = sample("vm-create.json")
        vm = applied(review["request"]["object"], server.review(c, review))
        c.close()
        plan = vm["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN]
        try:
            verify_plan(plan, PlanKeys(current=new_key), namespace="vms", vm="pg01")
        except Exception:  # noqa: BLE001 - still the old key on this worker
            return False
        return True

    wait_until(signed_with_new_key, "plans signed with the new key")


# ------------------------------------------------------------------------------------------------
# webhook/reload.py without the server
# ------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watched_policy_follows_a_configmap_swap(tmp_path: Path) -> None:
    from webhook.reload import WatchedFiles, watch_policy

    cm = ConfigMapDir(tmp_path / "cm", EXAMPLE_POLICY.read_text())
    watched = watch_policy(cm.path, interval=1.0)
    assert isinstance(watched, WatchedFiles)
    clock = FakeClock()
    watched._clock = clock  # drive time by hand
    watched._checked = clock.now
    first = watched.get()
    assert first.host_disks.max_disk_size == 2 * 2**40

    cm.update(EXAMPLE_POLICY.read_text().replace("maxDiskSize: 2Ti", "maxDiskSize: 1Ti"))
    assert watched.get() is first, "no stat before the interval has passed"
    clock.now += 1.0
    assert watched.get().host_disks.max_disk_size == 2**40
    assert watched.generation == 2 and watched.ready

    cm.update("hostDisks: [not, a, mapping]\n")
    clock.now += 1.0
    kept = watched.get()
    assert kept.host_disks.max_disk_size == 2**40, "the last good policy stays in use"
    assert not watched.ready and watched.error and "policy" in watched.error
    assert watched.failures == 1
    clock.now += 1.0
    watched.get()
    assert watched.failures == 1, "the same error is not reported again"

    cm.update(EXAMPLE_POLICY.read_text())
    clock.now += 1.0
    assert watched.get().host_disks.max_disk_size == 2 * 2**40 and watched.ready


def test_a_worker_asked_nothing_still_keeps_the_newest_good_policy(tmp_path: Path) -> None:
    """Each gunicorn worker holds its own copy of the policy source. Only worker 0 is asked while
    version B is on disk, then a broken C replaces B: both must keep B. Checked only on requests,
    worker 1 kept A and served it beside worker 0's B (test_policy_reload_and_a_broken_policy
    failed that way under load, when its requests all landed on one worker); the watcher thread
    that every worker starts after the fork (WatchedFiles.watch) closes that."""
    from webhook.reload import watch_policy

    text = EXAMPLE_POLICY.read_text()
    cm = ConfigMapDir(tmp_path / "cm", text)
    workers = [watch_policy(cm.path, interval=0.05) for _ in range(2)]
    for w in workers:
        w.watch()
    try:
        cm.update(text.replace("maxDiskSize: 2Ti", "maxDiskSize: 1Ti"))  # B
        wait_until(lambda: workers[0].get().host_disks.max_disk_size == 2**40, "worker 0 on B")
        wait_until(lambda: workers[1].generation == 2, "worker 1 taking B in without a request")
        cm.update(text.replace("hostDisks:", "hostDisks:\n  bogusKey: 1", 1))  # C, broken
        wait_until(lambda: all(w.error for w in workers), "both workers seeing C")
        assert [w.get().host_disks.max_disk_size for w in workers] == [2**40, 2**40]
    finally:
        for w in workers:
            w.unwatch()


def test_plan_keys_directory(tmp_path: Path) -> None:
    from webhook.reload import SourceError, load_plan_keys, watch_plan_keys

    d = tmp_path / "keys"
    d.mkdir()
    with pytest.raises(SourceError, match="current"):
        load_plan_keys(d)
    (d / "current").write_bytes(b"short\n")
    with pytest.raises(SourceError, match="16 bytes"):
        load_plan_keys(d)
    (d / "current").write_bytes(b"  key-number-two-0123456789abcdef \n")
    assert load_plan_keys(d).current == b"key-number-two-0123456789abcdef"
    (d / "previous").write_bytes(b"key-number-one-0123456789abcdef\n")
    keys = load_plan_keys(d)
    assert keys.previous == (b"key-number-one-0123456789abcdef",)

    watched = watch_plan_keys(d, interval=0)
    (d / "previous").unlink()
    assert watched.get().previous == ()
    (d / "current").unlink()
    assert watched.get().current == b"key-number-two-0123456789abcdef"  # kept
    assert not watched.ready and "does not exist" in (watched.error or "")


def test_a_server_does_not_start_on_a_broken_policy(tmp_path: Path) -> None:
    from webhook.app import Settings, create_app
    from webhook.reload import SourceError

    bad = tmp_path / "policy.yaml"
    bad.write_text("hostDisks: {root: relative/path}\n")
    with pytest.raises(SourceError, match="policy"):
        create_app(Settings(policy_file=bad, plan_keys=PlanKeys(current=b"k" * 32)))
