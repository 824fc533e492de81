"""The hostile corpus (``tests/data/hostile/``): one attack per file, each through the real entry point.

Every case is ``<name>.expect.json`` (what the attack is, the entry point, the defence that stops it,
the input and the outcome it must get) with, where the attack is a document, its payload beside it
(``<name>.yaml``, ``.json``, ``.xml``). Entry points, all real:

- ``webhook``: the served webhook (``python -m webhook.cli serve``: gunicorn, TLS, 2 workers, the
  example policy; ``tests/test_server.py``'s server), ``POST /mutate`` or ``/mutate-pod`` as
  kube-apiserver sends it, the reviews built from ``tests/data/kubevirt/admission/``;
- ``policy``: ``diskplan.policy.load_policy`` (what the webhook's reload runs on a new ConfigMap);
- ``sidecar-grpc``: the served hook sidecar (``python -m hooksidecar.cli serve``, its verified plan in
  ``DISKHOOKS_PLAN``), called over its unix socket with grpcio as virt-launcher calls it
  (``tests/test_sidecar_server.py``'s sample: KubeVirt's sample 01 with real qcow2 images);
- ``sidecar-dry-run``: ``python -m hooksidecar.cli dry-run``;
- ``prepare``: ``python -m hooksidecar.prepare`` with real ``qemu-img``, on a directory laid out like
  the launcher's filesystem; the images are made at test time from the case's recipe (qemu-img
  commands, links), and "node files" such as ``/etc/shadow`` are decoys in a directory outside it,
  which must be unchanged afterwards.

Only kube-apiserver and virt-launcher are played (by this test's HTTP and gRPC clients).
``docs/SECURITY.md`` maps each case to its defence.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jsonpatch
import pytest

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.plan import Backing, Plan, PlanKeys, PlannedDisk, sign_plan, verify_plan
from diskplan.policy import load_policy
from diskplan.quantity import parse_bytes
from tests.conftest import ADMISSION, DATA, ROOT
from tests.test_prepare import Node, make_plan, run_prepare
from tests.test_server import Server
from tests.test_sidecar_server import (
    PLAN_KEYS,
    PLAN_TEXT,
    PlannedSample,
    Sidecar,
    build_sample,
    call_on_define,
    start_sidecar,
    subprocess_env,
)
from tests.test_sidecar_server import (
    make_plan as sidecar_plan,
)
from webhook.admission import patch_of

HOSTILE = DATA / "hostile"
CASES = {
    p.name[: -len(".expect.json")]: json.loads(p.read_text()) for p in sorted(HOSTILE.glob("*.expect.json"))
}
ENTRIES = ("webhook", "policy", "sidecar-grpc", "sidecar-dry-run", "prepare")
POD_VMI = "fedora-data"  # the sample launcher Pod's kubevirt.io/domain


def cases(entry: str) -> list[str]:
    return [name for name, case in CASES.items() if case["entry"] == entry]


def payload(name: str) -> bytes | None:
    found = [p for p in HOSTILE.glob(f"{name}.*") if not p.name.endswith(".expect.json")]
    assert len(found) <= 1, found
    return found[0].read_bytes() if found else None


def generated(spec: dict[str, Any]) -> str:
    text = str(spec["repeat"]) * int(spec["times"])
    return text + (generated(spec["then"]) if "then" in spec else "")


def test_the_corpus_is_well_formed() -> None:
    """Every case names a known entry, its attack and its defence; every payload has its case."""
    assert len(CASES) >= 50
    for name, case in CASES.items():
        assert case["entry"] in ENTRIES, name
        assert case["attack"].strip() and case["defence"].strip() and case["expect"], name
    for path in HOSTILE.iterdir():
        stem = path.name.split(".")[0]
        assert stem in CASES, f"{path.name} belongs to no case"


def test_security_md_maps_every_case_to_its_defence() -> None:
    """docs/SECURITY.md's table has one row per case, naming the same defence as the case."""
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"^\| `([a-z0-9-]+)` \|[^|]*\|[^|]*\| (.*) \|$",
            (ROOT / "docs" / "SECURITY.md").read_text(),
            re.MULTILINE,
        )
    }
    assert sorted(rows) == sorted(CASES)
    for name, case in CASES.items():
        assert rows[name] == case["defence"].replace("|", "/"), name


# ================================================================================================
# the served webhook
# ================================================================================================
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("webhook"))
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=30)
    srv.log.close()


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """``a.b.c`` (``\\.`` for a dot inside a key) := value, creating objects on the way."""
    keys = [k.replace("\0", ".") for k in dotted.replace("\\.", "\0").split(".")]
    for key in keys[:-1]:
        doc = doc.setdefault(key, {})
    doc[keys[-1]] = value


def _pod_plan_text(how: str, keys: PlanKeys) -> str:
    plan = Plan(
        namespace="vms",
        vm=POD_VMI,
        host_dir=f"/var/lib/diskhooks/vms/vms/{POD_VMI}",
        image_library=None,
        sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
        disks=(
            PlannedDisk(
                name="datadisk", size_bytes=10 << 30, bus="virtio", cache="none", io="native", discard="unmap"
            ),
        ),
    )
    if how == "other-vm":
        return sign_plan(replace(plan, vm="other-vm"), keys)
    doc = json.loads(sign_plan(plan, keys))
    if how == "bad-hmac":
        doc["auth"]["hmac"] = ("0" if doc["auth"]["hmac"][0] != "0" else "1") + doc["auth"]["hmac"][1:]
    elif how == "version-tampered":
        doc["version"], doc["node"] = 3, "node-b"
    elif how == "unsigned":
        del doc["auth"]
    return json.dumps(doc)


def build_review(case: dict[str, Any], name: str, keys: PlanKeys) -> bytes:
    inp = case["input"]
    if inp.get("body"):
        return generated(inp["generate"]).encode()
    review: dict[str, Any] = json.loads((ADMISSION / inp["review"]).read_text())
    obj = review["request"]["object"]
    if "annotation" in inp:
        text = generated(inp["generate"]) if "generate" in inp else (payload(name) or b"").decode()
        annotations = {
            k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if not k.startswith(K.PREFIX)
        }
        obj["metadata"]["annotations"] = {**annotations, inp["annotation"]: text}
    for dotted, value in inp.get("set", {}).items():
        _set(review, dotted, value)
    how = inp.get("plan")
    if how == "forged-on-template":
        forged = Plan(
            namespace="vms",
            vm=obj["metadata"]["name"],
            host_dir="/var/lib/diskhooks/vms/vms/x",
            image_library=None,
            sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
            disks=(
                PlannedDisk(
                    name="pgdata",
                    size_bytes=1 << 50,
                    bus="virtio",
                    cache="none",
                    io="native",
                    discard="unmap",
                ),
            ),
            node="node-b",
        )
        tmeta = obj["spec"]["template"].setdefault("metadata", {})
        tmeta.setdefault("annotations", {})[K.ANN_PLAN] = sign_plan(
            forged, PlanKeys(b"the-owners-own-key-0123456789")
        )
    elif how is not None:  # a launcher Pod carrying a plan (the user can create Pods)
        obj["metadata"]["labels"][K.LABEL_MANAGED] = K.LABEL_MANAGED_VALUE
        obj["metadata"]["annotations"][K.ANN_PLAN] = _pod_plan_text(how, keys)
    return json.dumps(review).encode()


@pytest.mark.parametrize("name", cases("webhook"))
def test_webhook_case(server: Server, name: str) -> None:
    case = CASES[name]
    expect = case["expect"]
    body = build_review(case, name, server.plan_keys)
    conn = server.connect()
    try:
        conn.request(
            "POST",
            f"{case['input']['route']}?timeout=10s",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        status, answer = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == expect["http"], (status, answer)
    if status != 200:
        assert answer["field"] == expect["field"], answer
        assert expect["message"] in answer["reason"], answer
        return
    response = answer["response"]
    assert response["allowed"] is expect["allowed"], response
    if not expect["allowed"]:
        message = response["status"]["message"]
        assert response["status"]["code"] == expect["code"], response
        assert message.startswith(expect["field"] + ": "), message
        assert expect["message"] in message, message
        assert "patch" not in response
        return
    if expect.get("plan") == "recomputed":  # the owner's plan is gone; the webhook's verifies
        request = json.loads(body)["request"]
        ops = [
            op
            for op in patch_of(response)
            if "diskhooks.io~1plan" in op["path"] or op["path"].endswith("/metadata/annotations")
        ]
        assert ops, "the owner's plan was left in place"
        value = ops[-1]["value"]
        text = value if isinstance(value, str) else value[K.ANN_PLAN]
        plan = verify_plan(text, server.plan_keys, namespace="vms", vm=request["object"]["metadata"]["name"])
        assert plan.node is None and all(d.size_bytes <= parse_bytes("2Ti") for d in plan.disks)
    if expect.get("patch") is False:
        assert "patch" not in response
    if expect.get("sidecars") == "rewritten":  # only the webhook's own entry runs the diskhooks image
        admitted = jsonpatch.apply_patch(json.loads(body)["request"]["object"], patch_of(response))
        entries = json.loads(admitted["metadata"]["annotations"][K.ANN_HOOK_SIDECARS])
        ours = [e for e in entries if e["image"] == "ghcr.io/diskhooks/diskhooks-sidecar:0.1.0"]
        assert ours == [
            {
                "image": "ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
                "imagePullPolicy": "IfNotPresent",
                "args": ["serve", "--version", "v1alpha3"],
            }
        ], entries


# ================================================================================================
# the policy
# ================================================================================================
@pytest.mark.parametrize("name", cases("policy"))
def test_policy_case(name: str) -> None:
    expect = CASES[name]["expect"]
    with pytest.raises(Refused) as info:
        load_policy((payload(name) or b"").decode())
    if expect["refused"]:
        assert info.value.field == expect["refused"], str(info.value)
    assert info.value.field.strip() and expect["message"] in info.value.reason, str(info.value)


# ================================================================================================
# the served hook sidecar, and its dry run
# ================================================================================================
@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> PlannedSample:
    return build_sample(tmp_path_factory.mktemp("prefix"))


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, sample: PlannedSample) -> Iterator[Sidecar]:
    served = start_sidecar(tmp_path_factory.mktemp("sock"), "--path-prefix", str(sample.prefix))
    yield served
    served.stop()


def _domain(spec: Any, name: str, sample: PlannedSample) -> bytes:
    if spec == "payload":
        data = payload(name)
        assert data is not None
        return data
    if isinstance(spec, str):
        return (HOSTILE / spec).read_bytes()
    if spec is None:
        return sample.first_call
    if "nest" in spec:
        n = spec["nest"]
        return sample.first_call.replace(b"</metadata>", b"<a>" * n + b"</a>" * n + b"</metadata>", 1)
    return sample.first_call.replace(b"</metadata>", b"<!--" + b"x" * spec["pad"] + b"--></metadata>", 1)


def _vmi(spec: str | None, sample: PlannedSample) -> bytes:
    if spec == "plan-swapped":  # validly signed, but not the plan the Pod webhook verified
        vmi = json.loads(sample.vmi)
        vmi["metadata"]["annotations"][K.ANN_PLAN] = sign_plan(
            replace(sidecar_plan(), disks=sidecar_plan().disks[:1]), PLAN_KEYS
        )
        assert vmi["metadata"]["annotations"][K.ANN_PLAN] != PLAN_TEXT
        return json.dumps(vmi).encode()
    if spec == "plan-removed":
        return sample.vmi_without_plan
    if spec == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    return sample.vmi


@pytest.mark.parametrize("name", cases("sidecar-grpc"))
def test_sidecar_case(sidecar: Sidecar, sample: PlannedSample, name: str) -> None:
    case = CASES[name]
    domain = _domain(case["input"].get("domain"), name, sample)
    vmi = _vmi(case["input"].get("vmi"), sample)
    with pytest.raises(grpc.RpcError) as info:
        call_on_define(sidecar.target, "v1alpha3", domain, vmi)
    err = info.value
    assert err.code() == getattr(grpc.StatusCode, case["expect"]["grpc"]), (err.code(), err.details())
    assert case["expect"]["message"] in (err.details() or ""), err.details()
    # and it still answers a legitimate call afterwards
    assert b'type="qcow2"' in call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi)


@pytest.mark.parametrize("name", cases("sidecar-dry-run"))
def test_sidecar_dry_run_case(tmp_path: Path, sample: PlannedSample, name: str) -> None:
    case = CASES[name]
    (tmp_path / "vmi.json").write_bytes(sample.vmi)
    (tmp_path / "domain.xml").write_bytes(_domain(case["input"]["domain"], name, sample))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hooksidecar.cli",
            "dry-run",
            "--vmi",
            str(tmp_path / "vmi.json"),
            "--domain",
            str(tmp_path / "domain.xml"),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == case["expect"]["exit"], proc.stderr
    assert case["expect"]["message"] in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ================================================================================================
# real prepare, real qemu-img
# ================================================================================================
def _plan(disks: list[dict[str, Any]]) -> Plan:
    return make_plan(
        *(
            PlannedDisk(
                name=d["name"],
                size_bytes=parse_bytes(d["size"]),
                bus="virtio",
                cache="none",
                io="native",
                discard="unmap",
                backing=Backing(**d["backing"]) if "backing" in d else None,
            )
            for d in disks
        )
    )


def _edit_plan(text: str, edits: dict[str, Any]) -> str:
    doc = json.loads(text)
    for dotted, value in edits.items():
        target: Any = doc
        *parents, last = dotted.split(".")
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value
    return json.dumps(doc)


def _expand(arg: str, node: Node, outside: Path) -> str:
    def one(m: re.Match[str]) -> str:
        kind, _, name = m.group(1).partition(":")
        if kind == "outside":
            return str(outside)
        if kind == "library":
            return str(node.path(K.LAUNCHER_IMAGE_LIBRARY))
        if kind == "base":
            return str(node.path(f"{K.LAUNCHER_IMAGE_LIBRARY}/{name}"))
        if kind == "launcher-disk":
            return f"{K.launcher_disk_dir(name)}/{K.disk_file_name(name)}"
        if kind == "disk-dir":
            return str(node.path(K.launcher_disk_dir(name)))
        if kind == "parent-of-disk-dir":
            return str(node.path(K.launcher_disk_dir(name)).parent)
        assert kind == "disk", m.group(0)
        return str(node.path(f"{K.launcher_disk_dir(name)}/{K.disk_file_name(name)}"))

    return re.sub(r"\{([a-z-]+(?::[^}]*)?)\}", one, arg)


def _state(d: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mode) for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("name", cases("prepare"))
def test_prepare_case(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    inp, expect = case["input"], case["expect"]
    node = Node(tmp_path / "node")
    outside = tmp_path / "outside"  # the node's own files, as far as this test is concerned
    outside.mkdir()
    (outside / "shadow").write_text("root:$6$decoy:19000:0:99999:7:::\n")
    os.chmod(outside / "shadow", 0o640)
    plan = _plan(inp["disks"])
    steps = inp["recipe"]
    linked_dirs = {s[2] for s in steps if s[0] == "symlink"}
    for disk in plan.disks:
        if f"{{disk-dir:{disk.name}}}" not in linked_dirs:
            node.mount_volume(disk.name)
    if any(d.backing for d in plan.disks):
        node.library()
    for step in steps:
        args = [_expand(a, node, outside) for a in step[1:]]
        if step[0] == "qemu-img":
            subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)
        elif step[0] == "symlink":
            os.symlink(args[0], args[1])
        else:
            assert step[0] == "mkdir", step
            os.makedirs(args[0], exist_ok=True)
    before_node, before_outside = _state(node.root), _state(outside)
    text = _edit_plan(
        sign_plan(plan, PlanKeys(b"prepare-tests-plan-key-0123456789")), inp.get("plan_edit", {})
    )
    proc = run_prepare(node, text)
    assert proc.returncode == expect["exit"], (proc.returncode, proc.stdout, proc.stderr)
    assert expect["message"] in proc.stderr, proc.stderr
    assert proc.stdout == ""  # nothing was created or grown
    if expect.get("decoy_unchanged"):
        assert _state(outside) == before_outside, "a file outside the node's diskhooks directories changed"
        assert _state(node.root) == before_node, "prepare changed something although it refused"
