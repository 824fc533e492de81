"""Cold migration benchmark: the agents' data path against plain rsync of the same file, same run.

Makes a qcow2 of ``--size`` (default 2 GiB) virtual with ``--allocated`` (default 50%) of it written
with random data (incompressible, in 64 MiB extents spread over the disk), then, ``--rounds`` times
each, alternating:

(a) **plain rsync**: the same file to an ``rsync --daemon`` on 127.0.0.1 (plaintext, no TLS: the
    baseline the issue names), with the migration's own rsync options;
(b) **diskhooks**: the migration's data path as the agents run it: the source's
    :func:`nodeagent.migrate.rsyncrun.run_rsync` (rsync, ``-e`` the TLS connector) to a
    :class:`nodeagent.migrate.target.TargetServer` on 127.0.0.3 running its own ``rsync --server``
    into a staging directory (mutual TLS 1.3 both ways, the real allowlist and bridge). What stands in:
    the API server check of each request (the benchmark's target answers for the VM itself);

then once the target's verification (``commit``: SHA-256 of the copy, the marker, ``fsync``, the
rename) on the last copy. Prints each throughput (file bytes per second of wall time) and the CPU
seconds of all the processes of each path (plain: rsync and the daemon; diskhooks: both rsyncs, the
connector and the target's bridge) in all and by process (:class:`ProcessCpu`), the median ratio
diskhooks / plain (the issue asks for at least 0.8), the bytes rsync sent against the bytes
allocated by the image, and the copy's allocation against the source's.

``--holes``: the image's file is written whole and then half of it discarded (qcow2 punches the
freed clusters out of the file: a sparse file of twice its allocation, as after a guest's discards);
the source then compresses (zstd, :func:`diskplan.migration.wants_compression`), plain rsync not.

Usage: ``python -m benchmarks migrate [--rounds 3] [--size 2Gi] [--allocated 50] [--holes] [--by-process]
[--references ssh,socat|none] [--ssh-cipher C] [--dir D]``.

(c) **references** (``--references``, :mod:`benchmarks.migrate_references`): the usual encrypted ways
    of running rsync, in the same rounds: rsync over OpenSSH, and rsync's daemon protocol through two
    socat OpenSSL relays; the ratio the issue asks for is against plaintext rsync, these show what
    encryption costs any transport on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python benchmarks/migrate_bench.py
    sys.path.insert(0, str(ROOT))

from benchmarks.migrate_references import Reference, SocatReference, SshReference, missing_tools
from diskplan import capacity as C
from diskplan.migration import RSYNC_CLIENT_OPTIONS, FileEntry, WireRequest, request_json, wants_compression
from diskplan.plan import PlanKeys
from diskplan.policy import load_policy
from hooksidecar.logfmt import JsonLog
from nodeagent.capacity import migration_copies, scan_root
from nodeagent.migrate import vmdir
from nodeagent.migrate.connector import exchange, open_channel
from nodeagent.migrate.rsyncrun import run_rsync
from nodeagent.migrate.target import Refusal, TargetServer
from nodeagent.migrate.tlsfiles import PEER_NAME, TlsFiles
from nodeagent.reconcile import Paths
from tests.migration_support import make_tls

MiB, GiB = 1 << 20, 1 << 30
NAMESPACE, VM, UID = "bench", "vm01", "bench-uid-1"
SOURCE, TARGET = "node-a", "node-b"
TARGET_ADDRESS = "127.0.0.3"
EXTENT = 64 * MiB
BENCH_POLICY = "hostDisks:\n  root: /var/lib/diskhooks/vms\nsidecar:\n  image: bench\n"
BENCH_KEYS = PlanKeys(current=os.urandom(32))  # the benchmark's VM has no plan: nothing is verified
_SENT = re.compile(r"Total bytes sent: ([\d,]+)")


class BenchTarget(TargetServer):
    """The real target server; only the API server's answer about the VM is given here, and the
    capacity count is the agent's disk count of the target's root without the API server's view of
    VMs (:func:`count_node`): the preflight's budget check runs as in the agent."""

    def _vm(self, r: WireRequest) -> Mapping[str, Any]:
        if (r.namespace, r.vm, r.vm_uid, r.source) != (NAMESPACE, VM, UID, SOURCE):
            raise Refusal("not the benchmark's VM")
        return {"metadata": {"uid": UID}}


def count_node(root: str) -> C.NodeAccount:
    """What the agent's capacity pass counts on a node the API server knows no VM of: every VM
    directory and migration copy under ``root``, on its filesystem, under the default policy."""
    scans = scan_root(root)
    facts = [C.DirFacts(ns, vm, images=s.images, other_allocated=s.other_allocated,
                        state=C.dir_state(running=False, homed_here=False, vm_exists=None))
             for (ns, vm), s in sorted(scans.items())] + migration_copies(root)
    fs = os.statvfs(root)
    return C.account_node(facts, filesystem_bytes=fs.f_blocks * fs.f_frsize, free_bytes=fs.f_bavail * fs.f_frsize,
                          capacity=load_policy(BENCH_POLICY).host_disks.capacity)


def _size(text: str) -> int:
    units = {"Gi": GiB, "Mi": MiB, "": 1}
    match = re.fullmatch(r"(\d+)(Gi|Mi|)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 2Gi or 512Mi")
    return int(match.group(1)) * units[match.group(2)]


def make_image(path: Path, size: int, allocated_pct: int, *, holes: bool) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    chunk = path.with_suffix(".chunk")
    chunk.write_bytes(os.urandom(EXTENT))
    extents = size // EXTENT
    try:
        wanted: list[int]
        if holes:
            wanted = list(range(extents))
        else:
            count = max(1, extents * allocated_pct // 100)
            wanted = sorted({round(i * extents / count) for i in range(count)})
        commands = []
        for i in wanted:
            commands += ["-c", f"write -s {chunk} {i * EXTENT} {EXTENT}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True, capture_output=True)
        if holes:
            discard = extents - max(1, extents * allocated_pct // 100)
            cmds = []
            for i in range(discard):
                cmds += ["-c", f"discard {(2 * i + 1) % extents * EXTENT} {EXTENT}"]
            subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)
    finally:
        chunk.unlink()


def _allocated(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in (path.iterdir() if path.is_dir() else [path]) if f.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A plaintext ``rsync --daemon`` on 127.0.0.1 writing into ``directory`` (the baseline)."""

    def __init__(self, work: Path, directory: Path) -> None:
        self.port = _free_port()
        conf = work / "rsyncd.conf"
        conf.write_text(f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n[dst]\n"
                        f"path = {directory}\nread only = no\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--port={self.port}", "--address=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("migrate_bench: rsync --daemon did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    """CPU seconds of a process and of its children it has reaped (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class ProcessCpu:
    """CPU seconds by role of every process below this one (rsyncs, the connector, the daemon's
    children) and of the target's connection threads in this one, while a round runs: ``/proc`` read
    every :data:`POLL` s; a process counts with its last reading before it exits (at most one
    interval short), one that existed before the round with what it used during it. The sampler's
    own CPU is in :attr:`own` (to be taken off this process's figure); it costs the path some time
    all the same (a thread beside the target's bridge), so it runs only with ``--by-process``, and
    the throughput to quote is from a run without it. ``enabled=False``: does nothing."""

    POLL = 0.02

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._first: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.own = 0.0
        if enabled:
            self._poll(first=True)

    def __enter__(self) -> Self:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def by_role(self) -> dict[str, float]:
        roles: dict[str, float] = {}
        for pid, (role, cpu) in self._last.items():
            used = cpu - self._first.get(pid, 0.0)
            if used > 0:
                roles[role] = roles.get(role, 0.0) + used
        return roles

    def _run(self) -> None:
        began = time.thread_time()
        while not self._stop.wait(self.POLL):
            self._poll()
        self._poll()
        self.own = time.thread_time() - began

    def _poll(self, first: bool = False) -> None:
        me = os.getpid()
        found = [(tid, "target bridge (agent thread)", f"/proc/{me}/task/{tid}/stat")
                 for tid in (t.native_id for t in threading.enumerate() if t.name == "migrate-conn") if tid]
        todo, seen = [me], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
                if pid != me:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                    # an exited process (a zombie) has no command line: keep the role it had
                    role = _role(argv) if argv[0] else self._last.get(pid, ("?", 0.0))[0]
                    found.append((pid, role, f"/proc/{pid}/stat"))
            except OSError:
                continue  # gone meanwhile
        for key, role, stat in found:
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # its own, not children
            if first:
                self._first[key] = cpu
            self._last[key] = (role, cpu)


def _role(argv: list[str]) -> str:
    if "nodeagent.migrate.connector" in argv:
        return "connector (TLS, source)"
    if not argv or os.path.basename(argv[0]) != "rsync":
        return os.path.basename(argv[0]) if argv else "?"
    if "--daemon" in argv:
        return "rsync daemon (receiver)"
    return "rsync --server (target)" if "--server" in argv else "rsync (source)"


def _roles_text(roles: dict[str, float]) -> str:
    text = ", ".join(f"{role} {cpu:.2f}" for role, cpu in sorted(roles.items(), key=lambda kv: -kv[1]) if cpu >= 0.01)
    return f" ({text})" if text else ""


def plain_round(source_dir: Path, daemon: Daemon, dest: Path,
                by_process: bool) -> tuple[float, int, float, dict[str, float]]:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    options = [o for o in RSYNC_CLIENT_OPTIONS if not o.startswith("--info")]
    cpu = _cpu_children() + _cpu_of(daemon.proc.pid)
    with ProcessCpu(by_process) as each:
        began = time.perf_counter()
        out = subprocess.run(["rsync", *options, f"{source_dir}/", f"rsync://127.0.0.1:{daemon.port}/dst/"],
                             check=True, capture_output=True, text=True)
        took = time.perf_counter() - began
        time.sleep(0.2)  # the daemon reaps its connection's process
    cpu = _cpu_children() + _cpu_of(daemon.proc.pid) - cpu
    match = _SENT.search(out.stdout)
    return took, int(match.group(1).replace(",", "")) if match else -1, cpu, each.by_role()


def reference_round(ref: Reference, source_dir: Path, dest: Path,
                    by_process: bool) -> tuple[float, float, dict[str, float]]:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    options = [o for o in RSYNC_CLIENT_OPTIONS if not o.startswith("--info")]
    assert ref.listener is not None
    cpu = _cpu_children() + _cpu_of(ref.listener.pid)
    with ProcessCpu(by_process) as each:
        began = time.perf_counter()
        subprocess.run(ref.command(options, source_dir), check=True, capture_output=True, text=True)
        took = time.perf_counter() - began
        time.sleep(0.2)  # the listener reaps its connection's processes
    cpu = _cpu_children() + _cpu_of(ref.listener.pid) - cpu
    return took, cpu, each.by_role()


def aes_gcm_rate() -> str:
    """One core's AES-256-GCM rate on 16 KiB blocks (``openssl speed``): the cipher's share of any
    TLS relay's cost here."""
    try:
        out = subprocess.run(["openssl", "speed", "-elapsed", "-seconds", "1", "-bytes", "16384", "-evp",
                              "aes-256-gcm"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not measured (openssl)"
    match = re.search(r"^AES-256-GCM\s+([\d.]+)k", out, re.MULTILINE)
    return f"{float(match.group(1)) * 1000 / 1e9:.2f} GB/s on one core" if match else "not measured"


def diskhooks_round(source_dir: Path, server: BenchTarget, tls: TlsFiles, port: int, root: Path,
                    files: list[FileEntry], by_process: bool) -> tuple[float, int, str, float, dict[str, float]]:
    vmdir.remove_tree(vmdir.staging_dir(str(root), NAMESPACE, VM))
    vmdir.remove_tree(vmdir.vm_dir(str(root), NAMESPACE, VM))
    vmdir.remove_file(vmdir.incoming_record(str(root), NAMESPACE, VM))
    ident = os.urandom(8).hex()
    _call(tls, port, WireRequest(op="preflight", id=ident, namespace=NAMESPACE, vm=VM, vm_uid=UID,
                                 source=SOURCE, target=TARGET, files=tuple(files)))
    wire = {"op": "rsync", "id": ident, "namespace": NAMESPACE, "vm": VM, "vmUID": UID, "source": SOURCE,
            "target": TARGET}
    cpu = _cpu_children() + _cpu_self()
    with ProcessCpu(by_process) as each:
        began = time.perf_counter()
        result = run_rsync(str(source_dir), address=TARGET_ADDRESS, port=port, tls_dir=tls.directory,
                           request=wire, on_progress=lambda _: None, stop=threading.Event(),
                           compress=wants_compression(files))  # as the source agent decides
        took = time.perf_counter() - began
        time.sleep(0.2)  # the target reaps its rsync --server
    cpu = _cpu_children() + _cpu_self() - cpu - each.own
    if result.code != 0:
        raise SystemExit(f"migrate_bench: the migration's rsync failed ({result.code}): {result.stderr}")
    roles = each.by_role()
    if by_process:  # the rest of this process: the source agent's threads reading rsync's output
        roles["agent, other threads"] = max(0.0, cpu - sum(roles.values()))
    return took, result.sent if result.sent is not None else -1, ident, cpu, roles


def _call(tls: TlsFiles, port: int, request: WireRequest, timeout: float = 600.0) -> dict[str, Any]:
    channel = open_channel(TARGET_ADDRESS, port, tls)
    try:
        reply, _ = exchange(channel, request_json(request), timeout=timeout)
    finally:
        channel.sock.close()
    if not reply.get("ok"):
        raise SystemExit(f"migrate_bench: {request.op} refused: {reply.get('error')}")
    return reply


def _median_roles(rounds: list[dict[str, float]]) -> dict[str, float]:
    names = {name for roles in rounds for name in roles}
    return {name: round(statistics.median(r.get(name, 0.0) for r in rounds), 2) for name in sorted(names)}


def _rate(size: int, seconds: float) -> str:
    return f"{size / seconds / MiB:7.1f} MiB/s ({seconds:6.2f} s)"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks migrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=_size, default=2 * GiB, help="virtual size of the qcow2 (default 2Gi)")
    p.add_argument("--allocated", type=int, default=50, help="percent of it written (default 50)")
    p.add_argument("--holes", action="store_true", help="write it all, then discard the rest (a sparse file)")
    p.add_argument("--by-process", action="store_true",
                   help="also the CPU of each process (a sampler thread: quote throughput from a run without)")
    p.add_argument("--references", default="ssh,socat",
                   help="other encrypted transports measured in the same rounds: ssh, socat, or none "
                        "(benchmarks/migrate_references.py; default ssh,socat where installed)")
    p.add_argument("--ssh-cipher", default=None, help="the ssh reference's cipher (default: OpenSSH's own)")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one; on a disk, not tmpfs)")
    args = p.parse_args(list(argv) if argv is not None else None)
    for tool in ("rsync", "qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"migrate_bench: {tool} is missing (scripts/setup.sh installs it)", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="migrate-bench-", dir=args.dir))
    server: BenchTarget | None = None
    daemon: Daemon | None = None
    references: list[Reference] = []
    try:
        source_dir = work / "source"
        source_dir.mkdir()
        image = source_dir / "data.qcow2"
        began = time.perf_counter()
        make_image(image, args.size, args.allocated, holes=args.holes)
        file_size, file_alloc = image.stat().st_size, _allocated(image)
        print(f"image: {args.size / GiB:.1f} GiB virtual, {args.allocated}% written"
              f"{' then the rest discarded (holes)' if args.holes else ''}: file {file_size / MiB:.0f} MiB, "
              f"allocated {file_alloc / MiB:.0f} MiB (made in {time.perf_counter() - began:.1f} s)", flush=True)
        tls_dir = work / "tls"
        make_tls(tls_dir)
        tls = TlsFiles(str(tls_dir))
        host = work / "target-node"
        root = host / "var/lib/diskhooks/vms"
        root.mkdir(parents=True)
        policy = load_policy(BENCH_POLICY)
        log_path = work / "target.log"
        log_file = open(log_path, "w")  # noqa: SIM115 - open while the server runs
        server = BenchTarget(node=TARGET, kube=None, policy=lambda: policy,  # type: ignore[arg-type]
                             paths=Paths(host_prefix=str(host), kubelet_pods_dir="/var/lib/kubelet/pods"),
                             tls=tls, address=TARGET_ADDRESS, port=0, log=JsonLog(log_file),
                             plan_keys=lambda: BENCH_KEYS, capacity=lambda: count_node(str(root)))
        server.start()
        daemon_dest = work / "plain-dest"
        daemon_dest.mkdir()
        daemon = Daemon(work, daemon_dest)
        ref_dest = work / "reference-dest"
        for name in [n for n in args.references.split(",") if n and n != "none"]:
            why = missing_tools(name)
            if why:
                print(f"reference {name}: not measured: {why}", flush=True)
                continue
            try:
                references.append(SshReference(work, ref_dest, args.ssh_cipher) if name == "ssh"
                                  else SocatReference(work, ref_dest, tls_dir, PEER_NAME))
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                print(f"reference {name}: not measured: {exc}", flush=True)
        ref_times: list[list[float]] = [[] for _ in references]
        ref_cpu: list[list[float]] = [[] for _ in references]
        ref_roles: list[list[dict[str, float]]] = [[] for _ in references]
        files = vmdir.list_files(str(source_dir))
        plain: list[float] = []
        ours: list[float] = []
        cpu_plain: list[float] = []
        cpu_ours: list[float] = []
        roles_plain: list[dict[str, float]] = []
        roles_ours: list[dict[str, float]] = []
        sent_plain = sent_ours = -1
        ident = ""
        for i in range(args.rounds):
            subprocess.run(["sync"], check=False)
            t, sent_plain, cpu, roles = plain_round(source_dir, daemon, daemon_dest, args.by_process)
            plain.append(t)
            cpu_plain.append(cpu)
            roles_plain.append(roles)
            print(f"round {i + 1}: plain rsync  {_rate(file_size, t)}, CPU {cpu:5.2f} s{_roles_text(roles)}",
                  flush=True)
            subprocess.run(["sync"], check=False)
            t, sent_ours, ident, cpu, roles = diskhooks_round(source_dir, server, tls, server.port, root, files,
                                                             args.by_process)
            ours.append(t)
            cpu_ours.append(cpu)
            roles_ours.append(roles)
            print(f"round {i + 1}: diskhooks    {_rate(file_size, t)}, CPU {cpu:5.2f} s{_roles_text(roles)}",
                  flush=True)
            for k, ref in enumerate(references):
                subprocess.run(["sync"], check=False)
                t, cpu, roles = reference_round(ref, source_dir, ref_dest, args.by_process)
                ref_times[k].append(t)
                ref_cpu[k].append(cpu)
                ref_roles[k].append(roles)
                print(f"round {i + 1}: {ref.name}  {_rate(file_size, t)}, CPU {cpu:5.2f} s"
                      f"{_roles_text(roles)}", flush=True)
        # the target's verification of the last copy (what a migration adds after the copy)
        hashed = [FileEntry(f.name, f.size, f.allocated, vmdir.hash_file(f"{source_dir}/{f.name}").sha256)
                  for f in files]
        began = time.perf_counter()
        _call(tls, server.port, WireRequest(op="commit", id=ident, namespace=NAMESPACE, vm=VM, vm_uid=UID,
                                            source=SOURCE, target=TARGET, files=tuple(hashed)))
        verify = time.perf_counter() - began
        moved = Path(vmdir.vm_dir(str(root), NAMESPACE, VM))
        target_alloc = _allocated(moved)
        plain_med, ours_med = statistics.median(plain), statistics.median(ours)
        ref_summary = {ref.name: {"MiBps": round(file_size / statistics.median(ref_times[k]) / MiB, 1),
                                  "ratio": round(plain_med / statistics.median(ref_times[k]), 3),
                                  "cpuSeconds": round(statistics.median(ref_cpu[k]), 2)}
                       for k, ref in enumerate(references)}
        summary = {
            "fileBytes": file_size, "allocatedBytes": file_alloc,
            "plainMiBps": round(file_size / plain_med / MiB, 1), "diskhooksMiBps": round(file_size / ours_med / MiB, 1),
            "ratio": round(plain_med / ours_med, 3),
            "sentPlain": sent_plain, "sentDiskhooks": sent_ours,
            "sentPerAllocated": round(sent_ours / file_alloc, 3) if file_alloc else None,
            "targetAllocatedPerSource": round(target_alloc / file_alloc, 3) if file_alloc else None,
            "verifySeconds": round(verify, 2),
            "cpuPlainSeconds": round(statistics.median(cpu_plain), 2),
            "cpuDiskhooksSeconds": round(statistics.median(cpu_ours), 2),
            "cpuPlainByRole": _median_roles(roles_plain), "cpuDiskhooksByRole": _median_roles(roles_ours),
            "references": ref_summary,
            "aes256gcm": aes_gcm_rate(),
            "cpus": os.cpu_count(), "loadAverage": os.getloadavg()[0],
        }
        print(f"median: plain {_rate(file_size, plain_med)}, diskhooks {_rate(file_size, ours_med)}: "
              f"ratio {summary['ratio']:.2f} (at least 0.8 wanted)")
        for k, ref in enumerate(references):
            entry = ref_summary[ref.name]
            print(f"reference: {ref.name} {_rate(file_size, statistics.median(ref_times[k]))}: ratio "
                  f"{entry['ratio']:.2f} of plain; CPU {entry['cpuSeconds']} s"
                  f"{_roles_text(_median_roles(ref_roles[k])) if args.by_process else ''}")
        print(f"AES-256-GCM on this CPU: {summary['aes256gcm']}")
        print(f"bytes sent: diskhooks {sent_ours / MiB:.0f} MiB, plain {sent_plain / MiB:.0f} MiB, for "
              f"{file_alloc / MiB:.0f} MiB allocated ({summary['sentPerAllocated']}x); copy allocates "
              f"{target_alloc / MiB:.0f} MiB ({summary['targetAllocatedPerSource']}x the source)")
        print(f"target verification (SHA-256 of the copy, fsync, rename): {verify:.2f} s")
        print(f"CPU (all processes of each path, median): plain {summary['cpuPlainSeconds']} s, diskhooks "
              f"{summary['cpuDiskhooksSeconds']} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        if args.by_process:
            print(f"CPU by process (median s): plain{_roles_text(_median_roles(roles_plain))}; diskhooks"
                  f"{_roles_text(_median_roles(roles_ours))}")
        print(json.dumps(summary))
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        for ref in references:
            ref.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
