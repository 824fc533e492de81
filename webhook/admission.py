"""The admission core: an AdmissionReview (a decoded JSON dict) in, the AdmissionReview response out.

Pure. This layer reads the review, decides which mutation core applies (by route, kind and
operation), calls it, diffs the object before and after into a JSONPatch and builds the response.
It does no I/O, reads no environment, keeps no state, never edits its inputs and does not log:
transports (``webhook/app.py``, ``webhook/cli.py``) log and serialise.

Errors:

- :class:`~diskplan.errors.Malformed` — the body is not an ``admission.k8s.io/v1`` AdmissionReview
  with ``request.uid``, ``request.kind``, ``request.operation`` and (for CREATE/UPDATE)
  ``request.object``; the transport answers HTTP 400 naming the field.
- :class:`~diskplan.errors.Refused` from a core — ``allowed: false`` with ``status.code`` 403 and the
  message ``<field>: <reason>`` (HTTP 200). :class:`~diskplan.errors.Malformed` raised by a core
  (after the envelope was accepted) is about the user's object, so it is a denial too
  (``status.code`` 400): a 400 *HTTP* answer would make the API server apply the failurePolicy,
  and ``Ignore`` would then admit an object whose plan was never verified.
- Any other exception from a core is a diskhooks bug. :func:`admit` does not let it escape: it
  answers ``allowed: false`` with ``status.code`` 500 and a generic message carrying the request uid,
  and hands the exception to the transport (``Outcome.error``) to be logged with its traceback.
  Denying is the safe side: the API server shows the user the denial instead of applying the
  webhook's failurePolicy, which for ``Ignore`` would admit a VM without the disks it asked for.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import jsonpatch

from diskplan.errors import Malformed, Refused
from diskplan.plan import PlanKeys
from diskplan.policy import Policy
from webhook.cluster import Cluster
from webhook.mutation import Mutation
from webhook.pod_mutation import mutate_pod
from webhook.vm.mutate import mutate_vm, mutate_vmi

ADMISSION_API_VERSION = "admission.k8s.io/v1"
ADMISSION_KIND = "AdmissionReview"
KUBEVIRT_GROUP = "kubevirt.io"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
# bounded label values for metrics: anything else is reported as "other"
KNOWN_KINDS = ("VirtualMachine", "VirtualMachineInstance", "Pod")

Route = Literal["mutate", "mutate-pod"]
ROUTES: tuple[Route, ...] = ("mutate", "mutate-pod")
Result = Literal["allowed", "patched", "denied", "error"]


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class ResponseStatus(TypedDict, total=False):
    code: int
    message: str
    reason: str


class AdmissionResponse(TypedDict, total=False):
    uid: str
    allowed: bool
    status: ResponseStatus
    warnings: list[str]
    patchType: Literal["JSONPatch"]
    patch: str


class AdmissionReviewResponse(TypedDict):
    apiVersion: str
    kind: str
    response: AdmissionResponse


@dataclass(frozen=True)
class AdmissionRequest:
    """The parts of ``request`` diskhooks uses, checked for shape."""

    uid: str
    group: str
    version: str
    kind: str
    operation: str
    namespace: str
    name: str
    obj: Mapping[str, Any] | None
    old_obj: Mapping[str, Any] | None
    dry_run: bool
    username: str = ""  # userInfo.username: who asks (the node agent's home node, virt-controller's Pods)


@dataclass(frozen=True)
class Outcome:
    """What happened to one review: the response to send, and labels for metrics and logs.

    ``kind`` and ``operation`` are bounded to known values (``other`` otherwise) so they can be
    metric labels. ``error`` is set only for ``result == "error"`` (a diskhooks bug, to be logged).
    """

    response: dict[str, Any]
    kind: str
    operation: str
    result: Result
    uid: str
    error: BaseException | None = None


def build_response(*, uid: str, allowed: bool, patch_ops: Sequence[Mapping[str, Any]] | None = None,
                   message: str | None = None, warnings: Sequence[str] = (), code: int | None = None,
                   reason: str | None = None) -> dict[str, Any]:
    """A complete ``admission.k8s.io/v1`` AdmissionReview response.

    ``patch_ops`` (a JSONPatch as a list of operations) is sent base64-encoded with
    ``patchType: JSONPatch`` only when non-empty and only when ``allowed``. A denial gets
    ``status.code`` (default 403) and ``status.reason`` (default ``Forbidden``) with ``message``.
    """
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        status: dict[str, Any] = {"code": 403 if code is None else code,
                                  "reason": "Forbidden" if reason is None else reason}
        if message:
            status["message"] = message
        response["status"] = status
    elif message:
        response["status"] = {"code": 200 if code is None else code, "message": message}
    if warnings:
        response["warnings"] = list(warnings)
    if allowed and patch_ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(patch_ops), separators=(",", ":")).encode()).decode()
    return {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND, "response": response}


def parse_request(review: Any) -> AdmissionRequest:
    """Check the envelope and return the request. Raises :class:`Malformed` naming the field."""
    if not isinstance(review, Mapping):
        raise Malformed("", "the body must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != ADMISSION_API_VERSION:
        raise Malformed("apiVersion", f"must be {ADMISSION_API_VERSION!r}, "
                        f"not {_short(review.get('apiVersion'))}")
    if review.get("kind") != ADMISSION_KIND:
        raise Malformed("kind", f"must be {ADMISSION_KIND!r}, not {_short(review.get('kind'))}")
    req = review.get("request")
    if not isinstance(req, Mapping):
        raise Malformed("request", "must be an object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise Malformed("request.uid", "must be a non-empty string")
    if len(uid) > 128:
        raise Malformed("request.uid", "is longer than 128 characters")
    gvk = req.get("kind")
    if not isinstance(gvk, Mapping):
        raise Malformed("request.kind", "must be an object with group, version and kind")
    for key in ("group", "version", "kind"):
        if not isinstance(gvk.get(key, ""), str):
            raise Malformed(f"request.kind.{key}", "must be a string")
    if not gvk.get("kind"):
        raise Malformed("request.kind.kind", "must be a non-empty string")
    operation = req.get("operation")
    if operation not in OPERATIONS:
        raise Malformed("request.operation", f"must be one of {', '.join(OPERATIONS)}, "
                        f"not {_short(operation)}")
    obj = req.get("object")
    old_obj = req.get("oldObject")
    if operation in ("CREATE", "UPDATE") and not isinstance(obj, Mapping):
        raise Malformed("request.object", f"must be an object for {operation}")
    if obj is not None and not isinstance(obj, Mapping):
        raise Malformed("request.object", "must be an object or null")
    # The API server always sends oldObject on UPDATE; a hand-made review without one is read as
    # an UPDATE with no previous state (the cores then cannot compare, e.g. detect a shrink).
    if old_obj is not None and not isinstance(old_obj, Mapping):
        raise Malformed("request.oldObject", "must be an object or null")
    namespace = req.get("namespace", "")
    if not isinstance(namespace, str):
        raise Malformed("request.namespace", "must be a string")
    name = req.get("name", "")
    if not isinstance(name, str):
        raise Malformed("request.name", "must be a string")
    dry_run = req.get("dryRun", False)
    # The API server always sends userInfo; a hand-made review without it is nobody in particular
    user_info = req.get("userInfo")
    if user_info is not None and not isinstance(user_info, Mapping):
        raise Malformed("request.userInfo", "must be an object")
    username = (user_info or {}).get("username", "")
    if not isinstance(username, str):
        raise Malformed("request.userInfo.username", "must be a string")
    return AdmissionRequest(uid=uid, group=gvk.get("group", ""), version=gvk.get("version", ""),
                            kind=gvk["kind"], operation=operation, namespace=namespace, name=name,
                            obj=obj, old_obj=old_obj, dry_run=dry_run is True, username=username)


def admit(review: Any, *, route: Route, policy: Policy, plan_keys: PlanKeys,
          cluster: Cluster) -> Outcome:
    """Decide one review. Raises :class:`Malformed` for a bad envelope only; whatever goes wrong
    with the object (a refusal, an unreadable annotation, a diskhooks bug) is a denial."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}")  # a programming error, not user input
    req = parse_request(review)
    kind = req.kind if req.kind in KNOWN_KINDS else "other"
    core = select_core(req, route)
    if core is None:
        return Outcome(build_response(uid=req.uid, allowed=True), kind, req.operation, "allowed",
                       req.uid)
    namespace = _namespace(req)
    try:
        mutation = _dispatch(req, core, namespace=namespace, policy=policy, plan_keys=plan_keys,
                             cluster=cluster)
        assert req.obj is not None
        # equality is a fast C walk; most objects (no diskhooks annotations) stop here
        ops = diff_patch(req.obj, mutation.obj)
    except Refused as exc:
        return Outcome(build_response(uid=req.uid, allowed=False, message=str(exc)), kind,
                       req.operation, "denied", req.uid)
    except Malformed as exc:
        # The envelope was fine (parse_request passed): what a core cannot read is the user's
        # object (e.g. a plan annotation that is not JSON). That is a denial, never a 400: a 400
        # makes the API server apply failurePolicy, and "Ignore" would admit an unverified object.
        return Outcome(build_response(uid=req.uid, allowed=False, message=str(exc), code=400,
                                      reason="BadRequest"),
                       kind, req.operation, "denied", req.uid)
    except Exception as exc:  # noqa: BLE001 - a bug in a core must not become a 500 (see module doc)
        message = (f"diskhooks could not process this {req.kind} because of an internal error "
                   f"(request uid {req.uid}); it was not admitted. The webhook's log has the details.")
        return Outcome(build_response(uid=req.uid, allowed=False, message=message, code=500,
                                      reason="InternalError"),
                       kind, req.operation, "error", req.uid, exc)
    response = build_response(uid=req.uid, allowed=True, patch_ops=ops, warnings=mutation.warnings)
    return Outcome(response, kind, req.operation, "patched" if ops else "allowed", req.uid)


def handle_review(review: Any, *, route: Route, policy: Policy, plan_keys: PlanKeys,
                  cluster: Cluster) -> dict[str, Any]:
    """The AdmissionReview response for ``review`` (see :func:`admit`). Raises :class:`Malformed`."""
    return admit(review, route=route, policy=policy, plan_keys=plan_keys, cluster=cluster).response


def patch_of(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Decode the JSONPatch of a response (``[]`` when there is none)."""
    inner = response.get("response", response)
    patch = inner.get("patch")
    if not patch:
        return []
    ops = json.loads(base64.b64decode(patch))
    assert isinstance(ops, list)
    return ops


Core = Literal["vm", "vmi", "pod"]


def select_core(req: AdmissionRequest, route: Route) -> Core | None:
    """Which core applies to this request on this route; None when diskhooks has nothing to do."""
    if route == "mutate" and req.group == KUBEVIRT_GROUP:
        if req.kind == "VirtualMachine" and req.operation in ("CREATE", "UPDATE"):
            return "vm"
        if req.kind == "VirtualMachineInstance" and req.operation == "CREATE":
            return "vmi"
    if route == "mutate-pod" and req.group == "" and req.kind == "Pod" and req.operation == "CREATE":
        return "pod"
    return None


def _dispatch(req: AdmissionRequest, core: Core, *, namespace: str, policy: Policy,
              plan_keys: PlanKeys, cluster: Cluster) -> Mutation:
    assert req.obj is not None  # parse_request guarantees an object for CREATE/UPDATE
    if req.version != "v1":
        # the chart's rules (matchPolicy Equivalent) have the API server convert every request to
        # v1; an object of another version is not read with v1's rules, it is denied
        raise Malformed("request.kind.version", f"diskhooks reads {req.kind} v1 objects only, not "
                        f"{_short(req.version)}")
    if core == "vm":
        return mutate_vm(req.obj, operation=req.operation, old_obj=req.old_obj,
                         namespace=namespace, policy=policy, plan_keys=plan_keys, cluster=cluster,
                         username=req.username)
    if core == "vmi":
        return mutate_vmi(req.obj, operation=req.operation, namespace=namespace, policy=policy,
                          plan_keys=plan_keys, cluster=cluster)
    return mutate_pod(req.obj, namespace=namespace, policy=policy, plan_keys=plan_keys,
                      username=req.username)


def _namespace(req: AdmissionRequest) -> str:
    """``request.namespace``; the object's own namespace only if the API server sent none."""
    if req.namespace:
        return req.namespace
    meta = (req.obj or {}).get("metadata")
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    if isinstance(ns, str) and ns:
        return ns
    raise Malformed("request.namespace", f"a {req.kind} is namespaced: request.namespace is missing")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def diff_patch(before: Any, after: Any, prefix: str = "") -> list[dict[str, Any]]:
    """JSONPatch operations that turn ``before`` into ``after``, computed by diffing.

    Objects are walked key by key and equal sub-trees skipped with Python's (C-speed) equality, so
    ``jsonpatch.make_patch`` only diffs the few sub-trees the mutation touched (lists such as
    volumes and disks, where it finds minimal insertions); on a whole VM with managedFields it
    costs several times more than the mutation itself.
    """
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[dict[str, Any]] = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": f"{prefix}/{_escape(key)}"})
        for key, value in after.items():
            path = f"{prefix}/{_escape(key)}"
            if key not in before:
                ops.append({"op": "add", "path": path, "value": value})
            else:
                ops.extend(diff_patch(before[key], value, path))
        return ops
    if isinstance(before, list) and isinstance(after, list):
        n = len(before)
        if len(after) > n and after[:n] == before:  # appended (how diskhooks adds volumes and disks)
            return [{"op": "add", "path": f"{prefix}/{i}", "value": after[i]} for i in range(n, len(after))]
        sub = jsonpatch.make_patch(before, after).patch
        for op in sub:
            op["path"] = prefix + op["path"]
            if "from" in op:
                op["from"] = prefix + op["from"]
        return list(sub)
    return [{"op": "replace", "path": prefix, "value": after}]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
