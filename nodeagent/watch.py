"""List-then-watch of one resource with a label selector, kept in a small cache: the agent's informer.

A :class:`ResourceWatch` runs in its own thread: it lists (paged), hands every object to
``on_change`` (``SYNC``; objects gone since the last list as ``DELETED``), then watches from the
list's ``resourceVersion`` with the official client's :class:`kubernetes.watch.Watch`, resuming
from the last version seen (bookmarks included) when the server ends the watch, and lists again
when the server answers 410 Gone (the version is too old). Errors back off (0.5 s doubling to 30 s)
and never end the thread; only :meth:`stop` does (the stop event, then the watch's socket is shut so
that a blocked read returns at once).

The cache keeps a slimmed copy of each object (``slim``: what the decisions read, without
``managedFields`` and the bulk of the spec), keyed by ``(namespace, name)``; ``on_change`` gets
the slim copy too. ``on_change`` runs in the watch thread: it must be quick (enqueue a key).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from hooksidecar.logfmt import JsonLog
from nodeagent.home import object_key
from nodeagent.kube import describe_error

SYNC = "SYNC"
ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"
PAGE_SIZE = 500
WATCH_TIMEOUT = 300  # seconds the server keeps one watch open; then it is resumed
MIN_BACKOFF, MAX_BACKOFF = 0.5, 30.0

Key = tuple[str, str]


class _Stopped(Exception):
    """The watch was asked to stop while it was opening a request."""


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


class ResourceWatch:
    """Objects of one resource matching ``label_selector``, listed and watched (see module doc).

    ``list_fn(**kwargs)`` is the client's list call of the resource (e.g.
    ``CustomObjectsApi.list_cluster_custom_object`` bound to group, version and plural).
    """

    def __init__(self, *, resource: str, list_fn: Callable[..., Any], label_selector: str,
                 on_change: Callable[[str, dict[str, Any]], None], stop: threading.Event, log: JsonLog,
                 slim: Callable[[Mapping[str, Any]], dict[str, Any]] = dict,
                 on_restart: Callable[[str], None] | None = None,
                 watch_timeout: int = WATCH_TIMEOUT, page_size: int = PAGE_SIZE) -> None:
        self.resource = resource
        self.label_selector = label_selector
        self._list_fn = list_fn
        self._on_change = on_change
        self._stop = stop
        self._log = log
        self._slim = slim
        self._on_restart = on_restart
        self._watch_timeout = watch_timeout
        self._page_size = page_size
        self._cache: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._watch: Any = None
        self.synced = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{resource}", daemon=True)

    # --- the cache -----------------------------------------------------------------------------
    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._cache.get((namespace, name))

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._cache.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    # --- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop (the shared stop event must be set by the caller or is set here); True when the
        thread ended within ``timeout`` seconds."""
        self._stop.set()
        deadline = timeout
        step = 0.1
        while self._thread.is_alive() and deadline > 0:
            watch = self._watch
            if watch is not None:
                watch.stop()  # shuts the socket down: a read blocked in another thread returns
            self._thread.join(step)
            deadline -= step
        return not self._thread.is_alive()

    def _run(self) -> None:
        backoff = MIN_BACKOFF
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                version = self._watch_from(version)
                backoff = MIN_BACKOFF
            except _Stopped:
                break
            except Exception as exc:  # noqa: BLE001 - a watch must outlive every error
                if self._stop.is_set():
                    break
                status = _status(exc)
                if status == 410:  # Gone: our version is older than the server keeps; list again
                    version = None
                    self._restarted("gone")
                    self._log.emit("watch.relist", level="info", resource=self.resource, reason="410 Gone")
                    continue
                self.last_error = describe_error(exc)
                self._restarted("error")
                self._log.emit("watch.error", level="warning", resource=self.resource,
                               error=self.last_error, retryIn=backoff)
                if status is not None and status in (401, 403):
                    version = None  # permissions may have changed: start from a list
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _restarted(self, reason: str) -> None:
        if self._on_restart is not None:
            self._on_restart(reason)

    def _relist(self) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            if self._stop.is_set():
                raise _Stopped
            kwargs: dict[str, Any] = {"label_selector": self.label_selector, "limit": self._page_size,
                                      "_request_timeout": (10, 120)}
            if token:
                kwargs["_continue"] = token
            page = self._list_fn(**kwargs)
            items.extend(o for o in page.get("items") or [] if isinstance(o, dict))
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                version = str(meta.get("resourceVersion") or "")
                break
        fresh = {object_key(o): self._slim(o) for o in items}
        with self._lock:
            gone = [obj for key, obj in self._cache.items() if key not in fresh]
            self._cache = fresh
        for obj in gone:
            self._on_change(DELETED, obj)
        for obj in fresh.values():
            self._on_change(SYNC, obj)
        self.last_error = None
        self.synced.set()
        self._log.emit("watch.synced", level="info", resource=self.resource, objects=len(fresh),
                       resourceVersion=version, selector=self.label_selector)
        return version

    def _open(self, **kwargs: Any) -> Any:
        """The list call in watch mode, for :meth:`kubernetes.watch.Watch.stream`."""
        if self._stop.is_set():
            raise _Stopped
        response = self._list_fn(**kwargs)
        if self._stop.is_set():
            response.close()
            raise _Stopped
        return response

    def _watch_from(self, version: str) -> str:
        """Watch from ``version`` until the server ends the watch; the version to resume from."""
        from kubernetes import watch

        w = watch.Watch(return_type="object")
        self._watch = w
        try:
            stream = w.stream(self._open, resource_version=version, label_selector=self.label_selector,
                              timeout_seconds=self._watch_timeout, allow_watch_bookmarks=True,
                              _request_timeout=(10, self._watch_timeout + 30))
            for event in stream:
                if self._stop.is_set():
                    break
                kind = event.get("type") if isinstance(event, Mapping) else None
                raw = event.get("raw_object") if isinstance(event, Mapping) else None
                if kind == "BOOKMARK" or not isinstance(raw, Mapping):
                    version = w.resource_version or version
                    continue
                if kind not in (ADDED, MODIFIED, DELETED):
                    continue
                obj = self._slim(raw)
                key = object_key(obj)
                with self._lock:
                    if kind == DELETED:
                        self._cache.pop(key, None)
                    else:
                        self._cache[key] = obj
                version = w.resource_version or version
                self._on_change(kind, obj)
        finally:
            self._watch = None
        return version
