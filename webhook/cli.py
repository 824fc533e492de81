"""``diskhooks-webhook``: serve the admission webhook (gunicorn + TLS), or dry-run one object.

Transport layer: parses arguments, reads files, prepares TLS and metrics directories, runs
gunicorn, prints. Decisions are made by ``webhook.admission`` and the mutation cores.

``serve`` runs gunicorn in-process with ``gthread`` workers (threads per worker; kept-alive
connections wait in the worker's poller, so the API server's connection reuse costs no thread)
and ``preload_app`` (the policy, keys, cluster objects and certificate are loaded once in the
master, so a bad configuration fails with exit 2 *before* any worker forks). The keep-alive
timeout (120 s) is longer than the API server's idle-connection timeout (90 s), so the server
never closes a connection the client is about to reuse. SIGTERM drains first (``--drain-seconds``,
``webhook/drain.py``: ``/readyz`` 503, every response closes its connection, new connections still
served), then stops gracefully: workers finish the requests they have (``--graceful-timeout``),
then exit; SIGINT stops at once.

``dry-run`` prints the mutated object as YAML (or the JSONPatch as JSON with ``--show-patch``)
and exits 0; a denial exits 1 with the reason on stderr; unusable input (a missing file, bad YAML,
an object that is not a VirtualMachine/VirtualMachineInstance or whose shape cannot be read, such
as ``spec: 5`` — what the webhook answers as BadRequest — or a bad policy) exits 2 with a one-line
reason. Warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

EXIT_DENIED = 1
EXIT_USAGE = 2
# an object file is read up to the served webhook's review body limit (webhook.app's
# DEFAULT_MAX_BODY_BYTES; the API server sends objects up to 3 MiB), so that dry-run reaches the same
# verdict as the server (e.g. the denial naming a 1 MB annotation) instead of refusing the file
MAX_OBJECT_BYTES = 4 * 1024 * 1024
_HOSTNAME = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")

log = logging.getLogger("webhook.cli")


class UsageError(Exception):
    """Unusable input for the CLI: printed as one line, exit 2."""


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diskhooks-webhook",
        description="The diskhooks admission webhook: serve it, or dry-run one manifest.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve /mutate, /mutate-pod, /healthz, /readyz, /metrics "
                                         "over HTTPS with gunicorn")
    serve.add_argument("--config", required=True, type=Path, metavar="POLICY.yaml",
                       help="platform policy file (re-read when it changes)")
    serve.add_argument("--cert-file", type=Path, help="serving certificate, PEM (re-read when it "
                                                      "changes)")
    serve.add_argument("--key-file", type=Path, help="private key of --cert-file, PEM")
    serve.add_argument("--plan-keys-dir", type=Path, metavar="DIR",
                       help="directory with the plan keys `current` and optional `previous` "
                            "(re-read when they change)")
    serve.add_argument("--port", type=int, default=8443)
    serve.add_argument("--bind-address", default="0.0.0.0")
    serve.add_argument("--workers", type=int, default=2,
                       help="worker processes (default 2: one per core of a small node)")
    serve.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    serve.add_argument("--self-signed", action="store_true",
                       help="make a CA and a serving certificate (for local use); prints the CA's "
                            "path. Without --plan-keys-dir, an ephemeral plan key is used")
    serve.add_argument("--tls-dir", type=Path, metavar="DIR",
                       help="with --self-signed: where ca.crt, tls.crt, tls.key go (reused when "
                            "still valid); default: a temporary directory removed at exit")
    serve.add_argument("--hostname", action="append", default=[], metavar="NAME",
                       help="with --self-signed: extra DNS name or IP for the certificate "
                            "(repeatable)")
    serve.add_argument("--service", action="append", default=[], metavar="NAME.NAMESPACE",
                       help="with --self-signed: a Kubernetes Service whose DNS names the "
                            "certificate must carry (repeatable)")
    cluster = serve.add_mutually_exclusive_group()
    cluster.add_argument("--cluster-objects", type=Path, metavar="FILE",
                         help="YAML list of PVCs/StorageClasses to look up instead of a cluster")
    cluster.add_argument("--in-cluster", action="store_true",
                         help="look PVCs/StorageClasses up in the cluster (service account)")
    serve.add_argument("--reload-interval", type=float, default=1.0, metavar="SECONDS",
                       help="how often the policy, key and certificate files are checked")
    serve.add_argument("--graceful-timeout", type=int, default=25, metavar="SECONDS",
                       help="after the drain, how long workers may finish their requests")
    serve.add_argument("--drain-seconds", type=float, default=10.0, metavar="SECONDS",
                       help="on SIGTERM, how long to keep serving with /readyz 503 and "
                            "'Connection: close' on every response before stopping (default 10; "
                            "0: stop at once); a second SIGTERM ends it")
    serve.add_argument("--access-log", action="store_true", help="log every request to stderr")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])

    dry = sub.add_parser("dry-run", help="mutate one VirtualMachine/VirtualMachineInstance locally "
                                         "and print the result")
    dry.add_argument("object", type=Path, metavar="OBJECT.yaml")
    dry.add_argument("--config", required=True, type=Path, metavar="POLICY.yaml")
    dry.add_argument("--namespace", help="namespace of the object (default: its "
                                         "metadata.namespace, else 'default')")
    dry.add_argument("--old", type=Path, metavar="OLD.yaml",
                     help="the object before the change: an UPDATE instead of a CREATE")
    dry.add_argument("--cluster-objects", type=Path, metavar="FILE",
                     help="YAML list of PVCs/StorageClasses the policy checks claims against")
    dry.add_argument("--plan-keys-dir", type=Path, metavar="DIR",
                     help="plan keys (to verify plans already on the object, and sign with the "
                          "real key); default: an ephemeral key")
    dry.add_argument("--as", dest="as_user", default="", metavar="USERNAME",
                     help="who asks, as the API server would say in userInfo.username (e.g. "
                          "system:serviceaccount:diskhooks-system:diskhooks-node to try what the node "
                          "agent may change); default: nobody in particular")
    dry.add_argument("--show-patch", action="store_true",
                     help="print the JSONPatch (as the API server would get it) instead of the object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        return dry_run(args)
    except UsageError as exc:
        print(f"diskhooks-webhook {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


# ------------------------------------------------------------------------------------------------
# dry-run
# ------------------------------------------------------------------------------------------------
def dry_run(args: argparse.Namespace) -> int:
    import jsonpatch

    from diskplan.errors import Malformed
    from webhook.admission import admit, patch_of

    policy = _load_policy(args.config)
    obj = _load_object(args.object, "OBJECT")
    kind = obj.get("kind")
    if kind not in ("VirtualMachine", "VirtualMachineInstance"):
        raise UsageError(f"{args.object}: kind must be VirtualMachine or VirtualMachineInstance, "
                         f"not {str(kind)[:60]!r}")
    old = None
    if args.old is not None:
        old = _load_object(args.old, "--old")
        if old.get("kind") != kind:
            raise UsageError(f"{args.old}: kind {str(old.get('kind'))[:60]!r} differs from the "
                             f"object's {kind!r}")
        if kind != "VirtualMachine":
            raise UsageError("--old: only a VirtualMachine has UPDATEs that diskhooks mutates")
    raw_meta = obj.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    namespace = args.namespace or meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise UsageError(f"{args.object}: metadata.namespace must be a string")
    plan_keys = _dry_run_keys(args.plan_keys_dir)
    cluster = _make_cluster(args.cluster_objects, in_cluster=False)

    request: dict[str, Any] = {
        "uid": "dry-run", "kind": {"group": "kubevirt.io", "version": "v1", "kind": kind},
        "namespace": namespace, "name": str(meta.get("name", "")),
        "operation": "UPDATE" if old is not None else "CREATE",
        "object": obj, "oldObject": old, "dryRun": True,
    }
    if args.as_user:
        request["userInfo"] = {"username": args.as_user}
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    try:
        outcome = admit(review, route="mutate", policy=policy, plan_keys=plan_keys, cluster=cluster)
    except Malformed as exc:
        raise UsageError(str(exc)) from None
    response = outcome.response["response"]
    for warning in response.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if outcome.error is not None:
        err = outcome.error
        logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
        log.error("internal error", exc_info=(type(err), err, err.__traceback__))
    if not response["allowed"]:
        status = response.get("status", {})
        if status.get("reason") == "BadRequest":  # Malformed: the object itself is unusable
            raise UsageError(f"{args.object}: {status.get('message', '')}")
        print(f"denied: {status.get('message', '')}", file=sys.stderr)
        return EXIT_DENIED
    ops = patch_of(outcome.response)
    if args.show_patch:
        print(json.dumps(ops, indent=2))
    else:
        mutated = jsonpatch.apply_patch(obj, ops) if ops else obj
        sys.stdout.write(yaml.safe_dump(mutated, sort_keys=False, default_flow_style=False))
    return 0


def _dry_run_keys(directory: Path | None) -> Any:
    from diskplan.plan import PlanKeys
    from webhook.reload import SourceError, load_plan_keys

    if directory is None:
        print("warning: no --plan-keys-dir: the plan is signed with an ephemeral key (plans already "
              "on the object will not verify)", file=sys.stderr)
        return PlanKeys(current=secrets.token_bytes(32))
    try:
        return load_plan_keys(directory)
    except SourceError as exc:
        raise UsageError(str(exc)) from None


def _load_policy(path: Path) -> Any:
    from webhook.reload import SourceError, watch_policy

    try:
        return watch_policy(path, interval=float("inf")).get()
    except SourceError as exc:
        raise UsageError(str(exc)) from None


def _load_object(path: Path, what: str) -> dict[str, Any]:
    from webhook.reload import SourceError, read_bounded

    try:
        data = read_bounded(path, what=what, max_bytes=MAX_OBJECT_BYTES)
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: must be one YAML mapping (a Kubernetes object), "
                         f"not {type(doc).__name__}")
    return doc


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a few lines of anchors can expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted "
                                              "in a manifest", event.start_mark)
        return super().compose_node(parent, index)


def _make_cluster(cluster_objects: Path | None, *, in_cluster: bool) -> Any:
    from webhook.cluster import EMPTY_CLUSTER

    if cluster_objects is not None:
        from webhook.app import load_file_cluster
        from webhook.reload import SourceError

        try:
            return load_file_cluster(cluster_objects)
        except SourceError as exc:
            raise UsageError(str(exc)) from None
    if in_cluster:
        from webhook.cluster import KubeCluster

        try:
            return KubeCluster.in_cluster()
        except Exception as exc:  # noqa: BLE001 - no service account, no API server address...
            raise UsageError(f"--in-cluster: cannot configure the Kubernetes client: {exc}") from None
    return EMPTY_CLUSTER


# ------------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    master_pid = os.getpid()
    cleanup: list[Callable[[], None]] = []
    try:
        return _serve(args, cleanup)
    finally:
        # gunicorn workers are forked from inside _serve and leave through SystemExit: only the
        # master removes what it created.
        if os.getpid() == master_pid:
            for step in reversed(cleanup):
                step()


def _serve(args: argparse.Namespace, cleanup: list[Callable[[], None]]) -> int:
    _check_serve_args(args)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s")

    # prometheus_client picks its storage when first imported: set the directory before that.
    _prepare_metrics_dir(cleanup)

    from diskplan.plan import PlanKeys
    from webhook.app import Settings, create_app, drain_flag, watch_sources
    from webhook.drain import close_when_draining, draining_arbiter
    from webhook.metrics import mark_worker_dead
    from webhook.reload import SourceError
    from webhook.tls import CertReloader, generate_self_signed, reusable_self_signed

    cert_file, key_file = args.cert_file, args.key_file
    if args.self_signed:
        tls_dir = args.tls_dir
        if tls_dir is None:
            tls_dir = Path(tempfile.mkdtemp(prefix="diskhooks-webhook-tls-"))
            cleanup.append(lambda: shutil.rmtree(tls_dir, ignore_errors=True))
        names = _hostnames(args)
        paths = reusable_self_signed(tls_dir, hostnames=names)
        if paths is None:
            paths = generate_self_signed(tls_dir, hostnames=names)
            made = "generated"
        else:
            made = "reusing"
        ca_path, cert_file, key_file = paths
        print(f"{made} a self-signed serving certificate for {', '.join(names)}", flush=True)
        print(f"CA certificate: {ca_path}", flush=True)

    plan_keys = None
    if args.plan_keys_dir is None:
        plan_keys = PlanKeys(current=secrets.token_bytes(32))
        print("warning: no --plan-keys-dir: plans are signed with an ephemeral key that lives only "
              "as long as this process (local use only)", file=sys.stderr, flush=True)

    try:
        reloader = CertReloader(cert_file, key_file, interval=args.reload_interval)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise UsageError(f"TLS certificate {cert_file} / key {key_file}: {exc}") from None
    settings = Settings(policy_file=args.config, plan_keys_dir=args.plan_keys_dir,
                        plan_keys=plan_keys,
                        cluster=_make_cluster(args.cluster_objects, in_cluster=args.in_cluster),
                        reload_interval=args.reload_interval)
    try:
        app = create_app(settings)
    except SourceError as exc:
        raise UsageError(str(exc)) from None

    options = gunicorn_options(bind_address=args.bind_address, port=args.port, workers=args.workers,
                               threads=args.threads, cert_file=cert_file, key_file=key_file,
                               reloader=reloader, graceful_timeout=args.graceful_timeout,
                               access_log=args.access_log, log_level=args.log_level)
    options["child_exit"] = lambda _arbiter, worker: mark_worker_dead(worker.pid)

    def post_worker_init(_worker: Any) -> None:  # in each worker, after the fork
        watch_sources(app)
        reloader.watch()

    options["post_worker_init"] = post_worker_init
    flag = drain_flag(app)
    options["pre_request"] = close_when_draining(flag)
    host = options["bind"][0].rsplit(":", 1)[0]
    print(f"serving https://{host}:{args.port} with {args.workers} worker(s) x {args.threads} "
          f"thread(s)", flush=True)
    run_gunicorn(app, options, arbiter=draining_arbiter(flag, args.drain_seconds))
    return 0


def gunicorn_options(*, bind_address: str, port: int, workers: int, threads: int, cert_file: Path,
                     key_file: Path, reloader: Any, graceful_timeout: int = 25,
                     access_log: bool = False, log_level: str = "info") -> dict[str, Any]:
    """gunicorn settings of ``serve`` (shared with the benchmark's baseline server).

    ``reloader`` is a :class:`webhook.tls.CertReloader`: gunicorn calls ``ssl_context`` for every
    accepted connection, and the reloader answers with the context of the current files.
    """
    host = f"[{bind_address}]" if ":" in bind_address else bind_address
    options: dict[str, Any] = {
        "bind": [f"{host}:{port}"],
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "keepalive": 120,
        "timeout": 30,
        "graceful_timeout": graceful_timeout,
        "preload_app": True,
        "certfile": str(cert_file),
        "keyfile": str(key_file),
        "ssl_context": lambda _conf, _default_factory: reloader.context(),
        "control_socket_disable": True,
        "proc_name": "diskhooks-webhook",
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": log_level,
    }
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        options["worker_tmp_dir"] = "/dev/shm"  # heartbeat files off a read-only root filesystem
    return options


def run_gunicorn(app: Any, options: dict[str, Any], *, arbiter: type[Any] | None = None) -> None:
    """Run gunicorn in this process with ``app`` and ``options`` (gunicorn setting names), its
    master being ``arbiter`` (a ``gunicorn.arbiter.Arbiter`` class; default gunicorn's own).

    Shared with ``benchmarks/baseline_app.py`` so the baseline server runs the same configuration.
    """
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    master = Arbiter if arbiter is None else arbiter

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                if value is not None:
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return app

        def run(self) -> None:  # BaseApplication.run with the chosen master
            try:
                master(self).run()
            except RuntimeError as exc:
                print(f"\nError: {exc}\n", file=sys.stderr, flush=True)
                sys.exit(1)

    _Server().run()


def _check_serve_args(args: argparse.Namespace) -> None:
    if not args.self_signed and (args.cert_file is None or args.key_file is None):
        raise UsageError("--cert-file and --key-file are required (or --self-signed for local use)")
    if args.self_signed and (args.cert_file is not None or args.key_file is not None):
        raise UsageError("--self-signed makes its own certificate: leave out --cert-file/--key-file")
    if args.tls_dir is not None and not args.self_signed:
        raise UsageError("--tls-dir only applies with --self-signed")
    if args.plan_keys_dir is None and not args.self_signed:
        raise UsageError("--plan-keys-dir is required (the directory of the plan-key Secret)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be 1-65535")
    if not 1 <= args.workers <= 64:
        raise UsageError(f"--workers {args.workers}: must be 1-64")
    if not 1 <= args.threads <= 256:
        raise UsageError(f"--threads {args.threads}: must be 1-256")
    if not 0 <= args.reload_interval <= 3600:
        raise UsageError("--reload-interval: must be 0-3600 seconds")
    if not 0 <= args.drain_seconds <= 600:
        raise UsageError(f"--drain-seconds {args.drain_seconds:g}: must be 0-600 seconds")
    for name in (*args.hostname, *args.service):
        if not _valid_name(name):
            raise UsageError(f"{name[:80]!r} is not a DNS name or IP address")


def _valid_name(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return len(name) <= 253 and bool(_HOSTNAME.match(name))


def _hostnames(args: argparse.Namespace) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if _valid_name(host):
        names.append(host)
    if args.bind_address not in ("0.0.0.0", "::", ""):
        names.append(args.bind_address)
    for svc in args.service:
        name, _, ns = svc.partition(".")
        names.append(name)
        if ns:
            names += [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
    names += args.hostname
    return list(dict.fromkeys(names))


def _prepare_metrics_dir(cleanup: list[Callable[[], None]]) -> None:
    from_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if from_env:
        path = Path(from_env)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # values of an earlier run of this pod's container
            stale.unlink()
        return
    made = tempfile.mkdtemp(prefix="diskhooks-webhook-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    cleanup.append(lambda: shutil.rmtree(made, ignore_errors=True))


if __name__ == "__main__":
    raise SystemExit(main())
