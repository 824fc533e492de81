"""The node agent's part of the base catalog: hash each library base once, off the VM start path.

:func:`refresh_catalog` walks the image library once: a file whose catalog entry still describes it
(same identity) costs one ``stat``; a file changed less than the quiet period ago is left for the
next round (``settling``); any other is hashed under its lock, with its identity taken before and
after every byte is read, and its entry written only when both are equal (a file changed while read
is ``changed``, nothing written). A lock held by someone else (a prepare hashing the same file for
a VM starting now) makes it ``busy``: that prepare writes the entry. Entries of files no longer in
the library are removed. What makes an entry safe to trust: docs/BASE-CATALOG.md; the entry format:
:mod:`diskplan.basecatalog`; the files: :mod:`hooksidecar.prepare.catalog`.

:class:`CatalogRefresher` runs it in a thread (at a lowered CPU priority), every ``interval`` seconds
and soon after a settling file becomes quiet; ``diskhooks-node catalog`` runs it once
(:func:`catalog_command`). Nothing here talks to Kubernetes.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diskplan import basecatalog, baserecord
from diskplan import keys as K
from hooksidecar.prepare import catalog as files
from hooksidecar.prepare.basehash import HashingStopped

if TYPE_CHECKING:
    from pathlib import Path

    from diskplan.policy import Policy
    from hooksidecar.logfmt import JsonLog

DEFAULT_INTERVAL_S = 10.0
NICE = 10  # the hashing thread yields the CPU to VMs and to prepare
STALE_TMP_S = 600.0  # a temporary entry this old was left by a killed writer
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ENTRY_SUFFIX = K.catalog_entry_name("")


@dataclass
class CatalogSummary:
    """One pass over the library, file names per outcome (see the module docstring)."""

    hashed: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    settling: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # not a base file (name, link, directory)
    failed: dict[str, str] = field(default_factory=dict)  # cannot be read or recorded: why
    retry_in_s: float | None = None  # when the first settling file becomes quiet
    seconds: float = 0.0

    @property
    def news(self) -> bool:
        """Whether the pass changed or found anything worth a log line."""
        return bool(self.hashed or self.changed or self.removed or self.failed)

    def as_dict(self) -> dict[str, Any]:
        return {"hashed": self.hashed, "current": self.current, "settling": self.settling,
                "busy": self.busy, "changed": self.changed, "removed": self.removed,
                "skipped": self.skipped, "failed": self.failed, "retryInS": self.retry_in_s,
                "seconds": round(self.seconds, 3)}


def catalog_dirs(policy: Policy, on_host: Callable[[str], str]) -> tuple[str, str] | None:
    """(image library, catalog directory) as this process sees them; None without a library."""
    library = policy.host_disks.image_library
    if library is None:
        return None
    return on_host(library), on_host(K.catalog_dir(policy.host_disks.root))


def refresh_catalog(library_dir: str, catalog_dir: str, *, quiet_ns: int = basecatalog.QUIET_NS,
                    should_stop: Callable[[], bool] | None = None) -> CatalogSummary:
    """One pass: bring every library file's entry up to date (see the module docstring). Creates
    the catalog directory (mode 0755) when missing. ``should_stop`` is asked between files and
    while hashing; when it says yes the pass ends early (what is done stays done)."""
    began = time.monotonic()
    out = CatalogSummary()
    _ensure_dir(catalog_dir)
    lib_fd = os.open(library_dir, _DIR_FLAGS)
    try:
        names = sorted(os.listdir(lib_fd))
        for name in names:
            if should_stop is not None and should_stop():
                break
            _refresh_one(lib_fd, name, catalog_dir, out, quiet_ns=quiet_ns, should_stop=should_stop)
        _remove_orphans(lib_fd, catalog_dir, set(names), out)
    finally:
        os.close(lib_fd)
    out.seconds = time.monotonic() - began
    return out


def _refresh_one(lib_fd: int, name: str, catalog_dir: str, out: CatalogSummary, *, quiet_ns: int,
                 should_stop: Callable[[], bool] | None) -> None:
    if not basecatalog.is_base_file_name(name):
        out.skipped[name] = "not a name a plan can give a base"
        return
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=lib_fd)
    except FileNotFoundError:
        return  # removed since the listing
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            out.skipped[name] = "a symbolic link"
        else:
            out.failed[name] = f"cannot be opened ({exc.strerror})"
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            out.skipped[name] = "not a regular file"
            return
        now = baserecord.identity_of(st)
        entry, _ = files.read_entry(catalog_dir, name)
        if entry is not None and basecatalog.mismatch(entry, file=name, identity=now) is None:
            out.current.append(name)
            return
        if not basecatalog.is_quiet(now, now_ns=time.time_ns(), quiet_ns=quiet_ns):
            out.settling.append(name)
            left = (now["ctimeNs"] + quiet_ns - time.time_ns()) / 1e9
            out.retry_in_s = max(0.0, min(left, out.retry_in_s if out.retry_in_s is not None else left))
            return
        with files.file_lock(catalog_dir, name, wait_s=0) as held:
            if not held:
                out.busy.append(name)
                return
            entry, _ = files.read_entry(catalog_dir, name)  # a prepare may just have written it
            now = baserecord.identity_of(os.fstat(fd))
            if entry is not None and basecatalog.mismatch(entry, file=name, identity=now) is None:
                out.current.append(name)
                return
            hashed = files.hash_for_catalog(fd, should_stop=should_stop, quiet_ns=quiet_ns)
            if not hashed.steady or not hashed.quiet:
                out.changed.append(name)  # written to while read (or just before): next round
                return
            files.write_entry(catalog_dir, files.entry_of(name, hashed, by="node-agent"))
            out.hashed.append(name)
    except HashingStopped:
        return
    except OSError as exc:
        out.failed[name] = exc.strerror or str(exc)
    finally:
        os.close(fd)


def _remove_orphans(lib_fd: int, catalog_dir: str, names: set[str], out: CatalogSummary) -> None:
    """Remove the entry and lock file of every file no longer in the library (under its lock, the
    file checked missing once more), and temporary entries a killed writer left."""
    for entry_name in sorted(os.listdir(catalog_dir)):
        path = f"{catalog_dir}/{entry_name}"
        if entry_name.startswith(".") and files.TMP_INFIX in entry_name:
            try:
                if time.time() - os.lstat(path).st_mtime > STALE_TMP_S:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        if not entry_name.endswith(_ENTRY_SUFFIX):
            continue
        base = entry_name[: -len(_ENTRY_SUFFIX)]
        if base in names or not basecatalog.is_base_file_name(base):
            continue
        with files.file_lock(catalog_dir, base, wait_s=0) as held:
            if not held or _exists(lib_fd, base):
                continue
            for gone in (entry_name, K.catalog_lock_name(base)):
                try:
                    os.unlink(f"{catalog_dir}/{gone}")
                except FileNotFoundError:
                    pass
            out.removed.append(base)


def _exists(lib_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=lib_fd)
    except FileNotFoundError:
        return False
    return True


def _ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise NotADirectoryError(path)


# ------------------------------------------------------------------------------------------------
# the agent's thread
# ------------------------------------------------------------------------------------------------
class CatalogRefresher:
    """Runs :func:`refresh_catalog` every ``interval_s`` (sooner when a file is settling) in a
    daemon thread at nice +10. ``dirs`` gives (image library, catalog directory) as this process
    sees them, or None when the policy names no image library (then it only waits). One log line
    per pass that hashed, removed, or failed something; ``last`` is the latest summary."""

    def __init__(self, *, dirs: Callable[[], tuple[str, str] | None], log: JsonLog,
                 interval_s: float = DEFAULT_INTERVAL_S, quiet_ns: int = basecatalog.QUIET_NS) -> None:
        self._dirs = dirs
        self._log = log
        self._interval = interval_s
        self._quiet_ns = quiet_ns
        self.stopping = threading.Event()
        self.last: CatalogSummary | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="base-catalog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop (a file being hashed is given up within some 50 ms); True when the thread ended."""
        self.stopping.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def run_once(self) -> CatalogSummary | None:
        dirs = self._dirs()
        if dirs is None:
            return None
        try:
            summary = refresh_catalog(*dirs, quiet_ns=self._quiet_ns, should_stop=self.stopping.is_set)
        except OSError as exc:
            error = f"{dirs[0]} or {dirs[1]}: {exc.strerror or exc}"
            if error != self.error:
                self._log.emit("catalog.failed", level="warning", error=error)
            self.error = error
            return None
        self.error = None
        self.last = summary
        if summary.news:
            self._log.emit("catalog", level="warning" if summary.failed else "info",
                           library=dirs[0], **summary.as_dict())
        return summary

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # this thread only
        except OSError:
            pass
        while not self.stopping.is_set():
            summary = self.run_once()
            wait = self._interval
            if summary is not None and summary.retry_in_s is not None:
                wait = min(wait, summary.retry_in_s + 0.05)
            self.stopping.wait(wait)


def catalog_command(config: Path, *, host_prefix: str = "") -> int:
    """``diskhooks-node catalog``: load the policy, run one pass, print its summary (JSON)."""
    import json
    import sys

    from webhook.reload import SourceError, watch_policy

    try:
        policy = watch_policy(config).get()
    except SourceError as exc:
        print(f"diskhooks-node: {exc}", file=sys.stderr)
        return 2
    try:
        code, summary = run_once_cli(policy, host_prefix=host_prefix)
    except OSError as exc:
        print(f"diskhooks-node: the image library or the catalog cannot be used: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return code


def run_once_cli(policy: Policy, *, host_prefix: str = "") -> tuple[int, dict[str, Any]]:
    """``diskhooks-node catalog``: one pass for the policy's library; (exit status, summary)."""
    prefix = host_prefix.rstrip("/")
    dirs = catalog_dirs(policy, lambda p: prefix + p)
    if dirs is None:
        return 0, {"note": "the policy names no hostDisks.imageLibrary: no base to catalog"}
    summary = refresh_catalog(*dirs)
    return (1 if summary.failed else 0), {"library": dirs[0], "catalog": dirs[1], **summary.as_dict()}
