"""``diskhooks-node serve``: the node agent process (one per node, the chart's DaemonSet).

``diskhooks-node serve --config POLICY.yaml --node-name NAME [--kubeconfig FILE] [--host-prefix DIR]
[--kubelet-pods-dir DIR] [--metrics-port N] [--plan-keys-dir DIR]``

- ``--config``: the platform policy (the chart's ConfigMap); re-read when it changes.
- ``--node-name``: this node (the DaemonSet passes ``spec.nodeName``).
- ``--kubeconfig``: credentials; default: the Pod's ServiceAccount (in-cluster).
- ``--host-prefix``: prefixes every node path (``hostDisks.root``, the kubelet pods directory):
  the node's root filesystem as this process sees it (tests and demos; default none).
- ``--kubelet-pods-dir``: default ``/var/lib/kubelet/pods``.
- ``--metrics-port``: ``/metrics``, ``/healthz`` and ``/readyz`` (default 9180; 0: any free port,
  named on the ``serving`` log line).
- ``--plan-keys-dir``: the plan keys (the chart's Secret: ``current``, optional ``previous`` and
  ``current-not-before``; default ``/etc/diskhooks/plan-keys``); re-read when they change.

``diskhooks-node catalog --config POLICY.yaml [--host-prefix DIR]``: one pass of the base catalog
over the policy's image library (:mod:`nodeagent.catalog`), its summary as one JSON object on
stdout; exit 1 when a file could not be hashed or recorded.

Transport only: parses arguments, loads the files (``webhook.reload``'s readers, shared with the
webhook), builds the client, starts :class:`nodeagent.agent.Agent` and the base catalog's
:class:`nodeagent.catalog.CatalogRefresher` (the policy's image library hashed into
``<hostDisks.root>/.diskhooks/catalog``, at nice +10; nothing without an image library), waits for
SIGTERM or SIGINT, stops both (within a few seconds) and exits 0. Exit 2 on unusable arguments or files, 1 when the
agent cannot start (the metrics port is taken, no credentials). Logs: one JSON object per line on
stderr (``hooksidecar.logfmt.JsonLog``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from diskplan.plan import DNS_SUBDOMAIN

PROG = "diskhooks-node"
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_METRICS_PORT = 9180
DEFAULT_PLAN_KEYS_DIR = "/etc/diskhooks/plan-keys"
DEFAULT_KUBELET_PODS_DIR = "/var/lib/kubelet/pods"
STOP_TIMEOUT = 5.0


def _node_name(value: str) -> str:
    if not DNS_SUBDOMAIN.match(value):
        raise argparse.ArgumentTypeError(f"{value[:80]!r} is not a node name (a DNS subdomain)")
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:20]!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def _abs_dir(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"{value[:80]!r} must be an absolute path")
    return value


def _prefix(value: str) -> str:
    """``--host-prefix``: an absolute directory, or "" (the default: no prefix)."""
    return value if value == "" else _abs_dir(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="diskhooks node agent: records each VM's home "
                                "node and grows running disks online")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the agent until SIGTERM")
    serve.add_argument("--config", required=True, type=Path, metavar="POLICY.yaml",
                       help="the platform policy (re-read when it changes)")
    serve.add_argument("--node-name", required=True, type=_node_name, metavar="NAME",
                       help="this node's name (downward API spec.nodeName)")
    serve.add_argument("--kubeconfig", metavar="FILE",
                       help="kubeconfig to use (default: the Pod's ServiceAccount)")
    serve.add_argument("--host-prefix", default="", type=_prefix, metavar="DIR",
                       help="prefix of every node path (default: none)")
    serve.add_argument("--kubelet-pods-dir", default=DEFAULT_KUBELET_PODS_DIR, type=_abs_dir,
                       metavar="DIR",
                       help=f"the kubelet's pods directory (default {DEFAULT_KUBELET_PODS_DIR})")
    serve.add_argument("--metrics-port", default=DEFAULT_METRICS_PORT, type=_port, metavar="N",
                       help=f"port of /metrics, /healthz, /readyz (default {DEFAULT_METRICS_PORT}; 0: any)")
    serve.add_argument("--plan-keys-dir", default=Path(DEFAULT_PLAN_KEYS_DIR), type=Path, metavar="DIR",
                       help=f"the plan keys (default {DEFAULT_PLAN_KEYS_DIR})")
    from nodeagent.migrate.options import add_migrate_arguments, add_serve_options
    add_serve_options(serve)
    add_migrate_arguments(sub.add_parser("migrate", help="move a stopped VM and its disks to another node "
                                         "(as kubectl diskhooks migrate)"))
    catalog = sub.add_parser("catalog", help="hash the image library's new or changed bases into "
                             "the node's base catalog, once")
    catalog.add_argument("--config", required=True, type=Path, metavar="POLICY.yaml",
                         help="the platform policy (hostDisks.root, hostDisks.imageLibrary)")
    catalog.add_argument("--host-prefix", default="", type=_prefix, metavar="DIR",
                         help="prefix of every node path (default: none)")
    return p


def serve(args: argparse.Namespace) -> int:
    from hooksidecar.logfmt import JsonLog
    from webhook.reload import SourceError, watch_plan_keys, watch_policy

    log = JsonLog(sys.stderr)
    try:
        policy = watch_policy(args.config)
        plan_keys = watch_plan_keys(args.plan_keys_dir)
    except SourceError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from nodeagent.agent import Agent
    from nodeagent.catalog import CatalogRefresher, catalog_dirs
    from nodeagent.kube import Kube, load_client
    from nodeagent.migrate.options import migration_config

    try:
        api = load_client(args.kubeconfig)
    except Exception as exc:  # noqa: BLE001 - the client's reason (no file, no in-cluster credentials)
        print(f"{PROG}: cannot build a Kubernetes client: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        agent = Agent(node=args.node_name, kube=Kube(api), policy=policy.get, plan_keys=plan_keys.get,
                      log=log, host_prefix=args.host_prefix, kubelet_pods_dir=args.kubelet_pods_dir,
                      metrics_port=args.metrics_port, migration=migration_config(args, log))
    except OSError as exc:
        print(f"{PROG}: cannot serve /metrics on port {args.metrics_port} or migrations on port "
              f"{args.migration_port}: {exc.strerror or exc}", file=sys.stderr)
        api.close()
        return EXIT_FAILED

    paths = agent.paths
    refresher = CatalogRefresher(dirs=lambda: catalog_dirs(policy.get(), paths.on_host), log=log)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        log.emit("signal", level="info", signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.start()
        refresher.start()
        log.emit("serving", level="info", node=args.node_name,
                 metricsPort=agent.status.port if agent.status else None,
                 root=agent.paths.on_host(policy.get().host_disks.root),
                 kubeletPodsDir=agent.paths.on_host(args.kubelet_pods_dir),
                 onlineExpand=policy.get().host_disks.online_expand)
        while not stop.wait(1.0):
            policy.check()
            plan_keys.check()
    finally:
        ended = refresher.stop(1.0)  # a file being hashed is given up within some 50 ms
        ended = agent.stop(STOP_TIMEOUT) and ended
        log.emit("stopped", level="info", node=args.node_name, clean=ended)
        api.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "catalog":
        from nodeagent.catalog import catalog_command
        return catalog_command(args.config, host_prefix=args.host_prefix)
    if args.command == "migrate":
        from nodeagent.migrate.command import run
        return run(args)
    return EXIT_USAGE  # argparse refuses other commands before this


if __name__ == "__main__":
    raise SystemExit(main())
