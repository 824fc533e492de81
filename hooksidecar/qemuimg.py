"""Run ``qemu-img`` for the prepare step: explicit formats, argv lists, resource limits, readable errors.

What this layer may do: start ``qemu-img`` as a child process (never through a shell) with

- an explicit format on every call (``-f``), so qemu never probes a guest-writable file
  (a guest can write a qcow2 header into a raw disk: the CVE-2026-24708 class);
- ``--output=json`` for ``info``, parsed strictly into :class:`ImageInfo`;
- ``-u`` and an explicit size for ``create`` with a backing file, so the backing file (a launcher path
  that need not exist where prepare runs) is written into the header but never opened;
- CPU and address-space limits (as CDI does for ``qemu-img info``: ``RLIMIT_AS`` 1 GiB,
  ``RLIMIT_CPU`` 30 s), a wall-clock timeout, a minimal environment (``LC_ALL=C``);
- every failure decoded into one readable sentence (:class:`QemuImgError`);
- files already opened and checked by the caller handed over as descriptors (``fd=``,
  ``image_fd=``/``backing_fd=``): the child inherits the descriptor and qemu-img opens
  ``/proc/self/fd/<n>``, which is the very file the caller checked, whatever is at its path by then
  (a file swapped between the check and qemu-img's open is never what qemu-img reads or writes).

What it may not do: decide anything. Which file to create, grow or refuse is decided by the caller
(:mod:`hooksidecar.prepare`); paths arrive already derived from a validated plan.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from diskplan.qcow2 import round_to_sector

#: address-space limit of a qemu-img child (CDI uses the same figure)
ADDRESS_SPACE_LIMIT = 1 << 30
#: CPU-time limit of a qemu-img child, seconds
CPU_SECONDS_LIMIT = 30
#: wall-clock limit of one qemu-img call, seconds
TIMEOUT_SECONDS = 60.0
#: the largest ``info`` output accepted (a real one is about 1 KiB)
MAX_INFO_BYTES = 1 << 20
FORMATS = ("qcow2", "raw")


class QemuImgError(Exception):
    """qemu-img failed; ``reason`` is one sentence a user can act on."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info -f <fmt> --output=json`` says about one image (its backing is not opened)."""

    format: str
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None  # qcow2 format-specific ``data-file``
    corrupt: bool


def parse_info(text: str) -> ImageInfo:
    """Parse ``qemu-img info --output=json`` (pure). Raises :class:`QemuImgError` if it is not that."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise QemuImgError(f"qemu-img info printed something that is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise QemuImgError("qemu-img info printed JSON that is not an object")
    fmt = doc.get("format")
    size = doc.get("virtual-size")
    if not isinstance(fmt, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise QemuImgError("qemu-img info printed no format or virtual-size")
    specific = doc.get("format-specific")
    data: dict[str, Any] = {}
    if isinstance(specific, dict) and isinstance(specific.get("data"), dict):
        data = specific["data"]
    return ImageInfo(
        format=fmt,
        virtual_size=size,
        backing_file=_opt_str(doc.get("backing-filename")),
        backing_format=_opt_str(doc.get("backing-filename-format")),
        data_file=_opt_str(data.get("data-file")),
        corrupt=data.get("corrupt") is True,
    )


def info(path: str, *, fmt: str, binary: str = "qemu-img", fd: int | None = None) -> ImageInfo:
    """``qemu-img info -f <fmt> --output=json <path>``: never opens the backing chain. With ``fd``
    (``path`` opened and checked by the caller), qemu-img reads that descriptor, not the path."""
    _check_format(fmt)
    target, fds = _by_fd(path, fd)
    out = _run([binary, "info", "-f", fmt, "--output=json", target], what="qemu-img info", pass_fds=fds,
               shown={target: path})
    result = parse_info(out)
    if result.format != fmt:
        raise QemuImgError(f"qemu-img info reports format {result.format!r}, not {fmt!r}")
    return result


def create(path: str, *, size: int, backing: str | None = None, backing_format: str | None = None,
           binary: str = "qemu-img") -> None:
    """Create a qcow2 image of ``size`` bytes at ``path``.

    With ``backing``: ``-F <backing_format> -b <backing> -u``, so ``backing`` (a launcher path) is
    recorded in the header exactly as given and never opened here.
    """
    if size <= 0:
        raise ValueError("size must be positive")
    argv = [binary, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        if backing_format is None:
            raise ValueError("a backing file needs its format")
        _check_format(backing_format)
        argv += ["-F", backing_format, "-b", backing, "-u"]
    argv += [path, str(round_to_sector(size))]
    _run(argv, what="qemu-img create")


def resize(path: str, *, size: int, backing: tuple[str, str] | None = None,
           binary: str = "qemu-img", image_fd: int | None = None, backing_fd: int | None = None) -> None:
    """Grow the qcow2 image at ``path`` to ``size`` bytes (rounded up to 512; never shrinks).

    ``qemu-img resize`` opens the backing chain (qemu zeroes the part of a grown overlay that
    would otherwise show the backing file's data). ``backing`` = ``(path, format)`` says where that
    file is *here*. The image is always opened through a ``json:`` description that names its
    backing (the base, whose own backing is ``null``, or ``null``), so qemu opens exactly the files
    the caller checked, never a name read from a header, and the backing file name written in the
    header stays as it is. ``image_fd`` and ``backing_fd`` (the files opened and checked by the
    caller) make qemu-img open those descriptors instead of the paths.
    """
    target = str(round_to_sector(size))
    image, fds = _by_fd(path, image_fd)
    shown = {image: path}
    backing_node: dict[str, Any] | None = None
    if backing is not None:
        base_path, base_format = backing
        _check_format(base_format)
        base, base_fds = _by_fd(base_path, backing_fd)
        fds += base_fds
        shown[base] = base_path
        backing_node = {"driver": base_format, "file": {"driver": "file", "filename": base},
                        "backing": None}
    name = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": image},
                                 "backing": backing_node})
    _run([binary, "resize", "-q", "-f", "qcow2", name, target], what="qemu-img resize", pass_fds=fds,
         shown=shown)


# ------------------------------------------------------------------------------------------------
def _by_fd(path: str, fd: int | None) -> tuple[str, tuple[int, ...]]:
    """The name qemu-img is given for ``path``, and the descriptors the child must inherit."""
    if fd is None:
        return path, ()
    return f"/proc/self/fd/{fd}", (fd,)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}")


def _limit_resources() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS_LIMIT, CPU_SECONDS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run(argv: Sequence[str], *, what: str, timeout: float = TIMEOUT_SECONDS, pass_fds: Sequence[int] = (),
         shown: dict[str, str] | None = None) -> str:
    """Run qemu-img; ``pass_fds`` are inherited by the child, and in its messages each key of
    ``shown`` (a ``/proc/self/fd/<n>`` name) is replaced by the path it stands for."""
    exe = shutil.which(argv[0]) if "/" not in argv[0] else argv[0]
    if exe is None:
        raise QemuImgError(f"{argv[0]} is not installed (the diskhooks sidecar image ships it)")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    try:
        proc = subprocess.run(  # an argv list, never a shell
            [exe, *argv[1:]], stdin=subprocess.DEVNULL, capture_output=True, env=env,
            timeout=timeout, preexec_fn=_limit_resources, check=False, pass_fds=tuple(pass_fds),
        )
    except subprocess.TimeoutExpired:
        raise QemuImgError(f"{what} took longer than {timeout:g} s and was stopped") from None
    except OSError as exc:
        raise QemuImgError(f"{what} could not be started: {exc.strerror}") from None
    if proc.returncode == 0:
        if len(proc.stdout) > MAX_INFO_BYTES:
            raise QemuImgError(f"{what} printed more than {MAX_INFO_BYTES} bytes")
        return proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    for name, path in (shown or {}).items():
        stderr = stderr.replace(name, path)
    raise QemuImgError(_explain(what, proc.returncode, stderr))


def _explain(what: str, returncode: int, stderr: str) -> str:
    """One sentence for a failed qemu-img call."""
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return (f"{what} was stopped after using {CPU_SECONDS_LIMIT} s of CPU time (its limit); "
                    "the image may be damaged or very fragmented")
        if sig == signal.SIGKILL:
            return (f"{what} was killed by SIGKILL (its {CPU_SECONDS_LIMIT} s CPU-time limit, the "
                    "out-of-memory killer or an operator); run prepare again (a new image is only "
                    "published once complete, a grown one stays usable)")
        return f"{what} was killed by signal {signal.Signals(sig).name}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    message = lines[-1] if lines else f"exit status {returncode}, no message"
    message = message.removeprefix("qemu-img: ")
    lowered = stderr.lower()
    if "cannot allocate memory" in lowered or "failed to allocate" in lowered \
            or "out of memory" in lowered:
        return (f"{what} ran out of memory within its {ADDRESS_SPACE_LIMIT >> 20} MiB address-space "
                f"limit: {message}")
    return f"{what} failed: {message}"
