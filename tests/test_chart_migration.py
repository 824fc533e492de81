"""The chart's part of cold migration (``nodeAgent.migration``), rendered by the real ``helm``.

helm is found as in tests/test_chart.py (``$HELM``, ``.tools/bin/helm``, ``PATH``). The Secret the
chart makes is used for real: its files open a mutual-TLS connection between two agents' contexts.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeagent.migrate.bridge import TlsChannel
from nodeagent.migrate.tlsfiles import PEER_NAME, TlsFiles

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "diskhooks"
ENABLED = ["--set", "nodeAgent.migration.enabled=true"]


def helm() -> str:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".tools" / "bin" / "helm"), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no helm binary ($HELM, .tools/bin/helm, PATH): run scripts/install-helm.sh")


def render(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "HELM_CONFIG_HOME": str(tmp_path / "c"), "HELM_CACHE_HOME": str(tmp_path / "k"),
           "HELM_DATA_HOME": str(tmp_path / "d")}
    out = subprocess.run([helm(), "template", "rel", str(CHART), "--namespace", "dh", *args],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if isinstance(d, dict)]


def refused(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "HELM_CONFIG_HOME": str(tmp_path / "c"), "HELM_CACHE_HOME": str(tmp_path / "k"),
           "HELM_DATA_HOME": str(tmp_path / "d")}
    out = subprocess.run([helm(), "template", "rel", str(CHART), *args], capture_output=True, text=True,
                         env=env, check=False)
    assert out.returncode != 0
    return out.stderr


def agent(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_off_by_default(tmp_path: Path) -> None:
    docs = render(tmp_path)
    pod, container = agent(docs)
    assert not any(a.startswith("--migration") for a in container["args"])
    assert [p["name"] for p in container["ports"]] == ["metrics"]
    assert container["securityContext"]["capabilities"]["add"] == ["DAC_OVERRIDE"]
    assert "migration-tls" not in {v["name"] for v in pod["volumes"]}
    assert not [d for d in docs if "migration" in d["metadata"]["name"]]


def test_enabled_the_agent_listens_on_its_node_with_the_secrets_files(tmp_path: Path) -> None:
    from nodeagent.cli import parser
    from nodeagent.migrate.options import migration_config

    docs = render(tmp_path, *ENABLED, "--set", "nodeAgent.migration.bandwidthMiB=40")
    pod, container = agent(docs)
    args = parser().parse_args([a.replace("$(NODE_NAME)", "worker-1") for a in container["args"]])
    assert (args.migration_port, args.migration_address, args.migration_bandwidth) == (9181, "0.0.0.0", 40.0)
    port = next(p for p in container["ports"] if p["name"] == "migration")
    assert port == {"name": "migration", "containerPort": 9181, "hostPort": 9181, "protocol": "TCP"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                            "add": ["DAC_OVERRIDE", "CHOWN", "FOWNER"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "migration-tls")
    assert mount == {"name": "migration-tls", "mountPath": args.migration_tls_dir, "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "migration-tls")
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] ==
                  volume["secret"]["secretName"])
    assert secret["type"] == "kubernetes.io/tls"
    assert "hostNetwork" not in pod  # a hostPort, not the node's whole network

    # the Secret's files, mounted as the kubelet would, make a working mutual-TLS pair
    tls_dir = tmp_path / "mounted"
    tls_dir.mkdir()
    for key, value in secret["data"].items():
        (tls_dir / key).write_bytes(base64.b64decode(value))
    cert = x509.load_pem_x509_certificate((tls_dir / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [PEER_NAME]
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usages
    from hooksidecar.logfmt import JsonLog

    config = migration_config(parser().parse_args(["serve", "--config", "x", "--node-name", "n",
                                                   "--migration-tls-dir", str(tls_dir)]), JsonLog(open(os.devnull, "w")))  # noqa: SIM115
    assert config is not None and config.tls_dir == str(tls_dir)
    files = TlsFiles(str(tls_dir))
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    server = TlsChannel(a, files.server_context(), server_side=True)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.handshake(10)
            server.send_all(b"ok\n")
        except BaseException as exc:  # noqa: BLE001 - to the test
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    client = TlsChannel(b, files.client_context(), server_side=False, server_hostname=PEER_NAME)
    client.handshake(10)
    assert client.read_line(10)[0] == b"ok"
    t.join(10)
    assert not errors
    a.close()
    b.close()


def test_cert_manager_issues_the_migration_certificate_from_the_charts_ca(tmp_path: Path) -> None:
    docs = render(tmp_path, *ENABLED, "--set", "certManager.enabled=true")
    cert = next(d for d in docs if d["kind"] == "Certificate" and "migration" in d["metadata"]["name"])
    spec = cert["spec"]
    assert spec["dnsNames"] == [PEER_NAME] and spec["commonName"] == PEER_NAME
    assert set(spec["usages"]) >= {"server auth", "client auth"}
    ca = next(d for d in docs if d["kind"] == "Issuer" and d["spec"].get("ca"))
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": ca["metadata"]["name"]}
    pod, _ = agent(docs)
    volume = next(v for v in pod["volumes"] if v["name"] == "migration-tls")
    assert volume["secret"]["secretName"] == spec["secretName"]
    assert not [d for d in docs if d["kind"] == "Secret" and "migration" in d["metadata"]["name"]]


def test_an_existing_secret_is_used_as_it_is(tmp_path: Path) -> None:
    docs = render(tmp_path, *ENABLED, "--set", "nodeAgent.migration.existingSecret=my-agents-tls")
    pod, _ = agent(docs)
    assert next(v for v in pod["volumes"] if v["name"] == "migration-tls")["secret"]["secretName"] == \
        "my-agents-tls"
    assert not [d for d in docs if "migration" in d["metadata"]["name"]]


def test_with_migrations_the_webhook_may_look_up_nodes_and_vmis_and_nothing_more(tmp_path: Path) -> None:
    def rules(docs: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[str]]:
        role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-webhook"))
        return {(tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"] for r in role["rules"]}

    on = rules(render(tmp_path, *ENABLED))
    assert on[(("",), ("nodes",))] == ["get"]
    assert on[(("kubevirt.io",), ("virtualmachineinstances",))] == ["get"]
    assert all(verbs == ["get"] for verbs in on.values())
    off = rules(render(tmp_path))  # no migrations: no lookups (a request is refused: 403 on the lookup)
    assert (("",), ("nodes",)) not in off and (("kubevirt.io",), ("virtualmachineinstances",)) not in off


def _policy(docs: list[dict[str, Any]]) -> Any:
    from diskplan.policy import load_policy

    config = next(d for d in docs if d["kind"] == "ConfigMap" and "policy.yaml" in d.get("data", {}))
    return load_policy(config["data"]["policy.yaml"])


def test_keep_source_goes_into_the_policy_the_agents_read(tmp_path: Path) -> None:
    assert _policy(render(tmp_path, *ENABLED)).node_agent.migration.keep_source == "untilStarted"
    forever = render(tmp_path, *ENABLED, "--set", "nodeAgent.migration.keepSource=forever")
    assert _policy(forever).node_agent.migration.keep_source == "forever"
    off = render(tmp_path, "--set", "nodeAgent.migration.keepSource=forever")  # no migrations: not written
    assert "migration" not in yaml.safe_load(next(d for d in off if d["kind"] == "ConfigMap" and "policy.yaml"
                                                  in d.get("data", {}))["data"]["policy.yaml"])["nodeAgent"]


@pytest.mark.parametrize("value, says", [
    ("nodeAgent.migration.port=80", "port"),
    ("nodeAgent.migration.keepSource=never", "keepSource"),
    ("nodeAgent.migration.bandwidthMiB=-1", "bandwidthMiB"),
    ("nodeAgent.migration.tls=x", "tls"),
])
def test_bad_values_are_refused_by_the_schema(tmp_path: Path, value: str, says: str) -> None:
    assert says in refused(tmp_path, "--set", value)
