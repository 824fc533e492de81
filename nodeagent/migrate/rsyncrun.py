"""The source's rsync: one run to the target agent through :mod:`nodeagent.migrate.connector`, with
its progress read as it goes.

``rsync <RSYNC_CLIENT_OPTIONS> -e '<python> -m nodeagent.migrate.connector' DIR/ target:staging/``
with the connection's details in the connector's environment. ``--info=progress2`` lines (bytes
so far, across all files) are parsed and handed to ``on_progress``. The process is started under
``setpriv --pdeathsig KILL`` when available, so it never outlives the agent thread that started it
(a killed agent leaves no rsync behind to race the next attempt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diskplan.migration import DEST_PLACEHOLDER, RSYNC_CLIENT_OPTIONS, RSYNC_COMPRESS_OPTIONS
from nodeagent.migrate.connector import ENV_CONNECT

_PROGRESS = re.compile(r"^\s*([\d,]+)\s+\d+%")
NO_SPACE = "No space left on device"


_SENT = re.compile(r"^Total bytes sent: ([\d,]+)")


@dataclass(frozen=True)
class RsyncResult:
    code: int
    stderr: str
    stopped: bool
    sent: int | None = None  # bytes rsync sent over the connection (its --stats), when it said

    @property
    def no_space(self) -> bool:
        return NO_SPACE in self.stderr


def _quote(word: str) -> str:
    """One word of rsync's ``-e`` command (rsync splits on spaces and honours quotes)."""
    if " " not in word and "'" not in word and '"' not in word:
        return word
    if "'" not in word:
        return f"'{word}'"
    raise ValueError(f"cannot quote {word!r} for rsync's -e")


def connector_command() -> str:
    return " ".join(_quote(w) for w in (sys.executable, "-m", "nodeagent.migrate.connector"))


def parse_progress(line: str) -> int | None:
    match = _PROGRESS.match(line)
    return int(match.group(1).replace(",", "")) if match else None


def run_rsync(source_dir: str, *, address: str, port: int, tls_dir: str, request: Mapping[str, Any],
              on_progress: Callable[[int], None], stop: threading.Event, rsync: str = "rsync",
              bwlimit_kib: int = 0, compress: bool = False, poll: float = 0.5) -> RsyncResult:
    """Copy ``source_dir``'s content to the target agent; returns rsync's exit status and the end of
    its error output. ``stop`` set: rsync is terminated (``stopped`` in the result).
    ``bwlimit_kib``: rsync's ``--bwlimit`` (KiB/s; 0: none). ``compress``: zstd on the wire
    (:func:`diskplan.migration.wants_compression`)."""
    limit = [f"--bwlimit={bwlimit_kib}"] if bwlimit_kib > 0 else []
    if compress:
        limit += RSYNC_COMPRESS_OPTIONS
    argv = [rsync, *RSYNC_CLIENT_OPTIONS, *limit, "-e", connector_command(), f"{source_dir.rstrip('/')}/",
            f"target:{DEST_PLACEHOLDER}"]
    setpriv = shutil.which("setpriv")
    if setpriv:
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C",
           "PYTHONPATH": package_root, "PYTHONDONTWRITEBYTECODE": "1",
           # the connector allocates a buffer per TLS record: keep freed memory instead of giving it
           # back and faulting it in again (about 100 000 page faults per GiB otherwise)
           "MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
           "MALLOC_TOP_PAD_": str(64 << 20),
           ENV_CONNECT: json.dumps({"address": address, "port": port, "tlsDir": tls_dir,
                                    "request": dict(request)})}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, close_fds=True)
    err: list[bytes] = []
    sent: list[int] = []
    assert proc.stdout is not None and proc.stderr is not None
    out, errs = proc.stdout, proc.stderr

    def read_err() -> None:
        err.append(errs.read())

    def read_progress() -> None:
        pending = b""
        while True:
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                return
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for raw in lines:
                line = raw.decode(errors="replace")
                value = parse_progress(line)
                if value is not None:
                    on_progress(value)
                sent_match = _SENT.match(line)
                if sent_match:
                    sent.append(int(sent_match.group(1).replace(",", "")))

    threads = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_progress,
                                                                                 daemon=True)]
    for t in threads:
        t.start()
    stopped = False
    while True:
        try:
            code = proc.wait(timeout=poll)
            break
        except subprocess.TimeoutExpired:
            if stop.is_set() and not stopped:
                stopped = True
                proc.terminate()
    for t in threads:
        t.join(5)
    return RsyncResult(code=code, stderr=b"".join(err).decode(errors="replace")[-2000:], stopped=stopped,
                       sent=sent[-1] if sent else None)
