"""The webhook's Flask application: thin routes around the admission core.

Transport layer: it reads bodies, checks their size and type, decodes JSON, asks the reloading
sources for the current policy and keys, calls :func:`webhook.admission.admit`, logs, counts and
serialises. It makes no admission decision itself.

Routes (query strings such as the API server's ``?timeout=5s`` are ignored):

- ``POST /mutate`` — VirtualMachine CREATE/UPDATE, VirtualMachineInstance CREATE.
- ``POST /mutate-pod`` — virt-launcher Pod CREATE.
- ``GET /healthz`` — the process answers (liveness).
- ``GET /readyz`` — the policy and the plan keys are loaded (always true once serving: a bad start
  fails before the workers fork), 503 ``{"ready": false, "draining": true}`` once SIGTERM started the
  drain (``webhook/drain.py``). A broken update of a mounted file keeps the last good version in
  service and is reported in the body (``stale``) and by ``diskhooks_config_reload_failures_total``,
  NOT by a 503: every replica reads the same ConfigMap, so a 503 would take them all out of the
  Service at once and, with failurePolicy Fail, stop VM admission cluster-wide over a typo.
  ``planKeySigning`` says which plan key signs: ``previous`` while a rotation's new key waits for
  its ``current-not-before`` time (every replica accepts it already), then ``current``.
- ``GET /metrics`` — Prometheus text format (see ``webhook/metrics.py``).

HTTP answers: 200 with an AdmissionReview for every readable review (a refusal is
``allowed: false``); 400 with a JSON error body naming the field for a body that is not JSON or
not an ``admission.k8s.io/v1`` AdmissionReview; 413 for a body over ``max_body_bytes``; 415 for a
Content-Type other than ``application/json``. A 500 would only come from a bug in this module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from diskplan.errors import Malformed
from diskplan.plan import PlanKeys
from diskplan.policy import Policy
from webhook.admission import Route, admit
from webhook.cluster import EMPTY_CLUSTER, Cluster
from webhook.drain import DrainFlag
from webhook.metrics import Metrics
from webhook.reload import Fixed, SourceError, TimedPlanKeys, WatchedFiles, watch_plan_keys, watch_policy

log = logging.getLogger(__name__)

# The API server sends the object and, on UPDATE, the old object; etcd stores at most 1.5 MiB per
# object, so two of them plus the envelope fit in 4 MiB. Anything larger is not from the API server.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# An oversized body up to this size is read and discarded so the client gets its 413 (see _read_body).
DRAIN_LIMIT = 32 * 1024 * 1024
_CLOSE_KEY = "diskhooks.close_connection"
EXTENSION = "diskhooks"

T_co = TypeVar("T_co", covariant=True)


class Source(Protocol[T_co]):
    """A value that may be reloaded (``webhook.reload.WatchedFiles`` or ``Fixed``)."""

    name: str

    @property
    def generation(self) -> int: ...

    def get(self) -> T_co: ...

    @property
    def error(self) -> str | None: ...

    @property
    def ready(self) -> bool: ...

    def watch(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    """What the webhook app needs; built by the CLI (or :meth:`from_env` for a bare WSGI server)."""

    policy_file: Path
    """The policy YAML (the chart's ConfigMap); re-read when it changes."""
    plan_keys_dir: Path | None = None
    """Directory with ``current`` and optional ``previous`` plan keys and ``current-not-before``
    (the chart's Secret; see ``diskplan/plankeys.py``)."""
    plan_keys: PlanKeys | None = None
    """A fixed key set, used only when ``plan_keys_dir`` is None (the CLI's ephemeral key)."""
    cluster: Cluster = field(default_factory=lambda: EMPTY_CLUSTER)
    """Where PVCs and StorageClasses are looked up (passthrough claims)."""
    reload_interval: float = 1.0
    """Seconds between two checks of the policy and key files for changes."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted (413 above)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """``DISKHOOKS_POLICY`` and ``DISKHOOKS_PLAN_KEYS_DIR`` (required),
        ``DISKHOOKS_CLUSTER_OBJECTS`` (optional file) — for ``gunicorn 'webhook.app:create_app()'``."""
        missing = [k for k in ("DISKHOOKS_POLICY", "DISKHOOKS_PLAN_KEYS_DIR") if not env.get(k)]
        if missing:
            raise SourceError(f"environment: {', '.join(missing)} must be set")
        cluster: Cluster = EMPTY_CLUSTER
        if env.get("DISKHOOKS_CLUSTER_OBJECTS"):
            cluster = load_file_cluster(Path(env["DISKHOOKS_CLUSTER_OBJECTS"]))
        return cls(policy_file=Path(env["DISKHOOKS_POLICY"]),
                   plan_keys_dir=Path(env["DISKHOOKS_PLAN_KEYS_DIR"]), cluster=cluster)


def load_file_cluster(path: Path) -> Cluster:
    """A ``FileCluster`` from a YAML file of objects; :class:`SourceError` if unusable."""
    from webhook.cluster import FileCluster
    from webhook.reload import read_bounded

    data = read_bounded(path, what="cluster objects")
    try:
        return FileCluster.from_text(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"cluster objects {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Refused/Malformed(field, reason) from the parser
        raise SourceError(f"cluster objects {path}: {exc}") from None


@dataclass
class State:
    """Per-app state kept in ``app.extensions``."""

    settings: Settings
    policy: Source[Policy]
    plan_keys: Source[PlanKeys]
    metrics: Metrics
    drain: DrainFlag = field(default_factory=DrainFlag)
    """Set by the gunicorn master at SIGTERM (shared with the workers, see ``webhook/drain.py``)."""


bp = Blueprint("admission", __name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; loads the policy and keys now and raises :class:`SourceError` if unusable."""
    if settings is None:
        settings = Settings.from_env(os.environ)
    metrics = Metrics()
    policy: Source[Policy] = watch_policy(settings.policy_file, interval=settings.reload_interval)
    keys: Source[PlanKeys]
    if settings.plan_keys_dir is not None:
        keys = watch_plan_keys(settings.plan_keys_dir, interval=settings.reload_interval)
    elif settings.plan_keys is not None:
        keys = Fixed("plan keys", settings.plan_keys)
    else:
        raise SourceError("plan keys: neither a plan-keys directory nor a key was given")
    for source in (policy, keys):
        if isinstance(source, (WatchedFiles, TimedPlanKeys)):
            source.on_failure = (lambda _err, name=source.name:
                                 metrics.reload_failures.labels(source=name).inc())

    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = State(settings, policy, keys, metrics)
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def watch_sources(app: Flask) -> None:
    """Have the policy and the plan keys checked for changes in a thread of this process too (each
    gunicorn worker calls this once it has forked; see ``webhook/reload.py``)."""
    state = app.extensions[EXTENSION]
    assert isinstance(state, State)
    state.policy.watch()
    state.plan_keys.watch()


def drain_flag(app: Flask) -> DrainFlag:
    """The app's drain flag (made with the app, before gunicorn forks its workers)."""
    state = app.extensions[EXTENSION]
    assert isinstance(state, State)
    return state.drain


def _state() -> State:
    state = current_app.extensions[EXTENSION]
    assert isinstance(state, State)
    return state


def _json(body: Mapping[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status,
                    mimetype="application/json")


@bp.post("/mutate")
def mutate() -> Response:
    return _review("mutate")


@bp.post("/mutate-pod")
def mutate_pod() -> Response:
    return _review("mutate-pod")


def _review(route: Route) -> Response:
    state = _state()
    start = time.perf_counter()
    body = _read_body(state.settings.max_body_bytes)
    if body is None:
        state.metrics.observe(route=route, kind="unknown", operation="unknown", result="malformed",
                              seconds=time.perf_counter() - start)
        response = _json({"error": "request entity too large", "field": "",
                          "reason": f"the body is larger than {state.settings.max_body_bytes} "
                                    f"bytes"}, 413)
        if request.environ.get(_CLOSE_KEY):
            response.headers["Connection"] = "close"
        return response
    # checked after the body is read, so that the connection stays usable for the next review
    if request.mimetype != "application/json":
        state.metrics.observe(route=route, kind="unknown", operation="unknown", result="malformed",
                              seconds=0.0)
        return _json({"error": "unsupported media type", "field": "Content-Type",
                      "reason": f"must be application/json, not {request.mimetype or 'missing'!r}"},
                     415)
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        state.metrics.observe(route=route, kind="unknown", operation="unknown", result="malformed",
                              seconds=time.perf_counter() - start)
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        return _json({"error": "the body is not JSON", "field": "", "reason": reason}, 400)
    try:
        outcome = admit(review, route=route, policy=state.policy.get(),
                        plan_keys=state.plan_keys.get(), cluster=state.settings.cluster)
    except Malformed as exc:
        state.metrics.observe(route=route, kind="unknown", operation="unknown", result="malformed",
                              seconds=time.perf_counter() - start)
        log.info("malformed AdmissionReview on /%s: %s", route, exc)
        return _json({"error": "malformed AdmissionReview", "field": exc.field,
                      "reason": exc.reason}, 400)
    if outcome.error is not None:
        err = outcome.error
        log.error("internal error admitting %s %s (request uid %s); denied", outcome.kind,
                  outcome.operation, outcome.uid, exc_info=(type(err), err, err.__traceback__))
    elif outcome.result == "denied":
        log.info("denied %s %s (request uid %s): %s", outcome.kind, outcome.operation, outcome.uid,
                 outcome.response["response"].get("status", {}).get("message", ""))
    state.metrics.observe(route=route, kind=outcome.kind, operation=outcome.operation,
                          result=outcome.result, seconds=time.perf_counter() - start)
    return _json(outcome.response)


def _read_body(limit: int) -> bytes | None:
    """The request body, or None if it is larger than ``limit``.

    An oversized body is read and thrown away (up to :data:`DRAIN_LIMIT`) so that the 413 reaches
    a client that writes the whole body before reading the answer, and the kept-alive connection
    stays usable; beyond that the connection is closed after the answer.
    """
    stream = request.stream
    length = request.content_length
    if length is not None and length > limit:
        data = b""
    else:
        data = stream.read(limit + 1)
        if len(data) <= limit:
            return data
    drained = len(data)
    while drained <= DRAIN_LIMIT:
        chunk = stream.read(64 * 1024)
        if not chunk:
            return None
        drained += len(chunk)
    request.environ[_CLOSE_KEY] = True
    return None


@bp.get("/healthz")
def healthz() -> Response:
    return Response("ok\n", mimetype="text/plain")


@bp.get("/readyz")
def readyz() -> Response:
    state = _state()
    if state.drain.draining:  # SIGTERM: leave the Service's endpoints (webhook/drain.py)
        return _json({"ready": False, "draining": True}, 503)
    sources: list[Source[Any]] = [state.policy, state.plan_keys]
    for source in sources:
        source.get()  # runs the (rate-limited) check for a newer version
    errors = [s.error for s in sources if s.error]
    body: dict[str, Any] = {"ready": True, "policyVersion": state.policy.generation,
                            "planKeysVersion": state.plan_keys.generation}
    if isinstance(state.plan_keys, TimedPlanKeys):
        body["planKeySigning"] = state.plan_keys.signing()  # "previous" during a rotation's delay
    if errors:
        body["stale"] = errors  # the last good versions stay in use; see the module docstring
    return _json(body, 200)


@bp.get("/metrics")
def metrics() -> Response:
    data, content_type = _state().metrics.exposition()
    return Response(data, content_type=content_type)


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    return _json({"error": (exc.name or "error").lower(), "reason": exc.description or ""}, code)


def _unexpected_error(exc: Exception) -> Response:
    log.exception("unexpected error in the webhook's HTTP layer")
    return _json({"error": "internal server error"}, 500)
