"""Faults injected into the served webhook under load: its certificate and key replaced, its policy
replaced with a broken one, the plan-key Secret rotated while VMs start.

Real processes, TLS and files: ``python -m webhook.cli serve`` (gunicorn, 2 workers, reload
interval 0.2 s) started by ``benchmarks.soak.WebhookServer``; clients keep HTTPS connections as
kube-apiserver does (``benchmarks.soak.ReviewLoad``). Mounted ConfigMaps and Secrets are laid out
as the kubelet writes them (``..data`` swapped atomically). The one thing played is the API server.
A single failed or wrong answer fails a test.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import jsonpatch
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.soak import DEMO, ReviewLoad, WebhookServer, _envelope, load_reviews
from tests.conftest import EXAMPLE_POLICY
from tests.test_server import ConfigMapDir, wait_until
from webhook.tls import CERT_FILE, KEY_FILE, generate_self_signed

RELOAD = ["--reload-interval", "0.2", "--drain-seconds", "0"]


def _errors(answers: list[Any]) -> list[Any]:
    return [a for a in answers if a.error is not None]


def _serial_served(port: int, ca: Path) -> int | None:
    """The serial of the certificate a new connection gets, or None if ``ca`` does not verify it."""
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        der = conn.sock.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError:
        return None
    finally:
        conn.close()
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_certificate_and_key_replaced_under_load_fail_no_request(tmp_path: Path) -> None:
    """Two kept-alive connections and two that open a new TLS connection for every request; the
    key is replaced 0.6 s before its certificate (three reload intervals with a pair that does not
    match: the previous pair must stay in service), twice. New connections then get the new
    certificate, kept connections go on."""
    server = WebhookServer(tmp_path / "w", extra=RELOAD)
    try:
        server.wait_ready()
        cas = [server.ca]
        ctx = ssl.create_default_context(cafile=str(server.ca))
        serials = []
        for n in range(2):
            ca, cert, _ = generate_self_signed(tmp_path / f"rotated-{n}", hostnames=[])
            ctx.load_verify_locations(cafile=str(ca))
            cas.append(ca)
            serials.append(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number)
        reviews = load_reviews(server.keys_dir)
        kept = ReviewLoad(ctx=ctx, endpoint=lambda: server.port, reviews=reviews, connections=2).start()
        fresh = ReviewLoad(ctx=ctx, endpoint=lambda: server.port, reviews=reviews, connections=2,
                           reconnect_every=1).start()
        rotated_at = []
        for n in range(2):
            time.sleep(1.0)
            os.replace(tmp_path / f"rotated-{n}" / KEY_FILE, server.tls_dir / KEY_FILE)
            time.sleep(0.6)
            os.replace(tmp_path / f"rotated-{n}" / CERT_FILE, server.tls_dir / CERT_FILE)
            rotated_at.append(time.monotonic())
            wait_until(lambda n=n: _serial_served(server.port, cas[n + 1]) == serials[n],  # type: ignore[misc]
                       f"rotation {n + 1} served to new connections")
        time.sleep(1.0)
        answers = kept.stop() + fresh.stop()
        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0
    assert not _errors(answers), _errors(answers)[:5]
    log = server.log_tail(20000)
    assert "TLS reload failed, still serving the previous certificate" in log, log[-3000:]
    assert "reloaded the TLS certificate" in log
    after = [a for a in answers if a.sent > rotated_at[-1] + 0.5]
    assert {a.port for a in after} == {server.port} and len(after) > 20


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_broken_policy_under_load_keeps_the_previous_one(tmp_path: Path) -> None:
    """The ConfigMap gets a policy the webhook refuses while reviews keep coming: not one fails,
    every answer is still the previous policy's, ``/readyz`` stays 200 and names the error,
    ``diskhooks_config_reload_failures_total{source="policy"}`` counts it (once per worker), the
    log says why; a good policy then clears it."""
    text = EXAMPLE_POLICY.read_text()
    cm = ConfigMapDir(tmp_path / "policy", text)
    server = WebhookServer(tmp_path / "w", policy=cm.path, extra=RELOAD)
    try:
        server.wait_ready()
        load = ReviewLoad(ctx=server.context(), endpoint=lambda: server.port,
                          reviews=load_reviews(server.keys_dir), connections=4).start()
        time.sleep(1.0)
        cm.update(text.replace("hostDisks:", "hostDisks:\n  bogusKey: 1", 1))
        broken_at = time.monotonic()

        def metric() -> float:
            return _metric(server.get("/metrics")[1].decode(), "diskhooks_config_reload_failures_total",
                           source="policy")

        wait_until(lambda: metric() == 2, "both workers counting the failed reload")
        time.sleep(1.0)
        code, body = server.get("/readyz")
        ready = json.loads(body)
        cm.update(text)
        wait_until(lambda: "stale" not in json.loads(server.get("/readyz")[1]), "recovery")
        time.sleep(0.5)
        answers = load.stop()
    finally:
        assert server.stop() == 0
    assert not _errors(answers), _errors(answers)[:5]
    assert len([a for a in answers if a.sent > broken_at]) > 50
    assert code == 200 and ready["ready"] is True, ready
    assert any("bogusKey" in e for e in ready["stale"]), ready
    assert ready["policyVersion"] == 1
    assert "reload of policy failed, still serving the previous version" in server.log_tail(20000)


# ------------------------------------------------------------------------------------------------
# the plan-key Secret rotated while VMs start
# ------------------------------------------------------------------------------------------------
class SecretDir:
    """A directory laid out as the kubelet mounts a Secret: ``<key> -> ..data/<key>``,
    ``..data -> ..<version>``, :meth:`update` swapping ``..data`` atomically."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root = root
        root.mkdir()
        self.version = 0
        self.update(files)

    def update(self, files: dict[str, bytes]) -> None:
        self.version += 1
        version_dir = self.root / f"..v{self.version}"
        version_dir.mkdir()
        for name, data in files.items():
            (version_dir / name).write_bytes(data)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version_dir.name)
        os.replace(tmp, self.root / "..data")
        for name in files:
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")


class VmStarts:
    """The admission steps of VM starts, as the API server sends them: the demo VM's CREATE, then
    the VMI virt-controller makes from it and its launcher Pod, each step to either replica."""

    def __init__(self, servers: list[WebhookServer], ctx: ssl.SSLContext) -> None:
        self.servers, self.ctx = servers, ctx
        self.vm = yaml.safe_load((DEMO / "vm.yaml").read_text())
        self.pod = yaml.safe_load((DEMO / "launcher-pod.yaml").read_text())
        self.refusals: list[str] = []
        self.steps = 0
        self._lock = threading.Lock()

    def _send(self, n: int, path: str, review: dict[str, Any]) -> dict[str, Any]:
        server = self.servers[n % len(self.servers)]
        conn = http.client.HTTPSConnection("localhost", server.port, context=self.ctx, timeout=10)
        try:
            conn.request("POST", f"{path}?timeout=10s", body=json.dumps(review).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, data[:300]
        answer: dict[str, Any] = json.loads(data)["response"]
        with self._lock:
            self.steps += 1
            if not answer["allowed"]:
                self.refusals.append(f"{path} on replica {n % len(self.servers)}: "
                                     f"{answer['status']['message']}")
        return answer

    def create_vm(self, n: int) -> dict[str, Any]:
        """The VM as stored after its CREATE (with the signed plan in its template)."""
        answer = self._send(n, "/mutate", _envelope(self.vm, kind="VirtualMachine", group="kubevirt.io",
                                                    resource="virtualmachines"))
        assert "patch" in answer, answer
        vm: dict[str, Any] = jsonpatch.apply_patch(self.vm, json.loads(base64.b64decode(answer["patch"])))
        return vm

    def start(self, vm: dict[str, Any], n: int) -> None:
        tmeta = vm["spec"]["template"]["metadata"]
        vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
               "metadata": {**tmeta, "name": "pg01", "namespace": "vms"}, "spec": vm["spec"]["template"]["spec"]}
        self._send(n + 1, "/mutate", _envelope(vmi, kind="VirtualMachineInstance", group="kubevirt.io",
                                               resource="virtualmachineinstances"))
        pod = json.loads(json.dumps(self.pod))
        pod["metadata"]["labels"].update(tmeta.get("labels", {}))
        pod["metadata"]["annotations"].update(tmeta.get("annotations", {}))
        self._send(n + 2, "/mutate-pod", _envelope(pod, kind="Pod", group="", resource="pods"))


def test_plan_key_rotation_while_vms_start_refuses_none(tmp_path: Path) -> None:
    """Two replicas; the rotated Secret (new ``current``, the old key as ``previous``,
    ``current-not-before`` 3 s ahead, as the chart writes it) reaches replica 0 at once and replica
    1 a second later, as the kubelet refreshes each pod's mount on its own schedule. VMs created
    and started before, during and after, each step on either replica, and VMs created before the
    rotation but started after the new key signs: no step is refused."""
    old_key, new_key = b"plan-key-one-0123456789abcdef", b"plan-key-two-0123456789abcdef"
    secrets = [SecretDir(tmp_path / f"keys-{i}", {"current": old_key + b"\n"}) for i in range(2)]
    servers = [WebhookServer(tmp_path / f"w{i}", keys_dir=secrets[i].root, extra=RELOAD) for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        ctx = ssl.create_default_context(cafile=str(servers[0].ca))
        ctx.load_verify_locations(cafile=str(servers[1].ca))
        starts = VmStarts(servers, ctx)
        early = [starts.create_vm(n) for n in range(6)]  # created before, started after the rotation
        stop = threading.Event()

        def run(offset: int) -> None:
            n = offset
            try:
                while not stop.is_set():
                    starts.start(starts.create_vm(n), n)
                    n += 1
            except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
                starts.refusals.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        not_before = int(time.time()) + 3
        rotated = {"current": new_key + b"\n", "previous": old_key + b"\n",
                   "current-not-before": f"{not_before}\n".encode()}
        secrets[0].update(rotated)
        time.sleep(1.0)
        secrets[1].update(rotated)
        while time.time() < not_before + 1.5:
            time.sleep(0.1)
        signing = [json.loads(s.get("/readyz")[1])["planKeySigning"] for s in servers]
        for n, vm in enumerate(early):
            starts.start(vm, n)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        for s in servers:
            assert s.stop() == 0
    assert not starts.refusals, starts.refusals[:5]
    assert starts.steps > 60, starts.steps
    assert signing == ["current", "current"]
