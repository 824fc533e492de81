"""What prepare checked is what ``qemu-img`` opens: a file swapped between the check and qemu-img's
open is never read or written (``hooksidecar/qemuimg.py`` hands the checked descriptor over as
``/proc/self/fd/<n>``; ``hooksidecar/prepare/checked.py`` checks the image again, through that
descriptor, just before a resize).

The swap is made where it hurts most, after every check and before qemu-img opens anything: a
``qemu-img`` earlier in ``PATH`` moves the checked image aside, puts another file at its path, then
runs the real qemu-img. The other file is a qcow2 image whose header names an external data file
(``data_file``), a file outside the VM's directory: opened by path, qemu-img would open that file,
and grow it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from hooksidecar import qemuimg
from tests.test_prepare import MiB, Node, make_disk, make_plan, qemu_img, qimg, qinfo, run_prepare

GiB = 1024 * MiB


def test_info_reads_the_descriptor_it_is_given_not_the_path(tmp_path: Path) -> None:
    checked, other = tmp_path / "disk.qcow2", tmp_path / "other.qcow2"
    qimg("create", "-q", "-f", "qcow2", str(checked), str(64 * MiB))
    qimg("create", "-q", "-f", "qcow2", str(other), str(128 * MiB))
    fd = os.open(checked, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.replace(other, checked)  # the path now names another file
        assert qemuimg.info(str(checked), fmt="qcow2", fd=fd).virtual_size == 64 * MiB
        assert qemuimg.info(str(checked), fmt="qcow2").virtual_size == 128 * MiB  # by path: the other
    finally:
        os.close(fd)


def test_a_failure_names_the_path_not_the_descriptor(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    fd = os.open(raw, os.O_RDONLY)
    try:
        qemuimg.info(str(raw), fmt="qcow2", fd=fd)
    except qemuimg.QemuImgError as exc:
        assert str(raw) in exc.reason and "/proc/self/fd" not in exc.reason, exc.reason
    else:
        raise AssertionError("a raw file read as qcow2 must fail")
    finally:
        os.close(fd)


class Swapper:
    """The ``qemu-img`` of ``PATH`` that, once, for ``sub``: moves ``path`` to ``<path>.checked``,
    puts ``hostile`` in its place, then runs the real qemu-img."""

    def __init__(self, work: Path, *, sub: str, path: Path, hostile: Path) -> None:
        self.bin = work / "bin"
        self.bin.mkdir()
        self.todo = work / "swap-once"
        self.todo.touch()
        (self.bin / "qemu-img").write_text(f"""#!/bin/sh
if [ "$1" = {sub} ] && [ -f {self.todo} ]; then
  rm {self.todo}
  mv {path} {path}.checked
  mv {hostile} {path}
fi
exec {qemu_img()} "$@"
""")
        (self.bin / "qemu-img").chmod(0o755)

    def wrap(self) -> list[str]:
        return ["env", f"PATH={self.bin}:{os.environ['PATH']}"]


def hostile_image(path: Path, victim: Path, size: int) -> None:
    """A qcow2 image whose data lives in ``victim`` (an external data file, made ``size`` bytes)."""
    victim.write_bytes(b"victim data" * 100)
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={victim},data_file_raw=on", str(path), str(size))


def state(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def test_inspection_reads_the_image_it_checked(tmp_path: Path) -> None:
    """Swapped just before ``qemu-img info``: inspection still reads the image it checked (its
    header and qemu-img agree), so the VM's image is found as planned and left as it is."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    node.mount_volume("data")
    plan = make_plan(make_disk("data", 64 * MiB))
    assert run_prepare(node, plan).returncode == 0
    image = node.path(plan.disks[0].launcher_path)
    victim = tmp_path / "victim.raw"
    hostile_image(tmp_path / "hostile.qcow2", victim, 128 * MiB)
    swap = Swapper(tmp_path, sub="info", path=image, hostile=tmp_path / "hostile.qcow2")
    victim_before = state(victim)

    proc = run_prepare(node, plan, wrap=swap.wrap())
    assert not swap.todo.exists(), "the swap happened"
    # by path, qemu-img info read the hostile image: 128 MiB against the checked header's 64 MiB
    assert proc.returncode == 0, proc.stderr
    assert '"result": "unchanged"' in proc.stdout
    assert state(victim) == victim_before


def test_growing_writes_the_image_it_checked_never_the_file_put_in_its_place(tmp_path: Path) -> None:
    """Swapped just before ``qemu-img resize``: the image that was checked (moved aside by the
    swap) is the one grown; the file put in its place and the data file its header names are not
    touched. By path, qemu-img would have grown the hostile image and with it the data file."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    node.mount_volume("data")
    assert run_prepare(node, make_plan(make_disk("data", GiB))).returncode == 0
    image = node.path(make_plan(make_disk("data", GiB)).disks[0].launcher_path)
    victim = tmp_path / "victim.raw"
    hostile_image(tmp_path / "hostile.qcow2", victim, GiB)
    swap = Swapper(tmp_path, sub="resize", path=image, hostile=tmp_path / "hostile.qcow2")
    victim_before = state(victim)

    proc = run_prepare(node, make_plan(make_disk("data", 2 * GiB)), wrap=swap.wrap())
    assert not swap.todo.exists(), "the swap happened"
    assert proc.returncode == 0, proc.stderr
    assert qinfo(Path(f"{image}.checked"))["virtual-size"] == 2 * GiB  # the checked image grew
    assert qinfo(image)["virtual-size"] == GiB  # the hostile one did not
    assert state(victim) == victim_before
    check = subprocess.run([qemu_img(), "check", "-f", "qcow2", f"{image}.checked"],
                           capture_output=True, check=False)
    assert check.returncode == 0


def test_an_image_changed_before_the_resize_is_not_grown(tmp_path: Path) -> None:
    """Replaced by the hostile image between inspection and apply (before prepare opens it for the
    resize): the check through the descriptor refuses it, naming the image and the reason."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    node.mount_volume("data")
    plan = make_plan(make_disk("data", GiB))
    assert run_prepare(node, plan).returncode == 0
    image = node.path(plan.disks[0].launcher_path)
    victim = tmp_path / "victim.raw"
    hostile_image(tmp_path / "hostile.qcow2", victim, GiB)
    victim_before = state(victim)
    # qemu-img info of inspection is the last thing before apply: swap right after it
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "qemu-img").write_text(f"""#!/bin/sh
{qemu_img()} "$@"; status=$?
if [ "$1" = info ] && [ -f {tmp_path}/hostile.qcow2 ]; then mv {tmp_path}/hostile.qcow2 {image}; fi
exit $status
""")
    (tmp_path / "bin" / "qemu-img").chmod(0o755)
    proc = run_prepare(node, make_plan(make_disk("data", 2 * GiB)),
                       wrap=["env", f"PATH={tmp_path / 'bin'}:{os.environ['PATH']}"])
    assert proc.returncode == 1
    assert ("volume data: /var/run/kubevirt-private/vmi-disks/data/data.qcow2: changed while prepare "
            "was running (its header names an external data file, encryption or unknown features); "
            "not grown, run prepare again") in proc.stderr, proc.stderr
    assert qinfo(image)["virtual-size"] == GiB
    assert state(victim) == victim_before
