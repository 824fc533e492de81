"""prepare benchmark, catalog mode: what a library base adds to a VM's start with the node's base catalog.

``python -m benchmarks prepare --catalog [--base-gib 20] [--rounds 5] [--parallel 20]
[--cpu-limit-m 500]``. A raw library base of ``--base-gib`` GiB (default 20), sparse but written:
1 MiB of random bytes at the start of every 64 MiB (320 MiB of data for 20 GiB, so setting it up
takes seconds while its content is not trivial; SHA-256 reads all 20 GiB, holes as zeros). prepare
runs as the init container runs it (a fresh ``python -m hooksidecar.prepare`` process, real
``qemu-img``, ``--path-prefix`` with the catalog directory mounted where the Pod mutation mounts it).
Measured, median of ``--rounds`` (the miss case once):

(p) baseline: first start of a plain qcow2 disk (no base);
(a) the node agent's pass over the library (``refresh_catalog``, off the start path, once);
(b) first start on the base with the agent's entry in the catalog (nothing hashed);
(c) later start, overlay and base record there (the record's fast path);
(d) first start after ``touch`` of the base once the agent has hashed it again;
(e) catalog miss: first start with no entry (prepare hashes the base and writes the entry);
(f) ``--parallel`` first starts at once on the base, catalog empty: wall time of the batch and how
    many hashed it (must be 1); and the same with the entry present.

Before each read of the whole base ((a), (e), (f) with an empty catalog) its pages are dropped from
the page cache, so it is read as on a node that has not read it lately.

With ``--cpu-limit-m`` (default 500, the init container's limit) every single-process case runs a
second time in a cgroup of its own with that CPU quota (cgroup v1 ``cpu.cfs_quota_us`` or v2
``cpu.max``, made and removed here; needs root); where no cgroup can be made, the figure is the
projection CPU time / limit, and says so. The ``baseHashed`` field of every log line is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
STRIDE = 64 * MiB


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float  # user + system of prepare and its qemu-img children
    rss_kib: int
    lines: list[dict[str, Any]]


class CpuLimit:
    """Cgroups with a CPU quota, one per name, made on first use and removed by :meth:`close`."""

    def __init__(self, millicores: int) -> None:
        self.millicores = millicores
        self.kind: str | None = None
        self._made: list[Path] = []
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        if millicores > 0 and (v1 / "cpu.cfs_quota_us").exists():
            self.kind, self._parent = "cgroup v1 cpu.cfs_quota_us", v1
        elif millicores > 0 and "cpu" in _read(v2 / "cgroup.subtree_control").split():
            self.kind, self._parent = "cgroup v2 cpu.max", v2

    def enter(self, name: str) -> Callable[[], None] | None:
        """A ``preexec_fn`` moving the child into the cgroup ``name`` (None: no cgroup here)."""
        if self.kind is None:
            return None
        path = self._parent / f"diskhooks-bench-{os.getpid()}-{name}"
        if path not in self._made:
            try:
                path.mkdir()
                if self.kind.startswith("cgroup v1"):
                    (path / "cpu.cfs_period_us").write_text("100000")
                    (path / "cpu.cfs_quota_us").write_text(str(self.millicores * 100))
                else:
                    (path / "cpu.max").write_text(f"{self.millicores * 100} 100000")
            except OSError:
                self.kind = None
                return None
            self._made.append(path)
        procs = str(path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))
        return join

    def close(self) -> None:
        for path in self._made:
            try:
                path.rmdir()
            except OSError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def write_base(path: Path, size: int) -> int:
    """A sparse raw file of ``size`` bytes with 1 MiB of random bytes every 64 MiB; bytes written."""
    written = 0
    with path.open("wb") as fh:
        fh.truncate(size)
        for offset in range(0, size, STRIDE):
            fh.seek(offset)
            n = min(MiB, size - offset)
            fh.write(os.urandom(n))
            written += n
        fh.flush()
        os.fsync(fh.fileno())
    return written


def drop_cache(path: Path) -> None:
    """Drop the file's pages from the page cache: the next read goes to the disk (or, for a hole,
    allocates and zeroes pages again), as on a node that did not read the base lately."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def spawn(plan_file: Path, prefix: Path, preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "hooksidecar.prepare", "--plan", str(plan_file),
                             "--path-prefix", str(prefix)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=preexec,  # noqa: PLW1509 - no threads here
                            env={"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"})


def reap(proc: subprocess.Popen[bytes], began: float) -> Run:
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"prepare exited {proc.returncode}: {err.decode()}")
    lines = [json.loads(ln) for ln in out.decode().splitlines() if ln.strip()]
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, lines)


def run_one(plan_file: Path, prefix: Path, preexec: Callable[[], None] | None = None) -> Run:
    began = time.perf_counter()
    return reap(spawn(plan_file, prefix, preexec), began)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks prepare --catalog",
                                     description="a library base's cost at VM start, with the catalog")
    parser.add_argument("--catalog", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-gib", type=float, default=20.0, help="size of the base, GiB (20)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per cheap case (5)")
    parser.add_argument("--parallel", type=int, default=20, help="first starts at once (20)")
    parser.add_argument("--cpu-limit-m", type=int, default=500,
                        help="CPU limit to emulate, millicores (500; 0: none)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.rounds < 1 or args.base_gib <= 0 or args.parallel < 1 or args.cpu_limit_m < 0:
        parser.error("--rounds and --parallel must be at least 1, --base-gib positive")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    from diskplan import basecatalog
    from diskplan import keys as K
    from diskplan.plan import Backing, Plan, PlanKeys, PlannedDisk, sign_plan
    from nodeagent.catalog import refresh_catalog

    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is missing: apt-get install -y qemu-utils")
    size = int(args.base_gib * GiB) // 512 * 512
    began = time.monotonic()
    limit = CpuLimit(args.cpu_limit_m)
    workdir = Path(tempfile.mkdtemp(prefix="dh-cbench-", dir="/var/tmp"))
    results: dict[str, Any] = {}
    try:
        prefix = workdir / "node"
        library = prefix / K.LAUNCHER_IMAGE_LIBRARY.lstrip("/")
        catalog = prefix / K.LAUNCHER_BASE_CATALOG.lstrip("/")
        library.mkdir(parents=True)
        catalog.mkdir(parents=True)
        base = library / "almalinux-9.raw"
        t = time.perf_counter()
        written = write_base(base, size)
        setup_s = time.perf_counter() - t
        keys = PlanKeys(b"bench-plan-key-0123456789")
        backing = Backing(image="almalinux-9", file="almalinux-9.raw", format="raw")

        def plan_for(name: str, with_base: bool) -> tuple[PlannedDisk, Path]:
            disk = PlannedDisk(name=name, size_bytes=size if with_base else 2 * GiB, bus="virtio",
                               cache="none", io="native", discard="unmap",
                               backing=backing if with_base else None)
            (prefix / disk.launcher_dir.lstrip("/")).mkdir(parents=True, exist_ok=True)
            plan = Plan(namespace="vms", vm="bench", host_dir="/var/lib/diskhooks/vms/vms/bench",
                        image_library="/var/lib/diskhooks/images" if with_base else None,
                        sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0", disks=(disk,))
            path = workdir / f"plan-{name}.json"
            path.write_text(sign_plan(plan, keys))
            return disk, path

        plain, plain_plan = plan_for("plain", False)
        backed, backed_plan = plan_for("data", True)
        entry = catalog / K.catalog_entry_name(backing.file)

        def drop(*disks: PlannedDisk) -> None:
            for d in disks:
                for f in (d.launcher_path, d.base_record_path):
                    (prefix / f.lstrip("/")).unlink(missing_ok=True)

        def line(run: Run, volume: str) -> dict[str, Any]:
            return next(ln for ln in run.lines if ln.get("volume") == volume)

        def case(name: str, plan_file: Path, volume: str, setup: Callable[[], None], rounds: int,
                 *, result: str, hashed: bool | None) -> None:
            for limited in (False, True):
                runs = []
                for _ in range(rounds):
                    setup()
                    preexec = limit.enter(name) if limited else None
                    run = run_one(plan_file, prefix, preexec)
                    ln = line(run, volume)
                    if ln["result"] != result or ln.get("baseHashed") is not hashed:
                        raise RuntimeError(f"{name}: unexpected log line {ln}")
                    runs.append(run)
                results[name + (":limited" if limited else "")] = runs
                if not limited and limit.kind is None:
                    break

        def settle() -> None:
            left = (base.stat().st_ctime_ns + basecatalog.QUIET_NS - time.time_ns()) / 1e9
            if left > 0:
                time.sleep(left + 0.05)

        run_one(plain_plan, prefix)  # warm: imports compiled
        drop(plain)
        case("p", plain_plan, "plain", lambda: drop(plain), args.rounds, result="created", hashed=None)

        settle()
        drop_cache(base)
        t, c = time.perf_counter(), time.process_time()
        summary = refresh_catalog(str(library), str(catalog))
        results["a"] = (time.perf_counter() - t, time.process_time() - c)
        if summary.hashed != [backing.file]:
            raise RuntimeError(f"the agent's pass did not hash the base: {summary.as_dict()}")

        case("b", backed_plan, "data", lambda: drop(backed), args.rounds, result="created", hashed=False)
        case("c", backed_plan, "data", lambda: None, args.rounds, result="unchanged", hashed=False)

        record = prefix / backed.base_record_path.lstrip("/")
        old_record = record.read_bytes()  # names the base's identity before the touch
        os.utime(base)
        settle()
        refresh_catalog(str(library), str(catalog))
        def untouched_record() -> None:
            record.write_bytes(old_record)

        case("d", backed_plan, "data", untouched_record, args.rounds, result="unchanged", hashed=False)

        def miss() -> None:
            drop(backed)
            entry.unlink(missing_ok=True)
            drop_cache(base)

        case("e", backed_plan, "data", miss, 1, result="created", hashed=True)

        disks, plan_files = zip(*(plan_for(f"p{i}", True) for i in range(args.parallel)), strict=True)
        for label, keep_entry in (("f-miss", False), ("f-hit", True)):
            drop(*disks)
            if not keep_entry:
                entry.unlink(missing_ok=True)
                drop_cache(base)
            t0 = time.perf_counter()
            procs = [spawn(p, prefix) for p in plan_files]
            runs = [reap(p, t0) for p in procs]
            batch = time.perf_counter() - t0
            hashed_count = sum(bool(line(r, d.name)["baseHashed"]) for r, d in zip(runs, disks, strict=True))
            if hashed_count != (0 if keep_entry else 1):
                raise RuntimeError(f"{label}: {hashed_count} of {args.parallel} prepares hashed the base")
            results[label] = (batch, hashed_count, max(r.wall for r in runs))
    finally:
        limit.close()
        shutil.rmtree(workdir, ignore_errors=True)

    _report(results, args=args, size=size, written=written, setup_s=setup_s, limit=limit,
            total=time.monotonic() - began)
    return 0


def _report(results: dict[str, Any], *, args: argparse.Namespace, size: int, written: int,
            setup_s: float, limit: CpuLimit, total: float) -> None:
    med = statistics.median
    ms = 1000.0
    share = args.cpu_limit_m / 1000 if args.cpu_limit_m else None
    how = limit.kind or ("projected: CPU time / limit (no cgroup could be made)" if share else "none")
    print(f"base {size / GiB:.1f} GiB raw, sparse: 1 MiB random every 64 MiB ({written / MiB:.0f} MiB "
          f"written, set up in {setup_s:.1f} s); python {sys.version.split()[0]}; {os.cpu_count()} CPUs; "
          f"CPU limit {args.cpu_limit_m}m: {how}")
    print()
    head = f"at {args.cpu_limit_m}m" if share else ""
    print(f"{'prepare, one disk (fresh process each)':60} {'median ms':>10} {'CPU ms':>8} {head:>11} "
          f"{'RSS MiB':>8}")
    rows = [("(p) baseline: first start, plain qcow2 disk", "p"),
            ("(b) first start on the base, entry from the agent", "b"),
            ("(c) later start (base record's fast path)", "c"),
            ("(d) later start after touch, agent re-hashed the base", "d"),
            ("(e) catalog miss: first start hashes the base (1 run)", "e")]

    def at_limit(key: str) -> float | None:
        if share is None:
            return None
        if f"{key}:limited" in results:
            return float(med(r.wall for r in results[f"{key}:limited"]))
        return float(max(med(r.wall for r in results[key]), med(r.cpu for r in results[key]) / share))

    for label, key in rows:
        runs = results[key]
        lim = at_limit(key)
        print(f"{label:60} {med(r.wall for r in runs) * ms:10.1f} {med(r.cpu for r in runs) * ms:8.1f} "
              f"{'' if lim is None else f'{lim * ms:11.1f}'} {max(r.rss_kib for r in runs) / 1024:8.1f}")
    agent_wall, agent_cpu = results["a"]
    print(f"{'(a) node agent pass over the library (off the start path)':60} {agent_wall * ms:10.1f} "
          f"{agent_cpu * ms:8.1f}  ({size / 1e9 / agent_wall:.2f} GB/s)")
    print()
    plain = med(r.wall for r in results["p"])
    added = med(r.wall for r in results["b"]) - plain
    print(f"{'first start added over a plain disk, entry from the agent':60} {added * ms:10.1f} ms")
    if share is not None:
        p_lim, b_lim, e_lim = at_limit("p"), at_limit("b"), at_limit("e")
        assert p_lim is not None and b_lim is not None and e_lim is not None
        print(f"{f'  the same at {args.cpu_limit_m}m':60} {(b_lim - p_lim) * ms:10.1f} ms")
        print(f"{f'first start added on a catalog miss, at {args.cpu_limit_m}m':60} "
              f"{(e_lim - p_lim) * ms:10.1f} ms")
    print(f"{'first start added on a catalog miss, full CPU':60} "
          f"{(med(r.wall for r in results['e']) - plain) * ms:10.1f} ms")
    for label, key in ((f"{args.parallel} first starts at once, empty catalog", "f-miss"),
                       (f"{args.parallel} first starts at once, entry present", "f-hit")):
        batch, hashed, _slowest = results[key]
        print(f"{label:60} {batch * ms:10.1f} ms for all, base hashed {hashed}x")
    print(f"(total {total:.0f} s)")
