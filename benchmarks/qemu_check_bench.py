"""What a ``qemu-img check`` at a VM's first start would cost: wall time, CPU time and peak memory of
``qemu-img check -f qcow2 --output=json`` on sparse qcow2 images of 1 GiB and 20 GiB (``--sizes``).

``python -m benchmarks qemucheck [--sizes 1,20] [--rounds 3]``

Three states per size, each a sparse file on the temporary directory's filesystem:

- ``empty``: just created (what prepare makes; no L2 table, one refcount block);
- ``half``: a guest wrote 1 byte every 2 MiB over the first half of the disk (one data cluster and
  its L2 table in use per 2 MiB: the metadata of a half-used image, little data);
- ``metadata``: ``preallocation=metadata`` (every L2 table and refcount block present, every
  cluster mapped: the most metadata an image of this size has, still sparse).

``qemu-img check`` walks the L1/L2 tables and rebuilds the refcounts in memory, so its cost grows
with the metadata, not with the data. Each image is checked warm (in the page cache) and cold (its
pages dropped first with ``posix_fadvise(DONTNEED)`` after an ``fsync``: read from the disk). ``half``
is made only for sizes up to 20 GiB (it writes a cluster per 2 MiB). The figures decide whether prepare should run it (see
docs/ARCHITECTURE.md, "Decisions"). Runs under prepare's limits (1 GiB address space, 30 s CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
PEAK_CODE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _limits() -> None:  # the same limits as hooksidecar.qemuimg gives every qemu-img child
    resource.setrlimit(resource.RLIMIT_AS, (GiB, GiB))
    resource.setrlimit(resource.RLIMIT_CPU, (30, 30))


def make(path: Path, size: int, state: str, qemu_img: str, qemu_io: str | None) -> None:
    opts = ["-o", "preallocation=metadata"] if state == "metadata" else []
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", *opts, str(path), str(size)], check=True)
    if state == "half":
        if qemu_io is None:
            raise SystemExit("qemu-io is missing (Debian: qemu-utils)")
        cmds = []
        for off in range(0, size // 2, 2 * MiB):
            cmds += ["-c", f"write -q {off} 1"]
        for start in range(0, len(cmds), 2000):  # one qemu-io per 1000 writes (argv length)
            subprocess.run([qemu_io, "-f", "qcow2", *cmds[start:start + 2000], str(path)], check=True,
                           stdout=subprocess.DEVNULL)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_once(path: Path, qemu_img: str, *, cold: bool = False) -> tuple[float, float, int, int]:
    """(wall s, CPU s, peak RSS KiB, exit status) of one ``qemu-img check``."""
    if cold:
        drop_cache(path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.run([qemu_img, "check", "-f", "qcow2", "--output=json", str(path)],
                          capture_output=True, preexec_fn=_limits, check=False)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss, proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks qemucheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,20", help="image sizes in GiB, comma-separated (1,20)")
    parser.add_argument("--rounds", type=int, default=3, help="checks per image (median shown)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if qemu_img is None:
        raise SystemExit("qemu-img is missing: apt-get install -y qemu-utils")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="diskhooks-check-") as tmp:
        for gib in sizes:
            for state in ("empty", "half", "metadata") if gib <= 20 else ("empty", "metadata"):
                path = Path(tmp) / f"{gib}-{state}.qcow2"
                made = time.perf_counter()
                make(path, gib * GiB, state, qemu_img, qemu_io)
                made = time.perf_counter() - made
                runs = [check_once(path, qemu_img) for _ in range(args.rounds)]
                colds = [check_once(path, qemu_img, cold=True) for _ in range(args.rounds)]
                # peak RSS of children is a high-water mark over all of them: measure it alone
                peak = subprocess.run([sys.executable, "-c", PEAK_CODE, qemu_img, "check", "-f", "qcow2",
                                       str(path)], capture_output=True, text=True, check=True).stdout.strip()
                rows.append({"sizeGiB": gib, "state": state,
                             "fileMiB": round(path.stat().st_blocks * 512 / MiB, 1),
                             "wallMs": round(statistics.median(r[0] for r in runs) * 1000, 1),
                             "cpuMs": round(statistics.median(r[1] for r in runs) * 1000, 1),
                             "coldWallMs": round(statistics.median(r[0] for r in colds) * 1000, 1),
                             "peakRssMiB": round(int(peak) / 1024, 1),
                             "exit": sorted({r[3] for r in runs}), "setupS": round(made, 1)})
                path.unlink()
    print(f"{'size':>6} {'state':9} {'on disk':>9} {'wall ms':>8} {'CPU ms':>8} {'cold ms':>8} "
          f"{'peak RSS':>9} exit")
    for r in rows:
        print(f"{r['sizeGiB']:4d}Gi {r['state']:9} {r['fileMiB']:7.1f}Mi {r['wallMs']:8.1f} "
              f"{r['cpuMs']:8.1f} {r['coldWallMs']:8.1f} {r['peakRssMiB']:7.1f}Mi {r['exit']}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
