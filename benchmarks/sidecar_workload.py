"""The sidecar benchmark's workload: KubeVirt's sample ``05-vm-mixed-smbios`` (launcher VMI and
first-call domain) with a signed diskhooks plan for two qcow2 host disks, one an overlay on a
library base, and the real images ``qemu-img`` makes under a temporary ``--path-prefix``; and the
same domain grown to the largest the sidecar accepts (section (e) of ``benchmarks/sidecar_bench.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "data" / "kubevirt" / "samples"
SAMPLE = SAMPLES / "05-vm-mixed-smbios"

MiB = 1024 * 1024
GiB = 1024 * MiB
LAUNCHER_DISKS = "/var/run/kubevirt-private/vmi-disks"
LAUNCHER_LIBRARY = "/var/run/kubevirt-private/diskhooks/images"
BASE_FILE = "almalinux-9.qcow2"


@dataclass(frozen=True)
class Workload:
    prefix: Path
    vmi: bytes
    domain: bytes
    plan: str  # the signed plan: the VMI's annotation and the sidecar's DISKHOOKS_PLAN


def build_workload(workdir: Path) -> Workload:
    """Sample 05's launcher VMI and first-call domain, with a signed plan for ``scratch`` (qcow2)
    and ``logs`` (qcow2 overlay on a library base), and the images (and base record) prepare would
    leave."""
    from diskplan import keys as K
    from diskplan.plan import Backing, Plan, PlanKeys, PlannedDisk, sign_plan

    host_dir = "/var/lib/diskhooks/vms/team-a/mixed"
    plan = Plan(
        namespace="team-a", vm="mixed", host_dir=host_dir, image_library="/var/lib/diskhooks/images",
        sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
        disks=(PlannedDisk(name="scratch", size_bytes=20 * GiB, bus="sata", cache="none", io="native",
                           discard="unmap"),
               PlannedDisk(name="logs", size_bytes=10 * GiB, bus="scsi", cache="none", io="native",
                           discard="unmap", backing=Backing(image="almalinux-9", file=BASE_FILE,
                                                            format="qcow2"))))
    vmi = json.loads(SAMPLE.with_name(SAMPLE.name + ".launcher-vmi.json").read_bytes())
    plan_text = sign_plan(plan, PlanKeys(b"bench-plan-key-0123456789"))
    vmi["metadata"]["annotations"][K.ANN_PLAN] = plan_text
    for volume in vmi["spec"]["volumes"]:
        if volume["name"] in ("scratch", "logs"):
            volume["hostDisk"] = {"path": f"{host_dir}/{volume['name']}.qcow2", "type": "DiskOrCreate",
                                  "capacity": volume["hostDisk"]["capacity"]}
    domain = (SAMPLE.with_name(SAMPLE.name + ".domain.first-call.xml").read_bytes()
              .replace(b"vmi-disks/scratch/scratch.raw", b"vmi-disks/scratch/scratch.qcow2")
              .replace(b"vmi-disks/logs/disk.img", b"vmi-disks/logs/logs.qcow2"))
    prefix = workdir / "prefix"
    for vol in ("scratch", "logs"):
        (prefix / LAUNCHER_DISKS.lstrip("/") / vol).mkdir(parents=True)
    (prefix / LAUNCHER_LIBRARY.lstrip("/")).mkdir(parents=True)
    qemu = shutil.which("qemu-img")
    if qemu is None:
        raise SystemExit("qemu-img is missing: apt-get install -y qemu-utils")

    def img(*args: str) -> None:
        subprocess.run([qemu, "create", "-q", "-f", "qcow2", *args], check=True, timeout=30)

    img(str(prefix / LAUNCHER_LIBRARY.lstrip("/") / BASE_FILE), "1G")
    img(str(prefix / LAUNCHER_DISKS.lstrip("/") / "scratch" / "scratch.qcow2"), "20G")
    from hooksidecar.prepare import make_base_record

    logs = plan.disks[1]
    (prefix / LAUNCHER_DISKS.lstrip("/") / "logs" / logs.base_record).write_text(  # record first
        json.dumps(make_base_record(logs, str(prefix / LAUNCHER_LIBRARY.lstrip("/") / BASE_FILE))))
    img("-u", "-F", "qcow2", "-b", f"{LAUNCHER_LIBRARY}/{BASE_FILE}",
        str(prefix / LAUNCHER_DISKS.lstrip("/") / "logs" / "logs.qcow2"), "10G")
    return Workload(prefix=prefix, vmi=json.dumps(vmi).encode(), domain=domain, plan=plan_text)


def largest_domain(domain: bytes, kind: str) -> bytes:
    """``domain`` grown to just under the sidecar's bound: with copies of an unplanned disk
    (``disks``) or with empty elements (``empty``, the most lxml nodes per byte)."""
    from hooksidecar.xmlsafe import MAX_DOMAIN_XML_BYTES

    room = MAX_DOMAIN_XML_BYTES - len(domain) - 64
    if kind == "disks":
        start = domain.index(b"<disk ")
        one = b"\n\t\t" + domain[start:domain.index(b"</disk>", start) + 7].replace(b'name="ua-', b'name="ux-')
        pad = one * (room // len(one))
    else:
        pad = b"<x>" + b"<a/>" * ((room - 7) // 4) + b"</x>"
    at = domain.index(b"</devices>")
    return domain[:at] + pad + domain[at:]
