"""Files the webhook re-reads while it runs: the policy and the plan keys.

Transport layer: this module stats and reads files and logs; it decides nothing about their
contents (``diskplan.policy.load_policy`` and ``diskplan.plankeys.PlanKeyRing`` do).

Kubernetes updates a mounted ConfigMap or Secret without filesystem events: it writes a new
timestamped directory and swaps the ``..data`` symlink, so the visible file keeps its name while
the path resolves to a new inode. A :class:`WatchedFiles` therefore stamps each file by its
resolved path, device, inode, size and mtime (one ``os.stat`` per file, following symlinks) and
reloads when any of them changes. The check runs on the request path, at most once every
``interval`` seconds, under a lock, so a burst of requests costs one stat, and (after
:meth:`WatchedFiles.watch`, which each gunicorn worker calls once it has forked) in a thread of
each process every ``interval`` seconds, so that a process that serves no request meanwhile still
takes in every version that stays on disk longer than that. A reload that fails (unreadable file,
broken policy, missing key) keeps serving the last good value, logs the reason once per change,
and reports the source as stale (``error``; shown by ``/readyz`` and counted in the metrics) until
a good version appears. No request is ever dropped for a reload.

Why the thread: "the last good value" must be the same in every worker. Checked only on
requests, a worker that got none while a good version B was on disk would still hold the version
A before it when a broken version C replaces B, and serve A while its siblings serve B
(``tests/test_server.py::test_policy_reload_and_a_broken_policy`` failed that way now and then
under load, when all of its requests happened to land on one worker).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from diskplan.plan import PlanKeys
from diskplan.plankeys import PlanKeyRing, parse_not_before

if TYPE_CHECKING:
    from diskplan.policy import Policy

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_FILE_BYTES = 1024 * 1024  # a policy or a key larger than this is a mistake


class SourceError(Exception):
    """A watched source cannot be loaded; the message names the file and the reason."""


@dataclass(frozen=True)
class Stamp:
    """What identifies one version of a file (``None`` fields: the file does not exist)."""

    resolved: str
    device: int | None
    inode: int | None
    size: int | None
    mtime_ns: int | None


def stamp(path: Path) -> Stamp:
    """Stamp ``path`` as it is now: stat of the resolved target (the ``..data`` swap shows up)."""
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
    except OSError:
        return Stamp(resolved, None, None, None, None)
    return Stamp(resolved, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_bounded(path: Path, *, what: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` (at most ``max_bytes``), or :class:`SourceError`."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise SourceError(f"{what} {path}: the file does not exist") from None
    except OSError as exc:
        raise SourceError(f"{what} {path}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise SourceError(f"{what} {path}: larger than {max_bytes} bytes")
    return data


class WatchedFiles(Generic[T]):
    """A value loaded from some files, reloaded when they change (see the module docstring).

    ``load`` reads the files itself and raises :class:`SourceError` (or any exception from the
    pure parser, logged with its message) when the new version is unusable. The first load
    happens in the constructor and raises :class:`SourceError`: a server must not start without
    a usable value.
    """

    def __init__(self, name: str, paths: Sequence[Path], load: Callable[[], T], *,
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.on_failure = on_failure
        self._paths = tuple(paths)
        self._load = load
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps = self._stamp_all()
        try:
            self._value: T = load()
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the parser's reason, e.g. Refused(field, reason)
            raise SourceError(f"{name}: {exc}") from None
        self._error: str | None = None
        self._checked = clock()
        self.generation = 1
        self.failures = 0
        self._watcher_pid: int | None = None
        self._unwatch = threading.Event()

    def watch(self) -> None:
        """Check every ``interval`` seconds in a daemon thread of this process as well (see the
        module docstring). Threads do not survive a fork: each gunicorn worker calls this after it
        forked; a second call in the same process does nothing, and so does an infinite interval."""
        if self._watcher_pid == os.getpid() or not math.isfinite(self._interval):
            return
        self._watcher_pid = os.getpid()
        self._unwatch = threading.Event()
        threading.Thread(target=self._watch_loop, args=(self._unwatch,), name=f"watch {self.name}",
                         daemon=True).start()

    def unwatch(self) -> None:
        """End this process's watcher thread (tests)."""
        self._unwatch.set()
        self._watcher_pid = None

    def _watch_loop(self, stop: threading.Event) -> None:
        pause = max(self._interval, 0.05)  # --reload-interval 0 means every request, not a busy loop
        while not stop.wait(pause):
            try:
                self.check()
            except Exception:  # never let the watcher die; the request path still checks
                log.exception("checking %s for changes failed", self.name)

    def _stamp_all(self) -> tuple[Stamp, ...]:
        return tuple(stamp(p) for p in self._paths)

    def get(self) -> T:
        """The current value, after a cheap check for changes if ``interval`` has passed."""
        now = self._clock()
        if now - self._checked >= self._interval:
            self.check(now)
        return self._value

    def check(self, now: float | None = None) -> None:
        """Stat the files now and reload if they changed (one caller at a time)."""
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking; serve the current value meanwhile
        try:
            self._checked = self._clock() if now is None else now
            stamps = self._stamp_all()
            if stamps == self._stamps and self._error is None:
                return
            self._stamps = stamps
            try:
                value = self._load()
            except Exception as exc:  # noqa: BLE001 - keep the last good value, report not ready
                # While broken, retry at every check (a writer may still be writing the file),
                # but log only when the reason changes.
                error = str(exc) if isinstance(exc, SourceError) else f"{self.name}: {exc}"
                if error != self._error:
                    self.failures += 1
                    log.error("reload of %s failed, still serving the previous version: %s",
                              self.name, error)
                    if self.on_failure is not None:
                        self.on_failure(error)
                self._error = error
                return
            self._value = value
            self._error = None
            self.generation += 1
            log.info("reloaded %s (version %d)", self.name, self.generation)
        finally:
            self._lock.release()

    @property
    def error(self) -> str | None:
        """Why the newest version on disk is not in use (None: it is)."""
        return self._error

    @property
    def ready(self) -> bool:
        return self._error is None


def watch_policy(path: Path, *, interval: float = 1.0) -> WatchedFiles[Policy]:
    """The policy file (YAML), parsed strictly by ``load_policy``."""
    from diskplan.policy import load_policy  # here, so that webhook.tls can use stamp() alone

    def load() -> Policy:
        data = read_bounded(path, what="policy")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"policy {path}: not UTF-8 text") from None
        try:
            return load_policy(text)
        except Exception as exc:  # noqa: BLE001 - Refused(field, reason) from the strict loader
            raise SourceError(f"policy {path}: {exc}") from None

    return WatchedFiles("policy", [path], load, interval=interval)


PLAN_KEY_FILES = ("current", "previous", "current-not-before")


def load_plan_key_ring(directory: Path) -> PlanKeyRing:
    """``current`` (required), ``previous`` and ``current-not-before`` (optional) from
    ``directory``, as stripped bytes. Time-free: :meth:`PlanKeyRing.keys_at` picks the signer."""
    current = read_bounded(directory / "current", what="plan key").strip()
    previous: bytes | None = None
    prev_path = directory / "previous"
    if os.path.exists(prev_path):
        previous = read_bounded(prev_path, what="plan key").strip() or None
    not_before: int | None = None
    nb_path = directory / "current-not-before"
    if os.path.exists(nb_path):
        try:
            not_before = parse_not_before(read_bounded(nb_path, what="plan key"))
        except ValueError as exc:
            raise SourceError(f"plan key {nb_path}: {exc}") from None
    try:
        return PlanKeyRing(current=current, previous=previous, current_not_before=not_before)
    except ValueError as exc:
        raise SourceError(f"plan keys {directory}: {exc}") from None


def load_plan_keys(directory: Path, *, now: float | None = None) -> PlanKeys:
    """The keys of ``directory`` as they apply at unix time ``now`` (default: the clock's time)."""
    return load_plan_key_ring(directory).keys_at(time.time() if now is None else now)


class TimedPlanKeys:
    """The plan keys to use now: the watched key directory, read at the wall-clock time of each
    :meth:`get`, so that a rotation's new key starts signing when its ``current-not-before``
    passes even though no file changes then (see ``diskplan/plankeys.py``)."""

    def __init__(self, files: WatchedFiles[PlanKeyRing], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = files.name
        self.files = files
        self._clock = clock
        self._signing_current: bool | None = None

    def get(self) -> PlanKeys:
        ring = self.files.get()
        now = self._clock()
        signing_current = ring.signs_with_current(now)
        if signing_current != self._signing_current:  # log the switch (a race logs it twice)
            if not signing_current:
                log.info("plan keys: signing with the previous key until unix time %s; the new "
                         "current key is accepted already and signs from then on",
                         ring.current_not_before)
            elif self._signing_current is not None:
                log.info("plan keys: signing with the current key from now on")
            self._signing_current = signing_current
        return ring.keys_at(now)

    def signing(self) -> str:
        """``current`` or ``previous``: which key signs now (shown by ``/readyz``)."""
        return "current" if self.files.get().signs_with_current(self._clock()) else "previous"

    def check(self, now: float | None = None) -> None:
        self.files.check(now)

    def watch(self) -> None:
        self.files.watch()

    @property
    def generation(self) -> int:
        return self.files.generation

    @property
    def on_failure(self) -> Callable[[str], None] | None:
        return self.files.on_failure

    @on_failure.setter
    def on_failure(self, value: Callable[[str], None] | None) -> None:
        self.files.on_failure = value

    @property
    def error(self) -> str | None:
        return self.files.error

    @property
    def ready(self) -> bool:
        return self.files.ready


def watch_plan_keys(directory: Path, *, interval: float = 1.0,
                    clock: Callable[[], float] = time.time) -> TimedPlanKeys:
    """The plan-key directory (the chart's Secret): files ``current``, optional ``previous`` and
    ``current-not-before``; the signing key is chosen at each call with ``clock`` (unix time)."""
    files = WatchedFiles("plan keys", [directory / name for name in PLAN_KEY_FILES],
                         lambda: load_plan_key_ring(directory), interval=interval)
    return TimedPlanKeys(files, clock=clock)


class Fixed(Generic[T]):
    """A value that never changes (an ephemeral key), with the same interface as WatchedFiles."""

    def __init__(self, name: str, value: T) -> None:
        self.name = name
        self.on_failure: Callable[[str], None] | None = None
        self._value = value
        self.generation = 1
        self.failures = 0

    def get(self) -> T:
        return self._value

    def check(self, now: float | None = None) -> None:
        return None

    def watch(self) -> None:
        return None

    @property
    def error(self) -> str | None:
        return None

    @property
    def ready(self) -> bool:
        return True
