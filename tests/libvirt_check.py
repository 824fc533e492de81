"""Judge libvirt domain XML with libvirt's own tools (reusable by any test).

- ``virt-xml-validate FILE domain`` (Debian ``libvirt-clients``; it runs ``xmllint`` from
  ``libxml2-utils`` against ``/usr/share/libvirt/schemas/domain.rng`` from ``libvirt-daemon``);
- ``virsh -c test:///default define FILE``: libvirt's real domain parser, no hypervisor needed.

Debian 12 ships libvirt 9.0, older than the libvirt 10.10-11.x inside KubeVirt's virt-launcher, and
rejects a few things KubeVirt itself emits. :func:`normalise_for_libvirt9` removes exactly those,
and callers apply it identically to a hook's input and to its output, so a result is judged by the
errors it adds, never by KubeVirt's own quirks:

1. ``<maxMemory slots="0">`` is dropped: libvirt 9.0's parser refuses it ("both maximum memory size
   and memory slot count must be specified"); KubeVirt sets it for memory hotplug with no DIMM slots.
2. Empty ``<sysinfo>`` entries (``<entry name="sku"></entry>``) and empty ``<bios>``, ``<baseBoard>``,
   ``<chassis>`` blocks are dropped: the 9.0 schema requires text in an entry and an entry in a
   block ("Extra element sysinfo in interleave"); libvirt's parser ignores them.
3. KubeVirt's own ``<filesystemOverhead>`` and ``<capacity>`` inside ``<disk>`` are dropped: KubeVirt's
   Disk struct marshals them into the XML (samples 03 and 05); libvirt's parser ignores unknown
   elements, the schema does not allow them.
4. ``<watchdog model="itco">`` is dropped: libvirt 9.0 does not know the itco model that libvirt's
   read-back inside a current virt-launcher adds to q35 domains (seq-05 calls 2 and 3).

Not needed, though expected: ``<domain type="kvm">`` is accepted by the test driver's ``define`` in
libvirt 9.0, so the domain type is left alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

TOOLS = {"virt-xml-validate": "libvirt-clients", "virsh": "libvirt-clients",
         "xmllint": "libxml2-utils"}
SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def missing_tools() -> list[str]:
    """Tools (with their Debian package) that are not installed, as readable strings."""
    out = [f"{tool} (apt-get install -y {pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not SCHEMA.exists():
        out.append(f"{SCHEMA} (apt-get install -y libvirt-daemon)")
    return out


def normalise_for_libvirt9(xml: bytes) -> bytes:
    """``xml`` without the KubeVirt output that libvirt 9.0 rejects (see the module docstring)."""
    root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
    for mm in root.findall("maxMemory"):
        if mm.get("slots") == "0":
            root.remove(mm)
    for sysinfo in root.findall("sysinfo"):
        for entry in list(sysinfo.iter("entry")):
            if not (entry.text or "").strip():
                entry.getparent().remove(entry)
        for block in list(sysinfo):
            if len(block) == 0 and not (block.text or "").strip():
                sysinfo.remove(block)
    for disk in root.iter("disk"):
        for tag in ("filesystemOverhead", "capacity"):
            for el in disk.findall(tag):
                disk.remove(el)
    for devices in root.findall("devices"):
        for wd in devices.findall("watchdog"):
            if wd.get("model") == "itco":
                devices.remove(wd)
    return etree.tostring(root)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Verdict:
    schema_errors: tuple[str, ...]
    define_errors: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.schema_errors and not self.define_errors


def judge(xml: bytes, workdir: Path, *, label: str = "domain") -> Verdict:
    """Normalise ``xml`` and run both tools on it. Raises if a tool is missing."""
    if missing := missing_tools():
        raise RuntimeError("libvirt tools missing: " + ", ".join(missing))
    path = workdir / f"{label}.xml"
    path.write_bytes(normalise_for_libvirt9(xml))
    schema = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True,
                            timeout=60, check=False)
    schema_errors = () if schema.returncode == 0 else tuple(
        line for line in (schema.stdout + schema.stderr).splitlines() if line.strip())
    define = subprocess.run(["virsh", "-c", "test:///default", "define", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    define_errors = () if define.returncode == 0 else tuple(
        line for line in (define.stdout + define.stderr).splitlines() if line.strip())
    return Verdict(schema_errors=schema_errors, define_errors=define_errors)


def define_and_dump(xml: bytes, workdir: Path, *, label: str = "domain") -> bytes:
    """The inactive XML libvirt holds after defining ``xml`` (normalised) on the test driver."""
    path = workdir / f"{label}.xml"
    normalised = normalise_for_libvirt9(xml)
    path.write_bytes(normalised)
    name = etree.fromstring(normalised).findtext("name") or ""
    if not _SAFE_NAME.match(name) or "'" in str(path):
        raise ValueError(f"domain name {name!r} or path {path} cannot be quoted for virsh")
    # one virsh process: the test driver's state lives only as long as the connection
    result = subprocess.run(["virsh", "-c", "test:///default", f"define '{path}'; dumpxml --inactive '{name}'"],
                            capture_output=True, timeout=60, check=True)
    out = result.stdout
    return out[out.index(b"<domain"):]
