"""The Helm chart, rendered by the real ``helm`` binaries (v4, and v3 when installed).

helm is found through ``$HELM``, then ``<repo>/.tools/bin/helm``, then ``PATH``; a second binary
(``$HELM3``, ``<repo>/.tools/bin/helm3``, ``PATH``) runs the same tests when it is there.
``scripts/install-helm.sh`` installs both. Without helm these tests fail: the chart is a product.

Rendered objects are validated with kubernetes-validate (Kubernetes' own OpenAPI schemas, strict:
unknown fields are errors) for 1.28, the oldest version the chart supports, and the newest version
kubernetes-validate knows. cert-manager's Certificate/Issuer and the Prometheus Operator's
ServiceMonitor are CRDs: kubernetes-validate has no schema for them, so their fields are asserted
one by one instead.

``helm template`` cannot ``lookup`` existing objects, so keeping the CA and the plan keys across
upgrades is tested with ``helm template --dry-run=server`` against a fake Kubernetes API server (a
small HTTP server answering discovery and GET of Secrets): a real API server cannot run here.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLE_POLICY, ROOT

CHART = ROOT / "charts" / "diskhooks"
NAMESPACE = "diskhooks-system"
RELEASE = "dh"
FULLNAME = "dh-diskhooks"
CRD_KINDS = {("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer"),
             ("monitoring.coreos.com/v1", "ServiceMonitor")}
OLDEST_KUBERNETES = "1.28.0"
INSTALL_HINT = "run scripts/install-helm.sh (it puts helm v4 and helm3 in .tools/bin), or set $HELM"

ALL_FEATURES = {
    "commonLabels": {"example.com/owner": "platform"},
    "webhook": {
        "replicas": 3,
        "image": {"digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "platform-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra",
                         "effect": "NoSchedule"}],
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "webhook"}}}],
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"example.com/tier": "infra"},
        "accessLog": True,
        "podDisruptionBudget": {"minAvailable": 2},
    },
    "admission": {"failurePolicy": "Ignore", "timeoutSeconds": 5,
                  "excludeNamespaces": ["kubevirt", "cdi"]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "networkPolicy": {"enabled": True, "ingressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
    "policy": {"passthrough": {"storageClasses": ["local-nvme"], "allowLun": True},
               "sidecar": {"allowedImages": ["registry.example.com/qcow2-hook:0.1.0"]},
               "defaultProfile": "small"},
    "sidecar": {"image": {"tag": "0.2.0"}},
    "planKeys": {"existingSecret": "my-plan-keys"},
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "cert-manager": {"certManager": {"enabled": True}},
    "cert-manager-issuer": {"certManager": {"enabled": True,
                                            "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer",
                                                          "group": "cert-manager.io"}}},
    "all-features": ALL_FEATURES,
    "opt-out-namespaces": {"admission": {"namespaceSelector": {"optIn": False}},
                           "webhook": {"inCluster": False},
                           "planKeys": {"readerRole": False, "keepOnUninstall": False}},
}


# ------------------------------------------------------------------------------------------------
# finding helm and rendering
# ------------------------------------------------------------------------------------------------
def _find(env: str, name: str) -> str | None:
    explicit = os.environ.get(env)
    if explicit:
        if not os.access(explicit, os.X_OK):
            pytest.fail(f"${env}={explicit} is not an executable; {INSTALL_HINT}")
        return explicit
    local = ROOT / ".tools" / "bin" / name
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _version(binary: str) -> str:
    out = subprocess.run([binary, "version", "--short"], check=False, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="session")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Private helm config/cache/data directories, so tests neither read nor write the user's."""
    base = tmp_path_factory.mktemp("helm-home")
    return {"HELM_CONFIG_HOME": str(base / "config"), "HELM_CACHE_HOME": str(base / "cache"),
            "HELM_DATA_HOME": str(base / "data")}


class Helm:
    """One helm binary, with its renders cached for the session."""

    def __init__(self, path: str, env: dict[str, str], tmp: Path) -> None:
        self.path = path
        self.version = _version(path)
        self.env = {**os.environ, **env}
        self.env.pop("KUBECONFIG", None)
        self._tmp = tmp
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def run(self, *args: str, values: dict[str, Any] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [self.path, *args]
        if values is not None:
            vfile = self._tmp / f"values-{len(list(self._tmp.iterdir()))}.yaml"
            vfile.write_text(yaml.safe_dump(values))
            cmd += ["-f", str(vfile)]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60,
                              env={**self.env, **(env or {})})

    def template(self, values: dict[str, Any] | None = None, *extra: str,
                 env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        out = self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra,
                       values=values, env=env)
        assert out.returncode == 0, f"{self.version}: helm template failed:\n{out.stderr}"
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def scenario(self, name: str) -> list[dict[str, Any]]:
        if name not in self._cache:
            self._cache[name] = self.template(SCENARIOS[name])
        return copy.deepcopy(self._cache[name])


@pytest.fixture(scope="session")
def helm4_path() -> str:
    path = _find("HELM", "helm")
    if path is None:
        pytest.fail(f"no helm binary found ($HELM, .tools/bin/helm, PATH): {INSTALL_HINT}")
    return path


@pytest.fixture(scope="session", params=["helm", "helm3"])
def helm(request: pytest.FixtureRequest, helm4_path: str, helm_home: dict[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if request.param == "helm":
        path = helm4_path
    else:
        found = _find("HELM3", "helm3")
        if found is None:
            pytest.skip("no second helm (helm3) binary: scripts/install-helm.sh installs one")
        path = found
    return Helm(path, helm_home, tmp_path_factory.mktemp(request.param))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def secret_named(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == name]
    assert len(found) == 1, f"no Secret {name}"
    return found[0]


def b64(data: dict[str, str], key: str) -> bytes:
    return base64.b64decode(data[key])


# ------------------------------------------------------------------------------------------------
# lint and validation
# ------------------------------------------------------------------------------------------------
def test_helm_versions_found(helm: Helm) -> None:
    assert re.match(r"^v[34]\.\d+\.\d+", helm.version), helm.version


@pytest.mark.parametrize("scenario", ["default", "all-features", "cert-manager"])
def test_lint_strict(helm: Helm, scenario: str) -> None:
    out = helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                   values=SCENARIOS[scenario])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_kubernetes_validate_is_strict() -> None:
    """The validator itself refuses an unknown field (so the validations below can fail)."""
    import kubernetes_validate

    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {},
          "dataa": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cm, OLDEST_KUBERNETES, strict=True)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rendered_objects_validate_against_kubernetes(helm: Helm, scenario: str) -> None:
    import kubernetes_validate

    docs = helm.scenario(scenario)
    versions = [OLDEST_KUBERNETES, kubernetes_validate.latest_version()]
    checked = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes "
                            f"{version}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 8


def test_every_template_object_is_namespaced_or_cluster_scoped_correctly(helm: Helm) -> None:
    docs = helm.scenario("all-features")
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in meta, doc["kind"]
        else:
            assert meta.get("namespace") == NAMESPACE, (doc["kind"], meta["name"])
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["example.com/owner"] == "platform"  # commonLabels


# ------------------------------------------------------------------------------------------------
# the schema refuses what cannot work
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, named", [
    ({"webhook": {"replicsa": 3}}, "replicsa"),
    ({"policy": {"hostDisks": {"rooot": "/srv"}}}, "rooot"),
    ({"certManger": {"enabled": True}}, "certManger"),
    ({"admission": {"namespaceSelector": {"lable": "x"}}}, "lable"),
])
def test_misspelt_key_is_refused(helm: Helm, values: dict[str, Any], named: str) -> None:
    out = helm.run("template", RELEASE, str(CHART), values=values)
    assert out.returncode != 0
    assert named in out.stderr, out.stderr


@pytest.mark.parametrize("values, named", [
    ({"admission": {"timeoutSeconds": 31}}, "timeoutSeconds"),
    ({"admission": {"timeoutSeconds": 0}}, "timeoutSeconds"),
    ({"admission": {"failurePolicy": "Maybe"}}, "failurePolicy"),
    ({"policy": {"hostDisks": {"root": "relative/dir"}}}, "root"),
    ({"policy": {"hostDisks": {"maxDiskSize": "2 TB"}}}, "maxDiskSize"),
    ({"policy": {"hostDisks": {"defaults": {"bus": "ide"}}}}, "bus"),
    ({"policy": {"sizing": {"profiles": {"huge": {"cpu": 4}}}}}, "memory"),
    ({"webhook": {"port": 443}}, "port"),
    ({"planKeys": {"generation": 0}}, "generation"),
    ({"policy": {"hostDisks": {"defaults": {"cache": "writeback"}}}}, "defaults"),  # io native
    ({"policy": {"sizing": {"cpuAllocationRatio": 0.5}}}, "cpuAllocationRatio"),
])
def test_out_of_range_value_is_refused(helm: Helm, values: dict[str, Any], named: str) -> None:
    out = helm.run("template", RELEASE, str(CHART), values=values)
    assert out.returncode != 0
    assert named in out.stderr, out.stderr


@pytest.mark.parametrize("values, says", [
    ({"webhook": {"replicas": 1}}, "minAvailable (1) must be below webhook.replicas (1)"),
    ({"webhook": {"preStopSleepSeconds": 30}}, "preStopSleepSeconds (30) must be below"),
    ({"policy": {"defaultProfile": "huge"}},
     'policy.defaultProfile "huge" is not a profile in policy.sizing.profiles (large, medium, small)'),
])
def test_settings_that_cannot_work_fail_with_the_reason(helm: Helm, values: dict[str, Any],
                                                        says: str) -> None:
    out = helm.run("template", RELEASE, str(CHART), values=values)
    assert out.returncode != 0
    assert says in out.stderr, out.stderr


def test_single_replica_works_without_the_pdb(helm: Helm) -> None:
    docs = helm.template({"webhook": {"replicas": 1, "podDisruptionBudget": {"enabled": False}}})
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert not by_kind(docs, "PodDisruptionBudget")


def test_schema_closes_every_object_with_fixed_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, sub in node["properties"].items():
                walk(sub, f"{where}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}.*")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")
        for alt in node.get("oneOf", []):
            walk(alt, where)

    walk(schema, "values")
    assert open_objects == []


def test_schema_enums_match_the_policy_loader() -> None:
    """What the schema lets through for driver defaults is what diskplan.policy accepts."""
    from diskplan import plan

    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = schema["properties"]["policy"]["properties"]["hostDisks"]["properties"]["defaults"]
    enums = {k: set(v["enum"]) for k, v in defaults["properties"].items()}
    assert enums == {"bus": set(plan.BUSES), "cache": set(plan.CACHES), "io": set(plan.IOS),
                     "discard": set(plan.DISCARDS)}


def _values_keys(text: str) -> list[tuple[str, int, bool]]:
    """(dotted key, line index, documented) for every mapping key in values.yaml."""
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    found = []
    for idx, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(\s|$)", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        j = idx - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].startswith(" " * indent + "# -- ")
        found.append((".".join(k for _, k in stack), idx, documented))
    return found


def test_every_value_is_documented() -> None:
    keys = _values_keys((CHART / "values.yaml").read_text())
    assert len(keys) > 60
    undocumented = [k for k, _, documented in keys if not documented]
    assert undocumented == []


def test_readme_values_table_lists_every_value() -> None:
    text = (CHART / "values.yaml").read_text()
    keys = {k for k, _, _ in _values_keys(text)}
    defaults = yaml.safe_load(text)

    def leaves(node: Any, prefix: str) -> Iterator[str]:
        if isinstance(node, dict) and node and prefix.rsplit(".", 1)[-1] not in ("profiles",
                                                                                   "resources"):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix

    readme = (CHART / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Za-z0-9_.-]+)` \|", readme, flags=re.MULTILINE))
    expected = set(leaves(defaults, ""))
    assert expected <= keys
    assert table == expected, (f"missing from README: {sorted(expected - table)}; "
                               f"not in values.yaml: {sorted(table - expected)}")


# ------------------------------------------------------------------------------------------------
# the MutatingWebhookConfiguration
# ------------------------------------------------------------------------------------------------
def _webhooks(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    mwc = one(docs, "MutatingWebhookConfiguration")
    return {w["name"]: w for w in mwc["webhooks"]}


def test_three_webhooks_with_their_rules_and_paths(helm: Helm) -> None:
    docs = helm.scenario("default")
    hooks = _webhooks(docs)
    assert list(hooks) == ["vm.diskhooks.io", "vmi.diskhooks.io", "launcher-pod.diskhooks.io"]
    expected = {
        "vm.diskhooks.io": ("kubevirt.io", "virtualmachines", ["CREATE", "UPDATE"], "/mutate"),
        "vmi.diskhooks.io": ("kubevirt.io", "virtualmachineinstances", ["CREATE"], "/mutate"),
        "launcher-pod.diskhooks.io": ("", "pods", ["CREATE"], "/mutate-pod"),
    }
    service = one(docs, "Service")
    for name, (group, resource, operations, path) in expected.items():
        hook = hooks[name]
        (rule,) = hook["rules"]
        assert rule["apiGroups"] == [group] and rule["apiVersions"] == ["v1"]
        assert rule["resources"] == [resource] and rule["operations"] == operations
        assert rule["scope"] == "Namespaced"
        svc = hook["clientConfig"]["service"]
        assert svc == {"name": service["metadata"]["name"], "namespace": NAMESPACE, "path": path,
                       "port": 443}
        assert "?" not in path  # the API server adds ?timeout=; a webhook URL must carry none
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["matchPolicy"] == "Equivalent"
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["timeoutSeconds"] == 10
        assert hook["failurePolicy"] == "Fail"
    assert "objectSelector" not in hooks["vm.diskhooks.io"]
    assert "objectSelector" not in hooks["vmi.diskhooks.io"]
    assert hooks["launcher-pod.diskhooks.io"]["objectSelector"] == {
        "matchLabels": {"diskhooks.io/managed": "true", "kubevirt.io": "virt-launcher"}}


def test_pod_webhook_label_is_the_one_the_webhook_sets() -> None:
    from diskplan import keys

    text = (CHART / "templates" / "webhook-mutatingwebhookconfiguration.yaml").read_text()
    assert f'{keys.LABEL_MANAGED}: "{keys.LABEL_MANAGED_VALUE}"' in text
    assert f"{keys.LABEL_LAUNCHER}: virt-launcher" in text


def test_failure_policy_and_timeout_are_values_but_pods_always_fail_closed(helm: Helm) -> None:
    hooks = _webhooks(helm.scenario("all-features"))
    assert hooks["vm.diskhooks.io"]["failurePolicy"] == "Ignore"
    assert hooks["vmi.diskhooks.io"]["failurePolicy"] == "Ignore"
    assert hooks["launcher-pod.diskhooks.io"]["failurePolicy"] == "Fail"
    assert {h["timeoutSeconds"] for h in hooks.values()} == {5}


def test_namespace_selector_opt_in_and_exclusions(helm: Helm) -> None:
    for hook in _webhooks(helm.scenario("default")).values():
        sel = hook["namespaceSelector"]
        assert sel["matchLabels"] == {"diskhooks.io/enabled": "true"}
        (expr,) = sel["matchExpressions"]
        assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "NotIn"
        assert set(expr["values"]) == {"kube-system", NAMESPACE}
    for hook in _webhooks(helm.scenario("all-features")).values():
        (expr,) = hook["namespaceSelector"]["matchExpressions"]
        assert set(expr["values"]) == {"kube-system", NAMESPACE, "kubevirt", "cdi"}
    for hook in _webhooks(helm.scenario("opt-out-namespaces")).values():
        sel = hook["namespaceSelector"]
        assert "matchLabels" not in sel
        assert set(sel["matchExpressions"][0]["values"]) == {"kube-system", NAMESPACE}


def test_custom_opt_in_label(helm: Helm) -> None:
    docs = helm.template({"admission": {"namespaceSelector": {"label": "example.com/vms",
                                                              "value": "diskhooks"}}})
    for hook in _webhooks(docs).values():
        assert hook["namespaceSelector"]["matchLabels"] == {"example.com/vms": "diskhooks"}


# ------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------
def _dns_names() -> list[str]:
    svc = f"{FULLNAME}-webhook"
    return [svc, f"{svc}.{NAMESPACE}", f"{svc}.{NAMESPACE}.svc", f"{svc}.{NAMESPACE}.svc.cluster.local"]


def _check_chain(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """``cert`` is signed by ``ca``, carries the Service names, is for serving, matches ``key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == _dns_names()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=3000)  # tls.validityDays 3650


def test_default_tls_secret_and_ca_bundle_form_a_chain(helm: Helm) -> None:
    docs = helm.scenario("default")
    secret = secret_named(docs, f"{FULLNAME}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    _check_chain(b64(secret["data"], "ca.crt"), b64(secret["data"], "tls.crt"),
                 b64(secret["data"], "tls.key"))
    bundles = {h["clientConfig"]["caBundle"] for h in _webhooks(docs).values()}
    assert len(bundles) == 1
    assert base64.b64decode(bundles.pop()) == b64(secret["data"], "ca.crt")
    assert "annotations" not in one(docs, "MutatingWebhookConfiguration")["metadata"]
    deployment = one(docs, "Deployment")
    tls_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_each_template_render_makes_a_fresh_ca(helm: Helm) -> None:
    """helm template cannot lookup: documented, and visible here (two renders, two CAs)."""
    first = secret_named(helm.scenario("default"), f"{FULLNAME}-webhook-tls")
    second = secret_named(helm.template(), f"{FULLNAME}-webhook-tls")
    assert first["data"]["ca.crt"] != second["data"]["ca.crt"]


@pytest.mark.parametrize("scenario", ["cert-manager", "cert-manager-issuer"])
def test_cert_manager_mode(helm: Helm, scenario: str) -> None:
    docs = helm.scenario(scenario)
    mwc = one(docs, "MutatingWebhookConfiguration")
    certs = {d["metadata"]["name"]: d for d in by_kind(docs, "Certificate")}
    serving = certs[f"{FULLNAME}-webhook"]
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{NAMESPACE}/{FULLNAME}-webhook"
    for hook in mwc["webhooks"]:
        assert "caBundle" not in hook["clientConfig"]
    assert not [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("-tls")]
    assert serving["apiVersion"] == "cert-manager.io/v1"
    spec = serving["spec"]
    assert spec["secretName"] == f"{FULLNAME}-webhook-tls"
    assert spec["dnsNames"] == _dns_names()
    assert "server auth" in spec["usages"]
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert spec["duration"] == "2160h" and spec["renewBefore"] == "720h"
    deployment = one(docs, "Deployment")
    tls_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == spec["secretName"]
    issuers = {d["metadata"]["name"]: d for d in by_kind(docs, "Issuer")}
    if scenario == "cert-manager-issuer":
        assert spec["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert issuers == {} and list(certs) == [f"{FULLNAME}-webhook"]
        return
    # the chart's own chain: self-signed Issuer -> CA Certificate -> CA Issuer -> serving cert
    ca_cert = certs[f"{FULLNAME}-ca"]["spec"]
    assert ca_cert["isCA"] is True
    assert ca_cert["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    assert issuers[f"{FULLNAME}-selfsigned"]["spec"] == {"selfSigned": {}}
    assert issuers[f"{FULLNAME}-ca"]["spec"] == {"ca": {"secretName": ca_cert["secretName"]}}
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": f"{FULLNAME}-ca"}
    for doc in [*certs.values(), *issuers.values()]:
        assert doc["apiVersion"] == "cert-manager.io/v1"


# ------------------------------------------------------------------------------------------------
# the Deployment and its neighbours
# ------------------------------------------------------------------------------------------------
def test_deployment_is_hardened(helm: Helm) -> None:
    docs = helm.scenario("default")
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "priorityClassName" not in pod
    # writable /tmp on an emptyDir (prometheus multiprocess files, gunicorn)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert all("subPath" not in m for m in container["volumeMounts"])  # updates must propagate
    # resources
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    # probes over HTTPS on the named port
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"https": 8443}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["scheme"], get["path"], get["port"]) == ("HTTPS", path, "https")
    # preferred anti-affinity by hostname, selecting exactly these pods
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert selector == spec["selector"]["matchLabels"]
    # PDB keeps one of them
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    # the Service: 443 -> the container's https port
    service = one(docs, "Service")
    (sport,) = service["spec"]["ports"]
    assert (sport["port"], sport["targetPort"]) == (443, "https")
    assert service["spec"]["selector"] == selector
    # no checksum annotations: the webhook reloads policy, keys and certificate itself
    assert "annotations" not in spec["template"]["metadata"]


def test_deployment_runs_the_webhook_cli_with_the_mounted_files(helm: Helm) -> None:
    from webhook.cli import build_parser

    docs = helm.scenario("default")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])  # the real CLI accepts the chart's args
    assert args.command == "serve"
    assert args.port == 8443 and args.workers == 2 and args.in_cluster
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    policy_cm = one(docs, "ConfigMap")
    assert str(args.config) == f"{mounts['policy']}/policy.yaml"
    assert volumes["policy"]["configMap"]["name"] == policy_cm["metadata"]["name"]
    assert str(args.cert_file) == f"{mounts['tls']}/tls.crt"
    assert str(args.key_file) == f"{mounts['tls']}/tls.key"
    assert str(args.plan_keys_dir) == mounts["plan-keys"]
    assert volumes["plan-keys"]["secret"]["secretName"] == f"{FULLNAME}-plan-keys"
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["mountPath"] != "/tmp")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    # graceful shutdown fits in the grace period after the preStop sleep
    assert args.graceful_timeout + 5 < pod["terminationGracePeriodSeconds"]
    assert pod["automountServiceAccountToken"] is True  # --in-cluster needs the token


def test_optional_features_render(helm: Helm) -> None:
    docs = helm.scenario("all-features")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert pod["priorityClassName"] == "platform-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert container["image"] == "ghcr.io/diskhooks/diskhooks-webhook@sha256:" + "ab" * 32
    assert "--access-log" in container["args"]
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["annotations"] == {"example.com/team": "platform"}
    assert meta["labels"]["example.com/tier"] == "infra"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2

    netpol = one(docs, "NetworkPolicy")
    assert netpol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = netpol["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}]
    assert rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert netpol["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]

    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"] == one(docs, "Service")["spec"]["selector"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["scheme"], endpoint["path"]) == ("https", "https", "/metrics")
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": f"{FULLNAME}-webhook-tls", "key": "ca.crt"}
    assert endpoint["tlsConfig"]["serverName"] == f"{FULLNAME}-webhook.{NAMESPACE}.svc"


def test_network_policy_admits_any_source_by_default(helm: Helm) -> None:
    docs = helm.template({"networkPolicy": {"enabled": True}})
    (rule,) = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert "from" not in rule  # the API server's addresses are not pod IPs
    assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}]


def test_rbac_is_least_privilege(helm: Helm) -> None:
    docs = helm.scenario("default")
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    (cluster_role,) = by_kind(docs, "ClusterRole")
    granted = {(g, r, v) for rule in cluster_role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {(g, r, v) for g, r in [("", "persistentvolumeclaims"), ("", "nodes"),
                                              ("storage.k8s.io", "storageclasses")]
                       for v in ("get", "list", "watch")}
    crb = one(docs, "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    # the only namespaced grant: get on the plan-key Secret, by name
    role = one(docs, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "resourceNames": [f"{FULLNAME}-plan-keys"], "verbs": ["get"]}]
    rb = one(docs, "RoleBinding")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                             "name": role["metadata"]["name"]}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa

    off = helm.scenario("opt-out-namespaces")  # inCluster false, readerRole false
    assert not [d for d in off if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    pod = one(off, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "--in-cluster" not in pod["containers"][0]["args"]


# ------------------------------------------------------------------------------------------------
# the policy ConfigMap
# ------------------------------------------------------------------------------------------------
def _policy_text(docs: list[dict[str, Any]]) -> str:
    return str(one(docs, "ConfigMap")["data"]["policy.yaml"])


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    if not isinstance(node, dict) or prefix.endswith("profiles"):
        return {prefix}
    out = set()
    for k, v in node.items():
        out |= _key_paths(v, f"{prefix}.{k}" if prefix else k)
    return out


def test_policy_has_the_example_policy_keys_and_the_sidecar_image(helm: Helm) -> None:
    default = yaml.safe_load(_policy_text(helm.scenario("default")))
    example = yaml.safe_load(EXAMPLE_POLICY.read_text())
    assert _key_paths(default) == _key_paths(example)
    assert default["sidecar"]["image"] == "ghcr.io/diskhooks/diskhooks-sidecar:0.1.0"
    assert default["sidecar"]["imagePullPolicy"] == "IfNotPresent"
    assert default["defaultProfile"] is None
    featured = yaml.safe_load(_policy_text(helm.scenario("all-features")))
    assert featured["sidecar"]["image"] == "ghcr.io/diskhooks/diskhooks-sidecar:0.2.0"
    assert featured["passthrough"] == {"storageClasses": ["local-nvme"], "allowLun": True}
    assert featured["defaultProfile"] == "small"


def test_policy_loads_with_diskplan(helm: Helm) -> None:
    """The rendered policy.yaml is accepted by the loader the webhook runs (diskplan.policy)."""
    try:
        from diskplan.policy import load_policy
    except ImportError as exc:  # engineer A1's module; the assertion stays until it lands
        pytest.fail(f"diskplan.policy.load_policy is not importable yet: {exc}")
    for scenario in ("default", "all-features"):
        policy = load_policy(_policy_text(helm.scenario(scenario)))
        assert policy.host_disks.root == "/var/lib/diskhooks/vms"
        assert policy.sidecar.image.startswith("ghcr.io/diskhooks/diskhooks-sidecar:")
    featured = load_policy(_policy_text(helm.scenario("all-features")))
    assert featured.passthrough.allow_lun is True
    assert featured.default_profile == "small"
    docs = helm.template({"policy": {"hostDisks": {"root": "/srv/vms", "maxDiskSize": "500Gi"}}})
    custom = load_policy(_policy_text(docs))
    assert custom.host_disks.root == "/srv/vms"
    assert custom.host_disks.max_disk_size == 500 * 1024**3


# ------------------------------------------------------------------------------------------------
# plan keys
# ------------------------------------------------------------------------------------------------
def test_plan_key_secret(helm: Helm) -> None:
    docs = helm.scenario("default")
    secret = secret_named(docs, f"{FULLNAME}-plan-keys")
    current = b64(secret["data"], "current")
    assert len(current) >= 32 and current.isalnum()
    assert "previous" not in secret["data"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert secret["metadata"]["annotations"]["diskhooks.io/plan-key-generation"] == "1"
    # mounted into the webhook and nowhere else
    users = [v for d in by_kind(docs, "Deployment") for v in d["spec"]["template"]["spec"]["volumes"]
             if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]]
    assert len(users) == 1
    off = secret_named(helm.scenario("opt-out-namespaces"), f"{FULLNAME}-plan-keys")
    assert "helm.sh/resource-policy" not in off["metadata"].get("annotations", {})


def test_existing_plan_key_secret_is_used_not_made(helm: Helm) -> None:
    docs = helm.scenario("all-features")
    assert not [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("plan-keys")]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "plan-keys")
    assert vol["secret"]["secretName"] == "my-plan-keys"
    assert one(docs, "Role")["rules"][0]["resourceNames"] == ["my-plan-keys"]


# ------------------------------------------------------------------------------------------------
# upgrades: what `lookup` finds is kept (fake API server, see the module docstring)
# ------------------------------------------------------------------------------------------------
_DISCOVERY = {
    "v1": [("secrets", "Secret", True), ("configmaps", "ConfigMap", True),
           ("services", "Service", True), ("serviceaccounts", "ServiceAccount", True),
           ("namespaces", "Namespace", False), ("pods", "Pod", True)],
    "apps/v1": [("deployments", "Deployment", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False),
                                     ("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
    "admissionregistration.k8s.io/v1": [("mutatingwebhookconfigurations",
                                         "MutatingWebhookConfiguration", False)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
}


class FakeApiServer:
    """Answers what ``helm template --dry-run=server`` asks: version, discovery, GET Secret."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return None

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?")[0].rstrip("/")
                fake.requests.append(path)
                self._send(*fake.answer(path))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/version":
            return 200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = [{"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": "v1"}],
                       "preferredVersion": {"groupVersion": gv, "version": "v1"}}
                      for gv in _DISCOVERY if "/" in gv]
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if gv in _DISCOVERY:
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                         "resources": [{"name": n, "singularName": "", "namespaced": ns, "kind": k,
                                        "verbs": ["get", "list"]} for n, k, ns in _DISCOVERY[gv]]}
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+))?", path)
        if m and m.group(2) is None:
            return 200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": []}
        if m and (m.group(1), m.group(2)) in self.secrets:
            return 200, self.secrets[(m.group(1), m.group(2))]
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                     "code": 404}

    def store(self, secret: dict[str, Any]) -> None:
        """What `helm install` would have created from a rendered Secret (with helm's ownership)."""
        stored = copy.deepcopy(secret)
        stored["metadata"].setdefault("annotations", {}).update({
            "meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE})
        self.secrets[(secret["metadata"]["namespace"], secret["metadata"]["name"])] = stored

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        return path

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[FakeApiServer, dict[str, str]]]:
    fake = FakeApiServer()
    try:
        yield fake, {"KUBECONFIG": str(fake.kubeconfig(tmp_path))}
    finally:
        fake.close()


def _upgrade(helm: Helm, env: dict[str, str], values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return helm.template(values or {}, "--dry-run=server", "--disable-openapi-validation", env=env)


def test_upgrade_keeps_the_plan_key_and_rotation_keeps_the_previous_one(
        helm: Helm, cluster: tuple[FakeApiServer, dict[str, str]]) -> None:
    fake, env = cluster
    name = f"{FULLNAME}-plan-keys"
    first = secret_named(_upgrade(helm, env), name)  # install: nothing to find
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}" in fake.requests
    fake.store(first)
    again = secret_named(_upgrade(helm, env), name)
    assert again["data"] == first["data"]

    rotated = secret_named(_upgrade(helm, env, {"planKeys": {"generation": 2}}), name)
    assert rotated["data"]["previous"] == first["data"]["current"]
    assert rotated["data"]["current"] != first["data"]["current"]
    assert len(b64(rotated["data"], "current")) >= 32
    assert rotated["metadata"]["annotations"]["diskhooks.io/plan-key-generation"] == "2"
    fake.store(rotated)
    # a repeated upgrade with the same generation (e.g. --reuse-values) does not rotate again
    assert secret_named(_upgrade(helm, env, {"planKeys": {"generation": 2}}), name)["data"] == \
        rotated["data"]
    # values that forget the bump do not roll back either
    assert secret_named(_upgrade(helm, env), name)["data"] == rotated["data"]
    # once every VM was re-signed, the previous key can go
    dropped = secret_named(_upgrade(helm, env, {"planKeys": {"generation": 2, "keepPrevious": False}}),
                           name)
    assert dropped["data"] == {"current": rotated["data"]["current"]}


def test_upgrade_keeps_the_ca_and_rotation_bundles_old_and_new(
        helm: Helm, cluster: tuple[FakeApiServer, dict[str, str]]) -> None:
    fake, env = cluster
    name = f"{FULLNAME}-webhook-tls"
    docs = _upgrade(helm, env)
    first = secret_named(docs, name)
    fake.store(first)
    docs = _upgrade(helm, env)
    assert secret_named(docs, name)["data"] == first["data"]
    for hook in _webhooks(docs).values():
        assert hook["clientConfig"]["caBundle"] == first["data"]["ca.crt"]

    docs = _upgrade(helm, env, {"tls": {"generation": 2}})
    rotated = secret_named(docs, name)
    assert rotated["data"]["ca.crt"] != first["data"]["ca.crt"]
    assert rotated["data"]["previous-ca.crt"] == first["data"]["ca.crt"]
    _check_chain(b64(rotated["data"], "ca.crt"), b64(rotated["data"], "tls.crt"),
                 b64(rotated["data"], "tls.key"))
    bundle = base64.b64decode(_webhooks(docs)["vm.diskhooks.io"]["clientConfig"]["caBundle"])
    # pods still serving the old certificate until the kubelet refreshes the mount stay trusted
    assert b64(first["data"], "ca.crt").strip() in bundle
    assert b64(rotated["data"], "ca.crt").strip() in bundle
    assert bundle.count(b"BEGIN CERTIFICATE") == 2


# ------------------------------------------------------------------------------------------------
# NOTES.txt
# ------------------------------------------------------------------------------------------------
def test_notes_tell_the_next_steps(helm: Helm, cluster: tuple[FakeApiServer, dict[str, str]]) -> None:
    """helm 3's `install --dry-run` asks the cluster for releases: the fake API server answers."""
    _, env = cluster
    out = helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=server",
                   "--disable-openapi-validation", env=env)
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    for needed in ("featureGates: [HostDisk, Sidecar]", "developerConfiguration",
                   "supportContainerResources", "type: sidecar",
                   "kubectl label namespace NAMESPACE diskhooks.io/enabled=true",
                   f"deployment/{FULLNAME}-webhook"):
        assert needed in notes, needed
