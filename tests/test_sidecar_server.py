"""The real hook sidecar: ``python -m hooksidecar.cli serve`` on a unix socket, called as virt-launcher
calls it — a new gRPC channel per call, ``Info`` first, then ``OnDefineDomain`` — through the client
stubs generated from our own protos (``hooksidecar/_pb``), with KubeVirt's own sample VMI and domain
XML (``tests/data/kubevirt/samples/01-*``) plus a diskhooks plan as the webhook would add it, and real
qcow2 images made by ``qemu-img`` under a ``--path-prefix`` directory.

Nothing is faked but virt-launcher itself (there is no KubeVirt on this machine): these tests play
its side of the socket. The end of the module checks the server's hand-written codec against the
protobuf modules generated from the same protos.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from lxml import etree

from diskplan import keys as K
from diskplan.plan import Backing, Plan, PlanKeys, PlannedDisk, sign_plan
from hooksidecar import logfmt
from hooksidecar import server as srv
from hooksidecar._pb import info_pb2, v1alpha1_pb2, v1alpha2_pb2, v1alpha3_pb2
from hooksidecar.callback import on_define_domain
from hooksidecar.prepare import make_base_record
from tests.conftest import ROOT, SAMPLES

SAMPLE01 = SAMPLES / "01-vm-containerdisk-hostdisk-cloudinit"
VERSIONS = ("v1alpha1", "v1alpha2", "v1alpha3")
PB: dict[str, ModuleType] = {"v1alpha1": v1alpha1_pb2, "v1alpha2": v1alpha2_pb2, "v1alpha3": v1alpha3_pb2}
PLANNED = ("datadisk", "scratch")
HOST_DIR = "/var/lib/diskhooks/vms/vms/fedora-data"
BASE_FILE = "almalinux-9.qcow2"
GiB = 1024 ** 3


# ================================================================================================
# the sample with a plan, and its images
# ================================================================================================
@dataclass(frozen=True)
class PlannedSample:
    """Sample 01 as the launcher sees it once diskhooks planned ``datadisk`` (plain qcow2) and an
    added ``scratch`` disk (qcow2 overlay on a library base), with the images under ``prefix``."""

    prefix: Path
    vmi: bytes  # launcher VMI JSON with the signed plan
    vmi_without_plan: bytes
    first_call: bytes  # domain XML of the first OnDefineDomain call
    later_call: bytes  # domain XML of a later call (libvirt's read-back, through KubeVirt's struct)


def _planned_disk_xml(first_call_datadisk: bytes) -> bytes:
    """A ``scratch`` hostDisk as KubeVirt's converter writes it (raw driver, source in vmi-disks)."""
    return (first_call_datadisk.replace(b"ua-datadisk", b"ua-scratch")
            .replace(b'dev="vdb"', b'dev="vdd"')
            .replace(b"vmi-disks/datadisk/datadisk.qcow2", b"vmi-disks/scratch/scratch.qcow2"))


def _adapt_domain(xml: bytes) -> bytes:
    """Point ``datadisk`` at its planned file (KubeVirt takes the basename of the hostDisk path the
    webhook wrote) and add the planned ``scratch`` disk right after it."""
    xml = xml.replace(b"vmi-disks/datadisk/data.img", b"vmi-disks/datadisk/datadisk.qcow2")
    start = xml.rindex(b"<disk ", 0, xml.index(b"vmi-disks/datadisk/"))
    end = xml.index(b"</disk>", start) + len(b"</disk>")
    datadisk = xml[start:end]
    assert b"ua-datadisk" in datadisk
    return xml[:end] + b"\n\t\t" + _planned_disk_xml(datadisk) + xml[end:]


def make_plan() -> Plan:
    return Plan(
        namespace="vms", vm="fedora-data", host_dir=HOST_DIR, image_library="/var/lib/diskhooks/images",
        sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
        disks=(PlannedDisk(name="datadisk", size_bytes=10 * GiB, bus="virtio", cache="none", io="native",
                           discard="unmap"),
               PlannedDisk(name="scratch", size_bytes=20 * GiB, bus="virtio", cache="none", io="native",
                           discard="unmap",
                           backing=Backing(image="almalinux-9", file=BASE_FILE, format="qcow2"))))


PLAN_KEYS = PlanKeys(b"test-plan-key-0123456789")
#: the plan annotation of the sample, as the Pod webhook verified it and hands it to the sidecar
#: container (DISKHOOKS_PLAN); signing is deterministic, so it is also the VMI's annotation
PLAN_TEXT = sign_plan(make_plan(), PLAN_KEYS)


def planned_vmi(plan: Plan) -> dict[str, Any]:
    """The launcher VMI of sample 01 after the webhook: plan annotation, hostDisk paths, scratch."""
    vmi: dict[str, Any] = json.loads((SAMPLE01.parent / (SAMPLE01.name + ".launcher-vmi.json")).read_bytes())
    vmi["metadata"]["annotations"][K.ANN_PLAN] = sign_plan(plan, PLAN_KEYS)
    spec = vmi["spec"]
    for volume in spec["volumes"]:
        if volume["name"] == "datadisk":
            volume["hostDisk"] = {"path": f"{HOST_DIR}/datadisk.qcow2", "type": "DiskOrCreate",
                                  "capacity": "10Gi"}
    spec["volumes"].append({"name": "scratch", "hostDisk": {"path": f"{HOST_DIR}/scratch.qcow2",
                                                            "type": "DiskOrCreate", "capacity": "20Gi"}})
    spec["domain"]["devices"]["disks"].append({"name": "scratch", "disk": {"bus": "virtio"}})
    return vmi


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=30)


def make_images(prefix: Path, *, raw_datadisk: bool = False) -> None:
    """What diskhooks-prepare leaves behind, as the sidecar's read-only mounts show it."""
    data_dir = prefix / K.LAUNCHER_VMI_DISKS.lstrip("/") / "datadisk"
    scratch_dir = prefix / K.LAUNCHER_VMI_DISKS.lstrip("/") / "scratch"
    library = prefix / K.LAUNCHER_IMAGE_LIBRARY.lstrip("/")
    for d in (data_dir, scratch_dir, library):
        d.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", str(library / BASE_FILE), "1G")
    if raw_datadisk:  # what KubeVirt makes for DiskOrCreate when prepare did not run
        qemu_img("create", "-q", "-f", "raw", str(data_dir / "datadisk.qcow2"), "10G")
    else:
        qemu_img("create", "-q", "-f", "qcow2", str(data_dir / "datadisk.qcow2"), "10G")
    # the backing path is the launcher's, which does not exist here: -u (do not open it)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", f"{K.LAUNCHER_IMAGE_LIBRARY}/{BASE_FILE}",
             str(scratch_dir / "scratch.qcow2"), "20G")
    # the base record prepare writes before the overlay
    scratch = make_plan().disks[1]
    (scratch_dir / scratch.base_record).write_text(json.dumps(make_base_record(scratch, str(library / BASE_FILE))))


def build_sample(prefix: Path, *, raw_datadisk: bool = False) -> PlannedSample:
    make_images(prefix, raw_datadisk=raw_datadisk)
    vmi = planned_vmi(make_plan())
    bare = json.loads((SAMPLE01.parent / (SAMPLE01.name + ".launcher-vmi.json")).read_bytes())
    return PlannedSample(
        prefix=prefix, vmi=json.dumps(vmi).encode(), vmi_without_plan=json.dumps(bare).encode(),
        first_call=_adapt_domain((SAMPLE01.parent / (SAMPLE01.name + ".domain.first-call.xml")).read_bytes()),
        later_call=_adapt_domain((SAMPLE01.parent / (SAMPLE01.name + ".domain.xml")).read_bytes()))


# ================================================================================================
# the sidecar process and virt-launcher's side of the socket
# ================================================================================================
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    @property
    def target(self) -> str:
        return f"unix://{self.socket_path}"

    def log(self) -> list[dict[str, Any]]:
        return [dict(json.loads(line)) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 5 s (only this test's own process)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=10)


def start_sidecar(socket_dir: Path, *args: str, wait: bool = True, name: str = "diskhooks",
                  plan: str | None = PLAN_TEXT) -> Sidecar:
    """``serve`` as the launcher Pod runs it: with the verified plan in DISKHOOKS_PLAN (the sample's,
    unless ``plan`` says otherwise; None: no such variable, as in a Pod the webhook did not see)."""
    log_path = socket_dir.parent / f"{socket_dir.name}-{name}-{time.monotonic_ns()}.log"
    env = subprocess_env()
    env.pop(K.ENV_PLAN, None)
    if plan is not None:
        env[K.ENV_PLAN] = plan
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hooksidecar.cli", "serve", "--socket-dir",
                                 str(socket_dir), "--name", name, *args],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    sidecar = Sidecar(proc, socket_dir / f"{name}.sock", log_path)
    if wait:
        wait_ready(sidecar)
    return sidecar


def wait_ready(sidecar: Sidecar, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sidecar.proc.poll() is not None:
            raise AssertionError(f"the sidecar exited with {sidecar.proc.returncode}: "
                                 f"{sidecar.log_path.read_text()}")
        if sidecar.socket_path.exists() and b'"event":"serving"' in sidecar.log_path.read_bytes():
            try:
                call_info(sidecar.target)
                return
            except grpc.RpcError:
                pass
        time.sleep(0.02)
    sidecar.stop()
    raise AssertionError(f"the sidecar was not ready within {timeout} s: {sidecar.log_path.read_text()}")


def rpc(channel: grpc.Channel, module: ModuleType, service: str, method: str) -> Callable[..., Any]:
    """``service.method`` as a generated stub would call it: path and message classes are taken
    from the descriptors of the module generated from our protos."""
    desc = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    request_cls = getattr(module, desc.input_type.name)
    response_cls = getattr(module, desc.output_type.name)
    call: Callable[..., Any] = channel.unary_unary(f"/{desc.containing_service.full_name}/{desc.name}",
                                                   request_serializer=request_cls.SerializeToString,
                                                   response_deserializer=response_cls.FromString)
    return call


def call_info(target: str) -> Any:
    """virt-launcher's Info call: its own channel, 1 s to dial and call. (``wait_for_ready`` stands
    for Go's blocking dial; Python's ``channel_ready_future`` polls and would add ~200 ms.)"""
    with grpc.insecure_channel(target) as channel:
        return rpc(channel, info_pb2, "Info", "Info")(info_pb2.InfoParams(), timeout=1, wait_for_ready=True)


def call_on_define(target: str, version: str, domain_xml: bytes, vmi: bytes) -> bytes:
    """virt-launcher's OnDefineDomain call: a new channel, a one-minute timeout."""
    pb2 = PB[version]
    with grpc.insecure_channel(target) as channel:
        result = rpc(channel, pb2, "Callbacks", "OnDefineDomain")(
            pb2.OnDefineDomainParams(domainXML=domain_xml, vmi=vmi), timeout=60, wait_for_ready=True)
    return bytes(result.domainXML)


def rpc_error(fn: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


def disk_by_alias(xml: bytes, alias: str) -> bytes:
    """The canonical form (C14N, whitespace-insensitive) of the ``<disk>`` with ``alias``."""
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    root = etree.fromstring(xml, parser)
    found = root.xpath("devices/disk[alias/@name=$a]", a=alias)
    assert len(found) == 1, f"{alias}: {len(found)} disks"
    return bytes(etree.tostring(found[0], method="c14n"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> PlannedSample:
    return build_sample(tmp_path_factory.mktemp("prefix"))


@pytest.fixture(scope="module")
def unplanned_sidecar(tmp_path_factory: pytest.TempPathFactory, sample: PlannedSample) -> Iterator[Sidecar]:
    """A sidecar whose Pod the diskhooks Pod webhook gave no plan (no DISKHOOKS_PLAN)."""
    sidecar = start_sidecar(tmp_path_factory.mktemp("sock"), "--path-prefix", str(sample.prefix), plan=None)
    yield sidecar
    sidecar.stop()


@pytest.fixture(scope="module")
def shared_sidecar(tmp_path_factory: pytest.TempPathFactory, sample: PlannedSample) -> Iterator[Sidecar]:
    """One sidecar (all three versions) for the tests that only call it."""
    sidecar = start_sidecar(tmp_path_factory.mktemp("sock"), "--path-prefix", str(sample.prefix))
    yield sidecar
    sidecar.stop()


# ================================================================================================
# Info
# ================================================================================================
def test_info_names_the_hook_versions_and_hook_points(shared_sidecar: Sidecar) -> None:
    info = call_info(shared_sidecar.target)
    assert info.name == "diskhooks"
    assert list(info.versions) == ["v1alpha3", "v1alpha2", "v1alpha1"]
    assert [(p.name, p.priority) for p in info.hookPoints] == [("OnDefineDomain", 0), ("Shutdown", 0)]


@pytest.mark.parametrize("newest,offered", [("v1alpha3", ["v1alpha3", "v1alpha2", "v1alpha1"]),
                                             ("v1alpha2", ["v1alpha2", "v1alpha1"]),
                                             ("v1alpha1", ["v1alpha1"])])
def test_version_flag_is_the_newest_version_offered(sock_dir: Path, sample: PlannedSample, newest: str,
                                                    offered: list[str]) -> None:
    """``--version V`` (what the webhook gives the sidecar: v1alpha3) offers V and every older version:
    a KubeVirt 1.0 virt-launcher, which knows no v1alpha3, must still find one it speaks."""
    sidecar = start_sidecar(sock_dir, "--version", newest, "--path-prefix", str(sample.prefix))
    try:
        info = call_info(sidecar.target)
        assert list(info.versions) == offered
        assert [p.name for p in info.hookPoints] == (
            ["OnDefineDomain", "Shutdown"] if "v1alpha3" in offered else ["OnDefineDomain"])
        for version in VERSIONS:
            if version in offered:
                out = call_on_define(sidecar.target, version, sample.first_call, sample.vmi)
                assert b'type="qcow2"' in disk_by_alias(out, "ua-datadisk")
            else:
                err = rpc_error(call_on_define, sidecar.target, version, sample.first_call, sample.vmi)
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        sidecar.stop()


def test_shim_style_arguments_serve(sock_dir: Path) -> None:
    """``args: ["--version", "v1alpha3"]`` (KubeVirt's sidecar-shim style, no subcommand) serves, and
    offers every version up to v1alpha3."""
    log_path = sock_dir.parent / "shim.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hooksidecar.cli", "--version", "v1alpha3",
                                 "--socket-dir", str(sock_dir)],
                                cwd=ROOT, env=subprocess_env(), stderr=log)
    sidecar = Sidecar(proc, sock_dir / "diskhooks.sock", log_path)
    try:
        wait_ready(sidecar)
        assert list(call_info(sidecar.target).versions) == ["v1alpha3", "v1alpha2", "v1alpha1"]
    finally:
        sidecar.stop()


# ================================================================================================
# OnDefineDomain
# ================================================================================================
@pytest.mark.parametrize("version", VERSIONS)
def test_on_define_domain_is_the_same_on_every_call(shared_sidecar: Sidecar, sample: PlannedSample,
                                                    version: str) -> None:
    """A VM start: Info, then the first call (placeholder NICs), a later call (libvirt's read-back),
    and a call on the sidecar's own answer: the planned disks come out identical every time."""
    assert version in call_info(shared_sidecar.target).versions
    first = call_on_define(shared_sidecar.target, version, sample.first_call, sample.vmi)
    later = call_on_define(shared_sidecar.target, version, sample.later_call, sample.vmi)
    again = call_on_define(shared_sidecar.target, version, first, sample.vmi)
    assert again == first  # a fixed point, byte for byte
    for alias in ("ua-datadisk", "ua-scratch"):
        assert disk_by_alias(first, alias) == disk_by_alias(later, alias) == disk_by_alias(again, alias)
    data = etree.fromstring(disk_by_alias(first, "ua-datadisk"))
    assert data.find("driver").get("type") == "qcow2"
    assert data.find("source").get("file") == "/var/run/kubevirt-private/vmi-disks/datadisk/datadisk.qcow2"
    scratch = etree.fromstring(disk_by_alias(first, "ua-scratch"))
    assert scratch.find("driver").get("type") == "qcow2"
    chain = scratch.find("backingStore")
    assert chain is not None and chain.find("source").get("file") == f"{K.LAUNCHER_IMAGE_LIBRARY}/{BASE_FILE}"
    assert chain.find("format").get("type") == "qcow2"
    assert chain.find("backingStore") is not None and len(chain.find("backingStore")) == 0  # chain end
    # disks the plan does not name are untouched
    assert disk_by_alias(first, "ua-cloudinitdisk") == disk_by_alias(sample.first_call, "ua-cloudinitdisk")
    # the server answers exactly what the core computes
    assert first == on_define_domain(sample.first_call, sample.vmi, path_prefix=str(sample.prefix))


def test_every_version_gives_the_same_answer(shared_sidecar: Sidecar, sample: PlannedSample) -> None:
    answers = {v: call_on_define(shared_sidecar.target, v, sample.first_call, sample.vmi) for v in VERSIONS}
    assert len(set(answers.values())) == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_vmi_without_plan_gets_its_xml_back_byte_for_byte(unplanned_sidecar: Sidecar, sample: PlannedSample,
                                                         version: str) -> None:
    """A launcher Pod the diskhooks Pod webhook gave no plan, and a VMI without one."""
    for xml in (sample.first_call, sample.later_call):
        assert call_on_define(unplanned_sidecar.target, version, xml, sample.vmi_without_plan) == xml


# ================================================================================================
# only the plan verified at Pod admission is applied
# ================================================================================================
def _vmi_with_plan(sample: PlannedSample, text: str | None) -> bytes:
    vmi = json.loads(sample.vmi)
    if text is None:
        del vmi["metadata"]["annotations"][K.ANN_PLAN]
    else:
        vmi["metadata"]["annotations"][K.ANN_PLAN] = text
    return json.dumps(vmi).encode()


def _edited_plan() -> str:
    """What a VM owner could put on the running VMI: a validly signed plan of another VM of theirs,
    or the same plan with a disk edited (here: datadisk with another cache and io mode)."""
    plan = make_plan()
    edited = replace(plan, disks=(replace(plan.disks[0], cache="unsafe", io="threads"), plan.disks[1]))
    return sign_plan(edited, PLAN_KEYS)


@pytest.mark.parametrize("label", ["edited plan", "plan removed"])
def test_vmi_plan_that_differs_from_the_admitted_one_is_refused(shared_sidecar: Sidecar, sample: PlannedSample,
                                                                label: str) -> None:
    vmi = _vmi_with_plan(sample, _edited_plan() if label == "edited plan" else None)
    err = rpc_error(call_on_define, shared_sidecar.target, "v1alpha3", sample.first_call, vmi)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith(f"vmi.metadata.annotations[{K.ANN_PLAN}]: the VMI "), err.details()
    assert "the plan verified when the launcher Pod was admitted" in err.details()
    assert "DISKHOOKS_PLAN" in err.details()


def test_vmi_plan_without_an_admitted_plan_is_refused(unplanned_sidecar: Sidecar, sample: PlannedSample) -> None:
    err = rpc_error(call_on_define, unplanned_sidecar.target, "v1alpha3", sample.first_call, sample.vmi)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was not verified at Pod admission" in err.details()
    assert "check the diskhooks Pod webhook ran" in err.details()


def test_sizing_only_plan_needs_no_admitted_plan(unplanned_sidecar: Sidecar, sample: PlannedSample) -> None:
    """A plan with nothing for the domain (sizing only) gets no launcher-Pod handling: unchanged."""
    sizing_only = sign_plan(replace(make_plan(), disks=()), PLAN_KEYS)
    out = call_on_define(unplanned_sidecar.target, "v1alpha3", sample.first_call,
                         _vmi_with_plan(sample, sizing_only))
    assert out == sample.first_call


def test_the_admitted_plan_is_the_one_applied(shared_sidecar: Sidecar, sample: PlannedSample) -> None:
    assert [r["verifiedPlan"] for r in shared_sidecar.log() if r["event"] == "serving"] == [True]
    out = call_on_define(shared_sidecar.target, "v1alpha3", sample.first_call, _vmi_with_plan(sample, PLAN_TEXT))
    assert b'type="qcow2"' in disk_by_alias(out, "ua-datadisk")


def test_planned_disk_wrapped_as_an_incremental_backup_overlay_is_refused(shared_sidecar: Sidecar,
                                                                         sample: PlannedSample) -> None:
    """With changed-block tracking KubeVirt's converter makes a hostDisk a qcow2 overlay of its own
    whose raw ``dataStore`` is our image: qemu would show the qcow2 file's bytes to the guest as its
    disk. Left unchanged that is unsafe, so the sidecar refuses (docs/ARCHITECTURE.md, Decisions);
    a disk diskhooks did not plan is left as it is (tests/test_domain.py)."""
    ours = b'<source file="/var/run/kubevirt-private/vmi-disks/datadisk/datadisk.qcow2"></source>'
    cbt = (b'<source file="/var/lib/kubevirt-cbt/datadisk.qcow2"><dataStore type="file"><format type="raw">'
           b'</format><source file="/var/run/kubevirt-private/vmi-disks/datadisk/datadisk.qcow2"></source>'
           b'</dataStore></source>')
    assert sample.first_call.count(ours) == 1
    xml = sample.first_call.replace(ours, cbt).replace(
        b'<driver cache="none" error_policy="stop" name="qemu" type="raw" discard="unmap"></driver>\n'
        b'\t\t\t<alias name="ua-datadisk">',
        b'<driver cache="none" error_policy="stop" name="qemu" type="qcow2" discard="unmap"></driver>\n'
        b'\t\t\t<alias name="ua-datadisk">')
    assert b'type="qcow2" discard="unmap"></driver>\n\t\t\t<alias name="ua-datadisk">' in xml
    err = rpc_error(call_on_define, shared_sidecar.target, "v1alpha3", xml, sample.vmi)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("volume datadisk: KubeVirt turned disk ua-datadisk into an "
                                    "IncrementalBackup overlay"), err.details()


def test_an_unreadable_admitted_plan_stops_serve_with_the_reason(sock_dir: Path) -> None:
    sidecar = start_sidecar(sock_dir, wait=False, plan="{not a plan")
    assert sidecar.proc.wait(timeout=15) == 2
    assert "DISKHOOKS_PLAN: the plan is not valid JSON" in sidecar.log_path.read_text()
    assert not sidecar.socket_path.exists()


def test_malformed_domain_xml_is_invalid_argument(shared_sidecar: Sidecar, sample: PlannedSample) -> None:
    err = rpc_error(call_on_define, shared_sidecar.target, "v1alpha3", b"<domain><devices>", sample.vmi)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "domainXML" in err.details() and "not well-formed" in err.details()
    bomb = b'<!DOCTYPE d [<!ENTITY a "aaaa">]><domain>&a;</domain>'
    err = rpc_error(call_on_define, shared_sidecar.target, "v1alpha3", bomb, sample.vmi)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "DOCTYPE" in err.details()


def test_malformed_vmi_json_is_invalid_argument(shared_sidecar: Sidecar, sample: PlannedSample) -> None:
    err = rpc_error(call_on_define, shared_sidecar.target, "v1alpha1", sample.first_call, b'{"metadata": ')
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vmi" in err.details() and "JSON" in err.details()
    err = rpc_error(call_on_define, shared_sidecar.target, "v1alpha3", sample.first_call, b'{"a":' * 100000)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("vmi: the VMI JSON is nested too deeply"), err.details()


def test_bytes_that_are_not_a_protobuf_message_are_invalid_argument(shared_sidecar: Sidecar) -> None:
    with grpc.insecure_channel(shared_sidecar.target) as channel:
        call = channel.unary_unary("/kubevirt.hooks.v1alpha3.Callbacks/OnDefineDomain")
        err = rpc_error(call, b"\x0a\xff\xff\xff\x0f", 5)  # field 1, length far past the end
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "OnDefineDomainParams" in err.details()


def test_oversized_request_is_refused_naming_the_limits(shared_sidecar: Sidecar, sample: PlannedSample) -> None:
    huge = sample.first_call + b" " * (2 * 1024 * 1024)
    err = rpc_error(call_on_define, shared_sidecar.target, "v1alpha3", huge, sample.vmi)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "a domain XML of at most 512 KiB and a VMI JSON of at most 512 KiB" in err.details(), err.details()
    assert srv.MAX_MESSAGE_BYTES < 1.1 * 1024 * 1024
    call_info(shared_sidecar.target)  # and it still serves


def test_calls_run_one_at_a_time() -> None:
    """Concurrent OnDefineDomain calls (four h2 connections) reach the core one after the other, so the
    process never holds more than one call's parse in memory."""
    inside = 0
    most = 0
    guard = threading.Lock()

    def slow(domain_xml: bytes, vmi_json: bytes, **kw: Any) -> bytes:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)
        with guard:
            inside -= 1
        return domain_xml

    servicers = srv.Servicers(settings=srv.SidecarSettings(), log=logfmt.JsonLog(io.StringIO()),
                              request_shutdown=lambda: None, on_define=slow)
    handle = servicers.on_define_domain("v1alpha3")
    request = srv.encode_bytes_field(srv.F_DOMAIN_XML, b"<domain></domain>")
    threads = [threading.Thread(target=handle, args=(request,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most == 1


def test_raw_image_is_failed_precondition_naming_the_volume(sock_dir: Path, tmp_path: Path) -> None:
    raw = build_sample(tmp_path / "raw-prefix", raw_datadisk=True)
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(raw.prefix))
    try:
        err = rpc_error(call_on_define, sidecar.target, "v1alpha3", raw.first_call, raw.vmi)
    finally:
        sidecar.stop()
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "datadisk" in err.details() and "raw" in err.details()


def test_library_base_replaced_after_prepare_is_failed_precondition(sock_dir: Path, tmp_path: Path) -> None:
    """The base of ``scratch`` is replaced after prepare recorded it (same name, same size): the
    sidecar compares its identity with the record and refuses, on every call, naming the reason."""
    replaced = build_sample(tmp_path / "replaced-prefix")
    base = replaced.prefix / K.LAUNCHER_IMAGE_LIBRARY.lstrip("/") / BASE_FILE
    qemu_img("create", "-q", "-f", "qcow2", str(base.with_name("new")), "1G")
    os.replace(base.with_name("new"), base)
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(replaced.prefix))
    try:
        errs = [rpc_error(call_on_define, sidecar.target, v, replaced.first_call, replaced.vmi)
                for v in ("v1alpha3", "v1alpha2")]
    finally:
        sidecar.stop()
    for err in errs:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details().startswith("volume scratch: the base image almalinux-9 "
                                        "(/var/lib/diskhooks/images/almalinux-9.qcow2) changed since "
                                        "the diskhooks-prepare init container checked it"), err.details()
        assert "ino " in err.details()


def test_missing_base_record_is_failed_precondition(sock_dir: Path, tmp_path: Path) -> None:
    """As for a persistent root's record: no record means prepare did not run for this start."""
    unrecorded = build_sample(tmp_path / "unrecorded-prefix")
    (unrecorded.prefix / K.LAUNCHER_VMI_DISKS.lstrip("/") / "scratch" / "scratch.base.json").unlink()
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(unrecorded.prefix))
    try:
        err = rpc_error(call_on_define, sidecar.target, "v1alpha3", unrecorded.first_call, unrecorded.vmi)
    finally:
        sidecar.stop()
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith("volume scratch: the base record "
                                    "/var/run/kubevirt-private/vmi-disks/scratch/scratch.base.json"), \
        err.details()
    assert "did not run for this start" in err.details()


def test_raw_planned_base_with_a_qcow2_header_is_failed_precondition(sock_dir: Path, tmp_path: Path) -> None:
    """``scratch`` is planned on a raw library base whose first bytes are a qcow2 header naming a
    backing file (the format-confusion hazard): prepare refuses it, and so does the sidecar, on
    every call, naming the volume, the base and the reason."""
    raw_base = Backing(image="debian-12", file="debian-12.raw", format="raw")
    plan = replace(make_plan(), disks=(make_plan().disks[0], replace(make_plan().disks[1], backing=raw_base)))
    sample = build_sample(tmp_path / "confused-prefix")
    library = sample.prefix / K.LAUNCHER_IMAGE_LIBRARY.lstrip("/")
    scratch_dir = sample.prefix / K.LAUNCHER_VMI_DISKS.lstrip("/") / "scratch"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow",
             str(library / raw_base.file), "1G")
    (scratch_dir / "scratch.qcow2").unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", raw_base.launcher_path,
             str(scratch_dir / "scratch.qcow2"), "20G")
    (scratch_dir / "scratch.base.json").write_text(
        json.dumps(make_base_record(plan.disks[1], str(library / raw_base.file))))
    vmi = json.dumps(planned_vmi(plan)).encode()
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix), plan=sign_plan(plan, PLAN_KEYS))
    try:
        errs = [rpc_error(call_on_define, sidecar.target, v, sample.first_call, vmi)
                for v in ("v1alpha3", "v1alpha1")]
    finally:
        sidecar.stop()
    for err in errs:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details().startswith(
            "volume scratch: base image /var/run/kubevirt-private/diskhooks/images/debian-12.raw "
            "(debian-12, node file /var/lib/diskhooks/images/debian-12.raw) is qcow2, but the plan says "
            "raw"), err.details()
        assert "format-confusion" in err.details()
    failed = [r for r in sidecar.log() if r["event"] == "call" and r["hook"] == "OnDefineDomain"]
    assert [r["code"] for r in failed] == ["FAILED_PRECONDITION"] * 2


def test_image_larger_than_planned_is_answered_as_usual_and_logged(sock_dir: Path, tmp_path: Path) -> None:
    """prepare keeps an image larger than planned (never shrinks it) with a warning; the sidecar
    answers exactly as for the planned size and says so on the call's log line."""
    larger = build_sample(tmp_path / "larger-prefix")
    datadisk = larger.prefix / K.LAUNCHER_VMI_DISKS.lstrip("/") / "datadisk" / "datadisk.qcow2"
    datadisk.unlink()
    qemu_img("create", "-q", "-f", "qcow2", str(datadisk), "12G")  # planned 10 GiB
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(larger.prefix))
    try:
        out = call_on_define(sidecar.target, "v1alpha3", larger.first_call, larger.vmi)
    finally:
        sidecar.stop()
    assert out == on_define_domain(larger.first_call, larger.vmi, check_images=False)
    [call] = [r for r in sidecar.log() if r["event"] == "call" and r["hook"] == "OnDefineDomain"]
    assert call["result"] == "ok"
    assert call["largerThanPlanned"] == [{"volume": "datadisk", "virtualSize": 12 * GiB,
                                          "plannedSize": 10 * GiB}]
    assert call["warning"] == (
        "volume datadisk: /var/run/kubevirt-private/vmi-disks/datadisk/datadisk.qcow2 is larger than "
        f"planned ({12 * GiB} bytes, planned {10 * GiB}): kept as it is, since diskhooks never shrinks "
        f"an image; the guest sees {12 * GiB} bytes")


def test_larger_than_planned_log_fields_are_bounded() -> None:
    from hooksidecar.images import LargerImage

    many = [LargerImage(f"d{i}", f"/var/run/kubevirt-private/vmi-disks/d{i}/d{i}.qcow2", 2 * GiB, GiB)
            for i in range(40)]
    fields = logfmt.larger_than_planned(many)
    assert len(fields["largerThanPlanned"]) == 32 and fields["warning"].endswith("; and 8 more")
    assert logfmt.larger_than_planned([]) == {}


def test_missing_image_is_failed_precondition(sock_dir: Path, tmp_path: Path, sample: PlannedSample) -> None:
    """Served without the prefix, the sidecar finds no mounted volume directory: it refuses."""
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(tmp_path))
    try:
        err = rpc_error(call_on_define, sidecar.target, "v1alpha2", sample.first_call, sample.vmi)
    finally:
        sidecar.stop()
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "datadisk" in err.details()


# ================================================================================================
# PreCloudInitIso
# ================================================================================================
@pytest.mark.parametrize("version", ("v1alpha2", "v1alpha3"))
def test_pre_cloud_init_iso_returns_its_input(shared_sidecar: Sidecar, sample: PlannedSample,
                                              version: str) -> None:
    pb2 = PB[version]
    source = json.dumps({"userData": "#cloud-config\npassword: x\n"}).encode()
    data = json.dumps({"noCloud": {"userData": "#cloud-config\n"}}).encode()
    with grpc.insecure_channel(shared_sidecar.target) as channel:
        result = rpc(channel, pb2, "Callbacks", "PreCloudInitIso")(
            pb2.PreCloudInitIsoParams(cloudInitNoCloudSource=source, vmi=sample.vmi, cloudInitData=data),
            timeout=5)
    assert result.cloudInitNoCloudSource == source and result.cloudInitData == data


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rpc_of_our_protos_is_served(shared_sidecar: Sidecar, version: str) -> None:
    """Each method the .proto of a version declares answers (Shutdown is tested on its own)."""
    service = PB[version].DESCRIPTOR.services_by_name["Callbacks"]
    expected = {"v1alpha1": {"OnDefineDomain"}, "v1alpha2": {"OnDefineDomain", "PreCloudInitIso"},
                "v1alpha3": {"OnDefineDomain", "PreCloudInitIso", "Shutdown"}}
    assert set(service.methods_by_name) == expected[version]
    for method in service.methods_by_name:
        if method == "Shutdown":
            continue
        with grpc.insecure_channel(shared_sidecar.target) as channel:
            call = rpc(channel, PB[version], "Callbacks", method)
            request = getattr(PB[version], service.methods_by_name[method].input_type.name)()
            try:
                call(request, timeout=5)
            except grpc.RpcError as err:  # an empty OnDefineDomainParams carries no VMI: refused
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())


def test_v1alpha1_has_no_pre_cloud_init_iso(shared_sidecar: Sidecar) -> None:
    with grpc.insecure_channel(shared_sidecar.target) as channel:
        call = channel.unary_unary("/kubevirt.hooks.v1alpha1.Callbacks/PreCloudInitIso")
        assert rpc_error(call, b"", 5).code() == grpc.StatusCode.UNIMPLEMENTED


# ================================================================================================
# logging
# ================================================================================================
def test_one_json_line_per_call(sock_dir: Path, sample: PlannedSample) -> None:
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix))
    try:
        out = call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi)
        call_on_define(sidecar.target, "v1alpha1", out, sample.vmi)  # already rewritten: unchanged
        rpc_error(call_on_define, sidecar.target, "v1alpha2", b"<nope", sample.vmi)
    finally:
        sidecar.stop()
    calls = [r for r in sidecar.log() if r["event"] == "call" and r["hook"] == "OnDefineDomain"]
    assert len(calls) == 3
    ok, unchanged, bad = calls
    assert ok["vmi"] == "vms/fedora-data" and ok["version"] == "v1alpha3" and ok["result"] == "ok"
    assert ok["disksRewritten"] == ["ua-datadisk", "ua-scratch"] and ok["unchanged"] is False
    assert isinstance(ok["ms"], float) and ok["ms"] >= 0
    assert unchanged["unchanged"] is True and unchanged["disksRewritten"] == []
    assert bad["result"] == "error" and bad["code"] == "INVALID_ARGUMENT" and "not well-formed" in bad["error"]


# ================================================================================================
# lifecycle
# ================================================================================================
def test_shutdown_answers_then_stops_and_removes_the_socket(sock_dir: Path, sample: PlannedSample) -> None:
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix))
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            result = rpc(channel, v1alpha3_pb2, "Callbacks", "Shutdown")(v1alpha3_pb2.ShutdownParams(),
                                                                         timeout=5)
        assert result == v1alpha3_pb2.ShutdownResult()
        assert sidecar.proc.wait(timeout=10) == 0
    finally:
        sidecar.stop()
    assert not sidecar.socket_path.exists()
    assert [r["reason"] for r in sidecar.log() if r["event"] == "stopped"] == ["Shutdown call"]


@pytest.mark.parametrize("sig", (signal.SIGTERM, signal.SIGINT))
def test_signal_stops_gracefully_and_removes_the_socket(sock_dir: Path, sig: signal.Signals) -> None:
    sidecar = start_sidecar(sock_dir)
    try:
        sidecar.proc.send_signal(sig)
        assert sidecar.proc.wait(timeout=10) == 0
    finally:
        sidecar.stop()
    assert not sidecar.socket_path.exists()
    assert [r["reason"] for r in sidecar.log() if r["event"] == "stopped"] == [sig.name]


def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    stale = sock_dir / "diskhooks.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # left behind by a killed sidecar: a socket nobody listens on
    assert stale.is_socket()
    sidecar = start_sidecar(sock_dir)
    try:
        assert call_info(sidecar.target).name == "diskhooks"
    finally:
        sidecar.stop()


def test_live_socket_is_not_taken_over(sock_dir: Path) -> None:
    first = start_sidecar(sock_dir)
    try:
        second = start_sidecar(sock_dir, wait=False)
        assert second.proc.wait(timeout=15) == 1
        errors = [r for r in second.log() if r["event"] == "error"]
        assert errors and "live socket" in errors[0]["error"]
        assert call_info(first.target).name == "diskhooks"  # the first one still serves
    finally:
        first.stop()


def test_a_file_that_is_not_a_socket_is_left_alone(sock_dir: Path) -> None:
    precious = sock_dir / "diskhooks.sock"
    precious.write_text("not a socket")
    sidecar = start_sidecar(sock_dir, wait=False)
    assert sidecar.proc.wait(timeout=15) == 1
    assert precious.read_text() == "not a socket"
    assert "not a socket" in sidecar.log()[-1]["error"]


# ================================================================================================
# the server's codec against the modules generated from our protos
# ================================================================================================
@pytest.mark.parametrize("version", VERSIONS)
def test_codec_reads_on_define_domain_params(version: str) -> None:
    pb2 = PB[version]
    for xml, vmi in ((b"<domain/>", b"{}"), (b"", b'{"a": 1}'), (b"x" * 300, b""), (b"\x00\xff", b"\x80")):
        wire = pb2.OnDefineDomainParams(domainXML=xml, vmi=vmi).SerializeToString()
        assert srv.decode_fields(wire, (1, 2)) == {1: xml, 2: vmi}
        assert pb2.OnDefineDomainResult.FromString(srv.encode_bytes_field(1, xml)).domainXML == xml


def test_codec_skips_unknown_fields_and_keeps_the_last_occurrence() -> None:
    wire = (info_pb2.HookPoint(name="n", priority=-5).SerializeToString()  # fields 1 (bytes), 2 (varint)
            + v1alpha3_pb2.OnDefineDomainParams(domainXML=b"second").SerializeToString()
            + b"\x1d\x01\x02\x03\x04" + b"\x21" + b"\x00" * 8)  # field 3 fixed32, field 4 fixed64
    assert srv.decode_fields(wire, (1,)) == {1: b"second"}
    with pytest.raises(srv.WireError):
        srv.decode_fields(wire, (2,))  # field 2 is a varint here, not bytes


@pytest.mark.parametrize("wire", [b"\x0a\x05abc", b"\x0a", b"\x80", b"\x0b", b"\x00\x00", b"\x1d\x01"])
def test_codec_refuses_truncated_or_invalid_input(wire: bytes) -> None:
    with pytest.raises(srv.WireError):
        srv.decode_fields(wire, (1, 2))


def test_codec_pre_cloud_init_iso_matches_generated_modules() -> None:
    params = v1alpha2_pb2.PreCloudInitIsoParams(cloudInitNoCloudSource=b"src", vmi=b"{}", cloudInitData=b"data")
    fields = srv.decode_fields(params.SerializeToString(), (1, 2, 3))
    assert fields == {1: b"src", 2: b"{}", 3: b"data"}
    encoded = srv.encode_bytes_field(1, fields[1]) + srv.encode_bytes_field(3, fields[3])
    assert encoded == v1alpha2_pb2.PreCloudInitIsoResult(cloudInitNoCloudSource=b"src",
                                                          cloudInitData=b"data").SerializeToString()


def test_codec_info_result_matches_generated_modules() -> None:
    points = (("OnDefineDomain", 0), ("Shutdown", 7), ("PreCloudInitIso", -1))
    ours = srv.encode_info_result(name="diskhooks", hook_points=points, versions=("v1alpha3", "v1alpha1"))
    theirs = info_pb2.InfoResult(name="diskhooks", versions=["v1alpha3", "v1alpha1"],
                                 hookPoints=[info_pb2.HookPoint(name=n, priority=p) for n, p in points])
    assert ours == theirs.SerializeToString()
    parsed = info_pb2.InfoResult.FromString(ours)
    assert [(p.name, p.priority) for p in parsed.hookPoints] == list(points)


# ================================================================================================
# the transport's own pieces, in-process
# ================================================================================================
def test_a_bug_in_the_core_is_internal_with_the_reason(tmp_path: Path) -> None:
    """The server in this process, with a core that fails as a bug would (the only stand-in here)."""
    def broken(domain_xml: bytes, vmi_json: bytes, **_: Any) -> bytes:
        raise KeyError("devices")

    stream = io.StringIO()
    server = srv.HookServer(str(tmp_path / "t.sock"), srv.SidecarSettings(grace_seconds=1),
                            log=logfmt.JsonLog(stream), on_define=broken)
    server.start()
    try:
        err = rpc_error(call_on_define, f"unix://{tmp_path / 't.sock'}", "v1alpha3", b"<domain/>", b"{}")
    finally:
        server.stop("test over")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in err.details() and "devices" in err.details()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [r for r in records if r.get("code") == "INTERNAL"]
    assert failed and "KeyError" in failed[0]["trace"]
    assert records[-1] == {**records[-1], "event": "stopped", "reason": "test over"}
    assert not (tmp_path / "t.sock").exists()


def test_changed_disks_names_the_rewritten_disks() -> None:
    xml = (SAMPLES / "05-vm-mixed-smbios.domain.xml").read_bytes()
    after = xml.replace(b"vmi-disks/logs/disk.img", b"vmi-disks/logs/logs.qcow2")
    assert logfmt.changed_disks(xml, xml) == []
    assert logfmt.changed_disks(xml, after) == ["ua-logs"]
    assert logfmt.changed_disks(xml, after.replace(b"\t", b"  ")) == ["ua-logs"]  # whitespace ignored


@pytest.mark.parametrize("vmi", [b"", b"[]", b'{"metadata": 3}', b'{"metadata": {"name": 1}}', b"[" * 100000])
def test_vmi_identity_never_raises(vmi: bytes) -> None:
    assert logfmt.vmi_identity(vmi) == "?"


def test_stopping_lets_the_call_in_flight_finish(tmp_path: Path) -> None:
    """The server in this process with a slow core (the stand-in): a stop that starts while
    OnDefineDomain runs still delivers its answer, then the socket is gone."""
    entered, results = threading.Event(), []

    def slow(domain_xml: bytes, vmi_json: bytes, **_: Any) -> bytes:
        entered.set()
        time.sleep(0.5)
        return b"<domain>answered</domain>"

    sock = tmp_path / "t.sock"
    server = srv.HookServer(str(sock), srv.SidecarSettings(grace_seconds=5), log=logfmt.JsonLog(io.StringIO()),
                            on_define=slow)
    server.start()
    caller = threading.Thread(target=lambda: results.append(
        call_on_define(f"unix://{sock}", "v1alpha3", b"<domain/>", b"{}")))
    caller.start()
    assert entered.wait(5)
    server.stop("test")
    caller.join(5)
    assert results == [b"<domain>answered</domain>"]
    assert not sock.exists()
