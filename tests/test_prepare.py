"""The prepare step (``hooksidecar.prepare``) against real files and the real ``qemu-img``.

Every test runs the command as a subprocess (``python -m hooksidecar.prepare``) with
``--path-prefix`` pointing at a per-test directory laid out like the launcher's filesystem; the
qcow2 headers must nevertheless carry the launcher paths. ``qemu-img`` must be installed: without it
these tests fail (they do not skip). ``TMPDIR`` points nowhere, proving the init container needs no
writable /tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.plan import Backing, DetachedDisk, PersistRoot, Plan, PlanKeys, PlannedDisk, sign_plan
from hooksidecar import prepare
from hooksidecar.prepare.files import TMP_INFIX
from tests.conftest import ROOT

MiB = 1 << 20
KEYS = PlanKeys(current=b"prepare-tests-plan-key-0123456789")
HOST_DIR = "/var/lib/diskhooks/vms/vms/fedora-data"
LIBRARY = "/var/lib/diskhooks/images"
SIDECAR = "ghcr.io/diskhooks/diskhooks-sidecar:0.1.0"
VMI_UID = "6a1e5f3c-1d2b-4c3a-9e8f-0123456789ab"
ROOT_IMAGE = "quay.io/containerdisks/fedora:41"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def qemu_img() -> str:
    exe = shutil.which("qemu-img")
    assert exe is not None, "qemu-img is required for these tests (apt-get install -y qemu-utils)"
    return exe


def test_qemu_img_is_installed() -> None:
    qemu_img()


def make_disk(name: str, size: int, backing: Backing | None = None) -> PlannedDisk:
    return PlannedDisk(name=name, size_bytes=size, bus="virtio", cache="none", io="native",
                       discard="unmap", backing=backing)


def make_plan(*disks: PlannedDisk, persist: PersistRoot | None = None) -> Plan:
    has_backing = any(d.backing for d in disks)
    return Plan(namespace="vms", vm="fedora-data", host_dir=HOST_DIR,
                image_library=LIBRARY if has_backing else None, sidecar_image=SIDECAR,
                disks=tuple(disks), persist_root=persist)


class Node:
    """A directory laid out like the prepare container's view of the node."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)

    def path(self, launcher_path: str) -> Path:
        return self.root / launcher_path.lstrip("/")

    def mount_volume(self, volume: str) -> Path:
        d = self.path(K.launcher_disk_dir(volume))
        d.mkdir(parents=True, exist_ok=True)
        return d

    def library(self) -> Path:
        d = self.path(K.LAUNCHER_IMAGE_LIBRARY)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def vm_dir(self) -> Path:
        d = self.path(K.LAUNCHER_VM_DIR)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def container_disk(self, index: int, content: bytes | None = None, *, qcow2_size: int = 0) -> Path:
        d = self.path(f"{K.LAUNCHER_IMAGE_VOLUMES}/disk_{index}/disk")
        d.mkdir(parents=True, exist_ok=True)
        f = d / "disk.img"
        if f.exists():
            f.unlink()
        if qcow2_size:
            qimg("create", "-q", "-f", "qcow2", str(f), str(qcow2_size))
        else:
            f.write_bytes(content or b"")
        return f


def qimg(*args: str) -> str:
    return subprocess.run([qemu_img(), *args], check=True, capture_output=True, text=True).stdout


def qinfo(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qimg("info", "-f", "qcow2", "--output=json", str(path)))
    return out


def run_prepare(node: Node, plan: Plan | str, *, uid: str | None = VMI_UID, from_env: bool = False,
                preexec: Callable[[], None] | None = None,
                wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    text = plan if isinstance(plan, str) else sign_plan(plan, KEYS)
    env = {"PATH": os.environ["PATH"], "TMPDIR": "/nonexistent-tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    if uid is not None:
        env[K.ENV_VMI_UID] = uid
    if from_env:
        env[K.ENV_PLAN] = text
        source = ["--plan-from-env"]
    else:
        plan_file = node.root.parent / f"{node.root.name}-plan.json"
        plan_file.write_text(text)
        source = ["--plan", str(plan_file)]
    argv = [*(wrap or []), sys.executable, "-m", "hooksidecar.prepare", *source,
            "--path-prefix", str(node.root)]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec, check=False)


def summaries(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    return {s["volume"]: s for s in lines}


def snapshot(d: Path) -> dict[str, tuple[int, str, int, int]]:
    """name -> (mtime_ns, sha256, uid, mode) of every entry below ``d``."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(d))] = (st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest(),
                                          st.st_uid, st.st_mode & 0o7777)
    return out


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(node: Node) -> list[str]:
    return [str(p) for p in node.root.rglob(f"*{TMP_INFIX}*")]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path / "node")


def library_base(node: Node, name: str, fmt: str, size: int) -> Backing:
    path = node.library() / name
    qimg("create", "-q", "-f", fmt, str(path), str(size))
    return Backing(image=name.split(".")[0], file=name, format=fmt)


# ------------------------------------------------------------------------------------------------
# creating, re-running, growing
# ------------------------------------------------------------------------------------------------
def test_creates_missing_images_with_planned_size_and_backing(node: Node) -> None:
    node.mount_volume("data")
    node.mount_volume("scratch")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    plan = make_plan(make_disk("data", 64 * MiB), make_disk("scratch", 32 * MiB, base))

    proc = run_prepare(node, plan)
    result = summaries(proc)

    assert result["data"]["result"] == "created"
    assert result["scratch"]["result"] == "created"
    data = qinfo(node.path(plan.disks[0].launcher_path))
    assert data["virtual-size"] == 64 * MiB
    assert "backing-filename" not in data
    scratch = qinfo(node.path(plan.disks[1].launcher_path))
    assert scratch["virtual-size"] == 32 * MiB
    # the header names the launcher path, not the prefixed one prepare opened
    assert scratch["backing-filename"] == "/var/run/kubevirt-private/diskhooks/images/almalinux-9.qcow2"
    assert scratch["backing-filename-format"] == "qcow2"
    for d in plan.disks:
        st = node.path(d.launcher_path).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (K.QEMU_UID, K.QEMU_GID, 0o660)
    assert leftovers(node) == []


def test_detached_disks_of_a_version_2_plan_are_left_alone(node: Node) -> None:
    """Detached disks (plan version 2) are only the webhook's memory: prepare creates no image
    for them and never touches the one that is still on the node."""
    node.mount_volume("data")
    node.mount_volume("old")
    summaries(run_prepare(node, make_plan(make_disk("old", 32 * MiB))))
    before = snapshot(node.root)
    plan = replace(make_plan(make_disk("data", 16 * MiB)), detached=(DetachedDisk("old", 32 * MiB),))
    assert json.loads(sign_plan(plan, KEYS))["version"] == 2
    result = summaries(run_prepare(node, plan))
    assert list(result) == ["data"] and result["data"]["result"] == "created"
    assert {k: v for k, v in snapshot(node.root).items() if k in before} == before


def test_plan_from_env_and_raw_base(node: Node) -> None:
    node.mount_volume("data")
    base = library_base(node, "debian-12.raw", "raw", 4 * MiB)
    plan = make_plan(make_disk("data", 16 * MiB, base))
    result = summaries(run_prepare(node, plan, from_env=True))
    assert result["data"] == {"volume": "data", "result": "created", "path": plan.disks[0].launcher_path,
                              "virtualSize": 16 * MiB, "backing": base.launcher_path,
                              "backingFormat": "raw", "baseRecord": "written", "baseHashed": True,
                              "baseSha256": sha256_of(node.path(base.launcher_path))}
    info = qinfo(node.path(plan.disks[0].launcher_path))
    assert (info["backing-filename"], info["backing-filename-format"]) == (base.launcher_path, "raw")


def test_second_run_changes_nothing(node: Node) -> None:
    node.mount_volume("data")
    node.mount_volume("scratch")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    plan = make_plan(make_disk("data", 64 * MiB), make_disk("scratch", 32 * MiB, base))
    summaries(run_prepare(node, plan))
    before = snapshot(node.root)

    result = summaries(run_prepare(node, plan))

    assert {v: s["result"] for v, s in result.items()} == {"data": "unchanged", "scratch": "unchanged"}
    assert snapshot(node.root) == before


def test_unaligned_size_is_rounded_once_and_then_stable(node: Node) -> None:
    node.mount_volume("data")
    plan = make_plan(make_disk("data", 10 * MiB + 1))
    summaries(run_prepare(node, plan))
    assert qinfo(node.path(plan.disks[0].launcher_path))["virtual-size"] == 10 * MiB + 512
    assert summaries(run_prepare(node, plan))["data"]["result"] == "unchanged"


def test_larger_size_grows_plain_and_backed_images(node: Node) -> None:
    node.mount_volume("data")
    node.mount_volume("scratch")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    small = make_plan(make_disk("data", 16 * MiB), make_disk("scratch", 16 * MiB, base))
    summaries(run_prepare(node, small))
    big = make_plan(make_disk("data", 48 * MiB), make_disk("scratch", 40 * MiB, base))

    result = summaries(run_prepare(node, big))

    assert result["data"] == {"volume": "data", "result": "grown", "path": big.disks[0].launcher_path,
                              "fromSize": 16 * MiB, "virtualSize": 48 * MiB}
    assert result["scratch"]["result"] == "grown"
    assert qinfo(node.path(big.disks[0].launcher_path))["virtual-size"] == 48 * MiB
    scratch = qinfo(node.path(big.disks[1].launcher_path))
    assert scratch["virtual-size"] == 40 * MiB
    # growing opened the base where prepare sees it but left the header's launcher path alone
    assert scratch["backing-filename"] == base.launcher_path
    assert scratch["backing-filename-format"] == "qcow2"


def test_resize_opens_only_the_files_it_is_given(tmp_path: Path) -> None:
    """qemu-img resize opens the backing chain; prepare checks the image and its base first, and
    resize must then open exactly those files, never a backing file named in a header (here a
    name that does not exist: opening it would fail). The header's names stay as they were."""
    from hooksidecar import qemuimg

    plain = tmp_path / "plain.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/nonexistent/other.raw", "-u", str(plain),
         str(8 * MiB))
    base = tmp_path / "base.qcow2"  # a base that is itself an overlay: the chain stops at the base
    qimg("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/nonexistent/further.raw", "-u", str(base),
         str(8 * MiB))
    overlay = tmp_path / "overlay.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "/launcher/base.qcow2", "-u", str(overlay),
         str(8 * MiB))

    qemuimg.resize(str(plain), size=16 * MiB)
    qemuimg.resize(str(overlay), size=16 * MiB, backing=(str(base), "qcow2"))

    assert (qinfo(plain)["virtual-size"], qinfo(plain)["backing-filename"]) == \
        (16 * MiB, "/nonexistent/other.raw")
    assert (qinfo(overlay)["virtual-size"], qinfo(overlay)["backing-filename"]) == \
        (16 * MiB, "/launcher/base.qcow2")


def test_image_larger_than_planned_is_kept_as_it_is_and_said_so(node: Node) -> None:
    """A VM re-created under the same name with a smaller disk, or a platform that lowered
    maxDiskSize: the bigger image on the node is kept (never shrunk, its data intact), prepare
    says so on its log line, the other volumes are prepared, and the sidecar accepts it too."""
    from hooksidecar.images import check_images

    node.mount_volume("data")
    node.mount_volume("other")
    summaries(run_prepare(node, make_plan(make_disk("data", 32 * MiB))))
    before = snapshot(node.root)
    plan = make_plan(make_disk("data", 16 * MiB), make_disk("other", 8 * MiB))

    result = summaries(run_prepare(node, plan))

    assert result["data"]["result"] == "unchanged"
    assert result["data"]["virtualSize"] == 32 * MiB
    assert result["data"]["plannedSize"] == 16 * MiB
    assert "larger than planned" in result["data"]["warning"]
    assert "never shrinks" in result["data"]["warning"]
    assert result["other"]["result"] == "created"
    assert {k: v for k, v in snapshot(node.root).items() if k in before} == before
    assert qinfo(node.path(plan.disks[0].launcher_path))["virtual-size"] == 32 * MiB
    check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))  # same decision at OnDefineDomain


def test_overlay_larger_than_its_base_is_kept_when_planned_smaller(node: Node) -> None:
    """The base size only limits the size of an overlay prepare creates: an existing overlay that
    is already at least as big as its base is kept, like any image larger than planned."""
    node.mount_volume("data")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 32 * MiB)
    summaries(run_prepare(node, make_plan(make_disk("data", 48 * MiB, base))))
    result = summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB, base))))
    assert (result["data"]["result"], result["data"]["virtualSize"]) == ("unchanged", 48 * MiB)


def test_base_larger_than_planned_size_is_refused(node: Node) -> None:
    node.mount_volume("data")
    base = library_base(node, "big.qcow2", "qcow2", 64 * MiB)
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB, base)))
    assert proc.returncode == 1
    assert "smaller than its base" in proc.stderr
    assert not node.path("/var/run/kubevirt-private/vmi-disks/data/data.qcow2").exists()


# ------------------------------------------------------------------------------------------------
# unsafe existing images
# ------------------------------------------------------------------------------------------------
def test_raw_file_named_qcow2_is_refused_untouched(node: Node) -> None:
    d = node.mount_volume("data")
    raw = d / "data.qcow2"
    with open(raw, "wb") as fh:  # what KubeVirt's DiskOrCreate makes: a sparse raw file
        fh.truncate(32 * MiB)
    before = snapshot(node.root)

    proc = run_prepare(node, make_plan(make_disk("data", 32 * MiB)))

    assert proc.returncode == 1
    assert "volume data:" in proc.stderr
    assert "is not a qcow2 image (raw file? KubeVirt creates raw files when prepare did not run)" \
        in proc.stderr
    assert f"{HOST_DIR}/data.qcow2" in proc.stderr  # says which node file to look at
    assert snapshot(node.root) == before


def _l1_table_offset(image: Path) -> int:
    with image.open("rb") as fh:
        fh.seek(40)
        return int.from_bytes(fh.read(8), "big")


def _set_version(image: Path, version: int) -> None:
    with image.open("r+b") as fh:
        fh.seek(4)
        fh.write(version.to_bytes(4, "big"))


DAMAGED: list[tuple[str, Callable[[Path], None], str]] = [
    ("qcow2 cut after its header", lambda p: os.truncate(p, 1024), "lies beyond the end of the file"),
    ("qcow2 cut inside its L1 table", lambda p: os.truncate(p, _l1_table_offset(p) + 4),
     "L1 table"),
    ("qcow2 header cut short", lambda p: os.truncate(p, 40), "truncated qcow2 header"),
    ("qcow2 header of an unknown version", lambda p: _set_version(p, 7), "unsupported qcow2 version 7"),
    ("zero-length file", lambda p: os.truncate(p, 0), "is empty (0 bytes)"),
]


@pytest.mark.parametrize("label, damage, words", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_image_is_refused_untouched_by_prepare_and_the_sidecar(
        node: Node, label: str, damage: Callable[[Path], None], words: str) -> None:
    """A qcow2 file whose header or tables are cut off or garbled is neither grown nor handed on:
    qemu-img info reads a file cut after its header without complaint (and resize writes into
    it), so the header's own table offsets are checked against the file size."""
    from diskplan.errors import Refused
    from hooksidecar.images import check_images

    node.mount_volume("data")
    summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB))))
    damage(node.path(K.launcher_disk_dir("data")) / "data.qcow2")
    before = snapshot(node.root)
    plan = make_plan(make_disk("data", 32 * MiB))  # would grow it

    proc = run_prepare(node, plan)

    assert proc.returncode == 1, proc.stdout
    assert "volume data:" in proc.stderr and words in proc.stderr, proc.stderr
    assert f"{HOST_DIR}/data.qcow2" in proc.stderr
    assert snapshot(node.root) == before
    with pytest.raises(Refused) as err:
        check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))
    assert str(err.value).startswith("volume data:") and words in str(err.value), str(err.value)


def test_qcow2_with_external_data_file_is_refused(node: Node) -> None:
    d = node.mount_volume("data")
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={d}/data.bin", str(d / "data.qcow2"),
         str(16 * MiB))
    before = snapshot(node.root)
    proc = run_prepare(node, make_plan(make_disk("data", 32 * MiB)))
    assert proc.returncode == 1
    assert "external data file" in proc.stderr and "data.bin" in proc.stderr
    assert snapshot(node.root) == before  # not grown


def test_backing_file_outside_the_allowed_directories_is_refused(node: Node) -> None:
    d = node.mount_volume("data")
    qimg("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", "-u", str(d / "data.qcow2"),
         str(16 * MiB))
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB)))
    assert proc.returncode == 1
    assert "'/etc/shadow'" in proc.stderr
    assert "outside the VM directory and the image library" in proc.stderr


@pytest.mark.parametrize("backing", [
    "../../../../../etc/shadow",  # relative: qemu resolves it from the image's directory
    f"{K.LAUNCHER_IMAGE_LIBRARY}/../../../../../etc/shadow",  # starts like the library, escapes it
    "almalinux-9.qcow2",  # relative, in the image's own directory
])
def test_backing_file_escaping_with_dot_dot_or_relative_is_refused(node: Node, backing: str) -> None:
    from diskplan.errors import Refused
    from hooksidecar.images import check_images

    d = node.mount_volume("data")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    qimg("create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, "-u", str(d / "data.qcow2"),
         str(16 * MiB))
    before = snapshot(node.root)
    for plan in (make_plan(make_disk("data", 32 * MiB)), make_plan(make_disk("data", 32 * MiB, base))):
        proc = run_prepare(node, plan)
        assert proc.returncode == 1
        assert f"backing file {backing!r}" in proc.stderr
        assert "outside the VM directory and the image library" in proc.stderr, proc.stderr
        assert snapshot(node.root) == before
        with pytest.raises(Refused, match="unexpected backing files"):
            check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))


def test_backing_file_other_than_the_planned_one_is_refused(node: Node) -> None:
    d = node.mount_volume("data")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    library_base(node, "other.qcow2", "qcow2", 8 * MiB)
    qimg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f"{K.LAUNCHER_IMAGE_LIBRARY}/other.qcow2",
         "-u", str(d / "data.qcow2"), str(16 * MiB))
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB, base)))
    assert proc.returncode == 1
    assert "other.qcow2" in proc.stderr and "almalinux-9.qcow2" in proc.stderr


def test_symlinked_image_is_refused(node: Node, tmp_path: Path) -> None:
    d = node.mount_volume("data")
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "disk.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(target), str(16 * MiB))
    (d / "data.qcow2").symlink_to(target)
    os.chmod(target, 0o600)
    before = snapshot(target.parent)
    proc = run_prepare(node, make_plan(make_disk("data", 32 * MiB)))
    assert proc.returncode == 1
    assert "symbolic link" in proc.stderr
    assert snapshot(target.parent) == before  # not grown, not given to qemu (owner, mode) through the link


def test_directory_in_place_of_the_image_is_refused(node: Node) -> None:
    (node.mount_volume("data") / "data.qcow2").mkdir()
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB)))
    assert proc.returncode == 1 and "not a regular file" in proc.stderr


def test_fifo_in_place_of_the_image_is_refused_without_blocking(node: Node) -> None:
    os.mkfifo(node.mount_volume("data") / "data.qcow2")  # opening it for reading would block
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB)))
    assert proc.returncode == 1 and "not a regular file" in proc.stderr


def test_qcow2_version_2_image_is_used_and_grown(node: Node) -> None:
    """An image made with compat=0.10 (qcow2 version 2, e.g. by an old tool) is a valid qcow2
    image: kept, grown in place (still version 2), and accepted by the sidecar."""
    from hooksidecar.images import check_images

    d = node.mount_volume("data")
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "data.qcow2"), str(16 * MiB))
    assert summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB))))["data"]["result"] == \
        "unchanged"
    plan = make_plan(make_disk("data", 32 * MiB))
    assert summaries(run_prepare(node, plan))["data"]["result"] == "grown"
    info = qinfo(d / "data.qcow2")
    assert (info["virtual-size"], info["format-specific"]["data"]["compat"]) == (32 * MiB, "0.10")
    check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))


def _base_is_an_overlay(p: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f"{K.LAUNCHER_IMAGE_LIBRARY}/older.qcow2",
         "-u", str(p), str(8 * MiB))


def _base_with_data_file(p: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={p.parent / 'data.raw'}", str(p), str(8 * MiB))


def _base_symlink(p: Path) -> None:
    real = p.with_name("almalinux-9-2026.qcow2")
    qimg("create", "-q", "-f", "qcow2", str(real), str(8 * MiB))
    p.symlink_to(real.name)


def _base_cut_short(p: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", str(p), str(8 * MiB))
    os.truncate(p, 4096)


UNUSABLE_BASES: list[tuple[str, Callable[[Path], object], str]] = [
    ("base is itself an overlay", _base_is_an_overlay, "library bases must be self-contained"),
    ("base has an external data file", _base_with_data_file, "external data file"),
    ("base is a symbolic link", _base_symlink, "is a symbolic link"),
    ("base is cut short", _base_cut_short, "lies beyond the end of the file"),
    ("base is a FIFO", lambda p: os.mkfifo(p), "not a regular file"),
    ("base is empty", lambda p: p.write_bytes(b""), "is raw, but the plan says qcow2"),
]


@pytest.mark.parametrize("label, make_base, words", UNUSABLE_BASES, ids=[u[0] for u in UNUSABLE_BASES])
def test_unusable_library_base_is_refused_and_nothing_created(node: Node, label: str,
                                                               make_base: Callable[[Path], object],
                                                               words: str) -> None:
    """The chain is the image and its base, nothing further: a base must be a regular,
    self-contained qcow2 (or raw) file, checked before any overlay is made on it."""
    from diskplan.errors import Refused
    from hooksidecar.images import check_images

    d = node.mount_volume("data")
    make_base(node.library() / "almalinux-9.qcow2")
    backing = Backing("almalinux-9", "almalinux-9.qcow2", "qcow2")
    plan = make_plan(make_disk("data", 16 * MiB, backing))
    proc = run_prepare(node, plan)
    assert proc.returncode == 1
    assert "volume data:" in proc.stderr and words in proc.stderr, proc.stderr
    assert list(d.iterdir()) == []
    # the sidecar checks the same base under an overlay made as prepare makes it
    qimg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing.launcher_path, "-u",
         str(d / "data.qcow2"), str(16 * MiB))
    with pytest.raises(Refused, match="^volume data: "):
        check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))


def test_missing_volume_directory_is_refused_naming_the_pod_volume(node: Node) -> None:
    node.mount_volume("data")
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB), make_disk("logs", 16 * MiB)))
    assert proc.returncode == 1
    assert "volume logs:" in proc.stderr
    assert "/var/run/kubevirt-private/vmi-disks/logs is not mounted" in proc.stderr
    assert "hostPath volume 'logs'" in proc.stderr
    assert not node.path("/var/run/kubevirt-private/vmi-disks/data/data.qcow2").exists()


def test_missing_library_base_is_refused(node: Node) -> None:
    node.mount_volume("data")
    node.library()
    plan = make_plan(make_disk("data", 16 * MiB, Backing("almalinux-9", "almalinux-9.qcow2", "qcow2")))
    proc = run_prepare(node, plan)
    assert proc.returncode == 1
    assert f"{LIBRARY}/almalinux-9.qcow2" in proc.stderr and "does not exist" in proc.stderr


def test_library_base_in_another_format_than_planned_is_refused(node: Node) -> None:
    node.mount_volume("data")
    library_base(node, "almalinux-9.raw", "qcow2", 8 * MiB)  # a qcow2 file named and planned as raw
    plan = make_plan(make_disk("data", 16 * MiB, Backing("almalinux-9", "almalinux-9.raw", "raw")))
    proc = run_prepare(node, plan)
    assert proc.returncode == 1
    assert "is qcow2, but the plan says raw" in proc.stderr


# ------------------------------------------------------------------------------------------------
# malformed input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, field", [
    (lambda b: b.update(hostDir="/var/lib/diskhooks/../../etc"), "hostDir"),
    (lambda b: b["disks"][0].update(name="../etc"), "disks[0].name"),
    (lambda b: b["disks"][0].update(backing={"image": "x", "file": "../x.qcow2", "format": "qcow2"}),
     "backing.file"),
    (lambda b: b["disks"][0].update(sizeBytes=-1), "sizeBytes"),
    (lambda b: b.update(version=4), "version"),
    (lambda b: b.update(detached=[{"name": "old", "sizeBytes": 1}]), "detached"),  # version 1: unknown
])
def test_malformed_plan_exits_2(node: Node, mutate: Callable[[dict[str, Any]], None],
                                field: str) -> None:
    node.mount_volume("data")
    body = make_plan(make_disk("data", 16 * MiB)).body()
    mutate(body)
    proc = run_prepare(node, json.dumps(body))
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr
    assert list(node.root.rglob("*.qcow2")) == []


def test_unreadable_plan_exits_2(node: Node) -> None:
    assert run_prepare(node, "{not json").returncode == 2
    proc = run_prepare(node, "", from_env=True)
    assert proc.returncode == 2 and K.ENV_PLAN in proc.stderr


@pytest.mark.parametrize("from_env", [False, True])
@pytest.mark.parametrize("deep", ["[" * 60000, '{"version":' + "[" * 60000])
def test_deeply_nested_plan_exits_2(node: Node, deep: str, from_env: bool) -> None:
    proc = run_prepare(node, deep, from_env=from_env)
    assert proc.returncode == 2, proc.stderr
    assert "diskhooks.io/plan: the plan is nested too deeply" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_deeply_nested_base_record_is_invalid_not_a_crash(tmp_path: Path) -> None:
    record = tmp_path / "persist-root.rootdisk.base.json"
    record.write_text("[" * 60000)
    assert prepare.read_marker(str(record)) == prepare.MarkerState("invalid", "is not JSON")


def test_persist_root_without_vmi_uid_exits_2(node: Node) -> None:
    plan = make_plan(persist=PersistRoot("rootdisk", ROOT_IMAGE, 0))
    proc = run_prepare(node, plan, uid=None)
    assert proc.returncode == 2 and K.ENV_VMI_UID in proc.stderr


# ------------------------------------------------------------------------------------------------
# failures while acting leave nothing half-made
# ------------------------------------------------------------------------------------------------
def test_failure_after_qemu_img_created_the_file_leaves_nothing_behind(node: Node) -> None:
    """uid 0 without CAP_CHOWN (setpriv): qemu-img makes the temporary image, the chown to 107
    fails, and neither the temporary nor the final file may remain."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed for this test"
    d = node.mount_volume("data")
    wrap = [setpriv, "--bounding-set=-all,+dac_override", "--inh-caps=-all", "--no-new-privs", "--"]
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB)), wrap=wrap)
    assert proc.returncode == 1
    assert "volume data:" in proc.stderr and "CHOWN capability" in proc.stderr
    assert list(d.iterdir()) == []


def test_failed_qemu_img_leaves_no_temporary_file(node: Node) -> None:
    d = node.mount_volume("data")
    d2 = node.mount_volume("huge")
    # qcow2 with 64 KiB clusters cannot address 2^58 bytes: qemu-img create fails
    proc = run_prepare(node, make_plan(make_disk("data", 16 * MiB), make_disk("huge", 1 << 58)))
    assert proc.returncode == 1
    assert "volume huge: qemu-img create failed:" in proc.stderr
    assert "too large for file format 'qcow2'" in proc.stderr
    assert list(d2.iterdir()) == []
    # the volume done before the failure is complete and reported
    assert json.loads(proc.stdout)["volume"] == "data"
    assert qinfo(d / "data.qcow2")["virtual-size"] == 16 * MiB
    assert leftovers(node) == []


def test_a_new_image_swapped_for_a_link_is_not_followed_when_given_to_qemu(node: Node,
                                                                        tmp_path: Path) -> None:
    """Between qemu-img create and the chmod/chown, the new file is replaced by a symbolic link to
    another file (a race by anyone who can write the VM's directory): prepare must not change that
    file's mode or owner, and must leave neither the link nor an image behind. The real qemu-img runs;
    a wrapper only plays the racing writer once it has finished."""
    d = node.mount_volume("data")
    victim = tmp_path / "victim"
    victim.write_bytes(b"not an image")
    os.chmod(victim, 0o600)
    racer = tmp_path / "qemu-img-then-swap"
    racer.write_text(f"""#!{sys.executable}
import os, subprocess, sys
rc = subprocess.call([{qemu_img()!r}, *sys.argv[1:]])
if rc == 0 and sys.argv[1] == "create":
    os.unlink(sys.argv[-2])
    os.symlink({str(victim)!r}, sys.argv[-2])
sys.exit(rc)
""")
    os.chmod(racer, 0o755)
    plan = make_plan(make_disk("data", 16 * MiB))
    actions = prepare.plan_actions(plan, prepare.inspect(plan, prefix=str(node.root)), vmi_uid=None)

    with pytest.raises(prepare.ApplyError) as err:
        prepare.apply(actions, prefix=str(node.root), owner=(K.QEMU_UID, K.QEMU_GID), binary=str(racer))

    assert "symbolic link" in err.value.reason
    st = victim.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (os.geteuid(), os.getegid(), 0o600)
    assert list(d.iterdir()) == []


def test_stale_temporary_file_of_a_killed_run_is_removed(node: Node) -> None:
    d = node.mount_volume("data")
    stale = d / ".data.qcow2.tmp-0123456789abcdef"
    stale.write_bytes(b"half")
    unrelated = d / ".data.qcow2.tmp-keep"
    unrelated.write_bytes(b"not ours")
    summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB))))
    assert not stale.exists() and unrelated.exists()


def test_temporary_name_left_linked_to_the_image_is_removed_on_the_next_run(node: Node) -> None:
    """A run killed between publishing the image (a hard link to its final name) and removing the
    temporary name leaves a second, hidden name of the live image: it would keep the image's data
    on the node after the image is deleted to discard it. The next run removes it, whatever it
    does with the image."""
    d = node.mount_volume("data")
    node.mount_volume("logs")
    plan = make_plan(make_disk("data", 16 * MiB), make_disk("logs", 16 * MiB))
    summaries(run_prepare(node, plan))
    linked = d / ".data.qcow2.tmp-0123456789abcdef"
    os.link(d / "data.qcow2", linked)
    stale = node.path(K.launcher_disk_dir("logs")) / ".logs.qcow2.tmp-fedcba9876543210"
    stale.write_bytes(b"half")
    image_before = snapshot(d)["data.qcow2"]

    result = summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB),
                                                   make_disk("logs", 32 * MiB))))

    assert (result["data"]["result"], result["logs"]["result"]) == ("unchanged", "grown")
    assert leftovers(node) == []
    assert snapshot(d)["data.qcow2"] == image_before
    assert (d / "data.qcow2").stat().st_nlink == 1


# ------------------------------------------------------------------------------------------------
# persistent containerDisk root
# ------------------------------------------------------------------------------------------------
PERSIST = PersistRoot(volume="rootdisk", image=ROOT_IMAGE, volume_index=0)


def persist_layout(node: Node, *, qcow2_size: int = 0, content: bytes = b"") -> Path:
    node.vm_dir()
    return node.container_disk(0, content, qcow2_size=qcow2_size)


def test_persist_root_first_start_creates_overlay_and_base_record(node: Node) -> None:
    base = persist_layout(node, qcow2_size=24 * MiB)
    plan = make_plan(persist=PERSIST)

    result = summaries(run_prepare(node, plan))

    assert result["rootdisk"]["result"] == "created"
    overlay = node.path(PERSIST.launcher_path)
    info = qinfo(overlay)
    assert info["virtual-size"] == 24 * MiB
    assert info["backing-filename"] == "/var/run/kubevirt/container-disks/disk_0.img"
    assert info["backing-filename-format"] == "qcow2"
    marker = json.loads(node.path(PERSIST.marker_path).read_text())
    assert marker == {"image": ROOT_IMAGE, "sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
                      "format": "qcow2", "virtualSize": 24 * MiB, "vmiUID": VMI_UID,
                      "overlay": "persist-root.rootdisk.qcow2"}
    for p in (overlay, node.path(PERSIST.marker_path)):
        st = p.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (107, 107, 0o660)


def test_persist_root_raw_base_same_base_later_start_updates_only_the_vmi_uid(node: Node) -> None:
    persist_layout(node, content=b"\x00" * 1024 * 1024 + b"raw root")  # 1 MiB + 8 bytes
    plan = make_plan(persist=PERSIST)
    summaries(run_prepare(node, plan))
    info = qinfo(node.path(PERSIST.launcher_path))
    assert info["backing-filename-format"] == "raw"
    overlay_before = snapshot(node.path(K.LAUNCHER_VM_DIR))["persist-root.rootdisk.qcow2"]

    again = summaries(run_prepare(node, plan))  # same start (init container restarted)
    assert again["rootdisk"]["result"] == "unchanged"
    later = summaries(run_prepare(node, plan, uid="11111111-2222-3333-4444-555555555555"))

    assert later["rootdisk"]["result"] == "unchanged"
    after = snapshot(node.path(K.LAUNCHER_VM_DIR))
    assert after["persist-root.rootdisk.qcow2"] == overlay_before
    marker = json.loads(node.path(PERSIST.marker_path).read_text())
    assert marker["vmiUID"] == "11111111-2222-3333-4444-555555555555"
    assert after["persist-root.rootdisk.base.json"][2:] == (107, 0o660)


def test_persist_root_changed_base_is_refused_and_the_overlay_kept(node: Node) -> None:
    persist_layout(node, qcow2_size=24 * MiB)
    summaries(run_prepare(node, make_plan(persist=PERSIST)))
    before = snapshot(node.root)
    node.container_disk(0, qcow2_size=32 * MiB)  # the tag now points at different content
    changed = snapshot(node.root)

    same_ref = run_prepare(node, make_plan(persist=PERSIST), uid="another-start")
    new_ref = run_prepare(node, make_plan(persist=replace(PERSIST, image="quay.io/containerdisks/fedora:42")),
                          uid="another-start")

    for proc in (same_ref, new_ref):
        assert proc.returncode == 1
        assert "volume rootdisk: the base image changed" in proc.stderr
        assert "holds the writes made on the old base" in proc.stderr
        assert "pin the VM's containerDisk to the digest of the old image" in proc.stderr
        assert f"delete {HOST_DIR}/persist-root.rootdisk.qcow2 on the node" in proc.stderr
    assert f"the content behind {ROOT_IMAGE!r} changed" in same_ref.stderr
    assert "the image reference changed from" in new_ref.stderr
    assert snapshot(node.root) == changed  # neither the overlay nor the record was touched
    assert {k: v for k, v in before.items() if "disk_0" not in k} == \
        {k: v for k, v in changed.items() if "disk_0" not in k}


def test_persist_root_same_content_under_a_pinned_reference_is_accepted(node: Node) -> None:
    persist_layout(node, qcow2_size=24 * MiB)
    summaries(run_prepare(node, make_plan(persist=PERSIST)))
    pinned = replace(PERSIST, image="quay.io/containerdisks/fedora@sha256:" + "ab" * 32)
    result = summaries(run_prepare(node, make_plan(persist=pinned), uid="later-start"))
    assert result["rootdisk"]["result"] == "unchanged"
    marker = json.loads(node.path(PERSIST.marker_path).read_text())
    assert (marker["image"], marker["vmiUID"]) == (pinned.image, "later-start")


def test_persist_root_deleted_overlay_starts_afresh(node: Node) -> None:
    persist_layout(node, qcow2_size=24 * MiB)
    summaries(run_prepare(node, make_plan(persist=PERSIST)))
    node.container_disk(0, qcow2_size=32 * MiB)
    node.path(PERSIST.launcher_path).unlink()  # what the refusal tells the user to do
    result = summaries(run_prepare(node, make_plan(persist=PERSIST)))
    assert result["rootdisk"]["result"] == "created"
    assert qinfo(node.path(PERSIST.launcher_path))["virtual-size"] == 32 * MiB


def test_persist_root_overlay_without_record_is_refused(node: Node) -> None:
    persist_layout(node, qcow2_size=24 * MiB)
    summaries(run_prepare(node, make_plan(persist=PERSIST)))
    node.path(PERSIST.marker_path).unlink()
    proc = run_prepare(node, make_plan(persist=PERSIST))
    assert proc.returncode == 1 and "its base record" in proc.stderr


def test_persist_root_needs_the_image_volume(node: Node) -> None:
    node.vm_dir()
    proc = run_prepare(node, make_plan(persist=PERSIST))
    assert proc.returncode == 1
    assert "ImageVolume mode" in proc.stderr
    assert "/var/run/kubevirt-image-volume/disk_0" in proc.stderr


def test_persist_root_container_disk_cut_short_is_refused(node: Node) -> None:
    """The containerDisk's content is the VM owner's choice: a qcow2 file cut after its header is
    refused before any overlay is made on it."""
    os.truncate(persist_layout(node, qcow2_size=24 * MiB), 4096)
    proc = run_prepare(node, make_plan(persist=PERSIST))
    assert proc.returncode == 1
    assert "volume rootdisk:" in proc.stderr and "lies beyond the end of the file" in proc.stderr
    assert list(node.vm_dir().iterdir()) == []


def test_persist_root_container_disk_with_two_files_is_refused(node: Node) -> None:
    base = persist_layout(node, content=b"x" * 4096)
    (base.parent / "second.img").write_bytes(b"y")
    proc = run_prepare(node, make_plan(persist=PERSIST))
    assert proc.returncode == 1 and "exactly one file" in proc.stderr


# ------------------------------------------------------------------------------------------------
# contract with the hook sidecar and the init container's capabilities
# ------------------------------------------------------------------------------------------------
def test_what_prepare_makes_passes_the_sidecar_image_checks(node: Node) -> None:
    from hooksidecar.images import check_images

    node.mount_volume("data")
    node.mount_volume("scratch")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    persist_layout(node, qcow2_size=24 * MiB)
    plan = make_plan(make_disk("data", 64 * MiB), make_disk("scratch", 32 * MiB, base), persist=PERSIST)
    summaries(run_prepare(node, plan))

    facts = check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))
    assert facts.persist_root_base_format == "qcow2"


def test_runs_with_only_chown_and_dac_override(node: Node) -> None:
    """The init container keeps CHOWN and DAC_OVERRIDE only (no FOWNER), with no_new_privs:
    emulated with setpriv's bounding set, on a VM directory KubeVirt chowned to 107 and an
    existing image owned by 107."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed for this test"
    d = node.mount_volume("data")
    node.mount_volume("new")
    summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB))))
    os.chown(d, 107, 107)
    os.chmod(d, 0o755)
    os.chown(node.path(K.launcher_disk_dir("new")), 107, 107)
    vm = node.vm_dir()
    os.chown(vm, 107, 107)
    persist_layout(node, qcow2_size=8 * MiB)
    plan = make_plan(make_disk("data", 32 * MiB), make_disk("new", 8 * MiB), persist=PERSIST)
    wrap = [setpriv, "--bounding-set=-all,+chown,+dac_override", "--inh-caps=-all", "--no-new-privs",
            "--"]

    result = summaries(run_prepare(node, plan, wrap=wrap))

    assert {v: s["result"] for v, s in result.items()} == \
        {"data": "grown", "new": "created", "rootdisk": "created"}
    again = summaries(run_prepare(node, plan, wrap=wrap, uid="later-start"))
    assert again["rootdisk"]["result"] == "unchanged"


# ------------------------------------------------------------------------------------------------
# owner and mode of images prepare did not create this time
# ------------------------------------------------------------------------------------------------
def _owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


QEMU_OWNED = (K.QEMU_UID, K.QEMU_GID, 0o660)


def test_grown_and_unchanged_images_are_given_to_qemu(node: Node) -> None:
    """An existing image keeps whatever owner and mode it had (restored from a backup, copied by an
    admin...): prepare makes it qemu's 107:107 0660 whether it grows it or leaves it as it is."""
    assert os.geteuid() == 0, "this test needs root (as the init container runs)"
    node.mount_volume("data")
    node.mount_volume("scratch")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB), make_disk("scratch", 32 * MiB, base))))
    data, scratch = node.path(K.launcher_disk_dir("data")) / "data.qcow2", \
        node.path(K.launcher_disk_dir("scratch")) / "scratch.qcow2"
    os.chown(data, 0, 0)
    os.chmod(data, 0o600)
    os.chown(scratch, 107, 107)
    os.chmod(scratch, 0o4644)

    result = summaries(run_prepare(node, make_plan(make_disk("data", 48 * MiB),
                                                   make_disk("scratch", 32 * MiB, base))))

    assert (result["data"]["result"], result["scratch"]["result"]) == ("grown", "unchanged")
    assert _owner_mode(data) == QEMU_OWNED and _owner_mode(scratch) == QEMU_OWNED
    assert result["data"]["ownership"] == {"/var/run/kubevirt-private/vmi-disks/data/data.qcow2":
                                           "0:0 0600 -> 107:107 0660"}
    assert qinfo(data)["virtual-size"] == 48 * MiB
    again = summaries(run_prepare(node, make_plan(make_disk("data", 48 * MiB),
                                                  make_disk("scratch", 32 * MiB, base))))
    assert "ownership" not in again["data"] and "ownership" not in again["scratch"]


def test_persist_root_overlay_and_record_are_given_to_qemu(node: Node) -> None:
    persist_layout(node, qcow2_size=8 * MiB)
    plan = make_plan(persist=PERSIST)
    summaries(run_prepare(node, plan))
    overlay, record = node.path(PERSIST.launcher_path), node.path(PERSIST.marker_path)
    for f in (overlay, record):
        os.chown(f, 0, 0)
        os.chmod(f, 0o600)

    result = summaries(run_prepare(node, plan))  # the same start again: nothing to write

    assert result["rootdisk"]["result"] == "unchanged"
    assert _owner_mode(overlay) == QEMU_OWNED and _owner_mode(record) == QEMU_OWNED
    assert set(result["rootdisk"]["ownership"]) == {PERSIST.launcher_path, PERSIST.marker_path}


def _setpriv(*caps: str) -> list[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed for this test"
    return [setpriv, f"--bounding-set=-all{''.join(',+' + c for c in caps)}", "--inh-caps=-all",
            "--no-new-privs", "--"]


def test_images_are_given_to_qemu_with_chown_and_dac_override_only(node: Node) -> None:
    """Without FOWNER root may not chmod a file it does not own: a 107-owned image with a wrong mode
    is taken, given its mode, and handed back."""
    node.mount_volume("data")
    node.mount_volume("logs")
    summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB), make_disk("logs", 16 * MiB))))
    data, logs = (node.path(K.launcher_disk_dir(v)) / f"{v}.qcow2" for v in ("data", "logs"))
    os.chown(data, 107, 107)
    os.chmod(data, 0o600)
    os.chown(logs, 0, 0)
    os.chmod(logs, 0o600)

    result = summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB), make_disk("logs", 32 * MiB)),
                                   wrap=_setpriv("chown", "dac_override")))

    assert (result["data"]["result"], result["logs"]["result"]) == ("unchanged", "grown")
    assert _owner_mode(data) == QEMU_OWNED and _owner_mode(logs) == QEMU_OWNED


def test_an_image_that_cannot_be_given_to_qemu_is_refused(node: Node) -> None:
    node.mount_volume("data")
    summaries(run_prepare(node, make_plan(make_disk("data", 16 * MiB))))
    data = node.path(K.launcher_disk_dir("data")) / "data.qcow2"
    os.chown(data, 0, 0)
    os.chmod(data, 0o600)

    proc = run_prepare(node, make_plan(make_disk("data", 32 * MiB)), wrap=_setpriv("dac_override"))

    assert proc.returncode == 1, proc.stderr
    assert ("volume data: /var/run/kubevirt-private/vmi-disks/data/data.qcow2: is 0:0 0600 and cannot be "
            "given to qemu's 107:107 with mode 0660") in proc.stderr
    assert "needs the CHOWN capability" in proc.stderr
    assert qinfo(data)["virtual-size"] == 16 * MiB  # refused before anything was grown


# ------------------------------------------------------------------------------------------------
# the pure core, table by table (no files)
# ------------------------------------------------------------------------------------------------
SHA_A, SHA_B = "a" * 64, "b" * 64
OVERLAY_OK = prepare.FileState("qcow2", virtual_size=24 * MiB, backing_file=PERSIST.base_path,
                               backing_format="qcow2")
BASE_A = prepare.BaseObservation(True, None, "disk.img", "qcow2", 24 * MiB, SHA_A)


def _record(sha: str = SHA_A, uid: str = VMI_UID, image: str = ROOT_IMAGE) -> dict[str, Any]:
    return prepare.marker_record(image=image, sha256=sha, fmt="qcow2", virtual_size=24 * MiB,
                                 vmi_uid=uid, overlay=PERSIST.file)


@pytest.mark.parametrize("overlay, marker, expected", [
    (prepare.FileState("missing"), prepare.MarkerState("missing"), ["WriteMarker", "CreateImage"]),
    (prepare.FileState("missing"), prepare.MarkerState("ok", record=_record(SHA_B)),
     ["WriteMarker", "CreateImage"]),  # the overlay was deleted to discard its writes
    (prepare.FileState("missing"), prepare.MarkerState("invalid", "is a symbolic link", replaceable=False),
     ["Refuse"]),
    (OVERLAY_OK, prepare.MarkerState("ok", record=_record()), ["Unchanged"]),
    (OVERLAY_OK, prepare.MarkerState("ok", record=_record(uid="old")), ["WriteMarker", "Unchanged"]),
    (OVERLAY_OK, prepare.MarkerState("ok", record=_record(SHA_B)), ["Refuse"]),
    (OVERLAY_OK, prepare.MarkerState("missing"), ["Refuse"]),
    (OVERLAY_OK, prepare.MarkerState("invalid", "is not JSON"), ["Refuse"]),
    (replace(OVERLAY_OK, backing_file="/var/run/kubevirt/container-disks/disk_1.img"),
     prepare.MarkerState("ok", record=_record()), ["Refuse"]),
    (replace(OVERLAY_OK, data_file="/x"), prepare.MarkerState("ok", record=_record()), ["Refuse"]),
    (prepare.FileState("raw", file_size=1), prepare.MarkerState("ok", record=_record()), ["Refuse"]),
])
def test_persist_root_decisions(overlay: prepare.FileState, marker: prepare.MarkerState,
                                expected: list[str]) -> None:
    observed = prepare.Observed(disks={}, persist_root=prepare.PersistObservation(True, BASE_A, overlay,
                                                                                 marker))
    actions = prepare.plan_actions(make_plan(persist=PERSIST), observed, vmi_uid=VMI_UID)
    assert [type(a).__name__ for a in actions] == expected
    for a in actions:
        if isinstance(a, prepare.WriteMarker):
            assert a.record == _record()


@pytest.mark.parametrize("image, planned, expected", [
    (prepare.FileState("missing"), 10 * MiB, "CreateImage"),
    (prepare.FileState("qcow2", virtual_size=10 * MiB), 10 * MiB, "Unchanged"),
    (prepare.FileState("qcow2", virtual_size=10 * MiB), 10 * MiB - 100, "Unchanged"),  # rounds to 512
    (prepare.FileState("qcow2", virtual_size=10 * MiB), 20 * MiB, "GrowImage"),
    (prepare.FileState("qcow2", virtual_size=20 * MiB), 10 * MiB, "Unchanged"),  # never shrunk
    (prepare.FileState("qcow2", virtual_size=10 * MiB, corrupt=True), 10 * MiB, "Refuse"),
    (prepare.FileState("qcow2", virtual_size=10 * MiB, encrypted=True), 10 * MiB, "Refuse"),
    (prepare.FileState("qcow2", virtual_size=10 * MiB, unknown_features=1 << 9), 10 * MiB, "Refuse"),
    (prepare.FileState("bad-qcow2", "truncated"), 10 * MiB, "Refuse"),
    (prepare.FileState("not-regular"), 10 * MiB, "Refuse"),
])
def test_disk_decisions(image: prepare.FileState, planned: int, expected: str) -> None:
    observed = prepare.Observed(disks={"data": prepare.DiskObservation(True, image)})
    actions = prepare.plan_actions(make_plan(make_disk("data", planned)), observed, vmi_uid=None)
    assert [type(a).__name__ for a in actions] == [expected]


# ------------------------------------------------------------------------------------------------
# the base record of a library-backed disk (<disk>.base.json)
# ------------------------------------------------------------------------------------------------
def _record_path(node: Node, disk: PlannedDisk) -> Path:
    return node.path(disk.base_record_path)


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtimeNs": st.st_mtime_ns,
            "ctimeNs": st.st_ctime_ns}


def _backed_layout(node: Node, fmt: str = "qcow2") -> tuple[Plan, Path]:
    node.mount_volume("data")
    name = f"almalinux-9.{fmt}"
    base = library_base(node, name, fmt, 8 * MiB)
    if fmt == "raw":  # content to tell bases apart
        node.path(base.launcher_path).write_bytes(os.urandom(8 * MiB))
    return make_plan(make_disk("data", 32 * MiB, base)), node.path(base.launcher_path)


def _replace_base(path: Path, content: bytes, *, same_times: bool = True) -> None:
    """The platform team copies a new base over the old one under the same name (a new file moved
    in); with ``same_times`` it even keeps the old mtime (``cp -p``, rsync -t)."""
    st = path.stat()
    new = path.with_name(".incoming")
    new.write_bytes(content)
    if same_times:
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)


def test_new_overlay_on_a_library_base_gets_a_base_record_first(node: Node) -> None:
    plan, base = _backed_layout(node, "raw")
    disk = plan.disks[0]

    result = summaries(run_prepare(node, plan))["data"]

    record = json.loads(_record_path(node, disk).read_text())
    assert record == {"base": "almalinux-9", "file": "almalinux-9.raw", "format": "raw",
                      "virtualSize": 8 * MiB, "sha256": sha256_of(base), "overlay": "data.qcow2",
                      "identity": _identity(base)}
    assert (result["result"], result["baseRecord"], result["baseHashed"], result["baseSha256"]) == \
        ("created", "written", True, sha256_of(base))
    assert _owner_mode(_record_path(node, disk)) == QEMU_OWNED
    assert qinfo(node.path(disk.launcher_path))["backing-filename"] == disk.backing.launcher_path  # type: ignore[union-attr]
    assert leftovers(node) == []


def test_base_record_is_written_before_the_overlay(node: Node) -> None:
    """An overlay never exists without its record: when the overlay cannot be made (here qemu-img
    refuses the size), the record is already there and no overlay is."""
    node.mount_volume("huge")
    base = library_base(node, "almalinux-9.qcow2", "qcow2", 8 * MiB)
    disk = make_disk("huge", 1 << 58, base)
    proc = run_prepare(node, make_plan(disk))
    assert proc.returncode == 1 and "qemu-img create failed" in proc.stderr
    assert _record_path(node, disk).exists() and not node.path(disk.launcher_path).exists()
    # the next run finds the record still right for the base and only makes the overlay
    assert [type(a).__name__ for a in prepare.plan_actions(
        make_plan(disk), prepare.inspect(make_plan(disk), prefix=str(node.root)), vmi_uid=None)] == \
        ["KeepBaseRecord", "CreateImage"]


def test_later_start_with_the_base_unchanged_does_not_hash_it(node: Node) -> None:
    plan, base = _backed_layout(node)
    summaries(run_prepare(node, plan))
    before = snapshot(node.root)

    result = summaries(run_prepare(node, plan))["data"]

    assert (result["result"], result["baseRecord"], result["baseHashed"]) == ("unchanged", "kept", False)
    assert result["baseSha256"] == sha256_of(base)
    assert snapshot(node.root) == before  # record and overlay untouched


def test_fast_path_trusts_the_identity_and_reads_nothing(node: Node) -> None:
    """The fast path takes the recorded SHA-256 when the identity matches: shown with a record
    whose sha256 was edited (the base is not read, so the edit is not noticed), then with its
    identity edited too (the base is hashed again and the mismatch refused)."""
    plan, _ = _backed_layout(node)
    summaries(run_prepare(node, plan))
    path = _record_path(node, plan.disks[0])
    record = json.loads(path.read_text())
    record["sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    result = summaries(run_prepare(node, plan))["data"]
    assert (result["baseHashed"], result["baseSha256"]) == (False, "0" * 64)

    record["identity"]["ino"] += 1
    path.write_text(json.dumps(record))
    proc = run_prepare(node, plan)
    assert proc.returncode == 1 and "changed since the overlay" in proc.stderr


@pytest.mark.parametrize("how", ["new file moved in", "overwritten in place"])
def test_replaced_base_with_the_same_size_is_refused_and_nothing_changed(node: Node, how: str) -> None:
    from diskplan.errors import Refused
    from hooksidecar.images import check_images

    plan, base = _backed_layout(node, "raw")
    summaries(run_prepare(node, plan))
    old_sha = sha256_of(base)
    new = os.urandom(8 * MiB)  # same size, other content
    if how == "new file moved in":
        _replace_base(base, new)
    else:
        st = base.stat()
        with base.open("r+b") as fh:  # cp new old: same inode, same size
            fh.write(new)
        os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the old mtime
    assert base.stat().st_size == 8 * MiB
    before = snapshot(node.path(K.launcher_disk_dir("data")))

    proc = run_prepare(node, replace(plan, disks=(replace(plan.disks[0], size_bytes=64 * MiB),)))

    assert proc.returncode == 1, proc.stdout
    assert (f"volume data: the base image almalinux-9 ({LIBRARY}/almalinux-9.raw) changed since the "
            f"overlay {HOST_DIR}/data.qcow2 was made on it (sha256 {old_sha} -> {sha256_of(base)})") \
        in proc.stderr
    assert "Restore the old base" in proc.stderr and "rebases the overlay" in proc.stderr
    assert f"deleting {HOST_DIR}/data.qcow2 and {HOST_DIR}/data.base.json" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert snapshot(node.path(K.launcher_disk_dir("data"))) == before  # not grown, record kept
    assert qinfo(node.path(plan.disks[0].launcher_path))["virtual-size"] == 32 * MiB
    # the sidecar refuses the same start on the identity alone
    with pytest.raises(Refused, match=r"^volume data: the base image almalinux-9 .* changed since the "
                       r"diskhooks-prepare init container checked it"):
        check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))


@pytest.mark.parametrize("how", ["touched", "copied back"])
def test_base_with_the_same_content_under_a_new_identity_is_accepted(node: Node, how: str) -> None:
    from hooksidecar.images import check_images

    plan, base = _backed_layout(node, "raw")
    summaries(run_prepare(node, plan))
    old_identity = _identity(base)
    if how == "touched":
        os.utime(base)
    else:  # copied away and back (a restore from a backup)
        _replace_base(base, base.read_bytes(), same_times=False)
    assert _identity(base) != old_identity

    result = summaries(run_prepare(node, plan))["data"]

    assert (result["result"], result["baseRecord"], result["baseHashed"]) == \
        ("unchanged", "identity-updated", True)
    record = json.loads(_record_path(node, plan.disks[0]).read_text())
    assert record["identity"] == _identity(base) and record["sha256"] == sha256_of(base)
    assert _owner_mode(_record_path(node, plan.disks[0])) == QEMU_OWNED
    check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))
    again = summaries(run_prepare(node, plan))["data"]
    assert (again["baseRecord"], again["baseHashed"]) == ("kept", False)


def test_overlay_made_before_base_records_is_adopted_with_a_warning(node: Node) -> None:
    """Trust on first use: an overlay an earlier diskhooks made has no record; its base is
    recorded as it is now, and the log line says so."""
    plan, base = _backed_layout(node)
    disk = plan.disks[0]
    qimg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk.backing.launcher_path, "-u",  # type: ignore[union-attr]
         str(node.path(disk.launcher_path)), str(32 * MiB))

    result = summaries(run_prepare(node, plan))["data"]

    assert (result["result"], result["baseRecord"], result["baseHashed"]) == \
        ("unchanged", "adopted", True)
    assert "has no base record" in result["warning"] and "recorded as it is now" in result["warning"]
    assert json.loads(_record_path(node, disk).read_text())["sha256"] == sha256_of(base)
    again = summaries(run_prepare(node, plan))["data"]
    assert (again["baseRecord"], "warning" in again) == ("kept", False)


def test_adopting_while_growing_keeps_both_parts_of_the_log_line(node: Node) -> None:
    plan, _ = _backed_layout(node)
    disk = plan.disks[0]
    qimg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk.backing.launcher_path, "-u",  # type: ignore[union-attr]
         str(node.path(disk.launcher_path)), str(16 * MiB))
    result = summaries(run_prepare(node, plan))["data"]
    assert (result["result"], result["baseRecord"]) == ("grown", "adopted")
    assert _record_path(node, disk).exists()


@pytest.mark.parametrize("label, spoil, words", [
    ("not JSON", lambda p: p.write_text("{"), "is not JSON"),
    ("fields missing", lambda p: p.write_text('{"sha256": "x"}'), "does not have the fields"),
    ("another base", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                          "file": "rocky-9.qcow2"})),
     "names the base 'rocky-9.qcow2'"),
    ("a symbolic link", lambda p: (p.unlink(), p.symlink_to("/etc/hostname")), "is a symbolic link"),
])
def test_unusable_base_record_of_an_existing_overlay_is_refused(node: Node, label: str,
                                                                spoil: Callable[[Path], object],
                                                                words: str) -> None:
    plan, _ = _backed_layout(node)
    summaries(run_prepare(node, plan))
    spoil(_record_path(node, plan.disks[0]))
    before = snapshot(node.root)
    proc = run_prepare(node, plan)
    assert proc.returncode == 1
    assert "volume data: the base record" in proc.stderr and words in proc.stderr, proc.stderr
    assert snapshot(node.root) == before


def test_deleted_overlay_gets_a_fresh_record_on_the_new_base(node: Node) -> None:
    """Deleting the overlay (and not the record) discards its writes: the next start records the
    base as it is and makes a new overlay on it."""
    plan, base = _backed_layout(node, "raw")
    summaries(run_prepare(node, plan))
    _replace_base(base, os.urandom(8 * MiB))
    node.path(plan.disks[0].launcher_path).unlink()
    result = summaries(run_prepare(node, plan))["data"]
    assert (result["result"], result["baseRecord"], result["baseSha256"]) == \
        ("created", "written", sha256_of(base))


def test_hashing_a_base_is_streamed_under_an_address_space_limit(node: Node) -> None:
    """A base larger than prepare's whole address space is hashed: it is never read into memory."""
    import resource

    node.mount_volume("data")
    base = node.library() / "big.raw"
    with base.open("wb") as fh:
        fh.truncate(768 * MiB)
        fh.seek(700 * MiB)
        fh.write(b"not only zeros")
    plan = make_plan(make_disk("data", 1024 * MiB, Backing("big", "big.raw", "raw")))
    limit = 512 * MiB

    def cap() -> None:  # soft limit only: qemu-img children still set their own 1 GiB
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    result = summaries(run_prepare(node, plan, preexec=cap))["data"]
    assert (result["result"], result["baseHashed"]) == ("created", True)
    digest = hashlib.sha256()
    with base.open("rb") as rh:
        while chunk := rh.read(MiB):
            digest.update(chunk)
    assert result["baseSha256"] == digest.hexdigest()


@pytest.mark.parametrize("name", ["data", "persist-root", "root"])
def test_record_names_meet_no_other_name_prepare_uses(name: str) -> None:
    disk = make_disk(name, MiB)
    persist = PersistRoot(volume=name, image=ROOT_IMAGE, volume_index=0)
    others = {disk.file, persist.file, persist.marker}
    assert disk.base_record == f"{name}.base.json" and disk.base_record not in others
    assert not disk.base_record.startswith(".")  # temporary names start with a dot
