"""diskhooks-node: the per-node agent (home node of a VM, online growth of its running disks, the
node's disk capacity).

One process per node (the chart's DaemonSet), on top of :mod:`diskplan`. Shape of KubeVirt's
virt-handler: watches -> work queue -> reconcile one key (a pure decision, then a small I/O step)
-> metrics, a log line, an Event.

Pure (no I/O): ``home`` (what to record from a VMI or a marker), ``events`` (Event bodies),
``objects`` (slim cache copies), ``workqueue``. Thin I/O: ``kube`` (the API server, official
client), ``watch`` (list + watch per resource), ``scan`` (markers on the node), ``expand``
(libvirt), ``nodestatus`` (its Node's ``diskhooks.io/storage``), ``httpserver`` (``/metrics``,
``/healthz``, ``/readyz``), ``metrics``. Wiring: ``reconcile``, ``agent``, ``capacity`` (the capacity
pass, its own thread; rules in :mod:`diskplan.capacity`), ``cli`` (``diskhooks-node serve``). Logs: ``hooksidecar.logfmt.JsonLog``,
one JSON object per line on stderr, every line with ``event`` and ``level``.
"""
