"""``diskhooks-webhook`` as a user runs it: ``python -m webhook.cli dry-run|serve`` in a subprocess.

dry-run: exit 0 with the mutated object (YAML) or the JSONPatch (JSON); exit 1 with the denial on
stderr; exit 2 with a one-line reason for unusable input. serve: a bad configuration fails with
exit 2 before gunicorn starts (the running server is tested in ``tests/test_server.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from diskplan import keys as K
from diskplan.plan import PlanKeys
from tests.conftest import ADMISSION, EXAMPLE_POLICY, ROOT
from tests.test_admission import assert_vm_mutated

DEMO = ROOT / "examples" / "demo"
SIDECAR_IMAGE = yaml.safe_load(EXAMPLE_POLICY.read_text())["sidecar"]["image"]
KEY = b"cli-test-key-0123456789abcdef0123"


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "webhook.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture()
def keys_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    (d / "current").write_bytes(KEY + b"\n")
    return d


def review_object(tmp_path: Path, name: str, key: str = "object") -> Path:
    obj = json.loads((ADMISSION / name).read_text())["request"][key]
    path = tmp_path / f"{name}.{key}.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


def test_dry_run_prints_the_mutated_vm(tmp_path: Path, keys_dir: Path) -> None:
    vm_file = review_object(tmp_path, "vm-create.json")
    out = run("dry-run", "--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir, vm_file)
    assert out.returncode == 0, out.stderr
    vm = yaml.safe_load(out.stdout)
    assert_vm_mutated(vm, namespace="vms", name="pg01", plan_keys=PlanKeys(current=KEY),
                      sidecar_image=SIDECAR_IMAGE, disks={"pgdata": "200Gi", "wal": "20Gi"})


def test_dry_run_show_patch_is_the_same_change(tmp_path: Path, keys_dir: Path) -> None:
    demo = DEMO / "vm.yaml"
    common = ("--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir,
              "--cluster-objects", DEMO / "cluster-objects.yaml")
    full = run("dry-run", *common, demo)
    patch = run("dry-run", *common, "--show-patch", demo)
    assert full.returncode == 0 and patch.returncode == 0, full.stderr + patch.stderr
    ops = json.loads(patch.stdout)
    assert isinstance(ops, list) and ops
    assert {op["op"] for op in ops} <= {"add", "remove", "replace", "move", "copy", "test"}
    original = yaml.safe_load(demo.read_text())
    mutated = yaml.safe_load(full.stdout)
    # the plans differ only if signing were non-deterministic; everything else must match
    assert jsonpatch.apply_patch(original, ops) == mutated
    volumes = {v["name"] for v in mutated["spec"]["template"]["spec"]["volumes"]}
    assert {"pgdata", "scratch", "fast0"} <= volumes


def test_dry_run_update_with_old_object(tmp_path: Path, keys_dir: Path) -> None:
    new = review_object(tmp_path, "vm-update.json")
    old = review_object(tmp_path, "vm-update.json", "oldObject")
    out = run("dry-run", "--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir, "--old", old, new)
    assert out.returncode == 0, out.stderr
    assert_vm_mutated(yaml.safe_load(out.stdout), namespace="vms", name="pg01",
                      plan_keys=PlanKeys(current=KEY), sidecar_image=SIDECAR_IMAGE,
                      disks={"pgdata": "300Gi", "wal": "20Gi"})


def test_dry_run_without_keys_warns_on_stderr(tmp_path: Path) -> None:
    out = run("dry-run", "--config", EXAMPLE_POLICY, review_object(tmp_path, "vmi-create.json"))
    assert out.returncode == 0, out.stderr
    assert "ephemeral" in out.stderr
    vmi = yaml.safe_load(out.stdout)
    assert K.ANN_PLAN in vmi["metadata"]["annotations"]


def test_dry_run_denial_exits_1_with_the_reason(tmp_path: Path) -> None:
    obj: dict[str, Any] = json.loads((ADMISSION / "vm-create.json").read_text())["request"]["object"]
    obj["metadata"]["annotations"][K.ANN_DISKS] = '[{"name": "pgdata", "size": "9Ti"}]'
    path = tmp_path / "vm.yaml"
    path.write_text(yaml.safe_dump(obj))
    out = run("dry-run", "--config", EXAMPLE_POLICY, path)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "diskhooks.io/disks[0].size" in out.stderr


def test_dry_run_as_the_node_agent_may_set_the_home_node(tmp_path: Path, keys_dir: Path) -> None:
    """``--as`` puts a userInfo.username in the review: the home-node annotation is the node agent's
    alone, so a manifest carrying it is denied for nobody in particular and admitted as the agent."""
    obj: dict[str, Any] = json.loads((ADMISSION / "vm-create.json").read_text())["request"]["object"]
    obj["metadata"]["annotations"][K.ANN_NODE] = "node-a"
    path = tmp_path / "vm.yaml"
    path.write_text(yaml.safe_dump(obj))
    agent = "system:serviceaccount:diskhooks-system:diskhooks-node"  # examples/policy.yaml's nodeAgent
    denied = run("dry-run", "--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir, path)
    assert denied.returncode == 1 and f"metadata.annotations[{K.ANN_NODE}]: only the diskhooks node agent" in denied.stderr
    other = run("dry-run", "--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir, "--as", "alice", path)
    assert other.returncode == 1 and f"metadata.annotations[{K.ANN_NODE}]: only the diskhooks node agent" in other.stderr
    admitted = run("dry-run", "--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir, "--as", agent, path)
    assert admitted.returncode == 0, admitted.stderr
    vm = yaml.safe_load(admitted.stdout)
    assert vm["metadata"]["labels"][K.LABEL_NODE] == "node-a"


def test_dry_run_denies_a_vmi_running_other_code_with_the_diskhooks_image(tmp_path: Path) -> None:
    entry = {"image": SIDECAR_IMAGE, "command": ["python3", "-c", "import os; os.system('id')"]}
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": "evil", "namespace": "vms",
                        "annotations": {K.ANN_HOOK_SIDECARS: json.dumps([entry])}},
           "spec": {"domain": {"devices": {}, "memory": {"guest": "1Gi"}}}}
    path = tmp_path / "vmi.yaml"
    path.write_text(yaml.safe_dump(vmi))
    out = run("dry-run", "--config", EXAMPLE_POLICY, path)
    assert out.returncode == 1, out
    assert f"denied: metadata.annotations[{K.ANN_HOOK_SIDECARS}][0]: uses the diskhooks image" in out.stderr
    assert "with command" in out.stderr


def test_dry_run_passthrough_needs_the_claim(tmp_path: Path) -> None:
    out = run("dry-run", "--config", EXAMPLE_POLICY, DEMO / "vm.yaml")
    assert out.returncode == 1
    assert K.ANN_PASSTHROUGH in out.stderr


@pytest.mark.parametrize(("content", "expect"), [
    ("kind: VirtualMachine\nmetadata: {name: a\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "kind must be VirtualMachine"),
    ("a: &x [1, 2]\nb: *x\n", "aliases"),
    ("kind: VirtualMachine\n---\nkind: VirtualMachine\n", "not valid YAML"),
    ("apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: x}\nspec: 5\n",
     "spec: a VirtualMachine needs a spec object"),
    ("kind: VirtualMachine\nmetadata: [1]\nspec: {template: {spec: {}}}\n", "metadata: must be an object"),
    ("kind: VirtualMachineInstance\nmetadata: {name: x, annotations: 5}\nspec: {}\n",
     "metadata.annotations: must be an object"),
])
def test_dry_run_unusable_object_exits_2(tmp_path: Path, keys_dir: Path, content: str, expect: str) -> None:
    path = tmp_path / "obj.yaml"
    path.write_text(content)
    out = run("dry-run", "--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir, path)
    assert out.returncode == 2, out
    assert expect in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_dry_run_missing_files_and_bad_policy_exit_2(tmp_path: Path) -> None:
    vm = review_object(tmp_path, "vm-create.json")
    missing = run("dry-run", "--config", EXAMPLE_POLICY, tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_policy = run("dry-run", "--config", tmp_path / "nope.yaml", vm)
    assert no_policy.returncode == 2 and "policy" in no_policy.stderr
    bad = tmp_path / "bad-policy.yaml"
    bad.write_text(EXAMPLE_POLICY.read_text().replace("maxDiskSize: 2Ti", "maxDiskSize: lots"))
    bad_policy = run("dry-run", "--config", bad, vm)
    assert bad_policy.returncode == 2 and "maxDiskSize" in bad_policy.stderr
    for out in (missing, no_policy, bad_policy):
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_serve_refuses_a_bad_configuration_before_starting(tmp_path: Path, keys_dir: Path) -> None:
    bad = tmp_path / "bad-policy.yaml"
    bad.write_text("hostDisks: {root: relative}\n")
    out = run("serve", "--config", bad, "--self-signed", "--tls-dir", tmp_path / "tls",
              "--plan-keys-dir", keys_dir, "--port", "1", "--bind-address", "127.0.0.1")
    assert out.returncode == 2, out
    assert "policy" in out.stderr and "Traceback" not in out.stderr
    assert "Booting worker" not in out.stderr

    no_cert = run("serve", "--config", EXAMPLE_POLICY, "--plan-keys-dir", keys_dir)
    assert no_cert.returncode == 2 and "--cert-file" in no_cert.stderr

    no_keys = run("serve", "--config", EXAMPLE_POLICY, "--cert-file", tmp_path / "c",
                  "--key-file", tmp_path / "k")
    assert no_keys.returncode == 2 and "--plan-keys-dir" in no_keys.stderr

    (tmp_path / "c").write_text("not a certificate")
    (tmp_path / "k").write_text("not a key")
    bad_cert = run("serve", "--config", EXAMPLE_POLICY, "--cert-file", tmp_path / "c",
                   "--key-file", tmp_path / "k", "--plan-keys-dir", keys_dir)
    assert bad_cert.returncode == 2 and "TLS certificate" in bad_cert.stderr

    bad_host = run("serve", "--config", EXAMPLE_POLICY, "--self-signed", "--hostname", "a b/c")
    assert bad_host.returncode == 2 and "not a DNS name" in bad_host.stderr
