"""The command line of the prepare step: argv and environment -> plan -> inspect, decide, apply.

``diskhooks-sidecar prepare --plan-from-env | --plan FILE [--path-prefix DIR] [--node-name NAME]
[--overcommit R] [--reserve Q]`` (and ``python -m hooksidecar.prepare``). The plan comes from ``$DISKHOOKS_PLAN`` or a file, the VMI
uid (needed for a persistent root and the home marker) from ``$DISKHOOKS_VMI_UID``, the node it runs
on from ``$DISKHOOKS_NODE_NAME`` (``--node-name`` stands in for it: local runs, the demo). A plan
that names a home node is refused, before anything is looked at, on any other node. ``--path-prefix DIR`` (tests, the local
demo) prefixes every path this process opens; the backing file names written into qcow2 headers stay
the launcher paths. ``--overcommit`` and ``--reserve`` are the policy's ``hostDisks.capacity``
(the Pod mutation writes them; defaults 1 and 5%): a start that would create or grow an image
beyond the node's capacity is refused (:mod:`hooksidecar.prepare.capacity`). Exit status: 0 done
(one JSON line per volume on stdout, then one ``node.capacity`` line when the capacity was checked), 1
refused or failed (one reason per line on stderr), 2 unreadable plan or bad arguments/environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

from diskplan import keys as K
from diskplan.capacitypolicy import CapacityPolicy, parse_overcommit, parse_reserve
from diskplan.errors import Malformed, Refused
from diskplan.plan import MAX_PLAN_BYTES, Plan, is_node_name, parse_plan
from hooksidecar.prepare.actions import Refuse
from hooksidecar.prepare.apply import ApplyError, apply
from hooksidecar.prepare.capacity import guard
from hooksidecar.prepare.decide import plan_actions
from hooksidecar.prepare.home import needs_marker, wrong_node
from hooksidecar.prepare.lock import vm_lock
from hooksidecar.prepare.observe import inspect

PROG = "diskhooks-prepare"
EXIT_OK, EXIT_REFUSED, EXIT_MALFORMED = 0, 1, 2
_VMI_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}\Z")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskhooks-sidecar prepare",
        description="Create and grow the qcow2 images a diskhooks plan needs (the diskhooks-prepare "
                    "init container). Exit 0 done, 1 refused, 2 unreadable plan.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan-from-env", action="store_true",
                     help=f"read the plan from ${K.ENV_PLAN} (the VMI uid from ${K.ENV_VMI_UID})")
    src.add_argument("--plan", metavar="FILE", help="read the plan from FILE")
    p.add_argument("--path-prefix", metavar="DIR", default="",
                   help="prefix every path opened (tests, local demo); headers keep launcher paths")
    p.add_argument("--node-name", metavar="NAME", default=None,
                   help=f"the node this runs on (stands in for ${K.ENV_NODE_NAME}: local runs, demo)")
    p.add_argument("--overcommit", metavar="R", default=None,
                   help="hostDisks.capacity.overcommit: planned virtual bytes per filesystem byte (default 1)")
    p.add_argument("--reserve", metavar="Q", default=None,
                   help="hostDisks.capacity.reserve: free space kept, '5%%' or a quantity (default 5%%)")
    return p


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_MALFORMED
    try:
        text = _read_plan_text(args, env)
        plan = parse_plan(text)
        prefix = _prefix(args.path_prefix)
        node = _node_name(args, env)
        capacity = _capacity(args)
    except Malformed as exc:
        _err(str(exc))
        return EXIT_MALFORMED
    wrong = wrong_node(plan, node)
    if wrong is not None:  # before looking at anything: the images are not on this node
        _err(wrong)
        return EXIT_REFUSED
    try:
        vmi_uid = _vmi_uid(env, required=plan.persist_root is not None
                           or (node is not None and needs_marker(plan)))
    except Malformed as exc:
        _err(str(exc))
        return EXIT_MALFORMED
    # one prepare at a time per VM (hooksidecar/prepare/lock.py): a second one waits, then finds
    # the images made
    with vm_lock(prefix + K.LAUNCHER_VM_DIR,
                 waiting=lambda: _err("waiting for another prepare of this VM to finish")):
        return _prepare(plan, prefix=prefix, vmi_uid=vmi_uid, node=node, capacity=capacity)


def _prepare(plan: Plan, *, prefix: str, vmi_uid: str | None, node: str | None,
             capacity: CapacityPolicy) -> int:
    """Inspect, decide, apply; the exit status."""
    observed = inspect(plan, prefix=prefix)
    now = datetime.datetime.now(datetime.UTC)
    actions = plan_actions(plan, observed, vmi_uid=vmi_uid, node=node, now=now)
    refusals = [a for a in actions if isinstance(a, Refuse)]
    if refusals:
        for r in refusals:
            _err(f"volume {r.volume}: {r.reason}")
        _err(f"nothing was changed ({len(refusals)} problem(s)); the VM does not start until they are "
             "fixed")
        return EXIT_REFUSED
    checked = guard(plan, actions, prefix=prefix, node=node, capacity=capacity, now=now)
    capacity_line = json.dumps({"volume": K.CAPACITY_REPORT, **checked.report}, sort_keys=True)
    if checked.verdict is not None and checked.verdict.refusal is not None:
        print(capacity_line, flush=True)
        _err(checked.verdict.refusal)
        return EXIT_REFUSED
    owner = (K.QEMU_UID, K.QEMU_GID) if os.geteuid() == 0 else None
    try:
        apply(actions, prefix=prefix, owner=owner,
              report=lambda s: print(json.dumps(s, sort_keys=True), flush=True))
    except ApplyError as exc:
        _err(str(exc))
        return EXIT_REFUSED
    if checked.verdict is not None:
        print(capacity_line, flush=True)
    return EXIT_OK


def _capacity(args: argparse.Namespace) -> CapacityPolicy:
    """``--overcommit`` and ``--reserve`` (each defaults to the policy's default)."""
    defaults = CapacityPolicy()
    try:
        overcommit = defaults.overcommit if args.overcommit is None \
            else parse_overcommit(args.overcommit, "--overcommit", text=True)
        percent, reserve = (defaults.reserve_percent, defaults.reserve_bytes) if args.reserve is None \
            else parse_reserve(args.reserve, "--reserve")
    except Refused as exc:
        raise Malformed(exc.field, exc.reason) from None
    return CapacityPolicy(overcommit=overcommit, reserve_percent=percent, reserve_bytes=reserve)


def _read_plan_text(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.plan_from_env:
        text = env.get(K.ENV_PLAN)
        if not text:
            raise Malformed(K.ENV_PLAN, "is not set or empty: the diskhooks Pod mutation sets it to the "
                            "plan")
        return text
    try:
        with open(args.plan, "rb") as fh:
            data = fh.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise Malformed("--plan", f"cannot read {args.plan}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("--plan", f"{args.plan} is not UTF-8") from None


def _prefix(value: str) -> str:
    if not value:
        return ""
    path = os.path.abspath(value)
    if not os.path.isdir(path):
        raise Malformed("--path-prefix", f"{value} is not a directory")
    return path.rstrip("/")


def _node_name(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """The node this runs on: ``--node-name``, else ``$DISKHOOKS_NODE_NAME``; None when neither."""
    source, value = ("--node-name", args.node_name) if args.node_name is not None \
        else (K.ENV_NODE_NAME, env.get(K.ENV_NODE_NAME, ""))
    if not value:
        if args.node_name is not None:
            raise Malformed(source, "must not be empty")
        return None
    if not is_node_name(value):
        raise Malformed(source, f"{value[:80]!r} is not a node name (a DNS-1123 subdomain)")
    return str(value)


def _vmi_uid(env: Mapping[str, str], *, required: bool) -> str | None:
    uid = env.get(K.ENV_VMI_UID, "")
    if not uid:
        if required:
            raise Malformed(K.ENV_VMI_UID, "is not set: a persistent root and the home marker record "
                            "the VMI they were prepared for (the Pod mutation sets it from the pod "
                            f"label {K.LABEL_CREATED_BY})")
        return None
    if not _VMI_UID.match(uid):
        raise Malformed(K.ENV_VMI_UID, f"{uid[:80]!r} is not a VMI uid")
    return uid


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
