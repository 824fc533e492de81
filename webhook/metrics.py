"""Prometheus metrics of the webhook.

Transport layer: counts and times what the routes did; decides nothing.

Under gunicorn every worker is its own process, so the numbers live in prometheus_client's
multiprocess mode: each process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` (answered by whichever worker) merges all of them. The CLI creates that directory and
sets the variable *before* prometheus_client is first imported (the library picks its storage at
import time), and removes a dead worker's live gauges in gunicorn's ``child_exit`` hook. Without
the variable (tests, a single process), each :class:`Metrics` has its own registry, so several
apps in one process do not collide.

Label values are bounded: ``kind`` is VirtualMachine, VirtualMachineInstance, Pod, other or
unknown (a malformed request); ``operation`` is CREATE, UPDATE, DELETE, CONNECT or unknown.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RESULTS = ("allowed", "patched", "denied", "error", "malformed")


class Metrics:
    """The webhook's metrics, registered in a registry of their own."""

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "diskhooks_admission_requests", "Admission reviews answered, by route, kind, "
            "operation and result (allowed: no patch, patched, denied, error: a diskhooks bug "
            "answered with a denial, malformed: HTTP 4xx).",
            ["route", "kind", "operation", "result"], registry=self.registry)
        self.denials = Counter(
            "diskhooks_admission_denials", "Admission reviews denied, by kind.",
            ["kind"], registry=self.registry)
        self.latency = Histogram(
            "diskhooks_admission_duration_seconds", "Time to answer an admission review, from "
            "the request body read to the response built, by kind and operation.",
            ["kind", "operation"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.reload_failures = Counter(
            "diskhooks_config_reload_failures", "Reloads of the policy or the plan keys that "
            "failed (the previous version stays in use), per worker process.",
            ["source"], registry=self.registry)

    def observe(self, *, route: str, kind: str, operation: str, result: str, seconds: float) -> None:
        self.requests.labels(route=route, kind=kind, operation=operation, result=result).inc()
        if result in ("denied", "error"):
            self.denials.labels(kind=kind).inc()
        if result != "malformed":
            self.latency.labels(kind=kind, operation=operation).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format of every worker's metrics (or this process's)."""
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """gunicorn ``child_exit`` hook: drop the dead worker's live gauges (counters stay summed)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
