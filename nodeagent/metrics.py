"""The node agent's Prometheus figures, every one labelled with the node (``node``).

- ``diskhooks_node_vmis``: VMIs scheduled on this node (the VMI watch's cache).
- ``diskhooks_node_vms``: VMs whose home is this node (label ``diskhooks.io/node``).
- ``diskhooks_node_images``: planned images of those VMs (disks and persistent roots of their
  verified plans).
- ``diskhooks_node_home_decisions_total{source,outcome}``: home decisions, by source (``vmi``,
  ``marker``) and outcome (``record``, ``already``, ``conflict``, or why it was skipped).
- ``diskhooks_node_homes_recorded_total{source}``: homes written on VMs.
- ``diskhooks_node_expansions_total{outcome}``: running disks grown online (``grown``) or not
  (``failed``).
- ``diskhooks_node_reconciles_total{kind}`` and ``diskhooks_node_reconcile_errors_total{kind}``:
  keys worked on (``vmi``, ``vm``, ``marker``) and those that failed and were queued again.
- ``diskhooks_node_reconcile_seconds{kind}``: time to reconcile one key (histogram).
- ``diskhooks_node_watch_restarts_total{resource,reason}``: lists after 410 Gone (``gone``) and
  watches resumed after an error (``error``).

A registry of its own (not the process-global one), so several agents can run in one test process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._vmis = Gauge("diskhooks_node_vmis", "VMIs scheduled on this node", ["node"], registry=r)
        self._vms = Gauge("diskhooks_node_vms", "VMs whose home is this node", ["node"], registry=r)
        self._images = Gauge("diskhooks_node_images",
                             "Planned images (disks, persistent roots) of the VMs whose home is this node",
                             ["node"], registry=r)
        self._decisions = Counter("diskhooks_node_home_decisions",
                                  "Home-node decisions by source and outcome",
                                  ["node", "source", "outcome"], registry=r)
        self._recorded = Counter("diskhooks_node_homes_recorded", "Home nodes written on VMs",
                                 ["node", "source"], registry=r)
        self._expansions = Counter("diskhooks_node_expansions", "Running disks grown online, by outcome",
                                   ["node", "outcome"], registry=r)
        self._reconciles = Counter("diskhooks_node_reconciles", "Keys reconciled", ["node", "kind"],
                                   registry=r)
        self._errors = Counter("diskhooks_node_reconcile_errors", "Reconciles that failed and were "
                               "queued again", ["node", "kind"], registry=r)
        self._seconds = Histogram("diskhooks_node_reconcile_seconds", "Time to reconcile one key",
                                  ["node", "kind"], buckets=BUCKETS, registry=r)
        self._restarts = Counter("diskhooks_node_watch_restarts", "Watch re-lists (gone) and resumes "
                                 "after errors", ["node", "resource", "reason"], registry=r)

    def set_vmis(self, count: int) -> None:
        self._vmis.labels(node=self.node).set(count)

    def set_vms(self, count: int) -> None:
        self._vms.labels(node=self.node).set(count)

    def set_images(self, count: int) -> None:
        self._images.labels(node=self.node).set(count)

    def decision(self, source: str, outcome: str) -> None:
        self._decisions.labels(node=self.node, source=source, outcome=outcome).inc()

    def recorded(self, source: str) -> None:
        self._recorded.labels(node=self.node, source=source).inc()

    def expansion(self, outcome: str) -> None:
        self._expansions.labels(node=self.node, outcome=outcome).inc()

    def reconciled(self, kind: str, seconds: float, *, failed: bool) -> None:
        self._reconciles.labels(node=self.node, kind=kind).inc()
        self._seconds.labels(node=self.node, kind=kind).observe(seconds)
        if failed:
            self._errors.labels(node=self.node, kind=kind).inc()

    def watch_restart(self, resource: str, reason: str) -> None:
        self._restarts.labels(node=self.node, resource=resource, reason=reason).inc()

    def exposition(self) -> bytes:
        """The text exposition format of every figure."""
        return generate_latest(self.registry)
