"""Command-line options of migrations: ``diskhooks-node serve``'s listener flags and the ``migrate``
command's arguments (shared by ``diskhooks-node migrate`` and ``kubectl-diskhooks migrate``).

- ``--migration-tls-dir DIR`` (default :data:`DEFAULT_TLS_DIR`): ``ca.crt``, ``tls.crt``,
  ``tls.key`` (the chart's Secret). Missing directory: migrations are off on this node (logged).
- ``--migration-address ADDR`` (default ``0.0.0.0``): where the listener binds.
- ``--migration-port N`` (default :data:`~diskplan.migration.DEFAULT_PORT`): the same on every node
  (the source connects to the target Node's InternalIP on it).
- ``--migration-bandwidth MIB_S`` (default 0: none): rsync's ``--bwlimit`` for each outgoing move.
- ``--migration-housekeeping D`` (default 5m): how often the agent finishes what a crash left and
  deletes kept copies of VMs that started on their new node (policy ``nodeAgent.migration.keepSource``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from typing import TYPE_CHECKING

from diskplan.migration import DEFAULT_PORT

if TYPE_CHECKING:
    from hooksidecar.logfmt import JsonLog
    from nodeagent.migrate.service import MigrationConfig

DEFAULT_TLS_DIR = "/etc/diskhooks/migration-tls"
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:60]!r} is not an IP address") from None


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:20]!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _bandwidth(value: str) -> float:
    try:
        mib = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:20]!r} is not a number of MiB/s") from None
    if not 0 <= mib <= 1e6:
        raise argparse.ArgumentTypeError(f"{value[:20]} MiB/s is out of range (0-1000000)")
    return mib


def _interval(value: str) -> float:
    seconds = duration(value)
    if not 5 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value[:20]} is out of range (5s to 1h)")
    return seconds


def duration(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h30m``: seconds (0: no limit)."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.match(text)
        if not text or match is None or not any(match.groups()):
            raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a duration (90s, 15m, 1h30m)") from None
        h, m, s = match.groups()
        seconds = int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0)
    if seconds < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return seconds


def add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--migration-tls-dir", default=DEFAULT_TLS_DIR, metavar="DIR",
                   help=f"mutual-TLS files of cold migrations: ca.crt, tls.crt, tls.key (default "
                   f"{DEFAULT_TLS_DIR}; missing: migrations are off on this node)")
    p.add_argument("--migration-address", default="0.0.0.0", type=_address, metavar="ADDR",
                   help="address the migration listener binds (default 0.0.0.0)")
    p.add_argument("--migration-port", default=DEFAULT_PORT, type=_port, metavar="N",
                   help=f"port of the migration listener, the same on every node (default {DEFAULT_PORT})")
    p.add_argument("--migration-bandwidth", default=0.0, type=_bandwidth, metavar="MIB_S",
                   help="limit each outgoing migration to this many MiB/s (default 0: no limit)")
    p.add_argument("--migration-housekeeping", default=300.0, type=_interval, metavar="D",
                   help="how often leftovers of migrations are cleaned up and kept copies of VMs that "
                   "started on their new node deleted (5s to 1h; default 5m)")


def migration_config(args: argparse.Namespace, log: JsonLog) -> MigrationConfig | None:
    from nodeagent.migrate.service import MigrationConfig

    directory = str(args.migration_tls_dir)
    if not os.path.isdir(directory):
        log.emit("migrate.disabled", level="info", tlsDir=directory,
                 reason="no migration TLS directory: this node neither sends nor receives VMs")
        return None
    return MigrationConfig(tls_dir=directory, address=args.migration_address, port=args.migration_port,
                           bandwidth_mib=args.migration_bandwidth,
                           housekeeping_interval=args.migration_housekeeping)


def add_migrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", metavar="NAMESPACE/VM", help="the VirtualMachine to move")
    p.add_argument("--to", metavar="NODE", help="the node to move it to")
    p.add_argument("--stop", action="store_true", help="stop the VM first if it runs (runStrategy Halted)")
    p.add_argument("--delete-source", action="store_true",
                   help="delete the copy on the old node once moved (default: kept aside there)")
    p.add_argument("--cancel", action="store_true", help="withdraw a migration request not yet done")
    p.add_argument("--timeout", type=duration, default=3600.0, metavar="D",
                   help="give up waiting after D (90s, 15m, 1h; 0: no limit; default 1h); the "
                   "migration itself goes on")
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", metavar="NAME", help="kubeconfig context")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per phase)")
