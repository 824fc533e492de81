"""prepare's capacity guard on a real, small filesystem (tmpfs, and a loop-mounted ext4 image).

The node's ``hostDisks.root`` is a filesystem of its own, mounted for the test (root is needed, as
for the other tests that emulate the kubelet's mounts) and unmounted at teardown. The launcher's
view is made as the kubelet would make it, in a private mount namespace (``unshare --mount``): the
VM directory bind-mounted at every hostDisk volume's path and at the VM-directory path, the
capacity directory read-only. The other VMs' figures come from the summary the node agent writes,
made here by the agent's own code (``nodeagent.capacity.scan_root``, ``diskplan.capacity``). Then the
real ``python -m hooksidecar.prepare`` and the real ``qemu-img`` run.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diskplan import capacity as C
from diskplan import keys as K
from diskplan.plan import Plan, PlanKeys, PlannedDisk, sign_plan
from diskplan.policy import CapacityPolicy
from hooksidecar.prepare.files import write_record
from nodeagent.capacity import scan_root
from tests.conftest import ROOT

MiB = 1 << 20
KEYS = PlanKeys(current=b"prepare-capacity-test-key-0123456")
NODE_ROOT = "/var/lib/diskhooks/vms"
NODE = "node-a"
VMI_UID = "6a1e5f3c-1d2b-4c3a-9e8f-0123456789ab"
SIDECAR = "ghcr.io/diskhooks/diskhooks-sidecar:0.1.0"


def disk(name: str, mib: int) -> PlannedDisk:
    return PlannedDisk(name=name, size_bytes=mib * MiB, bus="virtio", cache="none", io="native",
                       discard="unmap")


def make_plan(vm: str, *disks: PlannedDisk, node: str | None = None) -> Plan:
    return Plan(namespace="vms", vm=vm, host_dir=f"{NODE_ROOT}/vms/{vm}", image_library=None,
                sidecar_image=SIDECAR, disks=disks, node=node)


def qemu_img() -> str:
    exe = shutil.which("qemu-img")
    assert exe is not None, "qemu-img is required (apt-get install -y qemu-utils)"
    return exe


def virtual_size(path: Path) -> int:
    out = subprocess.run([qemu_img(), "info", "-f", "qcow2", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    size: int = json.loads(out)["virtual-size"]
    return size


class Node:
    """One node: ``hostDisks.root`` on a small filesystem of its own below ``base``."""

    def __init__(self, base: Path, root: Path) -> None:
        self.base = base
        self.root = root
        self._runs = 0

    def vm_dir(self, vm: str) -> Path:
        return self.root / "vms" / vm

    def image(self, vm: str, name: str, mib: int) -> Path:
        """An existing image, as an earlier start left it."""
        d = self.vm_dir(vm)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.qcow2"
        subprocess.run([qemu_img(), "create", "-q", "-f", "qcow2", str(path), str(mib * MiB)], check=True)
        return path

    def agent_summary(self, *, node: str = NODE, capacity: CapacityPolicy | None = None,
                      written: datetime.datetime | None = None) -> C.NodeSummary:
        """What the node agent leaves: every directory counted by what is on disk."""
        scans = scan_root(str(self.root))
        facts = [C.DirFacts(ns, vm, images=s.images, other_allocated=s.other_allocated, state=C.STOPPED)
                 for (ns, vm), s in scans.items()]
        fs = os.statvfs(self.root)
        account = C.account_node(facts, filesystem_bytes=fs.f_blocks * fs.f_frsize,
                                 free_bytes=fs.f_bavail * fs.f_frsize, capacity=capacity or CapacityPolicy())
        summary = C.summary_of(account, node=node, now=written or datetime.datetime.now(datetime.UTC))
        d = self.root / K.CAPACITY_SUBDIR
        d.mkdir(parents=True, exist_ok=True)
        write_record(str(d / K.CAPACITY_SUMMARY), C.summary_json(summary), owner=None)
        return summary

    def prepare(self, plan: Plan, *args: str, capacity_mounted: bool = True) -> subprocess.CompletedProcess[str]:
        """The launcher's view (kubelet emulated, see the module doc) and prepare in it."""
        self._runs += 1
        view = self.base / f"view-{self._runs}"
        host_vm = self.vm_dir(plan.vm)
        host_vm.mkdir(parents=True, exist_ok=True)  # hostPath DirectoryOrCreate
        capacity = self.root / K.CAPACITY_SUBDIR
        capacity.mkdir(parents=True, exist_ok=True)
        binds = [(host_vm, d.launcher_dir, False) for d in plan.disks]
        binds.append((host_vm, K.LAUNCHER_VM_DIR, False))
        if capacity_mounted:
            binds.append((capacity, K.LAUNCHER_CAPACITY, True))
        lines = ["set -e"]
        for source, target, read_only in binds:
            where = view / target.lstrip("/")
            where.mkdir(parents=True, exist_ok=True)
            lines.append(f"mount -o {'bind,ro' if read_only else 'bind'} {shlex.quote(str(source))} "
                         f"{shlex.quote(str(where))}")
        plan_file = self.base / f"plan-{self._runs}.json"
        plan_file.write_text(sign_plan(plan, KEYS))
        argv = [sys.executable, "-m", "hooksidecar.prepare", "--plan", str(plan_file), "--path-prefix",
                str(view), "--node-name", NODE, *args]
        lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
        unshare = shutil.which("unshare")
        assert unshare is not None, "unshare (util-linux) is needed to emulate the kubelet's mounts"
        env = {"PATH": os.environ["PATH"], K.ENV_VMI_UID: VMI_UID, "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run([unshare, "--mount", "--propagation", "private", "--", "sh", "-c",
                               "\n".join(lines)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``small_fs(size_mib, kind="tmpfs"|"ext4")``: a node whose hostDisks.root is a filesystem of
    that size (ext4: a sparse image file, loop-mounted). Unmounted at teardown."""
    mounted: list[Path] = []

    def make(size_mib: int = 64, kind: str = "tmpfs") -> Node:
        base = tmp_path / f"node-{len(mounted)}"
        root = base / "host" / NODE_ROOT.lstrip("/")
        root.mkdir(parents=True)
        if kind == "tmpfs":
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(root)]
        else:
            image = base / "fs.img"
            with image.open("wb") as fh:
                fh.truncate(size_mib * MiB)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
            cmd = ["mount", "-o", "loop", str(image), str(root)]
        subprocess.run(cmd, check=True, capture_output=True)
        mounted.append(root)
        return Node(base, root)

    yield make
    for root in reversed(mounted):
        subprocess.run(["umount", str(root)], check=False, capture_output=True)


def lines(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {d["volume"]: d for d in map(json.loads, proc.stdout.splitlines())}


def listing(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(d.iterdir())} if d.exists() else {}


def fill(node: Node, leave_mib: float) -> None:
    """Write a real file until ``leave_mib`` MiB are free for an unprivileged writer."""
    free = os.statvfs(node.root)
    available = free.f_bavail * free.f_frsize
    with (node.root / "filler").open("wb") as fh:
        fh.write(b"\1" * int(available - leave_mib * MiB))
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------
def test_a_start_that_fits_creates_and_reports(small_fs: Callable[..., Node]) -> None:
    node = small_fs(64)
    node.image("other", "data", 24)
    node.agent_summary()
    proc = node.prepare(make_plan("pg", disk("data", 16), disk("logs", 8)))
    assert proc.returncode == 0, proc.stderr
    out = lines(proc)
    assert (out["data"]["result"], out["logs"]["result"]) == ("created", "created")
    report = out[K.CAPACITY_REPORT]
    assert report["result"] == "fits"
    assert (report["otherVMsBytes"], report["thisVMBytes"], report["plannedBytes"]) == \
        (24 * MiB, 24 * MiB, 48 * MiB)
    assert report["filesystemBytes"] == 64 * MiB and report["budgetBytes"] == 64 * MiB
    assert virtual_size(node.vm_dir("pg") / "data.qcow2") == 16 * MiB


def test_a_start_over_the_budget_is_refused_and_changes_nothing(small_fs: Callable[..., Node]) -> None:
    node = small_fs(64)
    node.image("other", "data", 40)
    node.agent_summary()
    before = listing(node.vm_dir("pg"))
    proc = node.prepare(make_plan("pg", disk("data", 32)))
    assert proc.returncode == 1
    assert "diskhooks-prepare: node node-a has no room for the images of VM vms/pg: creating data.qcow2 " \
        "(32.00 MiB) would not fit: the planned virtual size of the images under /var/lib/diskhooks/vms " \
        "would be 72.00 MiB, above this node's budget of 64.00 MiB (overcommit 1 x filesystem 64.00 MiB)" \
        in proc.stderr
    assert "This VM's share would be 32.00 MiB (32.00 MiB new); the other VMs' images count 40.00 MiB" \
        in proc.stderr
    report = lines(proc)[K.CAPACITY_REPORT]
    assert (report["result"], report["plannedBytes"], report["otherVMsBytes"]) == \
        ("refused", 72 * MiB, 40 * MiB)
    assert listing(node.vm_dir("pg")) == before  # not even the home marker
    # overcommit 2 promises twice the filesystem: the same start fits
    proc = node.prepare(make_plan("pg", disk("data", 32)), "--overcommit", "2")
    assert proc.returncode == 0, proc.stderr
    assert lines(proc)[K.CAPACITY_REPORT]["budgetBytes"] == 128 * MiB


def test_growing_beyond_the_budget_is_refused(small_fs: Callable[..., Node]) -> None:
    node = small_fs(64)
    node.image("other", "data", 30)
    image = node.image("pg", "data", 16)
    node.agent_summary()
    proc = node.prepare(make_plan("pg", disk("data", 40)))
    assert proc.returncode == 1
    assert "growing data.qcow2 from 16.00 MiB to 40.00 MiB" in proc.stderr
    assert "This VM's share would be 40.00 MiB (24.00 MiB new)" in proc.stderr  # its own 16 MiB not twice
    assert virtual_size(image) == 16 * MiB
    proc = node.prepare(make_plan("pg", disk("data", 34)))  # 30 + 34 = 64: exactly the budget
    assert proc.returncode == 0, proc.stderr
    assert virtual_size(image) == 34 * MiB


def test_below_the_reserve_a_new_image_is_refused(small_fs: Callable[..., Node]) -> None:
    node = small_fs(64)
    fill(node, leave_mib=2)  # 5% of 64 MiB is 3.2 MiB
    node.agent_summary()
    proc = node.prepare(make_plan("pg", disk("data", 1)))
    assert proc.returncode == 1
    assert "the reserve keeps 3.20 MiB (5%) free" in proc.stderr
    assert re.search(r"the filesystem of /var/lib/diskhooks/vms has (1\.9\d|2\.00) MiB free", proc.stderr)
    assert lines(proc)[K.CAPACITY_REPORT]["reserveBytes"] == (64 * MiB * 5 + 99) // 100
    assert not (node.vm_dir("pg") / "data.qcow2").exists()
    proc = node.prepare(make_plan("pg", disk("data", 1)), "--reserve", "512Ki")
    assert proc.returncode == 0, proc.stderr


def test_a_full_node_still_starts_vms_that_need_nothing_new(small_fs: Callable[..., Node]) -> None:
    """Over the budget (an orphan of 60 MiB) and below the reserve: a VM whose images exist at their
    planned size, or larger than planned, starts; only a VM that needs more is refused."""
    node = small_fs(64)
    node.image("gone", "data", 60)
    node.image("pg", "data", 16)
    node.image("big", "data", 24)  # kept larger than its plan's 8 MiB
    fill(node, leave_mib=1)
    node.agent_summary()
    for plan in (make_plan("pg", disk("data", 16), node=NODE), make_plan("big", disk("data", 8), node=NODE)):
        proc = node.prepare(plan)
        assert proc.returncode == 0, proc.stderr
        out = lines(proc)
        assert out["data"]["result"] == "unchanged"
        assert out[K.CAPACITY_REPORT]["result"] == "nothing-new"
    proc = node.prepare(make_plan("pg", disk("data", 17), node=NODE))
    assert proc.returncode == 1 and "growing data.qcow2" in proc.stderr


def test_detached_images_count_for_their_vm(small_fs: Callable[..., Node]) -> None:
    """A detached disk's file stays in the VM directory: prepare counts it in the VM's share."""
    node = small_fs(64)
    node.image("pg", "old", 40)
    node.agent_summary()
    proc = node.prepare(make_plan("pg", disk("data", 30)))
    assert proc.returncode == 1
    assert "This VM's share would be 70.00 MiB (30.00 MiB new); the other VMs' images count 0 bytes" \
        in proc.stderr


def test_ext4_free_space_is_what_qemu_may_use(small_fs: Callable[..., Node]) -> None:
    """On ext4, 5% of the blocks are kept for root by default: the free figure is what an
    unprivileged writer (qemu) may still use, not the root-only rest."""
    node = small_fs(64, kind="ext4")
    st = os.statvfs(node.root)
    assert st.f_bavail < st.f_bfree
    proc = node.prepare(make_plan("pg", disk("data", 8)), "--reserve", "0")
    assert proc.returncode == 0, proc.stderr
    report = lines(proc)[K.CAPACITY_REPORT]
    assert report["freeBytes"] <= st.f_bavail * st.f_frsize
    assert report["filesystemBytes"] == st.f_blocks * st.f_frsize


def test_the_summary_of_another_node_or_none_is_not_used(small_fs: Callable[..., Node]) -> None:
    node = small_fs(64)
    node.image("other", "data", 40)
    proc = node.prepare(make_plan("a", disk("data", 8)))  # no summary yet
    assert proc.returncode == 0, proc.stderr
    report = lines(proc)[K.CAPACITY_REPORT]
    assert report["otherVMsBytes"] is None
    assert "has written no capacity summary yet" in report["notes"][0]
    node.agent_summary(node="node-b")
    proc = node.prepare(make_plan("b", disk("data", 32)))
    assert proc.returncode == 0, proc.stderr  # 40 MiB of the other VM not counted
    assert "describes node node-b, not node-a: not used" in lines(proc)[K.CAPACITY_REPORT]["notes"][0]
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    node.agent_summary(written=old)  # counts 40 + 8 + 32
    proc = node.prepare(make_plan("c", disk("data", 1)))
    assert proc.returncode == 1  # a stale summary is still used
    assert re.match(r"the capacity summary is 36\d\d s old \(is the node agent running\?\): used as it is",
                    lines(proc)[K.CAPACITY_REPORT]["notes"][0])


def test_without_the_capacity_mount_nothing_is_checked(small_fs: Callable[..., Node]) -> None:
    """A launcher admitted by a webhook older than the guard: prepare works as before."""
    node = small_fs(64)
    node.image("other", "data", 60)
    node.agent_summary()
    proc = node.prepare(make_plan("pg", disk("data", 32)), capacity_mounted=False)
    assert proc.returncode == 0, proc.stderr
    assert K.CAPACITY_REPORT not in lines(proc)


@pytest.mark.parametrize(("args", "field"), [
    (("--overcommit", "0"), "--overcommit"), (("--overcommit", "x"), "--overcommit"),
    (("--reserve", "90%"), "--reserve"), (("--reserve", "-1"), "--reserve"),
])
def test_bad_capacity_flags_exit_2(small_fs: Callable[..., Node], args: tuple[str, str], field: str) -> None:
    node = small_fs(16)
    proc = node.prepare(make_plan("pg", disk("data", 1)), *args)
    assert proc.returncode == 2
    assert f"diskhooks-prepare: {field}:" in proc.stderr
    assert not node.vm_dir("pg").joinpath("data.qcow2").exists()
