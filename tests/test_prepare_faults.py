"""Faults during prepare, with real processes, signals and filesystems: ``qemu-img`` killed at each of
its writes (creating and growing), prepare itself killed while ``qemu-img`` is half-way, two prepare
runs for one VM at once, a filesystem that fills up.

``qemu-img`` is the real one; where a fault must hit it at a chosen point, a ``qemu-img`` earlier in
``PATH`` runs the real binary under ``strace`` fault injection (``-e inject=pwrite64:signal=...``:
the signal arrives as the Nth ``pwrite64`` starts), so the image is cut exactly where qemu's own
writes are. strace counts per thread, so that wrapper also gives qemu-img a single I/O thread
(``--object main-loop,thread-pool-max=1``): its Nth write is then the image's Nth write. A full filesystem is a small tmpfs mounted in a private mount namespace (``unshare
--mount``) over the disk's directory; what is left there is listed from inside the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from diskplan import keys as K
from diskplan.plan import Plan, sign_plan
from tests.conftest import ROOT
from tests.test_prepare import KEYS, MiB, Node, leftovers, make_disk, make_plan, qemu_img, qinfo, run_prepare

GiB = 1024 * MiB


def strace() -> str:
    exe = shutil.which("strace")
    assert exe is not None, "strace is required for these tests (scripts/setup.sh installs it)"
    return exe


class FaultyQemuImg:
    """A ``qemu-img`` for ``PATH``: the real one, but for the subcommand named in ``fault`` it runs
    under strace with ``inject`` (e.g. ``pwrite64:signal=KILL:when=3``); no fault file, no fault."""

    def __init__(self, work: Path) -> None:
        self.bin = work / "bin"
        self.bin.mkdir(parents=True)
        self.fault = work / "fault"
        script = self.bin / "qemu-img"
        script.write_text(f"""#!/bin/sh
if [ -f {self.fault} ]; then
  read sub inject < {self.fault}
  if [ "$1" = "$sub" ]; then
    shift
    exec {strace()} -f -qq -o /dev/null -e trace=pwrite64 -e inject=$inject \
      {qemu_img()} "$sub" --object main-loop,id=one-io-thread,thread-pool-max=1 "$@"
  fi
fi
exec {qemu_img()} "$@"
""")
        script.chmod(0o755)

    def set(self, sub: str | None, inject: str = "") -> None:
        if sub is None:
            self.fault.unlink(missing_ok=True)
        else:
            self.fault.write_text(f"{sub} {inject}\n")

    def wrap(self) -> list[str]:
        return ["env", f"PATH={self.bin}:{os.environ['PATH']}"]


def qemu_check(path: Path) -> subprocess.CompletedProcess[str]:
    """``qemu-img check``: exit 0 clean, 3 leaked clusters only (harmless), 2 corrupt."""
    return subprocess.run([qemu_img(), "check", "-f", "qcow2", str(path)], capture_output=True,
                          text=True, check=False, timeout=60)


def test_qemu_img_killed_at_each_write_while_creating_leaves_no_image(tmp_path: Path) -> None:
    """SIGKILL at the 1st, 2nd... ``pwrite64`` of ``qemu-img create``: prepare fails naming the
    volume, no image and no temporary file is left, and the next run creates a sound image."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    disk_dir = node.mount_volume("data")
    plan = make_plan(make_disk("data", 1024 * GiB))
    image = node.path(plan.disks[0].launcher_path)
    faulty = FaultyQemuImg(tmp_path)
    killed = 0
    for n in range(1, 40):
        faulty.set("create", f"pwrite64:signal=KILL:when={n}")
        proc = run_prepare(node, plan, wrap=faulty.wrap())
        if proc.returncode == 0:  # fewer than n writes: nothing was killed
            break
        killed += 1
        assert proc.returncode == 1, proc.stderr
        assert "volume data: qemu-img create was killed by SIGKILL" in proc.stderr, proc.stderr
        assert sorted(p.name for p in disk_dir.iterdir()) == [], "nothing half-made is left"
        faulty.set(None)
        again = run_prepare(node, plan)
        assert again.returncode == 0, again.stderr
        assert qinfo(image)["virtual-size"] == 1024 * GiB
        assert qemu_check(image).returncode == 0
        image.unlink()
    assert killed >= 5, "qemu-img create writes its header, refcount table and block, L1 table"
    assert leftovers(node) == []


def test_qemu_img_killed_at_each_write_while_growing_leaves_a_sound_image(tmp_path: Path) -> None:
    """``qemu-img resize`` grows the image in place; SIGKILL at each of its writes (a 1 GiB image
    grown to 4 TiB needs a larger L1 table and more refcount blocks): the image left is never
    corrupt (``qemu-img check``: clean, or leaked clusters only), its size is the old or the new one,
    and the next run grows it to the planned size."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    node.mount_volume("data")
    small, big = make_plan(make_disk("data", GiB)), make_plan(make_disk("data", 4096 * GiB))
    image = node.path(small.disks[0].launcher_path)
    faulty = FaultyQemuImg(tmp_path)
    killed = 0
    for n in range(1, 40):
        assert run_prepare(node, small).returncode == 0
        assert qinfo(image)["virtual-size"] == GiB
        faulty.set("resize", f"pwrite64:signal=KILL:when={n}")
        proc = run_prepare(node, big, wrap=faulty.wrap())
        faulty.set(None)
        if proc.returncode == 0:
            break
        killed += 1
        assert "volume data: qemu-img resize was killed by SIGKILL" in proc.stderr, proc.stderr
        check = qemu_check(image)
        assert check.returncode in (0, 3), f"killed at write {n}: {check.stdout}{check.stderr}"
        assert qinfo(image)["virtual-size"] in (GiB, 4096 * GiB)
        again = run_prepare(node, big)
        assert again.returncode == 0, again.stderr
        assert qinfo(image)["virtual-size"] == 4096 * GiB
        assert qemu_check(image).returncode in (0, 3)
        image.unlink()
    assert killed >= 3
    assert qinfo(image)["virtual-size"] == 4096 * GiB
    assert leftovers(node) == []


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in map(int, children):
        out += [child, *_descendants(child)]
    return out


def _stopped(pid: int) -> bool:
    """Whether a thread of ``pid`` is stopped (by a signal or its tracer)."""
    try:
        stats = [t.read_text() for t in Path(f"/proc/{pid}/task").glob("*/stat")]
    except OSError:
        return False
    return any(st.rsplit(")", 1)[1].split()[0] in ("T", "t") for st in stats)


def test_prepare_killed_while_qemu_img_is_half_way_the_next_run_cleans_up(tmp_path: Path) -> None:
    """The whole init container dies (SIGKILL to prepare, then to what it started) while
    ``qemu-img create`` is held (by its tracer) before the fifth of its writes: a half-written temporary file stays
    beside the image's name, never under it; the next run removes it and creates the image."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    disk_dir = node.mount_volume("data")
    plan = make_plan(make_disk("data", 1024 * GiB))
    faulty = FaultyQemuImg(tmp_path)
    faulty.set("create", "pwrite64:delay_enter=60000000:when=5")  # held 60 s before its 5th write
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(sign_plan(plan, KEYS))
    env = {"PATH": f"{faulty.bin}:{os.environ['PATH']}", "PYTHONDONTWRITEBYTECODE": "1",
           K.ENV_VMI_UID: "6a1e5f3c-1d2b-4c3a-9e8f-0123456789ab"}
    proc = subprocess.Popen([sys.executable, "-m", "hooksidecar.prepare", "--plan", str(plan_file),
                             "--path-prefix", str(node.root)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: list[int] = []
    try:
        deadline, held = time.monotonic() + 30, 0
        while held < 10:  # stopped by its tracer for 10 polls in a row: the held write
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-img was not held at its fifth write"
            held = held + 1 if any(_stopped(p) for p in _descendants(proc.pid)[1:]) else 0
            time.sleep(0.02)
        children = _descendants(proc.pid)  # the wrapper exec'd into strace, then qemu-img
    finally:
        proc.kill()
        proc.wait(10)
        for pid in reversed(children):  # qemu-img first, then its tracer: only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.2)
    left = sorted(p.name for p in disk_dir.iterdir())
    assert len(left) == 1 and left[0].startswith(".data.qcow2.tmp-"), left
    assert (disk_dir / left[0]).stat().st_size > 0, "the temporary file is half-written"
    assert not (disk_dir / "data.qcow2").exists()

    again = run_prepare(node, plan)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in disk_dir.iterdir()) == ["data.qcow2"]
    assert qinfo(disk_dir / "data.qcow2")["virtual-size"] == 1024 * GiB
    assert qemu_check(disk_dir / "data.qcow2").returncode == 0


def test_two_prepares_at_once_for_one_vm_both_succeed(tmp_path: Path) -> None:
    """Two prepare runs for the same VM start together (a slow ``qemu-img create``, 0.5 s, makes
    them overlap for sure): the second waits for the first (hooksidecar/prepare/lock.py), then
    finds the images made. Both exit 0, the images are the planned ones, nothing is left over.
    (Without the lock the second one failed: the image "appeared while prepare was creating it".)"""
    node = Node(tmp_path / "node")
    node.vm_dir()
    for vol in ("data", "logs"):
        node.mount_volume(vol)
    plan = make_plan(make_disk("data", 64 * GiB), make_disk("logs", 8 * GiB))
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "qemu-img").write_text(f'#!/bin/sh\n[ "$1" = create ] && sleep 0.5\nexec {qemu_img()} "$@"\n')
    (slow / "qemu-img").chmod(0o755)
    wrap = ["env", f"PATH={slow}:{os.environ['PATH']}"]
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(run_prepare(node, plan, wrap=wrap)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    outcomes = sorted(tuple(sorted(json.loads(ln)["result"] for ln in r.stdout.splitlines()))
                      for r in results)
    assert outcomes == [("created", "created"), ("unchanged", "unchanged")], outcomes
    assert sum("waiting for another prepare of this VM to finish" in r.stderr for r in results) == 1
    for disk in plan.disks:
        assert qinfo(node.path(disk.launcher_path))["virtual-size"] == disk.size_bytes
    assert leftovers(node) == []


# ------------------------------------------------------------------------------------------------
# a filesystem that fills up
# ------------------------------------------------------------------------------------------------
def _on_small_fs(node: Node, plan: Plan, *, fs_kib: int, leave_kib: int) -> tuple[int, str, list[str]]:
    """Run prepare with the disk directory of ``plan``'s first disk on a tmpfs of ``fs_kib`` KiB
    (a private mount namespace) that a filler file leaves ``leave_kib`` KiB free of, after copying
    in what is there now; returns prepare's exit status, its stderr, and the directory's entries
    with ``qemu-img check`` and ``info`` of the image, as seen from inside."""
    disk_dir = node.path(plan.disks[0].launcher_dir)
    plan_file = node.root.parent / "small-fs-plan.json"
    plan_file.write_text(sign_plan(plan, KEYS))
    image = disk_dir / plan.disks[0].file
    script = f"""set -u
cp -a {disk_dir} {node.root.parent}/saved-disk-dir
mount -t tmpfs -o size={fs_kib}k tmpfs {disk_dir}
cp -a {node.root.parent}/saved-disk-dir/. {disk_dir}/
rm -rf {node.root.parent}/saved-disk-dir
free=$(df -k --output=avail {disk_dir} | tail -1)
[ "$free" -gt {leave_kib} ] && dd if=/dev/zero of={disk_dir}/.filler bs=1k count=$((free - {leave_kib})) 2>/dev/null
"$@" > /dev/null 2> {node.root.parent}/stderr
status=$?
ls -A {disk_dir} | grep -v '^.filler$' | sed 's/^/entry /'
if [ -f {image} ]; then
  {qemu_img()} check -f qcow2 {image} > /dev/null 2>&1; echo "check $?"
  {qemu_img()} info -f qcow2 --output=json {image} | tr -d '\\n' | sed 's/^/info /'; echo
  cp {image} {node.root.parent}/image-copy
fi
exit $status
"""
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            sys.executable, "-m", "hooksidecar.prepare", "--plan", str(plan_file),
            "--path-prefix", str(node.root)]
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1",
           K.ENV_VMI_UID: "6a1e5f3c-1d2b-4c3a-9e8f-0123456789ab"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT)
    stderr = (node.root.parent / "stderr").read_text()
    return proc.returncode, stderr, proc.stdout.splitlines()


def test_a_full_filesystem_while_creating_leaves_no_image(tmp_path: Path) -> None:
    """``qemu-img create`` of a 4 TiB image needs a few clusters of metadata; 96 KiB free is not
    enough: prepare fails naming the volume and the reason, and leaves nothing in the directory."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    node.mount_volume("data")
    plan = make_plan(make_disk("data", 4096 * GiB))
    status, stderr, seen = _on_small_fs(node, plan, fs_kib=4096, leave_kib=96)
    assert status == 1, stderr
    assert "volume data: qemu-img create failed" in stderr and "No space left on device" in stderr, stderr
    assert seen == [], seen


def test_a_full_filesystem_while_growing_keeps_the_image_as_it_was(tmp_path: Path) -> None:
    """An image made while there was room, then grown from 1 GiB to 16 TiB with 64 KiB free (the
    L1 table alone needs 256 KiB): prepare fails naming the volume and the reason, the image is still
    the 1 GiB one and sound (clean or leaked clusters only), and once there is room it grows."""
    node = Node(tmp_path / "node")
    node.vm_dir()
    node.mount_volume("data")
    assert run_prepare(node, make_plan(make_disk("data", GiB))).returncode == 0
    big = make_plan(make_disk("data", 16384 * GiB))
    status, stderr, seen = _on_small_fs(node, big, fs_kib=4096, leave_kib=64)
    assert status == 1, stderr
    assert "volume data: qemu-img resize failed" in stderr and "No space left on device" in stderr, stderr
    assert seen[0] == "entry data.qcow2" and len([s for s in seen if s.startswith("entry")]) == 1, seen
    check = next(s for s in seen if s.startswith("check "))
    assert check in ("check 0", "check 3"), seen
    info = json.loads(next(s for s in seen if s.startswith("info "))[5:])
    assert info["virtual-size"] == GiB
    # with room (the image as the full filesystem left it, back on the disk): it grows
    shutil.copy(tmp_path / "image-copy", node.path(big.disks[0].launcher_path))
    again = run_prepare(node, big)
    assert again.returncode == 0, again.stderr
    assert qinfo(node.path(big.disks[0].launcher_path))["virtual-size"] == 16384 * GiB
