"""hooksidecar.images: the sidecar's image checks, on real images made with qemu-img in tmp_path.

The launcher's directories are recreated under ``tmp_path`` and passed as ``path_prefix``; the
images carry the backing paths they would have inside the virt-launcher pod (made with
``qemu-img create -u``, since those paths do not exist on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.plan import Backing, PersistRoot, Plan, PlannedDisk
from hooksidecar.images import ImageFacts, check_images
from hooksidecar.prepare import Refuse, Unchanged, inspect, make_base_record, plan_actions

QEMU_IMG = shutil.which("qemu-img")
UID = "6a1e5f3c-1d2b-4c3a-9e8f-0123456789ab"
GiB = 1024**3

PLAN = Plan(
    namespace="vms", vm="pg01", host_dir="/var/lib/diskhooks/vms/vms/pg01",
    image_library="/var/lib/diskhooks/images", sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
    disks=(
        PlannedDisk(name="pgdata", size_bytes=1 * GiB, bus="virtio", cache="none", io="native",
                    discard="unmap"),
        PlannedDisk(name="scratch", size_bytes=2 * GiB, bus="scsi", cache="writeback", io="threads",
                    discard="unmap",
                    backing=Backing(image="almalinux-9", file="almalinux-9.qcow2", format="qcow2")),
    ),
    persist_root=PersistRoot(volume="root", image="quay.io/containerdisks/almalinux:9", volume_index=0),
)


def qemu_img(*args: str) -> None:
    assert QEMU_IMG, "qemu-img is missing: apt-get install -y qemu-utils"
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


def at(root: Path, launcher_path: str) -> Path:
    return root / launcher_path.lstrip("/")


def marker(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "image": "quay.io/containerdisks/almalinux:9", "sha256": "ab" * 32, "format": "qcow2",
        "virtualSize": 10 * GiB, "vmiUID": UID, "overlay": "persist-root.root.qcow2",
    }
    doc.update(over)
    return doc


def build_tree(root: Path, plan: Plan = PLAN) -> None:
    """What prepare leaves behind and the Pod mutation mounts, as the sidecar sees it."""
    for disk in plan.disks:
        at(root, disk.launcher_dir).mkdir(parents=True, exist_ok=True)
        args = ["create", "-f", "qcow2"]
        if disk.backing is not None:
            args += ["-u", "-F", disk.backing.format, "-b", disk.backing.launcher_path]
        qemu_img(*args, str(at(root, disk.launcher_path)), str(disk.size_bytes))
        if disk.backing is not None:
            base = at(root, disk.backing.launcher_path)
            base.parent.mkdir(parents=True, exist_ok=True)
            if not base.exists():  # no larger than the overlay, as prepare requires
                qemu_img("create", "-f", disk.backing.format, str(base), "1G")
            # the base record prepare writes before the overlay
            at(root, disk.base_record_path).write_text(json.dumps(make_base_record(disk, str(base))))
    if plan.persist_root is not None:
        pr = plan.persist_root
        at(root, K.LAUNCHER_VM_DIR).mkdir(parents=True, exist_ok=True)
        qemu_img("create", "-f", "qcow2", "-u", "-F", "qcow2", "-b", pr.base_path,
                 str(at(root, pr.launcher_path)), "10G")
        at(root, pr.marker_path).write_text(json.dumps(marker(image=pr.image)))


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    build_tree(tmp_path)
    return tmp_path


def test_a_prepared_tree_passes(tree: Path) -> None:
    assert check_images(PLAN, vmi_uid=UID, path_prefix=str(tree)) == ImageFacts(
        persist_root_base_format="qcow2")


def test_raw_base_format_is_reported(tmp_path: Path) -> None:
    build_tree(tmp_path)
    pr = PLAN.persist_root
    assert pr is not None
    overlay = at(tmp_path, pr.launcher_path)
    overlay.unlink()
    qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", pr.base_path, str(overlay), "10G")
    at(tmp_path, pr.marker_path).write_text(json.dumps(marker(format="raw")))
    facts = check_images(PLAN, vmi_uid=UID, path_prefix=str(tmp_path))
    assert facts.persist_root_base_format == "raw"


# ------------------------------------------------------------------------------------------------
# every way a tree can be wrong, each with the words a user needs to see
# ------------------------------------------------------------------------------------------------
def _base_record(root: Path) -> Path:
    return at(root, PLAN.disks[1].base_record_path)


def _record_other_base(root: Path) -> None:
    doc = json.loads(_base_record(root).read_text())
    _base_record(root).write_text(json.dumps({**doc, "file": "rocky-9.qcow2"}))


def _base_record_symlink(root: Path) -> None:
    real = _base_record(root).with_name("elsewhere.json")
    _base_record(root).rename(real)
    _base_record(root).symlink_to(real.name)


def _base_replaced(root: Path) -> None:
    new = _base(root).with_name("incoming.qcow2")
    qemu_img("create", "-f", "qcow2", str(new), "1G")  # same name, same size, other file
    os.replace(new, _base(root))


def _pgdata(root: Path) -> Path:
    return at(root, PLAN.disks[0].launcher_path)


def _scratch(root: Path) -> Path:
    return at(root, PLAN.disks[1].launcher_path)


def _base(root: Path) -> Path:
    backing = PLAN.disks[1].backing
    assert backing is not None
    return at(root, backing.launcher_path)


def _overlay(root: Path) -> Path:
    assert PLAN.persist_root is not None
    return at(root, PLAN.persist_root.launcher_path)


def _marker(root: Path) -> Path:
    assert PLAN.persist_root is not None
    return at(root, PLAN.persist_root.marker_path)


def _replace_with_raw(root: Path) -> None:
    p = _pgdata(root)
    p.unlink()
    qemu_img("create", "-f", "raw", str(p), "1G")  # what KubeVirt's DiskOrCreate makes


def _symlink(root: Path) -> None:
    p = _pgdata(root)
    real = p.with_name("real.qcow2")
    p.rename(real)
    p.symlink_to(real.name)


def _data_file(root: Path) -> None:
    p = _pgdata(root)
    p.unlink()
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={root / 'elsewhere.raw'}", str(p), "1G")


def _backing_outside(root: Path) -> None:
    p = _scratch(root)
    p.unlink()
    qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow", str(p), "2G")


def _backing_wrong_format(root: Path) -> None:
    p = _scratch(root)
    p.unlink()
    backing = PLAN.disks[1].backing
    assert backing is not None
    qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", backing.launcher_path, str(p), "2G")


def _unplanned_backing(root: Path) -> None:
    p = _pgdata(root)
    p.unlink()
    qemu_img("create", "-f", "qcow2", "-u", "-F", "qcow2", "-b",
             "/var/run/kubevirt-private/diskhooks/images/almalinux-9.qcow2", str(p), "1G")


def _too_small(root: Path) -> None:
    p = _pgdata(root)
    p.unlink()
    qemu_img("create", "-f", "qcow2", str(p), "512M")


def _fifo(root: Path) -> None:
    p = _pgdata(root)
    p.unlink()
    os.mkfifo(p)


def _directory(root: Path) -> None:
    p = _pgdata(root)
    p.unlink()
    p.mkdir()


def _base_with_backing(root: Path) -> None:
    base = _base(root)
    base.unlink()
    qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", "/srv/other.raw", str(base), "10G")


def _base_symlink(root: Path) -> None:
    base = _base(root)
    real = base.with_name("almalinux-9-2026.qcow2")
    base.rename(real)
    base.symlink_to(real.name)


def _write_marker(**over: object) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        _marker(root).write_text(json.dumps(marker(**over)))
    return go


def _overlay_other_base(root: Path) -> None:
    p = _overlay(root)
    p.unlink()
    qemu_img("create", "-f", "qcow2", "-u", "-F", "qcow2", "-b",
             "/var/run/kubevirt/container-disks/disk_1.img", str(p), "10G")


def _volume_dir_symlink(root: Path) -> None:
    d = _pgdata(root).parent
    real = d.with_name("pgdata-real")
    d.rename(real)
    d.symlink_to(real.name)


def _corrupt_flag(root: Path) -> None:
    p = _pgdata(root)
    data = bytearray(p.read_bytes())
    data[79] |= 0x02  # incompatible feature bit 1: corrupt
    p.write_bytes(bytes(data))


CASES: list[tuple[str, Callable[[Path], object], str]] = [
    ("volume dir not mounted", lambda r: shutil.rmtree(_pgdata(r).parent),
     ("volume directory /var/run/kubevirt-private/vmi-disks/pgdata is not mounted in the sidecar: check "
      "the Pod mutation added the read-only mount for pgdata")),
    ("volume dir a symlink (prepare: not mounted)", _volume_dir_symlink,
     "volume directory /var/run/kubevirt-private/vmi-disks/pgdata is not mounted in the sidecar"),
    ("image missing", lambda r: _pgdata(r).unlink(), "did not create it"),
    ("raw file named .qcow2", _replace_with_raw,
     ("raw image at /var/run/kubevirt-private/vmi-disks/pgdata/pgdata.qcow2: KubeVirt created it "
      "because the diskhooks-prepare init container did not run; delete it on the node "
      "(/var/lib/diskhooks/vms/vms/pg01/pgdata.qcow2) if it holds no data")),
    ("symlinked image", _symlink, "is a symbolic link"),
    ("external data file", _data_file, "external data file"),
    ("backing file outside the library", _backing_outside, "'/etc/shadow'"),
    ("backing format not as planned", _backing_wrong_format, "(format 'raw')"),
    ("backing file on a disk planned without", _unplanned_backing, "but the plan gives it none"),
    ("image smaller than planned", _too_small, "did not grow it"),
    ("a FIFO where the image should be", _fifo, "not a regular file"),
    ("a directory where the image should be", _directory, "not a regular file"),
    ("corrupt flag", _corrupt_flag, "marked corrupt"),
    ("image library not mounted", lambda r: shutil.rmtree(_base(r).parent),
     "image library /var/run/kubevirt-private/diskhooks/images is not mounted"),
    ("base missing", lambda r: _base(r).unlink(), "does not exist in the image library"),
    ("base with its own backing file", _base_with_backing, "library bases must be self-contained"),
    ("base is a symlink", _base_symlink, "is a symbolic link"),
    ("base cut short", lambda r: os.truncate(_base(r), 1024), "lies beyond the end of the file"),
    ("base record missing", lambda r: _base_record(r).unlink(),
     ("scratch.base.json (node file /var/lib/diskhooks/vms/vms/pg01/scratch.base.json) does not exist: "
      "the diskhooks-prepare init container did not run for this start")),
    ("base record not JSON", lambda r: _base_record(r).write_text("{"), "is not JSON"),
    ("base record without its fields", lambda r: _base_record(r).write_text("{}"),
     "does not have the fields diskhooks writes"),
    ("base record of another base", _record_other_base, "names the base 'rocky-9.qcow2'"),
    ("base record a symlink", _base_record_symlink, "is a symbolic link"),
    ("base replaced (new inode)", _base_replaced, "changed since the diskhooks-prepare init container"),
    ("base touched", lambda r: os.utime(_base(r), ns=(1, 1)), "mtimeNs "),
    ("VM dir not mounted", lambda r: shutil.rmtree(_overlay(r).parent),
     "the VM directory /var/run/kubevirt-private/diskhooks/vm is not mounted"),
    ("marker missing", lambda r: _marker(r).unlink(),
     "the diskhooks-prepare init container did not run for this start"),
    ("marker for another image", _write_marker(image="quay.io/containerdisks/almalinux:10"),
     "the base image changed"),
    ("marker from another start", _write_marker(vmiUID="00000000-0000-0000-0000-000000000000"),
     "prepare did not run for this start"),
    ("marker with a bad format", _write_marker(format="vmdk"), "has format 'vmdk'"),
    ("marker without a sha256 (prepare: invalid)", _write_marker(sha256="not-a-hash"),
     "does not have the fields diskhooks writes (image, sha256, format"),
    ("marker without its overlay (prepare: invalid)", _write_marker(overlay=None),
     "does not have the fields diskhooks writes"),
    ("marker not JSON", lambda r: _marker(r).write_text("{not json"), "is not JSON"),
    ("marker nested too deeply", lambda r: _marker(r).write_text("[" * 60000), "is not JSON"),
    ("overlay on another base", _overlay_other_base, "disk_1.img"),
    ("overlay missing", lambda r: _overlay(r).unlink(), "persist-root.root.qcow2"),
]


@pytest.mark.parametrize("label,breaker,words", CASES, ids=[c[0] for c in CASES])
def test_unsafe_trees_are_refused(tmp_path: Path, label: str, breaker: Callable[[Path], object],
                                  words: str) -> None:
    build_tree(tmp_path)
    breaker(tmp_path)
    with pytest.raises(Refused) as err:
        check_images(PLAN, vmi_uid=UID, path_prefix=str(tmp_path))
    message = str(err.value)
    assert words in message, message
    assert message.startswith("volume "), message  # every error names the volume


def test_only_planned_things_are_checked(tmp_path: Path) -> None:
    """A plan with one plain disk needs neither the image library nor the VM directory."""
    plan = replace(PLAN, disks=PLAN.disks[:1], persist_root=None)
    build_tree(tmp_path, plan)
    assert not at(tmp_path, K.LAUNCHER_IMAGE_LIBRARY).exists()
    assert check_images(plan, vmi_uid="", path_prefix=str(tmp_path)) == ImageFacts()


def test_raw_library_base_is_not_parsed(tmp_path: Path) -> None:
    backing = Backing(image="debian-12", file="debian-12.raw", format="raw")
    plan = replace(PLAN, disks=(replace(PLAN.disks[1], backing=backing),), persist_root=None)
    build_tree(tmp_path, plan)
    assert check_images(plan, vmi_uid=UID, path_prefix=str(tmp_path)) == ImageFacts()


# ------------------------------------------------------------------------------------------------
# the whole OnDefineDomain call with the checks on, against KubeVirt's samples
# ------------------------------------------------------------------------------------------------
def test_on_define_domain_with_real_images(tmp_path: Path) -> None:
    from hooksidecar.callback import on_define_domain
    from tests.test_domain import S01, S05, disk

    for sc in (S01, S05):
        build_tree(tmp_path, sc.plan)
        checked = on_define_domain(sc.xml(), sc.vmi_json(), path_prefix=str(tmp_path))
        unchecked = on_define_domain(sc.xml(), sc.vmi_json(), check_images=False)
        assert checked == unchecked  # the checks change nothing when the images are right
    root = disk(checked, "ua-scratch")
    assert root.find("driver").get("type") == "qcow2"


def test_on_define_domain_refuses_before_answering(tmp_path: Path) -> None:
    from hooksidecar.callback import on_define_domain
    from tests.test_domain import S01

    build_tree(tmp_path, S01.plan)
    datadisk = at(tmp_path, S01.plan.disks[0].launcher_path)
    datadisk.unlink()
    qemu_img("create", "-f", "raw", str(datadisk), "10G")
    with pytest.raises(Refused, match="raw image"):
        on_define_domain(S01.xml(), S01.vmi_json(), path_prefix=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# prepare and the sidecar decide alike: the same tree through both, on real files
# ------------------------------------------------------------------------------------------------
RAW_BASE = Backing(image="debian-12", file="debian-12.raw", format="raw")
RAW_PLAN = replace(PLAN, disks=(replace(PLAN.disks[1], backing=RAW_BASE),), persist_root=None)


def prepare_refusals(plan: Plan, root: Path) -> list[str]:
    """What prepare's inspection and pure core refuse for the tree under ``root`` (nothing is
    applied), in the sidecar's ``volume X: reason`` form."""
    actions = plan_actions(plan, inspect(plan, prefix=str(root)), vmi_uid=UID)
    return [f"volume {a.volume}: {a.reason}" for a in actions if isinstance(a, Refuse)]


def replace_base(root: Path, disk: PlannedDisk, *qemu_args: str, size: str = "1G",
                 cut_to: int | None = None) -> None:
    """Put another file at the base's path and record it as prepare would (so the base record
    agrees with it: only the file itself can be the reason for a refusal)."""
    assert disk.backing is not None
    base = at(root, disk.backing.launcher_path)
    base.unlink()
    qemu_img("create", *qemu_args, str(base), size)
    if cut_to is not None:
        os.truncate(base, cut_to)
    at(root, disk.base_record_path).write_text(json.dumps(make_base_record(disk, str(base))))


QCOW2_IN_RAW = [
    ("with a backing file in its header", ("-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow"), None),
    ("a plain qcow2 image", ("-f", "qcow2"), None),
    ("a qcow2 header whose tables are cut off", ("-f", "qcow2"), 4096),
]


@pytest.mark.parametrize("label,args,cut_to", QCOW2_IN_RAW, ids=[c[0] for c in QCOW2_IN_RAW])
def test_raw_base_that_starts_with_a_qcow2_header_is_refused_as_prepare_refuses_it(
        tmp_path: Path, label: str, args: tuple[str, ...], cut_to: int | None) -> None:
    """The format-confusion hazard: a base planned raw whose first bytes are a qcow2 header would
    be opened as qcow2 by anything that probes it, following the backing file written in it."""
    build_tree(tmp_path, RAW_PLAN)
    check_images(RAW_PLAN, vmi_uid=UID, path_prefix=str(tmp_path))  # a real raw base passes
    replace_base(tmp_path, RAW_PLAN.disks[0], *args, cut_to=cut_to)
    with pytest.raises(Refused) as err:
        check_images(RAW_PLAN, vmi_uid=UID, path_prefix=str(tmp_path))
    message = str(err.value)
    assert message.startswith("volume scratch: base image "
                              "/var/run/kubevirt-private/diskhooks/images/debian-12.raw (debian-12, "
                              "node file /var/lib/diskhooks/images/debian-12.raw) is qcow2, but the "
                              "plan says raw"), message
    assert "format-confusion" in message
    assert prepare_refusals(RAW_PLAN, tmp_path) == [message]  # prepare's words, exactly


def test_qcow2_base_that_is_raw_is_refused_with_prepares_words(tmp_path: Path) -> None:
    build_tree(tmp_path)
    replace_base(tmp_path, PLAN.disks[1], "-f", "raw")
    with pytest.raises(Refused) as err:
        check_images(PLAN, vmi_uid=UID, path_prefix=str(tmp_path))
    assert "is raw, but the plan says qcow2" in str(err.value)
    assert prepare_refusals(replace(PLAN, persist_root=None), tmp_path) == [str(err.value)]


def test_base_larger_than_the_image_is_refused_as_prepare_refuses_it(tmp_path: Path) -> None:
    build_tree(tmp_path)
    replace_base(tmp_path, PLAN.disks[1], "-f", "qcow2", size="3G")  # scratch is planned (and made) 2 GiB
    with pytest.raises(Refused) as err:
        check_images(PLAN, vmi_uid=UID, path_prefix=str(tmp_path))
    assert "smaller than its base almalinux-9 (3221225472 bytes)" in str(err.value)
    assert prepare_refusals(replace(PLAN, persist_root=None), tmp_path) == [str(err.value)]


def test_image_larger_than_planned_is_accepted_and_reported_as_prepare_keeps_it(tmp_path: Path) -> None:
    """prepare keeps it (never shrinks) with a warning on its log line; the sidecar accepts it and
    hands the same fact to its own log line."""
    from hooksidecar.images import LargerImage

    build_tree(tmp_path)
    _pgdata(tmp_path).unlink()
    qemu_img("create", "-f", "qcow2", str(_pgdata(tmp_path)), "3G")  # planned 1 GiB
    facts = check_images(PLAN, vmi_uid=UID, path_prefix=str(tmp_path))
    assert facts == ImageFacts(persist_root_base_format="qcow2", larger_than_planned=(
        LargerImage("pgdata", PLAN.disks[0].launcher_path, 3 * GiB, 1 * GiB),))
    plan = replace(PLAN, persist_root=None)
    kept = [a for a in plan_actions(plan, inspect(plan, prefix=str(tmp_path)), vmi_uid=UID)
            if isinstance(a, Unchanged) and a.planned_size is not None]
    assert [(a.volume, a.virtual_size, a.planned_size) for a in kept] == [("pgdata", 3 * GiB, 1 * GiB)]


def test_a_planned_size_off_the_sector_grid_is_compared_as_prepare_rounds_it(tmp_path: Path) -> None:
    """prepare makes a disk planned at 1 GiB - 100 bytes 1 GiB big (qemu's 512-byte sectors): not
    larger than planned, for either."""
    plan = replace(PLAN, disks=(replace(PLAN.disks[0], size_bytes=GiB - 100),), persist_root=None)
    build_tree(tmp_path, replace(plan, disks=(PLAN.disks[0],)))
    assert check_images(plan, vmi_uid=UID, path_prefix=str(tmp_path)) == ImageFacts()
    assert [type(a) for a in plan_actions(plan, inspect(plan, prefix=str(tmp_path)), vmi_uid=UID)] \
        == [Unchanged]
