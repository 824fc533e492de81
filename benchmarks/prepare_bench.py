"""prepare benchmark: what the base record of a library-backed disk costs.

A real base of ``--base-gib`` GiB (default 1) of random bytes (a raw file, so every byte is
allocated data to read; a qcow2 base costs the same per byte of file) in a temporary image library,
and ``python -m hooksidecar.prepare`` run as the init container runs it (a fresh process, real
``qemu-img``, ``--path-prefix``) on a plan with one disk overlaid on it. Measured, each
``--rounds`` times (median, max):

(a) first creation: record (SHA-256 of the whole base) + overlay, page cache warm;
(b) the same with the base dropped from the page cache first (``POSIX_FADV_DONTNEED``), closer
    to a first start on a node;
(c) a later start with the base unchanged: the fast path (identity only, nothing hashed);
(d) a later start after ``touch`` of the base: identity changed, content hashed again, same;
baselines: ``sha256sum`` of the base (coreutils), and prepare on a plan whose disk has no base
(the fast path's ratio to it is its whole cost). Peak RSS (``ru_maxrss``) of the prepare process
while hashing, against its 128Mi container limit. Also the in-process hashing rate (MB/s).
The log line's ``baseHashed`` field is checked for every run: a fast-path run that hashed, or a
first run that did not, stops the benchmark. No catalog directory is mounted here, so (a) and (b)
are what a first start costs without the node's base catalog; ``--catalog`` measures it with the
catalog (:mod:`benchmarks.catalog_bench`: a 20 GiB base, the agent's pass, 20 parallel starts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python benchmarks/prepare_bench.py
    sys.path.insert(0, str(ROOT))

MiB = 1 << 20
GiB = 1 << 30


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, 4 * MiB)
            fh.write(os.urandom(n))
            left -= n
        fh.flush()
        os.fsync(fh.fileno())


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _run(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of one child."""
    began = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    took = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {proc.returncode}: {err.decode()}")
    return took, usage.ru_maxrss, out.decode()


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--catalog" in args_in:  # the node's base catalog: benchmarks/catalog_bench.py
        from benchmarks import catalog_bench
        return catalog_bench.main(args_in)
    parser = argparse.ArgumentParser(prog="python -m benchmarks prepare",
                                     description="cost of the library base record in prepare "
                                     "(--catalog: with the node's base catalog, see its --help)")
    parser.add_argument("--base-gib", type=float, default=1.0, help="size of the base, GiB (1)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per case (5)")
    args = parser.parse_args(args_in)
    if args.rounds < 1 or args.base_gib <= 0:
        parser.error("--rounds must be at least 1 and --base-gib positive")

    from diskplan import keys as K
    from diskplan.plan import Backing, Plan, PlanKeys, PlannedDisk, sign_plan
    from hooksidecar.prepare import MarkerState, inspect_base_content

    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is missing: apt-get install -y qemu-utils")
    base_size = int(args.base_gib * GiB) // 512 * 512
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="dh-pbench-", dir="/var/tmp"))
    try:
        prefix = workdir / "node"
        library = prefix / K.LAUNCHER_IMAGE_LIBRARY.lstrip("/")
        library.mkdir(parents=True)
        base = library / "almalinux-9.raw"
        _write_random(base, base_size)
        backed = PlannedDisk(name="data", size_bytes=max(base_size, 2 * GiB), bus="virtio", cache="none",
                             io="native", discard="unmap",
                             backing=Backing(image="almalinux-9", file="almalinux-9.raw", format="raw"))
        plain = PlannedDisk(name="plain", size_bytes=2 * GiB, bus="virtio", cache="none", io="native",
                            discard="unmap")
        keys = PlanKeys(b"bench-plan-key-0123456789")
        plans = {}
        for disk in (backed, plain):
            (prefix / disk.launcher_dir.lstrip("/")).mkdir(parents=True)
            plan = Plan(namespace="vms", vm="bench", host_dir="/var/lib/diskhooks/vms/vms/bench",
                        image_library="/var/lib/diskhooks/images" if disk.backing else None,
                        sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0", disks=(disk,))
            plans[disk.name] = workdir / f"plan-{disk.name}.json"
            plans[disk.name].write_text(sign_plan(plan, keys))

        def prepare(name: str) -> tuple[float, int, dict[str, Any]]:
            took, rss, out = _run([sys.executable, "-m", "hooksidecar.prepare", "--plan", str(plans[name]),
                                   "--path-prefix", str(prefix)])
            return took, rss, json.loads(out.splitlines()[-1])

        def fresh() -> None:
            for f in (backed.launcher_path, backed.base_record_path):
                (prefix / f.lstrip("/")).unlink(missing_ok=True)

        def rounds(setup: Callable[[], None], name: str, hashed: bool | None,
                   result: str) -> tuple[list[float], int]:
            times, peak = [], 0
            for _ in range(args.rounds):
                setup()
                took, rss, line = prepare(name)
                if line["result"] != result or line.get("baseHashed") is not hashed:
                    raise RuntimeError(f"unexpected log line {line}")
                times.append(took)
                peak = max(peak, rss)
            return times, peak

        prepare("data")  # warm: imports compiled, base in the page cache
        first_warm, rss_first = rounds(fresh, "data", True, "created")
        def fresh_cold() -> None:
            fresh()
            _drop_cache(base)

        first_cold, _ = rounds(fresh_cold, "data", True, "created")
        fast, rss_fast = rounds(lambda: None, "data", False, "unchanged")
        touched, _ = rounds(lambda: os.utime(base), "data", True, "unchanged")
        prepare("plain")
        plain_times, _ = rounds(lambda: None, "plain", None, "unchanged")
        sha = []
        for _ in range(args.rounds):
            sha.append(_run(["sha256sum", str(base)])[0])
        inproc = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            content = inspect_base_content(str(base), MarkerState("missing"))
            inproc.append(time.perf_counter() - t)
        expected = hashlib.sha256(base.read_bytes()).hexdigest() if base_size <= 2 * GiB else None
        assert expected is None or content.sha256 == expected
        record = json.loads((prefix / backed.base_record_path.lstrip("/")).read_text())
        assert record["sha256"] == content.sha256
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ms = 1000.0
    mb = base_size / 1e6
    med = statistics.median
    print(f"base {base_size / GiB:.2f} GiB raw, random content; python {sys.version.split()[0]}; "
          f"{args.rounds} rounds each; prepare = a fresh `python -m hooksidecar.prepare` process")
    print()
    print(f"{'prepare, one library-backed disk':58} {'median ms':>10} {'max ms':>8} {'MB/s':>7}")
    rows = [("(a) first creation: hash + record + overlay, warm cache", first_warm, True),
            ("(b) first creation, base dropped from the page cache", first_cold, True),
            ("(c) later start, base unchanged (fast path, no hash)", fast, False),
            ("(d) later start after touch: rehash, same content", touched, True),
            ("    baseline: plain disk, unchanged (no base)", plain_times, False),
            ("    baseline: sha256sum of the base", sha, True),
            ("    hashing in-process (inspect_base_content)", inproc, True)]
    for label, xs, rate in rows:
        speed = f"{mb / med(xs):7.0f}" if rate else f"{'':7}"
        print(f"{label:58} {med(xs) * ms:10.1f} {max(xs) * ms:8.1f} {speed}")
    print()
    print(f"{'fast path / plain disk (overhead of the record check)':58} {med(fast) / med(plain_times):10.2f}x")
    print(f"{'first creation (warm) / fast path':58} {med(first_warm) / med(fast):10.1f}x")
    print(f"{'in-process hashing / sha256sum':58} {med(inproc) / med(sha):10.2f}x")
    print(f"{'peak RSS of prepare, MiB: hashing / fast path':58} "
          f"{rss_first / 1024:10.1f} / {rss_fast / 1024:.1f}  (container limit 128Mi)")
    gib_per_s_at_limit = mb / med(inproc) / 1e3 * 0.5  # the init container's CPU limit is 500m
    print(f"{'est. first start of a 20 GiB base at the 500m CPU limit':58} "
          f"{20 * GiB / 1e9 / gib_per_s_at_limit:10.0f} s")
    print(f"(total {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
