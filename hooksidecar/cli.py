"""``diskhooks-sidecar``: serve KubeVirt's hook API, run the prepare step, or dry-run one domain.

Transport only: parses arguments, reads files, calls :mod:`hooksidecar.server`,
:mod:`hooksidecar.prepare` or :func:`hooksidecar.callback.on_define_domain`, prints. Every
subcommand imports its own modules only when chosen: the sidecar container runs under a 64M memory
limit, so ``serve`` must not pay for YAML or ``prepare`` for gRPC.

- ``serve [--socket-dir DIR] [--name NAME] [--version V] [--path-prefix DIR] [--grace S]
  [--transport h2|grpcio]`` listens on ``unix://DIR/NAME.sock`` until SIGTERM/SIGINT or a
  ``Shutdown`` call (``h2``, the default, needs no grpcio). The plan it applies is the one verified
  at Pod admission, from the environment variable ``DISKHOOKS_PLAN`` (set by the Pod mutation;
  exit 2 if it does not parse); a VMI whose ``diskhooks.io/plan`` differs is refused. ``--version V`` is the newest hook API
  version offered: ``Info`` advertises V and every older one and all their ``Callbacks`` are served
  (``v1alpha3`` -> v1alpha3, v1alpha2, v1alpha1), so a virt-launcher that knows no v1alpha3
  (KubeVirt 1.0) still finds one it speaks. Like KubeVirt's sidecar-shim,
  ``diskhooks-sidecar --version v1alpha3`` (no subcommand) serves too.
  Exit 0 after a clean stop, 1 when the socket cannot be taken, 2 on bad arguments. The image
  checks cannot be switched off when serving (only a dry run may skip them).
- ``prepare ...`` hands its arguments to :func:`hooksidecar.prepare.main`.
- ``dry-run --vmi VMI.(json|yaml) --domain DOMAIN.xml [--diff] [--path-prefix DIR]
  [--no-image-check]`` prints the domain XML the sidecar would answer (or a unified diff against
  the input); exit 1 with the reason when the plan is refused, 2 on unusable input. A
  VirtualMachine manifest (e.g. ``diskhooks-webhook dry-run`` output) is accepted too: its
  template stands for the VMI. The images are checked only with ``--path-prefix`` (the launcher
  paths under DIR; ``--path-prefix /`` inside the pod): a laptop has no pod mounts. A note on
  stderr says which it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from diskplan.keys import HOOK_VERSIONS

PROG = "diskhooks-sidecar"
EXIT_REFUSED = 1
EXIT_USAGE = 2
MAX_INPUT_BYTES = 4 * 1024 * 1024
VERSIONS = HOOK_VERSIONS
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


class UsageError(Exception):
    """Unusable input: printed as one line, exit 2."""


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def _socket_name(value: str) -> str:
    if not _NAME.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a DNS label (it becomes <name>.sock)")
    return value


def _directory(value: str) -> str:
    if not os.path.isabs(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an absolute path")
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is not a directory")
    return os.path.normpath(value)


def _grace(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= seconds <= 300:
        raise argparse.ArgumentTypeError("must be between 0 and 300 seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The diskhooks KubeVirt hook sidecar: serve the hook API over a unix "
        "socket, prepare qcow2 images (init container), or dry-run one domain XML.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve KubeVirt's hook gRPC API on a unix socket")
    serve.add_argument("--socket-dir", type=_directory, default="/var/run/kubevirt-hooks",
                       help="directory of the socket (default: /var/run/kubevirt-hooks)")
    serve.add_argument("--name", type=_socket_name, default="diskhooks",
                       help="hook name and socket file name <name>.sock (default: diskhooks)")
    serve.add_argument("--version", choices=VERSIONS, default=None,
                       help="newest hook API version to offer: Info advertises it and every older "
                       "version, and the Callbacks of all of them are served (v1alpha3 -> v1alpha3, "
                       f"v1alpha2, v1alpha1; default: {VERSIONS[0]})")
    serve.add_argument("--path-prefix", type=_directory, default=None,
                       help="look for the launcher paths under this directory (tests, demos)")
    serve.add_argument("--grace", type=_grace, default=5.0,
                       help="seconds in-flight calls get when stopping (default: 5)")
    serve.add_argument("--transport", choices=("h2", "grpcio"), default="h2",
                       help="HTTP/2 layer: h2 (our own, pure Python, the default, ~20 MiB less peak memory) or "
                       "grpcio (needs the grpcio package; for comparison)")

    serve.epilog = ("The plan applied is the one verified when the launcher Pod was admitted, from the "
                    "environment variable DISKHOOKS_PLAN (the diskhooks Pod mutation sets it); a VMI whose "
                    "diskhooks.io/plan annotation differs from it is refused.")

    sub.add_parser("prepare", add_help=False,
                   help="create/grow the planned qcow2 images (init container); see 'prepare --help'")

    dry = sub.add_parser(
        "dry-run", help="print the domain XML the sidecar would answer for a VMI",
        description="Print the domain XML the sidecar would answer for a VMI (the plan is taken from "
        "the VMI's diskhooks.io/plan annotation). The images are checked, as 'serve' always does, only "
        "when --path-prefix is given: without it the XML is rewritten from the plan alone.")
    dry.add_argument("--vmi", required=True, help="VMI (or VirtualMachine) as JSON or YAML")
    dry.add_argument("--domain", required=True, help="libvirt domain XML as virt-launcher sends it")
    dry.add_argument("--diff", action="store_true", help="print a unified diff instead of the XML")
    dry.add_argument("--path-prefix", type=_directory, default=None,
                     help="check the images at the launcher paths under this directory (a copy of the "
                     "pod's mounts; '/' inside the pod); without it no image is looked at")
    dry.add_argument("--no-image-check", dest="check_images", action="store_false",
                     help="do not look at the images even with --path-prefix")
    return parser


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    from diskplan.errors import Malformed
    from diskplan.keys import ENV_PLAN
    from diskplan.plan import parse_plan
    from hooksidecar import server

    admitted = (os.environ if environ is None else environ).get(ENV_PLAN) or None
    if admitted is not None:
        try:
            parse_plan(admitted, ENV_PLAN)
        except Malformed as exc:
            print(f"{PROG} serve: {exc} (the diskhooks Pod mutation sets it to the plan it verified)",
                  file=sys.stderr)
            return EXIT_USAGE
    settings = server.SidecarSettings(
        name=args.name, versions=versions_up_to(args.version),
        path_prefix=args.path_prefix or "", grace_seconds=args.grace, admitted_plan=admitted)
    return server.serve(socket_dir=args.socket_dir, settings=settings, transport=args.transport)


def cmd_dry_run(args: argparse.Namespace) -> int:
    from diskplan.errors import Malformed, Refused
    from hooksidecar.callback import PLAN_FROM_VMI, on_define_domain

    try:
        vmi_json = load_vmi(args.vmi)
        domain_xml = read_limited(args.domain)
    except UsageError as exc:
        print(f"{PROG} dry-run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    check_images = args.check_images and args.path_prefix is not None
    if check_images:
        print(f"{PROG} dry-run: checking the images under {args.path_prefix}", file=sys.stderr)
    else:
        why = "--no-image-check" if args.path_prefix is not None else "no --path-prefix given"
        print(f"{PROG} dry-run: images not checked ({why}); the sidecar checks them on every call",
              file=sys.stderr)
    def warn(facts: Any) -> None:  # what the served sidecar puts on its log line
        from hooksidecar.logfmt import larger_than_planned

        warning = larger_than_planned(facts.larger_than_planned).get("warning")
        if warning:
            print(f"{PROG} dry-run: warning: {warning}", file=sys.stderr)

    try:
        result = on_define_domain(domain_xml, vmi_json, path_prefix=args.path_prefix or "",
                                  check_images=check_images, admitted_plan=PLAN_FROM_VMI,
                                  on_facts=warn)
    except Malformed as exc:
        print(f"{PROG} dry-run: unusable input: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as exc:
        print(f"{PROG} dry-run: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.diff:
        sys.stdout.write(unified_diff(domain_xml, result, name=os.path.basename(args.domain)))
        if result == domain_xml:
            print(f"{PROG} dry-run: no change (no diskhooks plan for the domain)", file=sys.stderr)
    else:
        sys.stdout.buffer.write(result)
        sys.stdout.buffer.flush()
    return 0


def cmd_prepare(argv: list[str]) -> int:
    from hooksidecar import prepare

    return prepare.main(argv)


# ------------------------------------------------------------------------------------------------
# helpers (pure or file reading only)
# ------------------------------------------------------------------------------------------------
def versions_up_to(newest: str | None) -> tuple[str, ...]:
    """The hook API versions to offer when ``newest`` is the newest: it and every older one, most
    preferred first (``None``: all)."""
    if newest is None:
        return VERSIONS
    return VERSIONS[VERSIONS.index(newest):]


def read_limited(path: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{path} is larger than {limit} bytes")
    return data


def load_vmi(path: str) -> bytes:
    """The VMI as JSON bytes. JSON that does not parse (or is nested too deeply) is passed on as it
    is, so the core reports it (``Malformed``, with the reason); YAML (``.yaml``/``.yml``) is converted; a
    VirtualMachine becomes the VMI its template describes."""
    data = read_limited(path)
    if path.endswith((".yaml", ".yml")):
        doc = _load_yaml(data, path)
    else:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # not JSON, not UTF-8, too deep
            return data
    if isinstance(doc, dict) and doc.get("kind") == "VirtualMachine":
        return json.dumps(vmi_from_vm(doc)).encode()
    return data if not path.endswith((".yaml", ".yml")) else json.dumps(doc).encode()


def _load_yaml(data: bytes, path: str) -> Any:
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(data) if d is not None]
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path} is nested too deeply to be read") from None
    if len(docs) != 1:
        raise UsageError(f"{path} holds {len(docs)} documents; give exactly one VMI or VirtualMachine")
    return docs[0]


def vmi_from_vm(vm: dict[str, Any]) -> dict[str, Any]:
    """The VMI that a VirtualMachine's template describes (name/namespace from the VM)."""
    spec = _object(vm.get("spec"))
    template = _object(spec.get("template"))
    meta = dict(_object(template.get("metadata")))
    vm_meta = _object(vm.get("metadata"))
    for key in ("name", "namespace"):
        if key in vm_meta:
            meta[key] = vm_meta[key]
    return {"apiVersion": vm.get("apiVersion", "kubevirt.io/v1"), "kind": "VirtualMachineInstance",
            "metadata": meta, "spec": _object(template.get("spec"))}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def unified_diff(before: bytes, after: bytes, *, name: str) -> str:
    import difflib

    old = before.decode("utf-8", "replace").splitlines(keepends=True)
    new = after.decode("utf-8", "replace").splitlines(keepends=True)
    lines = list(difflib.unified_diff(old, new, fromfile=f"a/{name}", tofile=f"b/{name}"))
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "prepare":
        return cmd_prepare(args_list[1:])
    if args_list and args_list[0].startswith("--") and args_list[0] not in ("--help",):
        args_list.insert(0, "serve")  # sidecar-shim style: diskhooks-sidecar --version v1alpha3
    args = build_parser().parse_args(args_list)
    if args.command == "serve":
        return cmd_serve(args)
    return cmd_dry_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
