"""``kubectl diskhooks migrate NS/VM --to NODE [--stop] [--delete-source] [--timeout D]``.

The user-facing command (console script ``kubectl-diskhooks``, so ``kubectl diskhooks ...`` finds
it as a kubectl plugin; also ``diskhooks-node migrate``). It runs with the user's own kubeconfig and
rights: who may update the VM may ask for its migration. It

1. reads the VM (home node, status); with ``--stop`` stops a running VM (``runStrategy: Halted``)
   and waits until its VMI is gone;
2. sets ``diskhooks.io/migrate-to: NODE`` (and ``diskhooks.io/migrate-delete-source: "true"`` with
   ``--delete-source``) by a merge patch; the webhook's refusal, if any, is printed as it is;
3. follows ``diskhooks.io/migration-status`` (bytes, rate, ETA on a progress bar on a terminal,
   else a line per phase) until the outcome.

Exit 0 only when the VM's home is NODE; 1 when the migration failed, was cancelled, or the wait
timed out (the migration goes on: ``--cancel`` withdraws it); 2 for unusable arguments.
``--cancel`` removes the request and waits for the agent to confirm.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from diskplan import keys as K
from diskplan.migration import (
    ANN_MIGRATE_DELETE_SOURCE,
    ANN_MIGRATE_TO,
    CANCELLED,
    SUCCEEDED,
    MigrationStatus,
    migrate_to_of,
    status_of,
    stop_problem,
)
from diskplan.plan import DNS_LABEL, DNS_SUBDOMAIN, is_node_name
from nodeagent import home as H
from nodeagent.migrate.options import add_migrate_arguments

PROG = "kubectl diskhooks"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
POLL = 0.5
SILENT_AGENT = 60.0  # no status this long after the request: say what may be wrong
GROUP, VERSION = "kubevirt.io", "v1"


class CommandError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="diskhooks: move a stopped VM and its local disks "
                                "to another node")
    sub = p.add_subparsers(dest="command", required=True)
    add_migrate_arguments(sub.add_parser("migrate", help="move a VM to another node (cold migration)"))
    return p


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def eta(status: MigrationStatus) -> str:
    if status.rate <= 0 or status.total <= status.bytes:
        return "--"
    left = int((status.total - status.bytes) / status.rate)
    return f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}" if left >= 3600 else \
        f"{left // 60}:{left % 60:02d}"


def progress_line(status: MigrationStatus, width: int = 30) -> str:
    """``Copying  [#########.........]  1.0 GiB / 2.0 GiB  50%  85.3 MiB/s  ETA 0:12``."""
    fraction = status.bytes / status.total if status.total else 0.0
    filled = int(fraction * width)
    bar = "#" * filled + "." * (width - filled)
    text = (f"{status.phase:<11} [{bar}] {human(status.bytes)} / {human(status.total)} "
            f"{fraction * 100:3.0f}%  {human(status.rate)}/s  ETA {eta(status)}")
    if status.error and not status.done:
        text += f"  ({status.error[:80]})"
    return text


class Vms:
    """The user's view of VirtualMachines and VMIs (their own kubeconfig)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.custom: Any = client.CustomObjectsApi(api_client)

    def get(self, namespace: str, name: str, plural: str = "virtualmachines") -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural,
                                                                           name, _request_timeout=30)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise CommandError(_api_message(exc)) from None
        return obj

    def patch(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "virtualmachines", name, dict(body),
                _content_type="application/merge-patch+json", _request_timeout=30)
        except ApiException as exc:
            raise CommandError(_api_message(exc)) from None
        return obj


def _api_message(exc: Any) -> str:
    import json

    try:
        body = json.loads(exc.body or "")
        message = body.get("message") if isinstance(body, dict) else None
    except (ValueError, TypeError):
        message = None
    return f"{message or exc.reason} (HTTP {exc.status})"


def split_name(value: str) -> tuple[str, str]:
    namespace, slash, name = value.partition("/")
    if not slash or not DNS_LABEL.match(namespace) or not DNS_SUBDOMAIN.match(name):
        raise CommandError(f"{value[:100]!r}: name the VM as NAMESPACE/NAME")
    return namespace, name


class Migrate:
    def __init__(self, vms: Vms, args: argparse.Namespace, out: TextIO, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 silent_after: float = SILENT_AGENT) -> None:
        self.vms, self.args, self.out = vms, args, out
        self.clock, self.sleep = clock, sleep
        self.namespace, self.name = split_name(args.vm)
        self.deadline = clock() + args.timeout if args.timeout else None
        self.tty = bool(getattr(out, "isatty", lambda: False)()) and not args.no_progress
        self._last_line = ""
        self._last_print = 0.0
        self.silent_after = silent_after

    def say(self, text: str) -> None:
        self._end_bar()
        print(text, file=self.out, flush=True)

    def _end_bar(self) -> None:
        if self.tty and self._last_line:
            print(file=self.out, flush=True)
            self._last_line = ""

    def _vm(self) -> dict[str, Any]:
        vm = self.vms.get(self.namespace, self.name)
        if vm is None:
            raise CommandError(f"VirtualMachine {self.namespace}/{self.name} not found")
        return vm

    def _left(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def _timed_out(self, what: str) -> CommandError:
        return CommandError(f"timed out after {self.args.timeout:.0f} s {what}; the migration goes on "
                            f"(withdraw it: {PROG} migrate --cancel {self.namespace}/{self.name})")

    # --- migrate -------------------------------------------------------------------------------
    def run(self) -> int:
        if self.args.cancel:
            return self.cancel()
        target = self.args.to
        if not target or not is_node_name(target):
            raise CommandError("--to NODE is required (a node name)")
        vm = self._vm()
        ann = H.annotations_of(vm)
        home = ann.get(K.ANN_NODE)
        if home == target and migrate_to_of(ann) is None:
            self.say(f"VirtualMachine {self.namespace}/{self.name} is already on node {target}")
            return EXIT_OK
        if not isinstance(home, str):
            raise CommandError(f"VirtualMachine {self.namespace}/{self.name} has no home node yet (it never "
                               "started with diskhooks disks): there is nothing to move; it starts "
                               "wherever the scheduler puts it")
        before = status_of(ann)
        asked = migrate_to_of(ann)
        if asked is not None and asked != target:
            raise CommandError(f"a migration to node {asked} is under way; withdraw it first "
                               f"({PROG} migrate --cancel {self.namespace}/{self.name})")
        if asked is None:
            self._ensure_stopped(vm)
            patch: dict[str, Any] = {ANN_MIGRATE_TO: target}
            if self.args.delete_source:
                patch[ANN_MIGRATE_DELETE_SOURCE] = "true"
            self.vms.patch(self.namespace, self.name, {"metadata": {"annotations": patch}})
            self.say(f"asked to move VirtualMachine {self.namespace}/{self.name} from node {home} to node "
                     f"{target}")
        else:
            self.say(f"following the migration of {self.namespace}/{self.name} to node {target} under way")
        return self._follow(target, before)

    def _ensure_stopped(self, vm: Mapping[str, Any]) -> None:
        spec = vm.get("spec") if isinstance(vm.get("spec"), Mapping) else {}
        problem = stop_problem(spec)  # type: ignore[arg-type]
        vmi = self.vms.get(self.namespace, self.name, "virtualmachineinstances")
        if problem is None and vmi is None:
            return
        if not self.args.stop:
            why = problem or "its VMI still exists"
            raise CommandError(f"VirtualMachine {self.namespace}/{self.name} is not stopped ({why}); stop it "
                               "first or add --stop")
        if problem is not None:
            body = {"spec": {"running": False}} if "running" in (spec or {}) else \
                {"spec": {"runStrategy": "Halted"}}
            self.vms.patch(self.namespace, self.name, body)
            self.say(f"stopping VirtualMachine {self.namespace}/{self.name}")
        while self.vms.get(self.namespace, self.name, "virtualmachineinstances") is not None:
            left = self._left()
            if left is not None and left <= 0:
                raise CommandError(f"timed out after {self.args.timeout:.0f} s waiting for the VM to stop")
            self.sleep(POLL)

    def _follow(self, target: str, before: MigrationStatus | None) -> int:
        shown_phase = ""
        asked_at = self.clock()
        warned = False
        while True:
            vm = self._vm()
            ann = H.annotations_of(vm)
            status = status_of(ann)
            home = ann.get(K.ANN_NODE)
            ours = status is not None and status != before and status.target == target
            if ours and status is not None:
                self._show(status, shown_phase)
                shown_phase = status.phase
                if status.done:
                    return self._outcome(status, home, target)
            elif home == target and migrate_to_of(ann) is None:
                self.say(f"VirtualMachine {self.namespace}/{self.name} is on node {target}")
                return EXIT_OK
            elif migrate_to_of(ann) is None and status == before:
                raise CommandError("the migration request was withdrawn before it started")
            elif not warned and self.clock() - asked_at > self.silent_after:
                warned = True
                self.say(f"no agent has answered for {self.silent_after:.0f} s: is the diskhooks node agent "
                         f"running on node {home} with migrations on (chart value "
                         "nodeAgent.migration.enabled)? still waiting")
            left = self._left()
            if left is not None and left <= 0:
                raise self._timed_out("waiting for the migration")
            self.sleep(POLL)

    def _show(self, status: MigrationStatus, shown_phase: str) -> None:
        line = progress_line(status)
        if self.tty:
            if line != self._last_line:
                print("\r" + line.ljust(len(self._last_line)), end="", file=self.out, flush=True)
                self._last_line = line
            return
        now = self.clock()
        if status.phase != shown_phase or now - self._last_print >= 10.0:
            print(line, file=self.out, flush=True)
            self._last_print = now

    def _outcome(self, status: MigrationStatus, home: Any, target: str) -> int:
        if status.phase == SUCCEEDED and home == target:
            kept = f"; the copy on node {status.source} is kept at {status.source_kept}" \
                if status.source_kept else f"; the copy on node {status.source} is deleted"
            self.say(f"VirtualMachine {self.namespace}/{self.name} moved to node {target} ({human(status.total)})"
                     f"{kept}")
            return EXIT_OK
        word = "cancelled" if status.phase == CANCELLED else "failed"
        self.say(f"migration of {self.namespace}/{self.name} to node {target} {word}: {status.error}; the VM "
                 f"stays on node {home}")
        return EXIT_FAILED

    # --- cancel --------------------------------------------------------------------------------
    def cancel(self) -> int:
        vm = self._vm()
        ann = H.annotations_of(vm)
        asked = migrate_to_of(ann)
        if asked is None:
            self.say(f"VirtualMachine {self.namespace}/{self.name} has no migration request")
            return EXIT_OK
        before = status_of(ann)
        self.vms.patch(self.namespace, self.name, {"metadata": {"annotations": {
            ANN_MIGRATE_TO: None, ANN_MIGRATE_DELETE_SOURCE: None}}})
        self.say(f"withdrew the request to move {self.namespace}/{self.name} to node {asked}")
        if before is None or before.done:
            return EXIT_OK
        while True:
            status = status_of(H.annotations_of(self._vm()))
            if status is not None and status.done:
                self.say(f"migration {status.phase.lower()}" + (f": {status.error}" if status.error else ""))
                return EXIT_OK if status.phase != SUCCEEDED else EXIT_FAILED
            left = self._left()
            if left is not None and left <= 0:
                raise CommandError(f"timed out after {self.args.timeout:.0f} s waiting for the agent to "
                                   "confirm the cancellation")
            self.sleep(POLL)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stderr
    try:
        from kubernetes import config

        try:
            api = config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
        except Exception as exc:  # noqa: BLE001 - the client's own reason
            raise CommandError(f"cannot load the kubeconfig: {exc}") from None
        try:
            return Migrate(Vms(api), args, out).run()
        finally:
            api.close()
    except CommandError as exc:
        print(f"{PROG}: {exc}", file=out, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the migration goes on", file=out, flush=True)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
