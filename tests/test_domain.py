"""The sidecar's domain-XML core (hooksidecar.domain, .xmlsafe, .callback) without gRPC and without
image files (``check_images=False``; tests/test_images.py covers the files).

Inputs are KubeVirt's own samples (tests/data/kubevirt/samples). None carries a diskhooks plan, so each
scenario adds one as the webhook would: it signs a plan into the VMI's annotations and points the
planned hostDisk volumes at ``<hostDir>/<name>.qcow2`` (KubeVirt then renders the launcher path
``/var/run/kubevirt-private/vmi-disks/<name>/<name>.qcow2``, which the scenario writes into the XML).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.plan import (
    Backing,
    DetachedDisk,
    Passthrough,
    PersistRoot,
    Plan,
    PlanKeys,
    PlannedDisk,
    sign_plan,
)
from hooksidecar import domain, xmlsafe
from hooksidecar.callback import on_define_domain
from tests.conftest import DATA, ROOT, SAMPLES

GiB = 1024**3
KEYS = PlanKeys(current=b"test-plan-key-0123456789abcdef")
LIB = "/var/run/kubevirt-private/diskhooks/images"


# ------------------------------------------------------------------------------------------------
# scenarios: a sample + the edits the webhook's spec would cause + a plan
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    name: str
    sample: str  # file prefix in SAMPLES
    plan: Plan
    xml_edits: tuple[tuple[bytes, bytes], ...] = ()  # byte replacements KubeVirt's output would show
    vmi_volume_paths: dict[str, str] = field(default_factory=dict)  # hostDisk volume -> node path
    extra_disks: bytes = b""  # disks KubeVirt would render for volumes the webhook added

    def vmi(self) -> dict[str, Any]:
        doc = json.loads((SAMPLES / f"{self.sample}.launcher-vmi.json").read_text())
        for vol in doc["spec"]["volumes"]:
            if vol["name"] in self.vmi_volume_paths:
                vol["hostDisk"] = {"path": self.vmi_volume_paths[vol["name"]], "type": "DiskOrCreate",
                                   "capacity": "1Gi"}
        doc["metadata"].setdefault("annotations", {})[K.ANN_PLAN] = sign_plan(self.plan, KEYS)
        return doc  # type: ignore[no-any-return]

    def vmi_json(self) -> bytes:
        return json.dumps(self.vmi()).encode()

    def xml(self, which: str = "first-call") -> bytes:
        name = f"{self.sample}.domain.first-call.xml" if which == "first-call" else f"{self.sample}.domain.xml"
        data = (SAMPLES / name).read_bytes()
        for old, new in self.xml_edits:
            assert old in data, (self.name, old)
            data = data.replace(old, new)
        if self.extra_disks:
            anchor = b"\t\t<serial type=\"unix\">"
            assert anchor in data
            data = data.replace(anchor, self.extra_disks + anchor, 1)
        return data

    @property
    def planned_aliases(self) -> tuple[str, ...]:
        vols = [d.name for d in self.plan.disks] + [p.name for p in self.plan.passthrough]
        if self.plan.persist_root is not None:
            vols.append(self.plan.persist_root.volume)
        return tuple(K.disk_alias(v) for v in vols)


def _plan(ns: str, vm: str, **kw: Any) -> Plan:
    return Plan(namespace=ns, vm=vm, host_dir=f"/var/lib/diskhooks/vms/{ns}/{vm}",
                image_library="/var/lib/diskhooks/images",
                sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
                **kw)


def _hostdisk_edit(vol: str, old_file: str) -> tuple[bytes, bytes]:
    return (f'vmi-disks/{vol}/{old_file}"'.encode(), f'vmi-disks/{vol}/{vol}.qcow2"'.encode())


S01 = Scenario(
    name="01-persist-root-and-plain-disk",
    sample="01-vm-containerdisk-hostdisk-cloudinit",
    plan=_plan("vms", "fedora-data",
               disks=(PlannedDisk(name="datadisk", size_bytes=10 * GiB, bus="virtio", cache="none",
                                  io="native", discard="unmap"),),
               persist_root=PersistRoot(volume="rootdisk", image="quay.io/containerdisks/fedora:41",
                                        volume_index=0)),
    xml_edits=(_hostdisk_edit("datadisk", "data.img"),),
    vmi_volume_paths={"datadisk": "/var/lib/diskhooks/vms/vms/fedora-data/datadisk.qcow2"},
)

S02 = Scenario(
    name="02-two-disks-one-on-a-raw-base",
    sample="02-vmi-two-hostdisks-disk",
    plan=_plan("default", "db01",
               disks=(PlannedDisk(name="os", size_bytes=20 * GiB, bus="virtio", cache="none", io="native",
                                  discard="unmap", boot_order=1,
                                  backing=Backing(image="debian-12", file="debian-12.raw", format="raw")),
                      PlannedDisk(name="pgdata", size_bytes=100 * GiB, bus="virtio", cache="writeback",
                                  io="threads", discard="ignore", serial="PGDATA01"))),
    xml_edits=(_hostdisk_edit("os", "os.img"), _hostdisk_edit("pgdata", "pgdata.img")),
    vmi_volume_paths={"os": "/var/lib/diskhooks/vms/default/db01/os.qcow2",
                      "pgdata": "/var/lib/diskhooks/vms/default/db01/pgdata.qcow2"},
)

_S03_EXTRA = (
    b'\t\t<disk device="disk" type="file" model="virtio-non-transitional">\n'
    b'\t\t\t<source file="/var/run/kubevirt-private/vmi-disks/data/data.qcow2"></source>\n'
    b'\t\t\t<target bus="virtio" dev="vdc"></target>\n'
    b'\t\t\t<driver cache="none" error_policy="stop" name="qemu" type="raw" discard="unmap"></driver>\n'
    b'\t\t\t<alias name="ua-data"></alias>\n'
    b'\t\t</disk>\n'
    b'\t\t<disk device="lun" type="block">\n'
    b'\t\t\t<source dev="/dev/fast0"></source>\n'
    b'\t\t\t<target bus="scsi" dev="sdb"></target>\n'
    b'\t\t\t<driver cache="none" error_policy="stop" name="qemu" type="raw" discard="unmap"></driver>\n'
    b'\t\t\t<alias name="ua-fast0"></alias>\n'
    b'\t\t\t<address type="drive" bus="0" controller="0" unit="1"></address>\n'
    b'\t\t</disk>\n'
)

S03 = Scenario(
    name="03-added-disk-and-lun-beside-pvcs",
    sample="03-vmi-pvc-cloudinit",
    plan=_plan("web", "web-pvc",
               disks=(PlannedDisk(name="data", size_bytes=5 * GiB, bus="virtio", cache="directsync",
                                  io="native", discard="unmap"),),
               passthrough=(Passthrough(name="fast0", claim="node1-nvme0", mode="lun", cache="none",
                                        io="native"),)),
    extra_disks=_S03_EXTRA,
)

S05 = Scenario(
    name="05-overlay-on-library-base",
    sample="05-vm-mixed-smbios",
    plan=_plan("team-a", "mixed",
               disks=(PlannedDisk(name="scratch", size_bytes=20 * GiB, bus="sata", cache="writeback",
                                  io="threads", discard="unmap",
                                  backing=Backing(image="almalinux-9", file="almalinux-9.qcow2",
                                                  format="qcow2")),)),
    xml_edits=(_hostdisk_edit("scratch", "scratch.raw"),),
    vmi_volume_paths={"scratch": "/var/lib/diskhooks/vms/team-a/mixed/scratch.qcow2"},
)

SCENARIOS = (S01, S02, S03, S05)
IDS = [s.name for s in SCENARIOS]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def run(sc: Scenario, xml: bytes, **kw: Any) -> bytes:
    return on_define_domain(xml, sc.vmi_json(), check_images=False, **kw)


def disk(xml: bytes, alias: str) -> etree._Element:
    root = etree.fromstring(xml)
    found = root.xpath(f"devices/disk[alias/@name='{alias}']")
    assert len(found) == 1, (alias, len(found))
    el: etree._Element = found[0]
    return el


def signature(el: etree._Element) -> bytes:
    """A disk as libvirt understands it: no whitespace, no <address> (libvirt adds those)."""
    el = copy.deepcopy(el)
    for addr in el.findall("address"):
        el.remove(addr)
    for e in el.iter():
        if e.text is not None and not e.text.strip():
            e.text = None
        if e.tail is not None and not e.tail.strip():
            e.tail = None
    el.tail = None
    return etree.tostring(el, method="c14n")  # type: ignore[no-any-return]


def without(xml: bytes, aliases: tuple[str, ...]) -> bytes:
    """The whole domain minus the planned disks, canonical: what must not change."""
    root = etree.fromstring(xml)
    for d in root.xpath("devices/disk"):
        a = d.find("alias")
        if a is not None and a.get("name") in aliases:
            d.getparent().remove(d)
    for e in root.iter():
        if e.text is not None and not e.text.strip():
            e.text = None
        if e.tail is not None and not e.tail.strip():
            e.tail = None
    return etree.tostring(root, method="c14n")  # type: ignore[no-any-return]


def chain(el: etree._Element) -> list[tuple[str | None, str | None]]:
    """(format, file) of each backing level; the final empty <backingStore/> is (None, None)."""
    out = []
    store = el.find("backingStore")
    while store is not None:
        fmt, src = store.find("format"), store.find("source")
        out.append((fmt.get("type") if fmt is not None else None,
                    src.get("file") if src is not None else None))
        store = store.find("backingStore")
    return out


# KubeVirt's DiskDriver struct marshals its attributes in this order (pkg/virt-launcher/virtwrap/api)
_KV_DRIVER_ORDER = ("cache", "error_policy", "io", "name", "type", "iothread", "queues", "discard", "iommu")


def simulate_readback(xml: bytes) -> bytes:
    """What the next OnDefineDomain call receives after libvirt defined ``xml``: libvirt's read-back
    through KubeVirt's DomainSpec struct. Placeholder NICs gone, disks in another order with PCI or
    drive addresses, driver attributes in KubeVirt's struct order, the backing chain cut to one
    level (KubeVirt's BackingStore has no nested backingStore), and no xmlns:qemu (seq-05 call 3)."""
    root = etree.fromstring(xml)
    devices = root.find("devices")
    for iface in devices.findall("interface"):
        alias = iface.find("alias")
        if alias is not None and alias.get("name", "").startswith("placeholder-"):
            devices.remove(iface)
    disks = devices.findall("disk")
    for d in disks:
        devices.remove(d)
    for i, d in enumerate(reversed(disks)):
        if d.find("address") is None:
            bus = d.find("target").get("bus")
            if bus == "virtio":
                etree.SubElement(d, "address", type="pci", domain="0x0000", bus=f"0x{7 + i:02x}",
                                 slot="0x00", function="0x0")
            else:
                etree.SubElement(d, "address", type="drive", bus="0", controller="0", target="0",
                                 unit=str(i))
        drv = d.find("driver")
        if drv is not None:
            attrs = dict(drv.attrib)
            drv.attrib.clear()
            for key in _KV_DRIVER_ORDER:
                if key in attrs:
                    drv.set(key, attrs[key])
        for store in d.findall("backingStore"):
            for nested in store.findall("backingStore"):
                store.remove(nested)
        devices.append(d)
    fresh = etree.Element(root.tag, attrib=dict(root.attrib))  # drops the unused xmlns:qemu
    fresh.text = root.text
    for child in list(root):
        fresh.append(child)
    return xmlsafe.serialise_domain(fresh)


# ------------------------------------------------------------------------------------------------
# the first call is complete
# ------------------------------------------------------------------------------------------------
EXPECTED_DISKS: dict[str, dict[str, tuple[dict[str, str], str, list[tuple[str | None, str | None]]]]] = {
    # alias -> (driver attributes that must hold, source file, chain)
    S01.name: {
        "ua-datadisk": ({"name": "qemu", "type": "qcow2", "cache": "none", "io": "native",
                         "discard": "unmap", "error_policy": "stop"},
                        "/var/run/kubevirt-private/vmi-disks/datadisk/datadisk.qcow2", [(None, None)]),
        "ua-rootdisk": ({"name": "qemu", "type": "qcow2", "cache": "none", "discard": "unmap",
                         "error_policy": "stop"},
                        "/var/run/kubevirt-private/diskhooks/vm/persist-root.rootdisk.qcow2",
                        [("qcow2", "/var/run/kubevirt/container-disks/disk_0.img"), (None, None)]),
    },
    S02.name: {
        "ua-os": ({"type": "qcow2", "cache": "none", "io": "native", "discard": "unmap"},
                  "/var/run/kubevirt-private/vmi-disks/os/os.qcow2",
                  [("raw", f"{LIB}/debian-12.raw"), (None, None)]),
        "ua-pgdata": ({"type": "qcow2", "cache": "writeback", "io": "threads", "discard": "ignore"},
                      "/var/run/kubevirt-private/vmi-disks/pgdata/pgdata.qcow2", [(None, None)]),
    },
    S03.name: {
        "ua-data": ({"type": "qcow2", "cache": "directsync", "io": "native", "discard": "unmap"},
                    "/var/run/kubevirt-private/vmi-disks/data/data.qcow2", [(None, None)]),
    },
    S05.name: {
        "ua-scratch": ({"name": "qemu", "type": "qcow2", "cache": "writeback", "io": "threads",
                        "discard": "unmap", "error_policy": "stop"},
                       "/var/run/kubevirt-private/vmi-disks/scratch/scratch.qcow2",
                       [("qcow2", f"{LIB}/almalinux-9.qcow2"), (None, None)]),
    },
}


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_first_call_is_complete(sc: Scenario) -> None:
    out = run(sc, sc.xml("first-call"))
    for alias, (driver, source, want_chain) in EXPECTED_DISKS[sc.name].items():
        el = disk(out, alias)
        got = el.find("driver").attrib
        assert {k: got.get(k) for k in driver} == driver, alias
        assert el.find("source").get("file") == source
        assert chain(el) == want_chain, alias
        if want_chain[0] != (None, None):
            assert el.find("backingStore").get("type") == "file"


def test_passthrough_lun_is_tuned_and_keeps_kubevirts_settings() -> None:
    out = run(S03, S03.xml())
    lun = disk(out, "ua-fast0")
    assert lun.get("device") == "lun" and lun.get("type") == "block"
    assert lun.find("source").get("dev") == "/dev/fast0"
    assert dict(lun.find("driver").attrib) == {"cache": "none", "error_policy": "stop", "name": "qemu",
                                               "type": "raw", "discard": "unmap", "io": "native"}
    assert lun.find("backingStore") is None


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_everything_else_is_left_as_it_was(sc: Scenario) -> None:
    xml = sc.xml()
    out = run(sc, xml)
    assert without(out, sc.planned_aliases) == without(xml, sc.planned_aliases)
    root = etree.fromstring(out)
    assert root.nsmap.get("qemu") == "http://libvirt.org/schemas/domain/qemu/1.0"
    # the disks keep their place: same aliases in the same order
    order = [d.find("alias").get("name") for d in root.findall("devices/disk")]
    assert order == [d.find("alias").get("name") for d in etree.fromstring(xml).findall("devices/disk")]


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_root_start_tag_and_line_structure_outside_the_disks_are_kept(sc: Scenario) -> None:
    """A diff of input and output shows only the planned disks: the root start tag keeps
    KubeVirt's attribute order and the document its trailing white space."""
    xml = sc.xml()
    out = run(sc, xml)
    assert out.splitlines()[0] == xml.splitlines()[0]
    assert out[len(out.rstrip()):] == xml[len(xml.rstrip()):]


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_inserted_elements_follow_kubevirts_tab_style(sc: Scenario) -> None:
    out = run(sc, sc.xml()).decode()
    assert "\t\t\t<backingStore" in out
    assert "  " not in out  # no space indentation anywhere
    if any(d.backing for d in sc.plan.disks):
        assert "\t\t\t\t<format type=" in out and "\t\t\t\t<backingStore></backingStore>" in out


# ------------------------------------------------------------------------------------------------
# idempotence: own output, KubeVirt's later-call sample, libvirt's read-back
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
@pytest.mark.parametrize("which", ["first-call", "later"])
def test_own_output_comes_back_byte_for_byte(sc: Scenario, which: str) -> None:
    once = run(sc, sc.xml(which))
    assert run(sc, once) == once


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_later_call_sample_gives_the_same_disks(sc: Scenario) -> None:
    first = run(sc, sc.xml("first-call"))
    later = run(sc, sc.xml("later"))
    for alias in sc.planned_aliases:
        assert signature(disk(later, alias)) == signature(disk(first, alias)), alias


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_libvirt_readback_gives_the_same_disks(sc: Scenario) -> None:
    first = run(sc, sc.xml("first-call"))
    readback = simulate_readback(first)
    # the read-back really is cut and reordered, else this test proves nothing
    assert readback != first
    for alias in sc.planned_aliases:
        got = disk(readback, alias)
        if got.find("backingStore") is not None:
            assert got.find("backingStore/backingStore") is None
    second = run(sc, readback)
    for alias in sc.planned_aliases:
        assert signature(disk(second, alias)) == signature(disk(first, alias)), alias
        assert disk(second, alias).find("address") is not None  # libvirt's address kept
    assert run(sc, second) == second
    assert "xmlns:qemu" not in second.decode()  # not re-added when the input has none


def test_crafted_later_call_of_sample_05() -> None:
    """tests/data/domain-05-later-call.xml: seq-05's real call-2 input (libvirt's read-back through
    KubeVirt), with the scratch disk as libvirt would have read back diskhooks' first answer:
    chain cut to one level by KubeVirt's struct, disks reordered, PCI/drive addresses added."""
    later = (DATA / "domain-05-later-call.xml").read_bytes()
    got = disk(later, "ua-scratch")
    assert len(chain(got)) == 1 and got.find("address") is not None
    out = run(S05, later)
    first = run(S05, S05.xml("first-call"))
    assert signature(disk(out, "ua-scratch")) == signature(disk(first, "ua-scratch"))
    assert without(out, ("ua-scratch",)) == without(later, ("ua-scratch",))
    assert run(S05, out) == out


def test_input_tree_is_not_changed() -> None:
    root = xmlsafe.parse_domain(S05.xml())
    before = etree.tostring(root)
    new = domain.mutate_domain(root, S05.plan)
    assert etree.tostring(root) == before
    assert new is not root


def test_compact_xml_stays_compact() -> None:
    """KubeVirt's smbios example sidecar answers without whitespace; a sidecar after it gets that."""
    compact = (SAMPLES / "05-vm-mixed-smbios.smbios-hook-result.xml").read_bytes()
    compact = compact.replace(b"vmi-disks/scratch/scratch.raw", b"vmi-disks/scratch/scratch.qcow2")
    out = run(S05, compact)
    assert b"<backingStore type=\"file\"><format type=\"qcow2\"></format>" in out
    assert run(S05, out) == out


# ------------------------------------------------------------------------------------------------
# no plan: untouched, unparsed
# ------------------------------------------------------------------------------------------------
def test_no_plan_returns_the_input_unchanged_and_unparsed() -> None:
    vmi = (SAMPLES / "05-vm-mixed-smbios.launcher-vmi.json").read_bytes()
    xml = (SAMPLES / "05-vm-mixed-smbios.domain.first-call.xml").read_bytes()
    assert on_define_domain(xml, vmi) is xml
    not_xml = b"<domain><this is not well-formed"
    assert on_define_domain(not_xml, vmi) is not_xml  # proves the XML is not parsed
    bare = json.dumps({"metadata": {"name": "x"}}).encode()
    assert on_define_domain(not_xml, bare) is not_xml


def test_plan_with_nothing_for_the_domain_returns_the_input() -> None:
    sizing_only = replace(S05, plan=_plan("team-a", "mixed"))
    not_xml = b"<domain><not well-formed"
    assert on_define_domain(not_xml, sizing_only.vmi_json()) is not_xml


# ------------------------------------------------------------------------------------------------
# refusals: each names the volume and what to check
# ------------------------------------------------------------------------------------------------
def _vmi_with(sc: Scenario, mutate: Any) -> bytes:
    doc = sc.vmi()
    mutate(doc)
    return json.dumps(doc).encode()


def _set_plan(sc: Scenario, plan: Plan) -> Scenario:
    return replace(sc, plan=plan)


REFUSALS: list[tuple[str, Scenario, bytes | None, bytes | None, str]] = [
    # (label, scenario, xml (None: scenario's first call), vmi json (None: scenario's), words)
    ("plan names a disk the domain lacks",
     _set_plan(S05, replace(S05.plan, disks=S05.plan.disks + (
         PlannedDisk(name="ghost", size_bytes=GiB, bus="virtio", cache="none", io="native",
                     discard="unmap"),))),
     None, None, "plan names volume ghost but the domain has no disk with alias ua-ghost"),
    ("source is not the planned image", S05,
     (SAMPLES / "05-vm-mixed-smbios.domain.first-call.xml").read_bytes(), None,
     "not at the planned image /var/run/kubevirt-private/vmi-disks/scratch/scratch.qcow2"),
    ("a PVC disk is never taken for a planned one",
     _set_plan(S05, replace(S05.plan, disks=(replace(S05.plan.disks[0], name="logs", backing=None),))),
     None, None, "'/var/run/kubevirt-private/vmi-disks/logs/disk.img'"),
    ("lun planned but KubeVirt made a disk", S03,
     S03.xml().replace(b'<disk device="lun" type="block">', b'<disk device="disk" type="block">'),
     None, "device='disk'"),
    ("io=native without a direct cache",
     _set_plan(S05, replace(S05.plan, disks=(replace(S05.plan.disks[0], io="native"),))),
     None, None, "io=native needs cache none or directsync"),
    ("two disks with the planned alias", S05,
     S05.xml().replace(b'<alias name="ua-shared">', b'<alias name="ua-scratch">'), None,
     "2 disks with alias ua-scratch"),
    ("planned disk wrapped by IncrementalBackup", S05,
     S05.xml().replace(b'scratch.qcow2"></source>',
                       b'scratch.qcow2"><dataStore type="file"><format type="raw"/></dataStore></source>'),
     None, "IncrementalBackup"),
    ("persistent root on a cdrom", S01,
     S01.xml().replace(b'<disk device="disk" type="file" model="virtio-non-transitional">\n\t\t\t'
                       b'<source file="/var/run/kubevirt-ephemeral-disks/disk-data/rootdisk',
                       b'<disk device="cdrom" type="file" model="virtio-non-transitional">\n\t\t\t'
                       b'<source file="/var/run/kubevirt-ephemeral-disks/disk-data/rootdisk'),
     None, "device='cdrom'"),
    ("persistent root: KubeVirt's base is elsewhere (image volumes)", S01,
     S01.xml().replace(b"/var/run/kubevirt/container-disks/disk_0.img",
                       b"/var/run/kubevirt-image-volume/disk_0/disk/disk.img"),
     None, "not /var/run/kubevirt/container-disks/disk_0.img as planned"),
    ("persistent root: the VMI runs another image", S01, None,
     _vmi_with(S01, lambda d: d["spec"]["volumes"][0]["containerDisk"].update(
         image="quay.io/containerdisks/fedora:42")),
     "the base image changed: the VMI runs containerDisk 'quay.io/containerdisks/fedora:42'"),
    ("persistent root: volume moved", S01, None,
     _vmi_with(S01, lambda d: d["spec"]["volumes"].reverse()), "at index 2"),
    ("persistent root: not a containerDisk", S01, None,
     _vmi_with(S01, lambda d: d["spec"]["volumes"][0].update(
         containerDisk=None, persistentVolumeClaim={"claimName": "x"})), "is not a containerDisk"),
]


@pytest.mark.parametrize("label,sc,xml,vmi,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(label: str, sc: Scenario, xml: bytes | None, vmi: bytes | None, words: str) -> None:
    with pytest.raises(Refused) as err:
        on_define_domain(xml if xml is not None else sc.xml(), vmi if vmi is not None else sc.vmi_json(),
                         check_images=False)
    assert words in str(err.value), str(err.value)
    assert str(err.value).startswith("volume "), str(err.value)


def test_unplanned_incremental_backup_disk_is_left_alone() -> None:
    xml = S05.xml().replace(
        b'<source file="/var/run/kubevirt-private/vmi-disks/logs/disk.img"></source>',
        b'<source file="/var/run/kubevirt-private/vmi-disks/logs/disk.qcow2"><dataStore type="file">'
        b'<format type="raw"></format><source file="/var/run/kubevirt-private/vmi-disks/logs/disk.img">'
        b'</source></dataStore></source>')
    out = run(S05, xml)
    assert signature(disk(out, "ua-logs")) == signature(disk(xml, "ua-logs"))


def test_dry_run_persist_root_keeps_the_format_kubevirt_stated() -> None:
    xml = S01.xml().replace(b'<format type="qcow2"></format>\n\t\t\t\t<source file="/var/run/kubevirt/'
                            b'container-disks', b'<format type="raw"></format>\n\t\t\t\t<source '
                            b'file="/var/run/kubevirt/container-disks')
    out = run(S01, xml)
    assert chain(disk(out, "ua-rootdisk"))[0] == ("raw", "/var/run/kubevirt/container-disks/disk_0.img")


def test_recorded_base_format_must_match_kubevirts() -> None:
    root = xmlsafe.parse_domain(S01.xml())  # KubeVirt states qcow2
    with pytest.raises(Refused, match="prepare recorded it as raw"):
        domain.mutate_domain(root, S01.plan, persist_root_base_format="raw")
    new = domain.mutate_domain(root, S01.plan, persist_root_base_format="qcow2")
    assert chain(new.xpath("devices/disk[alias/@name='ua-rootdisk']")[0])[0][0] == "qcow2"


# ------------------------------------------------------------------------------------------------
# hostile and malformed input
# ------------------------------------------------------------------------------------------------
XXE = (b'<?xml version="1.0"?>\n<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
       b'<domain type="kvm"><name>&xxe;</name><devices></devices></domain>')
LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
          + b"".join(f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'.encode()
                     for i in range(1, 10))
          + b']>\n<domain><name>&lol9;</name></domain>')


@pytest.mark.parametrize("label,xml,words", [
    ("XXE to /etc/passwd", XXE, "<!DOCTYPE"),
    ("XXE in UTF-16 (no byte pattern to catch)", XXE.replace(b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-16"?>').decode().encode("utf-16"),
     "byte-order mark"),
    ("XXE in UTF-16 without a BOM", XXE.replace(b'<?xml version="1.0"?>', b'<?xml version="1.0" encoding="UTF-16"?>').decode().encode("utf-16-le"),
     "NUL bytes"),
    ("lower-case doctype", XXE.replace(b"<!DOCTYPE", b"<!doctype"), "<!DOCTYPE"),
    ("billion laughs", LAUGHS, "<!DOCTYPE"),
    ("not XML", b"\x00\x01garbage", "NUL bytes"),
    ("not XML either", b"\x01garbage", "not well-formed"),
    ("empty", b"", "empty"),
    ("another root", b"<network><name>x</name></network>", "not <domain>"),
])
def test_hostile_xml_is_malformed(label: str, xml: bytes, words: str) -> None:
    start = time.perf_counter()
    with pytest.raises(Malformed) as err:
        on_define_domain(xml, S05.vmi_json(), check_images=False)
    elapsed = time.perf_counter() - start
    assert words in str(err.value), str(err.value)
    assert "root:" not in str(err.value)  # nothing of /etc/passwd leaks into the error
    print(f"{label}: refused in {elapsed * 1000:.2f} ms")


# An external *parameter* entity is what libxml2 loads even with DTD loading and entity resolution
# off; in UTF-16 (or any encoding but UTF-8) a byte scan for "<!DOCTYPE" does not see it.
_PARAM_ENTITY = '<!DOCTYPE domain [<!ENTITY % x SYSTEM "file://{path}"> %x;]><domain type="kvm"></domain>'
_ENCODINGS = {
    "UTF-16 with BOM": ("UTF-16", "utf-16"),
    "UTF-16LE without BOM": ("UTF-16", "utf-16-le"),
    "UTF-16BE without BOM": ("UTF-16BE", "utf-16-be"),
    "UTF-32 with BOM": ("UTF-32", "utf-32"),
    "EBCDIC (IBM500)": ("IBM500", "cp500"),
    "UTF-8 with BOM": ("UTF-8", "utf-8-sig"),
    "UTF-8": ("UTF-8", "utf-8"),
}
_PARSE_IN_CHILD = """
import sys
from diskplan.errors import Malformed
from hooksidecar.callback import on_define_domain
xml, vmi = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
try:
    on_define_domain(xml, vmi, check_images=False)
except Malformed as exc:
    print("MALFORMED", exc)
else:
    print("ACCEPTED")
"""


def _parse_in_child(tmp_path: Path, xml: bytes) -> subprocess.Popen[str]:
    (tmp_path / "domain.xml").write_bytes(xml)
    (tmp_path / "vmi.json").write_bytes(S05.vmi_json())
    return subprocess.Popen([sys.executable, "-c", _PARSE_IN_CHILD, str(tmp_path / "domain.xml"),
                             str(tmp_path / "vmi.json")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("label", list(_ENCODINGS))
def test_external_parameter_entity_never_reaches_the_file(tmp_path: Path, label: str) -> None:
    """The entity points at a FIFO: if the parser ever opened it, a writer could open it too (and the
    parser would block until one did). The child must answer Malformed and the FIFO never have had
    a reader."""
    declared, codec = _ENCODINGS[label]
    fifo = tmp_path / "entity.fifo"
    os.mkfifo(fifo)
    doc = (f'<?xml version="1.0" encoding="{declared}"?>' + _PARAM_ENTITY.format(path=fifo)).encode(codec)
    child = _parse_in_child(tmp_path, doc)
    opened = False
    deadline = time.monotonic() + 20
    while child.poll() is None and time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads it
        except OSError as exc:
            assert exc.errno == errno.ENXIO, exc
            time.sleep(0.005)
            continue
        opened = True
        os.write(fd, b"<!ENTITY y 'leaked'>")
        os.close(fd)
    if child.poll() is None:
        child.kill()
    out, err = child.communicate(timeout=10)
    assert not opened, f"{label}: the parser opened {fifo}"
    assert child.returncode == 0, err
    assert out.startswith("MALFORMED domainXML:"), out + err
    print(f"{label}: {out.strip()}")


def test_external_parameter_entity_on_dev_zero_does_not_hang(tmp_path: Path) -> None:
    doc = ('<?xml version="1.0" encoding="UTF-16"?>'
           '<!DOCTYPE domain [<!ENTITY % x SYSTEM "file:///dev/zero"> %x;]><domain/>').encode("utf-16")
    child = _parse_in_child(tmp_path, doc)
    try:
        out, err = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail("parsing a parameter entity on /dev/zero hung")
    assert out.startswith("MALFORMED domainXML:"), out + err


@pytest.mark.parametrize("label,xml,words", [
    ("Latin-1 declared", '<?xml version="1.0" encoding="ISO-8859-1"?><domain>\xe9</domain>'.encode("latin-1"),
     "not UTF-8"),
    ("Latin-1 declared, ASCII body", b'<?xml version="1.0" encoding="ISO-8859-1"?><domain></domain>',
     "declares encoding 'ISO-8859-1'"),
    ("UTF-7 declared", b'<?xml version="1.0" encoding="UTF-7"?>+ADw-domain/+AD4-', "declares encoding 'UTF-7'"),
    ("UTF-16 declared in ASCII", b"<?xml version='1.0' encoding='UTF-16'?><domain></domain>",
     "declares encoding 'UTF-16'"),
    ("invalid UTF-8", b"<domain><name>\xff\xfe</name></domain>", "not UTF-8 (invalid byte at offset 14)"),
    ("UTF-8 BOM", b"\xef\xbb\xbf<domain></domain>", "byte-order mark"),
])
def test_only_utf8_is_accepted(label: str, xml: bytes, words: str) -> None:
    with pytest.raises(Malformed) as err:
        xmlsafe.parse_domain(xml)
    assert words in str(err.value), str(err.value)
    assert str(err.value).startswith("domainXML: ")


@pytest.mark.parametrize("declaration", [b'<?xml version="1.0" encoding="UTF-8"?>\n',
                                         b"<?xml version='1.0' encoding='utf-8'?>", b'<?xml version="1.0"?>',
                                         b""])
def test_utf8_with_or_without_a_declaration_parses(declaration: bytes) -> None:
    root = xmlsafe.parse_domain(declaration + '<domain><name>caf\u00e9</name></domain>'.encode())
    assert root.findtext("name") == "caf\u00e9"


def test_50_mb_is_refused_by_size_before_parsing() -> None:
    # not well-formed on purpose: the error is about the size, so the parser never saw it
    huge = b"<domain>" + b"<disk>" * (50 * 1024 * 1024 // 6)
    with pytest.raises(Malformed, match="refused before parsing") as err:
        on_define_domain(huge, S05.vmi_json(), check_images=False)
    assert "bytes" in str(err.value)


def test_xml_just_over_the_bound_is_refused_naming_the_limit() -> None:
    xml = S05.xml()
    padded = xml.replace(b"</domain>", b"<!--" + b"x" * (xmlsafe.MAX_DOMAIN_XML_BYTES - len(xml)) + b"--></domain>")
    assert xmlsafe.MAX_DOMAIN_XML_BYTES == 512 * 1024
    with pytest.raises(Malformed) as err:
        on_define_domain(padded, S05.vmi_json(), check_images=False)
    assert str(err.value).startswith("domainXML: ")
    assert "more than the 524288 bytes (512 KiB)" in str(err.value), str(err.value)


def _largest_domain(kind: str) -> bytes:
    """S05 grown to the largest domain the sidecar accepts: with more disks (what a big VM looks
    like) or with empty elements (the most nodes per byte, the worst case for memory)."""
    xml = S05.xml()
    room = xmlsafe.MAX_DOMAIN_XML_BYTES - len(xml) - 64
    if kind == "disks":
        start = xml.index(b"<disk ")
        one = b"\n\t\t" + xml[start:xml.index(b"</disk>", start) + len(b"</disk>")].replace(b"ua-", b"ux-")
        pad = one * (room // len(one))
    else:
        pad = b"<x>" + b"<a/>" * ((room - 7) // 4) + b"</x>"
    at = xml.index(b"</devices>")
    grown = xml[:at] + pad + xml[at:]
    assert xmlsafe.MAX_DOMAIN_XML_BYTES - 4096 < len(grown) <= xmlsafe.MAX_DOMAIN_XML_BYTES
    return grown


_PEAK_IN_CHILD = """
import gc, sys
from hooksidecar.callback import on_define_domain
def hwm():  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
xml, vmi, warm = (open(path, "rb").read() for path in sys.argv[1:4])
on_define_domain(warm, vmi, check_images=False)  # imports and first-call caches
gc.collect()
before = hwm()
out = on_define_domain(xml, vmi, check_images=False)
after = hwm()
assert b"almalinux-9.qcow2" in out
print((after - before) / 1024)
"""


@pytest.mark.parametrize("kind,limit_mib", [("disks", 16), ("empty elements", 28)])
def test_largest_accepted_domain_stays_small_in_memory(tmp_path: Path, kind: str, limit_mib: int) -> None:
    """Peak RSS growth of one call on the largest accepted domain, in a fresh process: the sidecar
    runs under a 64M limit and idles at ~23 MiB (benchmarks/sidecar_bench.py reports the whole
    process). The tree is parsed once and edited in place; no copy of it is made."""
    (tmp_path / "domain.xml").write_bytes(_largest_domain(kind))
    (tmp_path / "vmi.json").write_bytes(S05.vmi_json())
    (tmp_path / "warm.xml").write_bytes(S05.xml())
    out = subprocess.run([sys.executable, "-c", _PEAK_IN_CHILD, str(tmp_path / "domain.xml"),
                          str(tmp_path / "vmi.json"), str(tmp_path / "warm.xml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    grew = float(out.stdout)
    print(f"{kind}: +{grew:.1f} MiB for {xmlsafe.MAX_DOMAIN_XML_BYTES // 1024} KiB")
    assert grew < limit_mib


def test_serialising_leaves_the_tree_alone() -> None:
    root = xmlsafe.parse_domain(S05.xml())
    before = etree.tostring(root)
    data = xmlsafe.serialise_domain(root, like=S05.xml())
    assert etree.tostring(root) == before
    assert data == S05.xml()  # nothing planned applied: KubeVirt's own bytes come back


@pytest.mark.parametrize("pad", [0, 2 * xmlsafe._CACHED_START_TAG_BYTES])
def test_the_root_start_tag_is_kept_only_while_the_root_is_unchanged(pad: int) -> None:
    """The parsed root start tag is cached (short tags) or not (long ones): either way a root whose
    attributes changed after an identical call gets lxml's own start tag, never the cached one."""
    xml = S05.xml().replace(b"<domain ", b"<domain x-pad=\"" + b"p" * pad + b"\" ", 1)
    for _ in range(2):  # the second time from the cache, for a short tag
        assert xmlsafe.serialise_domain(xmlsafe.parse_domain(xml), like=xml) == xml
    changed = xmlsafe.parse_domain(xml)
    changed.set("type", "qemu")
    data = xmlsafe.serialise_domain(changed, like=xml)
    assert data != xml and data.startswith(b"<domain ") and b'type="qemu"' in data.split(b">", 1)[0]
    assert data.split(b">", 1)[1] == xml.split(b">", 1)[1].rstrip()


def test_xml_just_under_the_bound_still_parses() -> None:
    xml = S05.xml()
    padded = xml.replace(b"</domain>", b"<!--" + b"x" * (xmlsafe.MAX_DOMAIN_XML_BYTES - len(xml) - 100)
                         + b"--></domain>")
    assert len(padded) <= xmlsafe.MAX_DOMAIN_XML_BYTES
    assert b"almalinux-9.qcow2" in run(S05, padded)


def test_a_version_2_plan_with_detached_disks_gives_the_same_domain() -> None:
    """Detached disks (plan version 2) are only the webhook's memory: the sidecar reads the plan
    and acts exactly as on the same plan without them."""
    with_detached = replace(S05, plan=replace(S05.plan, detached=(DetachedDisk("old-data", 20 * GiB),)))
    assert json.loads(sign_plan(with_detached.plan, KEYS))["version"] == 2
    assert json.loads(sign_plan(S05.plan, KEYS))["version"] == 1
    assert run(with_detached, S05.xml()) == run(S05, S05.xml())
    assert b"old-data" not in run(with_detached, S05.xml())


@pytest.mark.parametrize("label,body_edit,words", [
    ("dot-dot in a disk name", lambda b: b["disks"][0].update(name="../etc"), "is not a valid name"),
    ("dot-dot in a base file", lambda b: b["disks"][0]["backing"].update(file="../../etc/shadow"),
     "is not a valid name"),
    ("slash in a base file", lambda b: b["disks"][0]["backing"].update(file="a/b.qcow2"),
     "is not a valid name"),
    ("unknown plan version", lambda b: b.update(version=4), "version 4 is not supported"),
    ("detached in a version 1 plan", lambda b: b.update(detached=[]), "unknown key"),
    ("unknown key", lambda b: b.update(extra=1), "unknown key"),
])
def test_bad_plans_are_malformed(label: str, body_edit: Any, words: str) -> None:
    body = S05.plan.body()
    body_edit(body)
    doc = S05.vmi()
    doc["metadata"]["annotations"][K.ANN_PLAN] = json.dumps(body)
    with pytest.raises(Malformed) as err:
        on_define_domain(S05.xml(), json.dumps(doc).encode(), check_images=False)
    assert words in str(err.value)
    assert str(err.value).startswith(K.ANN_PLAN)


@pytest.mark.parametrize("vmi,words", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (json.dumps({"metadata": {"annotations": {K.ANN_PLAN: 5}}}).encode(), "must be a string"),
    (json.dumps({"metadata": {"annotations": {K.ANN_PLAN: "{"}}}).encode(), "not valid JSON"),
    (b" " * (5 * 1024 * 1024), "more than"),
    (b'{"a":' * 100000, "the VMI JSON is nested too deeply"),
    (json.dumps({"metadata": {"annotations": {K.ANN_PLAN: "[" * 60000}}}).encode(), "the plan is nested too deeply"),
    (json.dumps({"metadata": {}}).encode("utf-16"), "the VMI JSON is not UTF-8"),
    (json.dumps({"metadata": {}}).encode("utf-32"), "the VMI JSON is not UTF-8"),
    (json.dumps({"metadata": {}}).encode("utf-8-sig"), "Unexpected UTF-8 BOM"),
])
def test_bad_vmis_are_malformed(vmi: bytes, words: str) -> None:
    with pytest.raises(Malformed, match=words):
        on_define_domain(S05.xml(), vmi, check_images=False)


def test_persist_root_with_image_checks_needs_the_vmi_uid() -> None:
    doc = S01.vmi()
    del doc["metadata"]["uid"]
    with pytest.raises(Malformed, match="uid"):
        on_define_domain(S01.xml(), json.dumps(doc).encode(), path_prefix="/nonexistent")


def test_data_files_for_the_cli_match_scenario_05() -> None:
    """tests/data/plan-05-launcher-vmi.json and domain-05-first-call.xml are sample 05 as the sidecar
    would receive it with a diskhooks plan (inputs for the dry-run CLI); they must not drift."""
    assert json.loads((DATA / "plan-05-launcher-vmi.json").read_text()) == S05.vmi()
    assert (DATA / "domain-05-first-call.xml").read_bytes() == S05.xml()


def _closed_by_regex_only(data: bytes) -> bytes:
    return xmlsafe._explicit_close_tags_by_regex(data)


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.xml")), ids=lambda p: p.name)
def test_empty_elements_get_close_tags_in_every_sample(path: Path) -> None:
    """The fast scan writes exactly what the comment-aware regular expression writes, and the
    result is the same document (lxml reads both alike) with no self-closed element left."""
    root = xmlsafe.parse_domain(path.read_bytes())
    raw = etree.tostring(root, encoding="UTF-8")
    fast = xmlsafe._explicit_close_tags(raw)
    assert fast == _closed_by_regex_only(raw)
    assert b"/>" not in fast
    assert etree.tostring(etree.fromstring(fast), method="c14n") == etree.tostring(root, method="c14n")


@pytest.mark.parametrize("xml", [
    b'<domain type="kvm"><a x="p/&gt;q" y="&lt;b/&gt;"/><b>t/&gt;u</b><qemu:arg xmlns:qemu="urn:q" value="/"/></domain>',
    b'<domain><devices><disk><driver name="qemu"/><source file="/a/b"/><backingStore/></disk></devices></domain>',
    b"<domain><a/><b/><c><d/></c></domain>",
    b"<domain>text only</domain>",
    b'<domain><!-- a comment with <x/> in it --><a/><?pi <y/>?><b/></domain>',
], ids=["escaped-gt", "disk", "nested", "no-empty", "comment-and-pi"])
def test_empty_elements_get_close_tags_and_nothing_else_changes(xml: bytes) -> None:
    root = etree.fromstring(xml)
    raw = etree.tostring(root, encoding="UTF-8")
    fast = xmlsafe._explicit_close_tags(raw)
    assert fast == _closed_by_regex_only(raw)
    assert etree.tostring(etree.fromstring(fast), method="c14n") == etree.tostring(root, method="c14n")
    opaque = [m.group(0) for m in re.finditer(rb"<!--.*?-->|<\?.*?\?>", raw, re.DOTALL)]
    assert [m.group(0) for m in re.finditer(rb"<!--.*?-->|<\?.*?\?>", fast, re.DOTALL)] == opaque
    assert b"/>" not in re.sub(rb"<!--.*?-->|<\?.*?\?>", b"", fast, flags=re.DOTALL)
