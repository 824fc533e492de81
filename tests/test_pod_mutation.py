"""The Pod mutation (``webhook/pod_mutation.py``) on the virt-launcher Pod kube-apiserver really sent.

The Pod is ``tests/data/kubevirt/admission/virt-launcher-pod-create.json`` (sample 01: a containerDisk
root in image-volume mode, a hostDisk ``datadisk``, one hook sidecar), given the pod label, a plan
signed for its volumes, and the diskhooks sidecar image, as the VM mutation would have made it.
Results are validated against Kubernetes' own Pod schema (kubernetes-validate, strict).

The last tests run the rendered init container and the sidecar checks on real files. There is no
kubelet here, so it is emulated (said again in those tests): each container's hostPath and image
volumes are bind-mounted, read-only where the Pod says so, at its mount paths under a per-container
root inside a private mount namespace (``unshare --mount``), and the container's args and env
(fieldRefs resolved from the Pod's labels) are handed to the real ``diskhooks-sidecar`` CLI.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.plan import Backing, Passthrough, PersistRoot, Plan, PlanKeys, PlannedDisk, sign_plan
from diskplan.policy import Policy, load_policy
from tests.conftest import ADMISSION, EXAMPLE_POLICY, ROOT
from webhook.pod_mutation import PREPARE_CAPABILITIES, mutate_pod

KEYS = PlanKeys(current=b"pod-mutation-test-key-0123456789ab")
GiB = 1 << 30
HOST_DIR = "/var/lib/diskhooks/vms/vms/fedora-data"
LIBRARY = "/var/lib/diskhooks/images"
VMI_UID = "6a1e5f3c-1d2b-4c3a-9e8f-0123456789ab"
#: the sample Pod came from kube-apiserver 1.36; image volumes (containerDisk image-volume mode)
#: are not in the 1.28 schema
KUBE_VERSION = "1.36"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(EXAMPLE_POLICY.read_text())


def sample_pod() -> dict[str, Any]:
    review = json.loads((ADMISSION / "virt-launcher-pod-create.json").read_text())
    pod: dict[str, Any] = review["request"]["object"]
    return pod


def data_disk(**kw: Any) -> PlannedDisk:
    return PlannedDisk(**{"name": "datadisk", "size_bytes": 10 * GiB, "bus": "virtio", "cache": "none",
                          "io": "native", "discard": "unmap", **kw})


def sample_plan(policy: Policy, *, backing: bool = False, persist: bool = True) -> Plan:
    base = Backing("almalinux-9", "almalinux-9.qcow2", "qcow2") if backing else None
    return Plan(namespace="vms", vm="fedora-data", host_dir=HOST_DIR,
                image_library=LIBRARY if backing else None, sidecar_image=policy.sidecar.image,
                disks=(data_disk(backing=base),),
                persist_root=PersistRoot("rootdisk", "quay.io/containerdisks/fedora:41", 0)
                if persist else None)


def managed_pod(plan: Plan, *, text: str | None = None) -> dict[str, Any]:
    """The sample launcher Pod as it arrives for a diskhooks VM (what the VM mutation leads to)."""
    pod = sample_pod()
    pod["metadata"]["labels"][K.LABEL_MANAGED] = K.LABEL_MANAGED_VALUE
    pod["metadata"]["annotations"][K.ANN_PLAN] = text if text is not None else sign_plan(plan, KEYS)
    for v in pod["spec"]["volumes"]:
        if v["name"] == "datadisk":  # the hostDisk path the VM mutation sets: <hostDir>/datadisk.qcow2
            v["hostPath"]["path"] = plan.host_dir
    for c in pod["spec"]["containers"]:
        if c["name"] == "hook-sidecar-0":
            c["image"] = plan.sidecar_image
            c["args"] = ["serve", "--version", "v1alpha3"]
    return pod


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


def mounts(c: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    return {m["mountPath"]: (m["name"], bool(m.get("readOnly"))) for m in c.get("volumeMounts", [])}


def volume(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod["spec"]["volumes"] if v["name"] == name), None)


def mutate(pod: dict[str, Any], policy: Policy) -> dict[str, Any]:
    return mutate_pod(pod, namespace="vms", policy=policy, plan_keys=KEYS).obj


# ------------------------------------------------------------------------------------------------
# what a managed Pod gets
# ------------------------------------------------------------------------------------------------
def test_prepare_init_container_for_persist_root_and_host_disk(policy: Policy) -> None:
    plan = sample_plan(policy)
    pod = managed_pod(plan)
    out = mutate(pod, policy)

    init = container(out, K.PREPARE_CONTAINER)
    assert out["spec"]["initContainers"][-1]["name"] == K.PREPARE_CONTAINER
    assert init["image"] == policy.sidecar.image
    assert init["imagePullPolicy"] == policy.sidecar.image_pull_policy
    assert init["args"] == ["prepare", "--plan-from-env", "--overcommit", "1", "--reserve", "5%"]
    env = {e["name"]: e for e in init["env"]}
    assert env[K.ENV_PLAN]["value"] == pod["metadata"]["annotations"][K.ANN_PLAN]
    assert env[K.ENV_VMI_UID]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['kubevirt.io/created-by']"
    assert mounts(init) == {
        "/var/run/kubevirt-private/vmi-disks/datadisk": ("datadisk", False),
        "/var/run/kubevirt-private/diskhooks/vm": (K.POD_VOLUME_VM_DIR, False),
        "/var/run/kubevirt-image-volume/disk_0": ("rootdisk", True),
        K.LAUNCHER_CAPACITY: (K.POD_VOLUME_CAPACITY, True),
    }
    sc = init["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"], sc["allowPrivilegeEscalation"],
            sc["readOnlyRootFilesystem"]) == (0, False, False, True)
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert init["resources"]["requests"] == init["resources"]["limits"]  # keeps Guaranteed pods so

    assert volume(out, K.POD_VOLUME_VM_DIR) == {
        "name": K.POD_VOLUME_VM_DIR, "hostPath": {"path": HOST_DIR, "type": "DirectoryOrCreate"}}
    assert volume(out, K.POD_VOLUME_IMAGE_LIBRARY) is None  # no disk has a backing base

    sidecar = mounts(container(out, "hook-sidecar-0"))
    for path, (name, _rw) in mounts(init).items():
        if path != K.LAUNCHER_CAPACITY:  # the capacity summary is prepare's alone
            assert sidecar[path] == (name, True)  # the same data, read-only
    assert K.LAUNCHER_CAPACITY not in sidecar
    assert sidecar["/var/run/kubevirt-hooks"] == ("hook-sidecar-sockets", False)  # KubeVirt's kept

    compute_before = mounts(container(pod, "compute"))
    compute = mounts(container(out, "compute"))
    assert compute == {**compute_before,
                       "/var/run/kubevirt-private/diskhooks/vm": (K.POD_VOLUME_VM_DIR, False)}


def test_backing_base_mounts_the_image_library(policy: Policy) -> None:
    plan = sample_plan(policy, backing=True, persist=False)
    out = mutate(managed_pod(plan), policy)
    assert volume(out, K.POD_VOLUME_IMAGE_LIBRARY) == {
        "name": K.POD_VOLUME_IMAGE_LIBRARY, "hostPath": {"path": LIBRARY, "type": "Directory"}}
    lib = "/var/run/kubevirt-private/diskhooks/images"
    assert mounts(container(out, K.PREPARE_CONTAINER))[lib] == (K.POD_VOLUME_IMAGE_LIBRARY, True)
    assert mounts(container(out, "hook-sidecar-0"))[lib] == (K.POD_VOLUME_IMAGE_LIBRARY, True)
    compute = mounts(container(out, "compute"))
    assert compute[lib] == (K.POD_VOLUME_IMAGE_LIBRARY, True)
    assert "/var/run/kubevirt-private/diskhooks/vm" not in compute  # no persistent root
    assert "/var/run/kubevirt-image-volume/disk_0" not in mounts(container(out, K.PREPARE_CONTAINER))


@pytest.mark.parametrize("backing, persist", [(False, True), (True, False), (True, True)])
def test_result_is_a_valid_pod_and_reinvocation_changes_nothing(policy: Policy, backing: bool,
                                                                persist: bool) -> None:
    pod = managed_pod(sample_plan(policy, backing=backing, persist=persist))
    pristine = copy.deepcopy(pod)
    out = mutate(pod, policy)

    assert pod == pristine  # the input is not modified
    assert mutate(out, policy) == out  # API-server reinvocation
    assert jsonpatch.make_patch(out, mutate(out, policy)).patch == []
    kubernetes_validate.validate(pristine, KUBE_VERSION, strict=True)  # the input is valid
    kubernetes_validate.validate(out, KUBE_VERSION, strict=True)


def test_pod_without_the_label_is_unchanged(policy: Policy) -> None:
    pod = sample_pod()
    assert mutate(pod, policy) == pod
    # even with a (valid) plan: the label, not the annotation, selects Pods
    plan = sample_plan(policy)
    pod["metadata"]["annotations"][K.ANN_PLAN] = sign_plan(plan, KEYS)
    assert mutate(pod, policy) == pod


def test_plan_with_nothing_to_prepare_leaves_the_pod_alone(policy: Policy) -> None:
    plan = replace(sample_plan(policy, persist=False), disks=())
    pod = managed_pod(plan)
    assert mutate(pod, policy) == pod


def sidecar_env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(pod, "hook-sidecar-0").get("env", [])}


@pytest.mark.parametrize("persist", [True, False])
def test_the_sidecar_gets_the_verified_plan_in_its_environment(policy: Policy, persist: bool) -> None:
    """The sidecar applies this copy, not the VMI's annotation, which the VM owner can still edit
    after the Pod was admitted; a Pod's env cannot change."""
    pod = managed_pod(sample_plan(policy, persist=persist))
    out = mutate(pod, policy)
    assert sidecar_env(out)[K.ENV_PLAN] == {"name": K.ENV_PLAN,
                                            "value": pod["metadata"]["annotations"][K.ANN_PLAN]}
    assert mutate(out, policy) == out  # set once, not appended again on reinvocation


def test_a_passthrough_only_pod_gets_the_plan_for_its_sidecar_and_no_prepare(policy: Policy) -> None:
    plan = replace(sample_plan(policy, persist=False), disks=(),
                   passthrough=(Passthrough(name="fast", claim="nvme0", mode="lun"),))
    pod = managed_pod(plan)
    out = mutate(pod, policy)
    assert sidecar_env(out)[K.ENV_PLAN]["value"] == pod["metadata"]["annotations"][K.ANN_PLAN]
    assert K.PREPARE_CONTAINER not in [c["name"] for c in out["spec"].get("initContainers", [])]
    assert out["spec"]["volumes"] == pod["spec"]["volumes"]  # nothing of the node is mounted
    assert mutate(out, policy) == out
    kubernetes_validate.validate(out, KUBE_VERSION, strict=True)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def test_missing_plan_is_refused(policy: Policy) -> None:
    pod = managed_pod(sample_plan(policy))
    del pod["metadata"]["annotations"][K.ANN_PLAN]
    with pytest.raises(Refused) as exc:
        mutate(pod, policy)
    assert K.ANN_PLAN in exc.value.field and "no diskhooks plan" in exc.value.reason


def test_forged_plan_is_refused(policy: Policy) -> None:
    plan = sample_plan(policy)
    signed = json.loads(sign_plan(plan, KEYS))
    signed["hostDir"] = "/etc"  # edited after signing
    with pytest.raises(Refused, match="signature does not verify"):
        mutate(managed_pod(plan, text=json.dumps(signed)), policy)
    other_key = PlanKeys(current=b"someone-elses-key-0123456789abcdef")
    with pytest.raises(Refused, match="signature does not verify"):
        mutate(managed_pod(plan, text=sign_plan(plan, other_key)), policy)
    unsigned = json.dumps(plan.body())
    with pytest.raises(Refused, match="not signed"):
        mutate(managed_pod(plan, text=unsigned), policy)
    with pytest.raises(Malformed):
        mutate(managed_pod(plan, text="{not json"), policy)


def test_plan_of_another_vm_or_namespace_is_refused(policy: Policy) -> None:
    other = replace(sample_plan(policy), vm="someone-else")
    with pytest.raises(Refused, match="made for VM 'someone-else'"):
        mutate(managed_pod(other, text=sign_plan(other, KEYS)), policy)
    pod = managed_pod(sample_plan(policy))
    with pytest.raises(Refused, match="namespace"):
        mutate_pod(pod, namespace="other", policy=policy, plan_keys=KEYS)


def test_a_pod_must_say_which_vmi_it_runs(policy: Policy) -> None:
    """A hand-made Pod without KubeVirt's kubevirt.io/domain annotation could present the plan of
    any VM of its namespace (here, the right one: still refused)."""
    for drop_label in (False, True):
        pod = managed_pod(sample_plan(policy))
        del pod["metadata"]["annotations"][K.ANN_DOMAIN]
        if drop_label:
            del pod["metadata"]["labels"]["vm.kubevirt.io/name"]
        with pytest.raises(Refused) as exc:
            mutate(pod, policy)
        assert exc.value.field == f"metadata.annotations[{K.ANN_DOMAIN}]" and "is missing" in exc.value.reason
    pod = managed_pod(sample_plan(policy))
    pod["metadata"]["labels"]["vm.kubevirt.io/name"] = "someone-else"
    with pytest.raises(Refused) as exc:
        mutate(pod, policy)
    assert exc.value.field == "metadata.labels[vm.kubevirt.io/name]" and "does not agree" in exc.value.reason
    pod["metadata"]["annotations"][K.ANN_DOMAIN] = "someone-else"  # agreeing, but not the plan's VM
    with pytest.raises(Refused, match="made for VM 'fedora-data', not 'someone-else'"):
        mutate(pod, policy)


def test_a_vmi_with_its_own_hostname_is_still_prepared(policy: Policy) -> None:
    """KubeVirt's vm.kubevirt.io/name label is the VMI's host name: spec.hostname when it has one."""
    pod = managed_pod(sample_plan(policy))
    pod["metadata"]["labels"]["vm.kubevirt.io/name"] = pod["spec"]["hostname"] = "db-host"
    assert any(c["name"] == K.PREPARE_CONTAINER for c in mutate(pod, policy)["spec"]["initContainers"])
    del pod["metadata"]["labels"]["vm.kubevirt.io/name"]  # the annotation is what identifies the VMI
    assert any(c["name"] == K.PREPARE_CONTAINER for c in mutate(pod, policy)["spec"]["initContainers"])


def test_missing_planned_volume_is_refused(policy: Policy) -> None:
    pod = managed_pod(sample_plan(policy))
    pod["spec"]["volumes"] = [v for v in pod["spec"]["volumes"] if v["name"] != "datadisk"]
    with pytest.raises(Refused) as exc:
        mutate(pod, policy)
    assert exc.value.field == "spec.volumes[datadisk]"


def test_planned_volume_of_another_directory_is_refused(policy: Policy) -> None:
    pod = managed_pod(sample_plan(policy))
    volume(pod, "datadisk")["hostPath"]["path"] = "/etc"  # type: ignore[index]
    with pytest.raises(Refused, match="hostPath volume of the VM's host directory"):
        mutate(pod, policy)


def test_no_diskhooks_sidecar_is_refused(policy: Policy) -> None:
    plan = sample_plan(policy)
    pod = managed_pod(plan)
    container_list = pod["spec"]["containers"]
    container_list[1]["image"] = "registry.example.com/qcow2-hook:0.1.0"
    with pytest.raises(Refused) as exc:
        mutate(pod, policy)
    assert exc.value.field == "spec.containers"
    assert "no diskhooks hook sidecar" in exc.value.reason and plan.sidecar_image in exc.value.reason


def test_persist_root_without_image_volume_mode_is_refused(policy: Policy) -> None:
    pod = managed_pod(sample_plan(policy))
    for v in pod["spec"]["volumes"]:
        if v["name"] == "rootdisk":  # legacy containerDisk mode: no image volume
            v.pop("image")
            v["emptyDir"] = {}
    with pytest.raises(Refused) as exc:
        mutate(pod, policy)
    assert exc.value.field == "spec.volumes[rootdisk]" and "image-volume mode" in exc.value.reason


def test_persist_root_index_that_does_not_match_kubevirt_is_refused(policy: Policy) -> None:
    plan = replace(sample_plan(policy), persist_root=PersistRoot("rootdisk", "quay.io/x:1", 2))
    with pytest.raises(Refused, match="disk_0"):
        mutate(managed_pod(plan), policy)


def test_missing_vmi_uid_label_is_refused(policy: Policy) -> None:
    pod = managed_pod(sample_plan(policy))
    del pod["metadata"]["labels"][K.LABEL_CREATED_BY]
    with pytest.raises(Refused, match=K.LABEL_CREATED_BY):
        mutate(pod, policy)


def test_capabilities_are_the_documented_minimum() -> None:
    # tests/test_prepare.py::test_runs_with_only_chown_and_dac_override runs prepare with exactly
    # these, and ::test_failure_after_qemu_img_created_the_file_leaves_nothing_behind without CHOWN
    assert PREPARE_CAPABILITIES == ["CHOWN", "DAC_OVERRIDE"]


# ------------------------------------------------------------------------------------------------
# the rendered containers against real files (kubelet emulated)
# ------------------------------------------------------------------------------------------------
def _env(c: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": "/nonexistent-tmp"}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            if path == "spec.nodeName":  # set by the scheduler before the kubelet runs the Pod
                env[e["name"]] = pod["spec"]["nodeName"]
                continue
            assert path.startswith("metadata.labels['") and path.endswith("']"), path
            env[e["name"]] = pod["metadata"]["labels"][path[len("metadata.labels['"):-2]]
    return env


def _bind_script(c: dict[str, Any], pod: dict[str, Any], node: Path, view: Path) -> list[str]:
    """Shell lines that mount, like kubelet would, the container's hostPath and image volumes."""
    lines = []
    for m in c.get("volumeMounts", []):
        vol = volume(pod, m["name"])
        assert vol is not None, m
        if "hostPath" in vol:
            source = node / vol["hostPath"]["path"].lstrip("/")
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                source.mkdir(parents=True, exist_ok=True)
            assert source.is_dir(), f"hostPath {source} must exist (type Directory)"
        elif "image" in vol:
            source = node / "image-volumes" / m["name"]
        else:
            continue  # emptyDirs (hook sockets) play no part here
        target = view / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        opts = "bind,ro" if m.get("readOnly") else "bind"
        lines.append(f"mount -o {opts} {shlex.quote(str(source))} {shlex.quote(str(target))}")
    return lines


def _run_in(c: dict[str, Any], pod: dict[str, Any], node: Path, view: Path,
            argv: list[str]) -> subprocess.CompletedProcess[str]:
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed to emulate kubelet's mounts"
    script = "set -e\n" + "\n".join(_bind_script(c, pod, node, view)) + "\nexec " + \
        " ".join(shlex.quote(a) for a in argv)
    return subprocess.run([unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script],
                          cwd=ROOT, env=_env(c, pod), capture_output=True, text=True, timeout=120,
                          check=False)


def test_rendered_init_container_prepares_and_sidecar_accepts(policy: Policy, tmp_path: Path) -> None:
    """Kubelet emulated (see module doc); the CLI, prepare, qemu-img and the sidecar checks are real."""
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None
    plan = replace(sample_plan(policy, backing=True), disks=(data_disk(
        backing=Backing("almalinux-9", "almalinux-9.qcow2", "qcow2")),))
    pod = mutate(managed_pod(plan), policy)
    pod["spec"]["nodeName"] = "node-a"  # the scheduler's binding, which the downward API reads
    node = tmp_path / "node"
    library = node / LIBRARY.lstrip("/")
    library.mkdir(parents=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(library / "almalinux-9.qcow2"), "1G"],
                   check=True)
    root_disk = node / "image-volumes" / "rootdisk" / "disk"
    root_disk.mkdir(parents=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(root_disk / "fedora.qcow2"), "5G"],
                   check=True)

    init = container(pod, K.PREPARE_CONTAINER)
    view = tmp_path / "prepare-view"
    proc = _run_in(init, pod, node, view, [sys.executable, "-m", "hooksidecar.cli", *init["args"],
                                           "--path-prefix", str(view)])
    assert proc.returncode == 0, proc.stderr
    results = {json.loads(ln)["volume"]: json.loads(ln)["result"] for ln in proc.stdout.splitlines()}
    assert results == {"datadisk": "created", "rootdisk": "created", K.HOME_MARKER: "written",
                       K.CAPACITY_REPORT: "fits"}
    host_dir = node / HOST_DIR.lstrip("/")
    assert sorted(p.name for p in host_dir.iterdir()) == [
        "datadisk.base.json", "datadisk.qcow2", K.HOME_MARKER, "persist-root.rootdisk.base.json",
        "persist-root.rootdisk.qcow2"]
    assert json.loads((host_dir / K.HOME_MARKER).read_text())["node"] == "node-a"

    sidecar = container(pod, "hook-sidecar-0")
    sview = tmp_path / "sidecar-view"
    check = ("import json, os, sys\n"
             "from diskplan.plan import parse_plan\n"
             "from hooksidecar.images import check_images\n"
             "plan = parse_plan(os.environ['DISKHOOKS_PLAN'])\n"  # the hook-sidecar container's own
             f"facts = check_images(plan, vmi_uid={VMI_UID!r}, path_prefix={str(sview)!r})\n"
             f"probe = {str(sview / 'var/run/kubevirt-private/diskhooks/vm/probe')!r}\n"
             "try:\n    open(probe, 'w')\nexcept OSError as exc:\n    print('write:', exc.strerror)\n"
             "print('base format:', facts.persist_root_base_format)\n")
    proc = _run_in(sidecar, pod, node, sview, [sys.executable, "-c", check])
    assert proc.returncode == 0, proc.stderr
    assert "base format: qcow2" in proc.stdout
    assert "write: Read-only file system" in proc.stdout  # the sidecar's mounts are read-only
