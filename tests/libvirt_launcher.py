"""A real virt-launcher-shaped libvirt for tests: an unprivileged session daemon and a TCG domain.

What a launcher runs, as far as the node agent can tell, and how this module reproduces it:

- **The daemon**: libvirt's ``virtqemud`` (``libvirtd`` where the modular daemons are not packaged, as
  on Debian 12) in **session mode**, as uid 107 (:func:`ensure_qemu_user` creates a ``qemu`` user with
  that uid when the machine has no record for it: libvirt refuses to start a domain for a uid without
  one). It is started with ``setpriv --reuid 107 --regid 107 --clear-groups`` and its own ``HOME``,
  ``XDG_RUNTIME_DIR``, ``XDG_CONFIG_HOME`` and ``XDG_CACHE_HOME`` in a temporary directory, with
  ``stdio_handler = "file"`` in its ``qemu.conf`` (QEMU's log goes to a file: no ``virtlogd`` is
  spawned, so every process started is known and killed by PID).
- **The socket where the node sees it**: the launcher's ``compute`` container mounts the Pod's
  ``libvirt-runtime`` emptyDir at ``/var/run/libvirt``; on the node that directory is
  ``<pods>/<pod uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/``. Here that directory is real
  and the daemon's ``unix_sock_dir`` is a **short symbolic link to it** (``<tmp>/r``), standing in for
  the container's mount: the socket inode lives in the kubelet-like directory, the daemon binds it
  through a path that fits a unix socket address. (The node path itself, with a real 36-character
  Pod UID, is longer than the 107 bytes a unix socket address holds; :mod:`nodeagent.expand` connects
  through ``/proc/self/fd``, and ``virsh`` in the tests uses :attr:`LauncherDaemon.uri`, the daemon's
  own short path, as ``virsh`` inside the compute container would.)
- **The domain**: ``<domain type="qemu">`` (TCG, no KVM needed), named ``<namespace>_<vmi name>`` as
  KubeVirt names it, disk-only (virtio disks with KubeVirt's ``ua-<volume>`` aliases), no network,
  no display. Its images are made by the project's real ``diskhooks-sidecar prepare`` (as root, so
  prepare hands them to 107:107 as it does in a launcher), laid out below a path prefix like the
  launcher's filesystem.

Measured on the 2-core development machine (``python -m benchmarks expand``): the daemon answers
30-90 ms after it is executed; the first domain takes 2.0-2.4 s to start (the daemon probes QEMU's
capabilities then), each later one about 0.3 s; destroying one takes about 1.6 s (libvirt waits for
QEMU to exit on SIGTERM). See :attr:`LauncherDaemon.started_in` and :attr:`RunningDomain.started_in`.

Teardown (:func:`stop_domain`, :func:`stop_daemon`) destroys the domains, terminates the daemon by
PID (SIGKILL after 10 s), kills any QEMU it left by its recorded PID, and removes the directory.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from diskplan import keys as K
from nodeagent.expand import RUNTIME_DIR_PARTS
from tests.conftest import ROOT

QEMU_SYSTEM = "/usr/bin/qemu-system-x86_64"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr without a handler; the tests look at exceptions."""


libvirt.registerErrorHandler(_silence, None)


def ensure_qemu_user() -> None:
    """Make sure uid and gid 107 (virt-launcher's ``qemu``) have records: libvirt's session daemon
    looks its own uid up and refuses to start a domain without it ("Failed to find user record").
    Adds a system group and user ``qemu`` (no home, no shell) only when there is no record for 107."""
    try:
        pwd.getpwuid(K.QEMU_UID)
        return
    except KeyError:
        pass
    try:
        grp.getgrgid(K.QEMU_GID)
    except KeyError:
        subprocess.run(["groupadd", "--system", "--gid", str(K.QEMU_GID), "qemu"], check=True,
                       capture_output=True)
    subprocess.run(["useradd", "--system", "--uid", str(K.QEMU_UID), "--gid", str(K.QEMU_GID),
                    "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                    "--comment", "virt-launcher qemu (diskhooks tests)", "qemu"],
                   check=True, capture_output=True)


def daemon_binary() -> tuple[str, str]:
    """(daemon executable, its socket name): ``virtqemud`` when installed, else ``libvirtd``."""
    for name, sock in (("virtqemud", "virtqemud-sock"), ("libvirtd", "libvirt-sock")):
        exe = shutil.which(name, path=_SBIN_PATH)
        if exe is not None:
            return exe, sock
    raise AssertionError("neither virtqemud nor libvirtd is installed (apt-get install -y libvirt-daemon "
                         "libvirt-daemon-driver-qemu qemu-system-x86; scripts/setup.sh does)")


@dataclass
class LauncherDaemon:
    root: Path  # the temporary directory holding everything below
    pods_dir: Path  # <root>/kubelet/pods, the kubelet's pods directory
    pod_uid: str
    runtime_dir: Path  # <pods>/<uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime (real directory)
    socket_path: Path  # the socket in runtime_dir: the node's view
    uri: str  # qemu+unix:///session?socket=<short daemon-side path> (for virsh and the harness)
    process: subprocess.Popen[bytes]
    log: Path
    started_in: float  # seconds from exec to the first answered connection
    conn: Any = None  # a root connection, the harness's own
    qemu_pids: set[int] = field(default_factory=set)

    def virsh(self, *args: str) -> str:
        proc = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class RunningDomain:
    name: str
    pid: int | None
    started_in: float  # seconds of createXML


def _chown_tree(path: Path) -> None:
    for p in (path, *path.rglob("*")):
        os.lchown(p, K.QEMU_UID, K.QEMU_GID)


def start_daemon(*, pod_uid: str | None = None) -> LauncherDaemon:
    """Start an unprivileged session daemon whose socket is in a kubelet-like ``libvirt-runtime``
    directory; returns once a root connection to it is answered."""
    assert os.geteuid() == 0, "the libvirt launcher fixture runs as root (CI does): it starts a uid-107 daemon"
    ensure_qemu_user()
    exe, sock_name = daemon_binary()
    root = Path(tempfile.mkdtemp(prefix="dh-lv-", dir="/tmp"))  # short: socket paths must fit 107 bytes
    root.chmod(0o755)
    uid = pod_uid or str(uuid.uuid4())
    pods = root / "kubelet" / "pods"
    runtime = pods.joinpath(uid, *RUNTIME_DIR_PARTS)
    runtime.mkdir(parents=True)
    os.chown(runtime, K.QEMU_UID, K.QEMU_GID)
    daemon_view = root / "r"  # the compute container's /var/run/libvirt
    daemon_view.symlink_to(runtime)
    home = root / "home"
    config = home / ".config"
    (config / "libvirt").mkdir(parents=True)
    (home / ".cache").mkdir()
    xdg_run = root / "xdg"
    xdg_run.mkdir(mode=0o700)
    conf_file = config / "libvirt" / f"{Path(exe).name}.conf"
    conf_file.write_text(f'unix_sock_dir = "{daemon_view}"\n')
    (config / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\n')
    _chown_tree(home)
    os.chown(xdg_run, K.QEMU_UID, K.QEMU_GID)
    env = {"PATH": _SBIN_PATH, "HOME": str(home), "XDG_RUNTIME_DIR": str(xdg_run),
           "XDG_CONFIG_HOME": str(config), "XDG_CACHE_HOME": str(home / ".cache"), "LC_ALL": "C"}
    log = root / "daemon.log"
    began = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={K.QEMU_UID}", f"--regid={K.QEMU_GID}", "--clear-groups",
             "--pdeathsig=SIGTERM", exe, "--config", str(conf_file)],
            cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    d = LauncherDaemon(root=root, pods_dir=pods, pod_uid=uid, runtime_dir=runtime,
                       socket_path=runtime / sock_name,
                       uri=f"qemu+unix:///session?socket={daemon_view / sock_name}",
                       process=proc, log=log, started_in=0.0)
    try:
        d.conn = _wait_for_daemon(d, began)
    except BaseException:
        stop_daemon(d)
        raise
    d.started_in = time.monotonic() - began
    return d


def _wait_for_daemon(d: LauncherDaemon, began: float) -> Any:
    last = ""
    while time.monotonic() - began < START_TIMEOUT:
        if d.process.poll() is not None:
            raise AssertionError(f"the libvirt daemon exited with {d.process.returncode}:\n{d.log_tail()}")
        if d.socket_path.is_socket():
            try:
                return libvirt.open(d.uri)
            except libvirt.libvirtError as exc:
                last = str(exc)
        time.sleep(0.02)
    raise AssertionError(f"the libvirt daemon did not answer within {START_TIMEOUT} s ({last}):\n"
                         f"{d.log_tail()}")


def stop_daemon(d: LauncherDaemon) -> None:
    """Close the harness's connection, terminate the daemon by PID, kill any QEMU left, remove files."""
    if d.conn is not None:
        try:
            for dom in d.conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
        except libvirt.libvirtError:
            pass
        try:
            d.conn.close()
        except libvirt.libvirtError:
            pass
        d.conn = None
    if d.process.poll() is None:
        d.process.send_signal(signal.SIGTERM)
        try:
            d.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            d.process.kill()
            d.process.wait(STOP_TIMEOUT)
    for pid in d.qemu_pids:
        _kill_qemu(pid)
    shutil.rmtree(d.root, ignore_errors=True)


def _kill_qemu(pid: int) -> None:
    """SIGKILL ``pid`` if it is still one of our QEMU processes (by its command line)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if cmdline.startswith(QEMU_SYSTEM.encode()) or b"qemu-system" in cmdline.split(b"\0", 1)[0]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def launcher_daemon(*, pod_uid: str | None = None) -> Iterator[LauncherDaemon]:
    d = start_daemon(pod_uid=pod_uid)
    try:
        yield d
    finally:
        stop_daemon(d)


# ------------------------------------------------------------------------------------------------
# the domain
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainDiskSpec:
    alias: str  # ua-<volume>
    path: Path  # the image file
    dev: str  # vda, vdb...
    fmt: str = "qcow2"
    backing: Path | None = None  # a qcow2 base, given as an explicit <backingStore> (as the sidecar does)


def domain_xml(name: str, disks: Sequence[DomainDiskSpec]) -> str:
    """A disk-only TCG domain, built as a tree (no string is pasted into XML)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = QEMU_SYSTEM
    for spec in disks:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=spec.fmt)
        ET.SubElement(disk, "source", file=str(spec.path))
        if spec.backing is not None:  # the base's own path: the header's may name a launcher path
            store = ET.SubElement(disk, "backingStore", type="file")
            ET.SubElement(store, "format", type="qcow2")
            ET.SubElement(store, "source", file=str(spec.backing))
            ET.SubElement(store, "backingStore")
        ET.SubElement(disk, "target", dev=spec.dev, bus="virtio")
        ET.SubElement(disk, "alias", name=spec.alias)
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def start_domain(d: LauncherDaemon, name: str, disks: Sequence[DomainDiskSpec]) -> RunningDomain:
    """Create (start) a transient domain ``name``; its QEMU's PID is recorded for teardown."""
    began = time.monotonic()
    try:
        dom = d.conn.createXML(domain_xml(name, disks), 0)
    except libvirt.libvirtError as exc:
        raise AssertionError(f"libvirt could not start domain {name}: {exc}\n{d.log_tail()}") from None
    took = time.monotonic() - began
    pid = _qemu_pid(d, name)
    if pid is not None:
        d.qemu_pids.add(pid)
    assert dom.isActive()
    return RunningDomain(name=name, pid=pid, started_in=took)


def _qemu_pid(d: LauncherDaemon, name: str) -> int | None:
    pidfile = d.root / "xdg" / "libvirt" / "qemu" / "run" / f"{name}.pid"
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def stop_domain(d: LauncherDaemon, dom: RunningDomain) -> None:
    """Destroy the domain (the VM stops; its images stay)."""
    try:
        d.conn.lookupByName(dom.name).destroy()
    except libvirt.libvirtError:
        pass
    if dom.pid is not None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while Path(f"/proc/{dom.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        _kill_qemu(dom.pid)
        d.qemu_pids.discard(dom.pid)


# ------------------------------------------------------------------------------------------------
# images by the project's own prepare
# ------------------------------------------------------------------------------------------------
def run_prepare(plan_text: str, *, prefix: Path, plan_file: Path,
                volumes: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """``diskhooks-sidecar prepare --plan FILE --path-prefix PREFIX`` as root (so prepare hands the
    images to 107:107, as in a launcher), after making each volume's mount directory below ``prefix``
    (what KubeVirt's hostDisk mounts are)."""
    for volume in volumes:
        prefix.joinpath(K.launcher_disk_dir(volume).lstrip("/")).mkdir(parents=True, exist_ok=True)
    plan_file.write_text(plan_text)
    exe = Path(sys.executable).with_name("diskhooks-sidecar")
    assert exe.exists(), f"{exe} is missing: run scripts/setup.sh"
    env = {"PATH": os.environ.get("PATH", _SBIN_PATH), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(exe), "prepare", "--plan", str(plan_file), "--path-prefix", str(prefix)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
