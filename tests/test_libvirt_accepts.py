"""Everything the sidecar emits is accepted by libvirt: ``virt-xml-validate FILE domain`` and
``virsh -c test:///default define FILE`` (tests/libvirt_check.py, which documents the four
normalisations Debian 12's libvirt 9.0 needs for KubeVirt's own output; they are applied identically
to the sidecar's input and output).

The input of every scenario must pass after normalisation (so nothing hides an error) and the output
must pass too: the sidecar adds no error over its input. If the tools are missing these tests fail;
they are installed by ``apt-get install -y libvirt-clients libvirt-daemon libxml2-utils``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import DATA
from tests.libvirt_check import define_and_dump, judge, missing_tools
from tests.test_domain import IDS, S01, S02, S03, S05, SCENARIOS, Scenario, run, simulate_readback


def test_libvirt_tools_are_installed() -> None:
    assert not missing_tools(), f"missing: {missing_tools()}"


def _inputs(sc: Scenario, which: str) -> bytes:
    if which == "readback":
        return simulate_readback(run(sc, sc.xml("first-call")))
    return sc.xml(which)


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
@pytest.mark.parametrize("which", ["first-call", "later", "readback"])
def test_output_adds_no_libvirt_error(sc: Scenario, which: str, tmp_path: Path) -> None:
    xml = _inputs(sc, which)
    before = judge(xml, tmp_path, label="in")
    assert before.ok, f"the normalised input itself fails: {before}"
    out = run(sc, xml)
    after = judge(out, tmp_path, label="out")
    assert after.ok, after


def test_crafted_later_call_adds_no_libvirt_error(tmp_path: Path) -> None:
    xml = (DATA / "domain-05-later-call.xml").read_bytes()
    assert judge(xml, tmp_path, label="in").ok
    assert judge(run(S05, xml), tmp_path, label="out").ok


def _disk(xml: bytes, alias: str) -> etree._Element:
    found = etree.fromstring(xml).xpath(f"devices/disk[alias/@name='{alias}']")
    assert len(found) == 1
    el: etree._Element = found[0]
    return el


def _libvirt_chain(el: etree._Element) -> list[tuple[str | None, str | None]]:
    out = []
    store = el.find("backingStore")
    while store is not None:
        fmt, src = store.find("format"), store.find("source")
        out.append((fmt.get("type") if fmt is not None else None,
                    src.get("file") if src is not None else None))
        store = store.find("backingStore")
    return out


@pytest.mark.parametrize("sc,alias,driver_type,chain", [
    (S05, "ua-scratch", "qcow2",
     [("qcow2", "/var/run/kubevirt-private/diskhooks/images/almalinux-9.qcow2"), (None, None)]),
    (S02, "ua-os", "qcow2", [("raw", "/var/run/kubevirt-private/diskhooks/images/debian-12.raw"),
                             (None, None)]),
    (S02, "ua-pgdata", "qcow2", [(None, None)]),
    (S01, "ua-rootdisk", "qcow2", [("qcow2", "/var/run/kubevirt/container-disks/disk_0.img"),
                                   (None, None)]),
    (S03, "ua-fast0", "raw", []),
], ids=["05-scratch", "02-os", "02-pgdata", "01-rootdisk", "03-lun"])
def test_libvirt_parses_disks_as_planned(sc: Scenario, alias: str, driver_type: str,
                                         chain: list[tuple[str | None, str | None]], tmp_path: Path) -> None:
    """libvirt's own parse of the result (its inactive XML after define) holds the planned disk."""
    held = define_and_dump(run(sc, sc.xml()), tmp_path)
    el = _disk(held, alias)
    assert el.find("driver").get("type") == driver_type
    assert _libvirt_chain(el) == chain


def test_the_checker_can_fail(tmp_path: Path) -> None:
    """Negative control: a result with a wrong backing format or io mode is caught by both tools."""
    out = run(S05, S05.xml())
    bad_format = out.replace(b'<format type="qcow2"></format>', b'<format type="qcow3"></format>')
    verdict = judge(bad_format, tmp_path, label="bad1")
    assert verdict.schema_errors and any("qcow3" in line for line in verdict.define_errors), verdict
    bad_io = out.replace(b'io="threads"', b'io="fast"')
    verdict = judge(bad_io, tmp_path, label="bad2")
    assert verdict.schema_errors and verdict.define_errors, verdict
