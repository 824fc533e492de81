"""Online expansion against a real launcher-shaped libvirt: an unprivileged session daemon (uid 107)
whose socket is in a kubelet-like ``libvirt-runtime`` directory, running a real QEMU (TCG) domain on
qcow2 images made by the project's own ``prepare`` (see ``tests/libvirt_launcher.py``).

The agent's call (:func:`nodeagent.expand.expand_online`) connects as root, the way it does on a node;
``virsh domblkinfo`` (QEMU's view through libvirt) and ``qemu-img info -U`` (the image file) are the
independent witnesses. Needs root, ``libvirtd`` and ``qemu-system-x86_64`` (scripts/setup.sh installs
them): without them these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.plan import Plan, PlanKeys, PlannedDisk, sign_plan
from nodeagent.expand import GrowResult, expand_online, launcher_socket
from tests.libvirt_launcher import (
    DomainDiskSpec,
    LauncherDaemon,
    RunningDomain,
    domain_xml,
    launcher_daemon,
    run_prepare,
    start_domain,
    stop_domain,
)

MiB, GiB = 1 << 20, 1 << 30
KEYS = PlanKeys(current=b"expand-libvirt-tests-plan-key-0123")
NAMESPACE, VM = "vms", "fedora-data"
DOMAIN = f"{NAMESPACE}_{VM}"  # KubeVirt's domain name: <namespace>_<vmi name>


def make_plan(**sizes: int) -> Plan:
    disks = tuple(PlannedDisk(name=n, size_bytes=s, bus="virtio", cache="none", io="native",
                              discard="unmap") for n, s in sizes.items())
    return Plan(namespace=NAMESPACE, vm=VM, host_dir=f"/var/lib/diskhooks/vms/{NAMESPACE}/{VM}",
                image_library=None, sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0", disks=disks)


@dataclass
class Vm:
    daemon: LauncherDaemon
    prefix: Path  # the launcher's filesystem, as prepare saw it
    domain: RunningDomain
    devs: dict[str, str]  # volume -> target dev

    def image(self, volume: str) -> Path:
        return self.prefix / K.launcher_disk_dir(volume).lstrip("/") / K.disk_file_name(volume)

    @property
    def socket(self) -> str:
        found = launcher_socket(str(self.daemon.pods_dir), self.daemon.pod_uid)
        assert found is not None, "the launcher's socket is not where the kubelet puts it"
        return found

    def expand(self, plan: Plan) -> dict[str, GrowResult]:
        return {r.volume: r for r in expand_online(plan, socket_path=self.socket, domain_name=DOMAIN)}

    def prepare(self, plan: Plan) -> dict[str, dict[str, Any]]:
        proc = run_prepare(sign_plan(plan, KEYS), prefix=self.prefix, plan_file=self.prefix.parent / "plan.json",
                           volumes=[d.name for d in plan.disks])
        assert proc.returncode == 0, proc.stderr
        return {s["volume"]: s for s in map(json.loads, proc.stdout.splitlines())}

    def domblk_capacity(self, volume: str) -> int:
        out = self.daemon.virsh("domblkinfo", DOMAIN, self.devs[volume])
        match = re.search(r"^Capacity:\s+(\d+)$", out, re.MULTILINE)
        assert match is not None, out
        return int(match.group(1))

    def qemu_img_size(self, volume: str) -> int:
        out = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(self.image(volume))],
                             check=True, capture_output=True, text=True).stdout
        return int(json.loads(out)["virtual-size"])

    def sizes(self, volume: str) -> tuple[int, int]:
        """(virsh domblkinfo's capacity, qemu-img info -U's virtual size)."""
        return self.domblk_capacity(volume), self.qemu_img_size(volume)

    def stop(self) -> None:
        stop_domain(self.daemon, self.domain)


@pytest.fixture(scope="module")
def daemon() -> Iterator[LauncherDaemon]:
    with launcher_daemon() as d:
        yield d


@pytest.fixture
def boot(daemon: LauncherDaemon, request: pytest.FixtureRequest) -> Iterator[Callable[..., Vm]]:
    """``boot(data=1 GiB, ...)``: prepare makes the images, then the domain starts on them."""
    started: list[Vm] = []

    def _boot(**sizes: int) -> Vm:
        prefix = daemon.root / f"launcher-{request.node.name[:40]}"
        prefix.mkdir()
        vm = Vm(daemon=daemon, prefix=prefix, domain=None,  # type: ignore[arg-type]
                devs={v: f"vd{chr(ord('a') + i)}" for i, v in enumerate(sizes)})
        made = vm.prepare(make_plan(**sizes))
        assert {v: s["result"] for v, s in made.items()} == {v: "created" for v in sizes}
        vm.domain = start_domain(daemon, DOMAIN, [DomainDiskSpec(K.disk_alias(v), vm.image(v), vm.devs[v])
                                                  for v in sizes])
        started.append(vm)
        return vm

    yield _boot
    for vm in started:
        vm.stop()


def test_the_running_disk_grows_online_to_the_planned_size(boot: Callable[..., Vm]) -> None:
    vm = boot(data=GiB)
    assert vm.sizes("data") == (GiB, GiB)
    result = vm.expand(make_plan(data=2 * GiB))["data"]
    assert (result.outcome, result.before, result.after) == ("grown", GiB, 2 * GiB), result.reason
    assert vm.sizes("data") == (2 * GiB, 2 * GiB)  # QEMU's view and the file's agree
    assert vm.daemon.conn.lookupByName(DOMAIN).isActive()  # grown while running, not restarted


def test_a_plan_asking_for_less_changes_nothing(boot: Callable[..., Vm]) -> None:
    vm = boot(data=GiB)
    result = vm.expand(make_plan(data=512 * MiB))["data"]
    assert (result.outcome, result.before, result.after) == ("already", GiB, GiB)
    assert vm.sizes("data") == (GiB, GiB)  # libvirt itself would have shrunk it


def test_a_disk_already_at_the_planned_size_is_already_done(boot: Callable[..., Vm]) -> None:
    vm = boot(data=GiB)
    first = vm.expand(make_plan(data=GiB))["data"]
    assert (first.outcome, first.before, first.after) == ("already", GiB, GiB)
    grown = vm.expand(make_plan(data=2 * GiB))["data"]
    again = vm.expand(make_plan(data=2 * GiB))["data"]
    assert (grown.outcome, again.outcome, again.before) == ("grown", "already", 2 * GiB)
    assert vm.sizes("data") == (2 * GiB, 2 * GiB)


def test_each_disk_gets_its_own_outcome(boot: Callable[..., Vm]) -> None:
    vm = boot(data=GiB, logs=GiB)
    results = vm.expand(make_plan(data=3 * GiB, logs=GiB, scratch=GiB))
    assert {v: r.outcome for v, r in results.items()} == {"data": "grown", "logs": "already",
                                                         "scratch": "skipped"}
    assert "next start" in results["scratch"].reason
    assert (vm.sizes("data"), vm.sizes("logs")) == ((3 * GiB, 3 * GiB), (GiB, GiB))


def test_a_missing_socket_or_a_wrong_domain_fails_with_the_reason_and_changes_nothing(
        boot: Callable[..., Vm]) -> None:
    vm = boot(data=GiB)
    other_pod = launcher_socket(str(vm.daemon.pods_dir), "3c1d6e0f-0000-4000-8000-0123456789ab")
    assert other_pod is None
    gone = str(Path(vm.socket).with_name("virtqemud-sock")) if vm.socket.endswith("libvirt-sock") \
        else str(Path(vm.socket).with_name("libvirt-sock"))
    missing = expand_online(make_plan(data=2 * GiB), socket_path=gone, domain_name=DOMAIN)
    assert [(r.outcome, r.before) for r in missing] == [("failed", None)]
    assert missing[0].reason.startswith(f"no libvirt socket at {gone}")
    wrong = expand_online(make_plan(data=2 * GiB), socket_path=vm.socket, domain_name="vms_other-vm")
    assert [r.outcome for r in wrong] == ["failed"]
    assert "'vms_other-vm'" in wrong[0].reason and "no domain with matching name" in wrong[0].reason
    assert vm.sizes("data") == (GiB, GiB)


def test_a_paused_domain_grows_and_a_stopped_one_does_not(daemon: LauncherDaemon,
                                                          boot: Callable[..., Vm]) -> None:
    vm = boot(data=GiB)
    dom = daemon.conn.lookupByName(DOMAIN)
    dom.suspend()  # paused: QEMU still holds the disk open, so it grows
    assert vm.expand(make_plan(data=2 * GiB))["data"].outcome == "grown"
    dom.resume()
    vm.stop()
    gone = expand_online(make_plan(data=3 * GiB), socket_path=vm.socket, domain_name=DOMAIN)
    assert [r.outcome for r in gone] == ["failed"] and "no domain" in gone[0].reason
    # the same domain defined but not running (a persistent, shut-off domain)
    spec = DomainDiskSpec(K.disk_alias("data"), vm.image("data"), "vda")
    defined = daemon.conn.defineXML(domain_xml(DOMAIN, [spec]))
    try:
        off = expand_online(make_plan(data=3 * GiB), socket_path=vm.socket, domain_name=DOMAIN)
    finally:
        defined.undefine()
    assert [r.outcome for r in off] == ["failed"]
    assert off[0].reason == f"domain {DOMAIN!r} is not running: its disks grow at the next start"
    assert vm.qemu_img_size("data") == 2 * GiB


def test_prepare_at_the_next_start_finds_the_grown_image_and_does_nothing(boot: Callable[..., Vm]) -> None:
    vm = boot(data=GiB, logs=GiB)
    odd = GiB + 1000  # not a sector multiple: both sides must round it the same way
    results = vm.expand(make_plan(data=2 * GiB, logs=odd))
    assert {v: (r.outcome, r.after) for v, r in results.items()} == {
        "data": ("grown", 2 * GiB), "logs": ("grown", GiB + 1024)}
    vm.stop()  # the VM stops; its next start runs prepare with the same plan
    again = vm.prepare(make_plan(data=2 * GiB, logs=odd))
    assert {v: (s["result"], s["virtualSize"]) for v, s in again.items()} == {
        "data": ("unchanged", 2 * GiB), "logs": ("unchanged", GiB + 1024)}
    assert not any("warning" in s for s in again.values())
