"""A work queue of keys, as client-go's: each key waits once, is worked on by one worker at a time,
and a key added while it is being worked on is worked on again afterwards. Failed keys come back
after an exponential delay (:meth:`WorkQueue.retry`). Thread-safe; no Kubernetes here.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

BASE_DELAY = 0.5
MAX_DELAY = 120.0


class WorkQueue(Generic[K]):
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, base_delay: float = BASE_DELAY,
                 max_delay: float = MAX_DELAY) -> None:
        self._clock = clock
        self._base = base_delay
        self._max = max_delay
        self._cond = threading.Condition()
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()  # in _ready
        self._active: set[K] = set()  # being worked on
        self._dirty: set[K] = set()  # added again while active
        self._later: list[tuple[float, int, K]] = []  # (due, sequence, key)
        self._seq = 0
        self._failures: dict[K, int] = {}
        self._closed = False

    def add(self, key: K) -> None:
        """Queue ``key`` now (once; if a worker has it, again after that worker is done)."""
        with self._cond:
            if self._closed:
                return
            if key in self._active:
                self._dirty.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._ready.append(key)
                self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds."""
        with self._cond:
            if self._closed:
                return
            self._seq += 1
            heapq.heappush(self._later, (self._clock() + max(0.0, delay), self._seq, key))
            self._cond.notify()

    def retry(self, key: K) -> float:
        """Queue ``key`` again after its next backoff delay (0.5 s doubling, at most 120 s); the
        delay chosen."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self._base * float(2 ** min(failures, 30)), self._max)
        self.add_after(key, delay)
        return delay

    def failures(self, key: K) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """``key`` succeeded: its next failure starts from the base delay."""
        with self._cond:
            self._failures.pop(key, None)

    def get(self, timeout: float | None = None) -> K | None:
        """The next key (the caller must call :meth:`done` with it), or None after ``timeout``
        seconds or when the queue is closed."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._promote()
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._active.add(key)
                    return key
                waits = []
                if self._later:
                    waits.append(self._later[0][0] - self._clock())
                if deadline is not None:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        return None
                    waits.append(remaining)
                self._cond.wait(max(0.0, min(waits)) if waits else None)

    def done(self, key: K) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                if key not in self._queued:
                    self._queued.add(key)
                    self._ready.append(key)
                    self._cond.notify()

    def _promote(self) -> None:
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            _, _, key = heapq.heappop(self._later)
            if key in self._active:
                self._dirty.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._ready.append(key)

    def close(self) -> None:
        """Wake every waiting worker; :meth:`get` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._later)
