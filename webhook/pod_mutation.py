"""Pod mutation: give a diskhooks VM's virt-launcher Pod the prepare init container and its mounts.

Pure core: a Pod (dict) in, a :class:`~webhook.mutation.Mutation` with a new Pod out; the input is
never modified, nothing is read from the environment, no I/O. The admission layer diffs the two.

Only Pods carrying the label ``diskhooks.io/managed: "true"`` are touched (the Pod webhook's
objectSelector picks exactly those, and fails closed for them). With the policy's
``kubevirt.controllerServiceAccount`` set, such a Pod must come from that user (virt-controller): a
user with Pod ``create`` rights in the namespace gets no hostPath volumes by borrowing a VM's plan.
Such a Pod must carry a plan that verifies for its namespace and VM (the VMI name KubeVirt puts in
the ``kubevirt.io/domain`` annotation, which is therefore required): the prepare step writes files
on the node as root, so a hand-made Pod with a forged, edited or borrowed-from-elsewhere plan is
refused, never given the init container. Then, for a plan with images to prepare:

- pod volumes ``diskhooks-vm-dir`` (hostPath ``plan.host_dir``, DirectoryOrCreate) and, when a disk
  has a backing base, ``diskhooks-image-library`` (hostPath ``plan.image_library``, Directory) and
  ``diskhooks-base-catalog`` (hostPath ``<hostDisks.root>/.diskhooks/catalog``, DirectoryOrCreate:
  the node's base catalog, docs/BASE-CATALOG.md), mounted read-write in prepare and nowhere else, so
  only root on the node (prepare, the node agent) can write an entry, never a VM's owner;
- pod volume ``diskhooks-capacity`` (hostPath ``<hostDisks.root>/.diskhooks/capacity``,
  DirectoryOrCreate), mounted read-only in prepare only: the node agent's capacity summary, which
  prepare's guard reads (it holds byte counts keyed by hashes, no VM's name or file);
- init container ``diskhooks-prepare`` (the plan's sidecar image, ``prepare --plan-from-env
  --overcommit R --reserve Q`` with the policy's ``hostDisks.capacity``; env
  ``DISKHOOKS_PLAN``, ``DISKHOOKS_VMI_UID`` from the Pod's ``kubevirt.io/created-by`` label and
  ``DISKHOOKS_NODE_NAME`` from ``spec.nodeName``, the downward API), with
  each planned hostDisk volume read-write at its launcher path, the VM directory read-write, the
  image library read-only and, for a persistent root, KubeVirt's image volume of the containerDisk
  read-only; when the policy names a node agent (which advertises it on the Nodes), its requests
  and limits include ``diskhooks.io/storage``: the whole GiB the plan may newly create on the node
  the scheduler picks (:func:`diskplan.capacity.launcher_request_gib`; 0, and so absent, for a VM
  with a home node), so kube-scheduler binds the Pod only where they fit (docs/CAPACITY.md);
- the same data mounts, read-only, in the diskhooks ``hook-sidecar-<i>`` container, and the verified
  plan as its ``DISKHOOKS_PLAN`` variable (also for a passthrough-only plan): the sidecar applies
  that plan and refuses a VMI whose annotation no longer matches it, because VMI annotations stay
  editable after the Pod is admitted while a Pod's env does not;
- in ``compute``: the VM directory (read-write, persistent root only) and the image library
  (read-only, backing bases only), which qemu opens through the domain's backing chains.

Re-running on its own output gives the same Pod (API-server reinvocation): every diskhooks entry is
replaced in place by its canonical form, never appended twice.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diskplan import keys as K
from diskplan.baserecord import image_digest
from diskplan.capacity import launcher_request_gib
from diskplan.errors import Refused
from diskplan.plan import Plan, PlanKeys, verify_plan
from webhook.mutation import Mutation

if TYPE_CHECKING:
    from diskplan.policy import Policy

COMPUTE_CONTAINER = "compute"
SIDECAR_CONTAINER_PREFIX = "hook-sidecar-"
LABEL_VM_NAME = "vm.kubevirt.io/name"
PLAN_FIELD = f"metadata.annotations[{K.ANN_PLAN}]"
DOMAIN_FIELD = f"metadata.annotations[{K.ANN_DOMAIN}]"
#: requests == limits, so a Guaranteed launcher pod (dedicated CPUs) stays Guaranteed; the pod's
#: scheduling request is unchanged (compute asks for far more). Measured on the build machine:
#: prepare peaks at ~32 MiB RSS (Python, or a qemu-img child under its own 1 GiB address-space
#: rlimit); the CPU-heavy part is hashing a base: a persistent root's containerDisk named by tag
#: (by digest it is not hashed), ~1 GB/s per core, so a 10 GiB containerDisk takes ~20 s at this
#: limit; a library base only when the node's base catalog has no entry for it (docs/BASE-CATALOG.md).
PREPARE_RESOURCES = {"cpu": "500m", "memory": "128Mi"}
#: The init container runs as root because it creates files in root-owned hostPath directories and
#: hands them to qemu (107). Of root's capabilities it keeps only:
#: - CHOWN: give each image and base record it creates to 107:107 before publishing it;
#: - DAC_OVERRIDE: open existing images owned by 107 (mode 0660) to inspect and grow them, and
#:   create files in a VM directory KubeVirt chowned to 107 (it does when an image is missing).
#: FOWNER is not needed: prepare only chmods files it has just created (and still owns).
PREPARE_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE"]


def mutate_pod(pod: Mapping[str, Any], *, namespace: str, policy: Policy,
               plan_keys: PlanKeys, username: str = "") -> Mutation:
    """The launcher Pod with diskhooks' prepare init container and mounts; see the module doc.

    ``username`` is who creates the Pod (the AdmissionReview's ``userInfo.username``); with the
    policy's ``kubevirt.controllerServiceAccount`` set, only that user's managed Pods are prepared.
    Raises :class:`Refused` (naming the field) for a managed Pod of another creator, whose plan does
    not verify or that lacks what the plan needs; :class:`~diskplan.errors.Malformed` for a plan
    that is not JSON.
    """
    out: dict[str, Any] = copy.deepcopy(dict(pod))
    meta = _mapping(out.get("metadata"), "metadata")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    if labels.get(K.LABEL_MANAGED) != K.LABEL_MANAGED_VALUE:
        return Mutation(out)
    controller = policy.kubevirt.username
    if controller is not None and username != controller:
        who = repr(username[:120]) if username else "a request without a user name"
        raise Refused("request.userInfo.username", f"only KubeVirt's virt-controller ({controller}) "
                      f"creates virt-launcher Pods that carry a diskhooks plan; {who} may not")
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    text = annotations.get(K.ANN_PLAN)
    if not isinstance(text, str) or not text:
        raise Refused(PLAN_FIELD, f"the Pod carries the label {K.LABEL_MANAGED}={K.LABEL_MANAGED_VALUE} "
                      "but no diskhooks plan; launcher Pods get the plan from their VMI, which the "
                      "diskhooks webhook wrote")
    vm = _vmi_name(labels, annotations, out.get("spec"))
    plan = verify_plan(text, plan_keys, namespace=namespace, vm=vm, field_path=PLAN_FIELD)
    if not plan.needs_launcher:
        return Mutation(out)  # sizing only: nothing for the sidecar or on the node

    spec = _mapping(out.get("spec"), "spec")
    containers = _list(spec.get("containers"), "spec.containers")
    sidecars = [c for c in containers if isinstance(c, dict)
                and str(c.get("name", "")).startswith(SIDECAR_CONTAINER_PREFIX)
                and c.get("image") == plan.sidecar_image]
    if not sidecars:
        raise Refused("spec.containers", f"no diskhooks hook sidecar: no {SIDECAR_CONTAINER_PREFIX}<i> "
                      f"container runs the plan's image {plan.sidecar_image!r}; the VMI's "
                      f"{K.ANN_HOOK_SIDECARS} annotation must request it")
    for sidecar in sidecars:  # the verified plan, which the sidecar applies (not the VMI's live one)
        _ensure_named(_list_field(sidecar, "env", f"spec.containers[{sidecar.get('name')}].env"),
                      {"name": K.ENV_PLAN, "value": text})
    if not plan.disks and plan.persist_root is None:
        return Mutation(out)  # nothing on the node to prepare (passthrough only)

    uid = labels.get(K.LABEL_CREATED_BY)
    if not isinstance(uid, str) or not uid:
        raise Refused(f"metadata.labels[{K.LABEL_CREATED_BY}]", "is missing: it is the VMI uid that "
                      "KubeVirt puts on every virt-launcher Pod, and prepare records it")
    volumes = _list_field(spec, "volumes", "spec.volumes")
    _check_pod_volumes(plan, volumes)
    compute = _find_container(containers, COMPUTE_CONTAINER)
    if compute is None:
        raise Refused("spec.containers", f"no {COMPUTE_CONTAINER!r} container: not a virt-launcher Pod")
    if plan.persist_root is not None:
        _check_image_volume_mount(plan, compute)

    has_backing = any(d.backing is not None for d in plan.disks)
    _ensure_named(volumes, _host_path_volume(K.POD_VOLUME_VM_DIR, plan.host_dir, "DirectoryOrCreate"))
    if has_backing:
        _ensure_named(volumes, _host_path_volume(K.POD_VOLUME_IMAGE_LIBRARY, str(plan.image_library),
                                                 "Directory"))

    catalog = _catalog_dir(plan) if has_backing else None
    if catalog is not None:
        _ensure_named(volumes, _host_path_volume(K.POD_VOLUME_BASE_CATALOG, catalog, "DirectoryOrCreate"))
    root = _root_dir(plan)
    if root is not None:
        _ensure_named(volumes, _host_path_volume(K.POD_VOLUME_CAPACITY, K.capacity_dir(root),
                                                 "DirectoryOrCreate"))

    data = _data_mounts(plan, has_backing)
    init = _list_field(spec, "initContainers", "spec.initContainers")
    prepare_only = [] if catalog is None else \
        [_mount(K.POD_VOLUME_BASE_CATALOG, K.LAUNCHER_BASE_CATALOG, read_only=False)]
    if root is not None:
        prepare_only.append(_mount(K.POD_VOLUME_CAPACITY, K.LAUNCHER_CAPACITY, read_only=True))
    _ensure_named(init, _prepare_container(plan, text, policy, data + prepare_only))
    for sidecar in sidecars:
        _ensure_mounts(sidecar, [{**m, "readOnly": True} for m in data], f"{sidecar.get('name')}")
    compute_mounts = []
    if plan.persist_root is not None:
        compute_mounts.append(_mount(K.POD_VOLUME_VM_DIR, K.LAUNCHER_VM_DIR, read_only=False))
    if has_backing:
        compute_mounts.append(_mount(K.POD_VOLUME_IMAGE_LIBRARY, K.LAUNCHER_IMAGE_LIBRARY, read_only=True))
    _ensure_mounts(compute, compute_mounts, COMPUTE_CONTAINER)
    return Mutation(out)


# ------------------------------------------------------------------------------------------------
def _vmi_name(labels: dict[str, Any], annotations: dict[str, Any], spec: Any) -> str:
    """The name of the VMI (the VM's name) this Pod runs, which its plan must have been made for.

    virt-controller sets the annotation ``kubevirt.io/domain`` to the VMI's name on every launcher
    Pod, and the label ``vm.kubevirt.io/name`` to its host name: the name up to the first dot (63
    characters at most), or ``spec.hostname``, which the Pod carries too. A Pod without the
    annotation could present any plan of its namespace, so it is refused; a label that agrees with
    neither is refused as well."""
    name = annotations.get(K.ANN_DOMAIN)
    if not isinstance(name, str) or not name:
        raise Refused(DOMAIN_FIELD, "is missing: KubeVirt sets it to the VMI's name on every "
                      "virt-launcher Pod, and the diskhooks plan is checked against it; without it a "
                      "Pod could present the plan of any VM in its namespace")
    host = labels.get(LABEL_VM_NAME)
    if host is not None:
        expected = [name.split(".")[0][:63]]
        hostname = spec.get("hostname") if isinstance(spec, dict) else None
        if isinstance(hostname, str) and hostname and hostname not in expected:
            expected.append(hostname)
        if host not in expected:
            raise Refused(f"metadata.labels[{LABEL_VM_NAME}]", f"{str(host)[:80]!r} does not agree with "
                          f"{DOMAIN_FIELD} {name[:80]!r}: KubeVirt sets it to the VMI's host name "
                          f"({' or '.join(repr(e) for e in expected)})")
    return name


def _check_pod_volumes(plan: Plan, volumes: list[Any]) -> None:
    by_name = {v["name"]: v for v in volumes if isinstance(v, dict) and isinstance(v.get("name"), str)}
    for disk in plan.disks:
        where = f"spec.volumes[{disk.name}]"
        vol = by_name.get(disk.name)
        if vol is None:
            raise Refused(where, f"the planned disk {disk.name!r} has no pod volume; KubeVirt makes a "
                          "hostPath volume for every hostDisk volume of the VMI")
        host_path = vol.get("hostPath")
        if not isinstance(host_path, dict) or host_path.get("path") != plan.host_dir:
            raise Refused(where, f"must be a hostPath volume of the VM's host directory {plan.host_dir} "
                          f"(the parent of the planned image), not {_describe(vol)}")
    if plan.image_library is None and any(d.backing is not None for d in plan.disks):
        raise Refused(PLAN_FIELD, "a disk has a backing base but the plan names no image library")
    pr = plan.persist_root
    if pr is not None:
        vol = by_name.get(pr.volume)
        if vol is None or not isinstance(vol.get("image"), dict):
            raise Refused(f"spec.volumes[{pr.volume}]", "persist-root needs KubeVirt's image-volume "
                          "mode (the ImageVolume feature gate): the containerDisk must be a pod 'image' "
                          f"volume, so the prepare step can read its base; found "
                          f"{'no such volume' if vol is None else _describe(vol)}")
        digest = image_digest(pr.image)
        reference = vol["image"].get("reference")
        if digest is not None and (not isinstance(reference, str) or image_digest(reference) != digest):
            # prepare records the overlay's base by this digest without hashing it (the runtime
            # checks what it pulls against the digest): the volume must be that very content
            raise Refused(f"spec.volumes[{pr.volume}].image.reference",
                          f"{str(reference)[:200]!r} is not the plan's containerDisk {pr.image!r} "
                          f"(digest {digest}); the plan does not match this VMI")


def _check_image_volume_mount(plan: Plan, compute: dict[str, Any]) -> None:
    pr = plan.persist_root
    assert pr is not None
    expected = _image_volume_dir(pr.volume_index)
    for m in _list(compute.get("volumeMounts"), f"spec.containers[{COMPUTE_CONTAINER}].volumeMounts"):
        if isinstance(m, dict) and m.get("name") == pr.volume and m.get("mountPath") != expected:
            raise Refused(f"spec.containers[{COMPUTE_CONTAINER}].volumeMounts[{pr.volume}]",
                          f"KubeVirt mounts the containerDisk at {m.get('mountPath')!r}, but the plan "
                          f"expects {expected!r} (volume index {pr.volume_index}); the plan does not "
                          "match this VMI")


def _catalog_dir(plan: Plan) -> str | None:
    """The node's base catalog below the ``hostDisks.root`` the plan's VM directory lies in
    (``<root>/<namespace>/<vm>``); None if it does not have that shape (then prepare hashes)."""
    root = _root_dir(plan)
    return None if root is None else K.catalog_dir(root)


def _root_dir(plan: Plan) -> str | None:
    """The ``hostDisks.root`` the plan's VM directory (``<root>/<namespace>/<vm>``) lies in; None if
    it does not have that shape."""
    tail = f"/{plan.namespace}/{plan.vm}"
    if not plan.host_dir.endswith(tail) or len(plan.host_dir) == len(tail):
        return None
    return plan.host_dir[: -len(tail)]


def _prepare_resources(plan: Plan, policy: Policy) -> dict[str, dict[str, str]]:
    """requests == limits (extended resources allow nothing else); ``diskhooks.io/storage`` only
    when a node agent advertises it (the policy names one) and the plan requests any: on the init
    container, where the Pod's effective request is ``max(largest init container, sum of its
    containers)``, so it is held for the Pod's whole life and nothing a VM owner puts on
    ``compute`` can lower it."""
    wanted: dict[str, str] = dict(PREPARE_RESOURCES)
    gib = launcher_request_gib(plan) if policy.node_agent.service_account is not None else 0
    if gib > 0:
        wanted[K.RESOURCE_STORAGE] = str(gib)
    return {"requests": dict(wanted), "limits": dict(wanted)}


def _image_volume_dir(index: int) -> str:
    return f"{K.LAUNCHER_IMAGE_VOLUMES}/disk_{index}"


def _data_mounts(plan: Plan, has_backing: bool) -> list[dict[str, Any]]:
    """What the prepare container mounts (its read-only flags); the sidecar gets them all read-only."""
    mounts = [_mount(d.name, d.launcher_dir, read_only=False) for d in plan.disks]
    mounts.append(_mount(K.POD_VOLUME_VM_DIR, K.LAUNCHER_VM_DIR, read_only=False))
    if has_backing:
        mounts.append(_mount(K.POD_VOLUME_IMAGE_LIBRARY, K.LAUNCHER_IMAGE_LIBRARY, read_only=True))
    if plan.persist_root is not None:
        mounts.append(_mount(plan.persist_root.volume, _image_volume_dir(plan.persist_root.volume_index),
                             read_only=True))
    return mounts


def _prepare_container(plan: Plan, text: str, policy: Policy,
                       mounts: list[dict[str, Any]]) -> dict[str, Any]:
    # every field the API server would default is spelt out, so reinvocation sees no difference
    capacity = policy.host_disks.capacity
    return {
        "name": K.PREPARE_CONTAINER,
        "image": plan.sidecar_image,
        "imagePullPolicy": policy.sidecar.image_pull_policy,
        "args": ["prepare", "--plan-from-env", "--overcommit", capacity.overcommit_text,
                 "--reserve", capacity.reserve_text],
        "env": [
            {"name": K.ENV_PLAN, "value": text},
            {"name": K.ENV_VMI_UID, "valueFrom": {"fieldRef": {
                "apiVersion": "v1", "fieldPath": f"metadata.labels['{K.LABEL_CREATED_BY}']"}}},
            # the node the Pod runs on: prepare refuses to run anywhere but the plan's home node
            {"name": K.ENV_NODE_NAME, "valueFrom": {"fieldRef": {
                "apiVersion": "v1", "fieldPath": "spec.nodeName"}}},
        ],
        "resources": _prepare_resources(plan, policy),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": list(PREPARE_CAPABILITIES)},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [dict(m) for m in mounts],
        "terminationMessagePath": "/dev/termination-log",
        # prepare's reasons (stderr) become the container's termination message: kubectl describe
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _host_path_volume(name: str, path: str, kind: str) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def _mount(name: str, path: str, *, read_only: bool) -> dict[str, Any]:
    return {"name": name, "mountPath": path, "readOnly": read_only}


def _ensure_named(items: list[Any], wanted: dict[str, Any]) -> None:
    """Replace the entry named like ``wanted`` in place, or append it."""
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == wanted["name"]:
            items[i] = wanted
            return
    items.append(wanted)


def _ensure_mounts(container: dict[str, Any], wanted: list[dict[str, Any]], where: str) -> None:
    if not wanted:
        return
    mounts = _list_field(container, "volumeMounts", f"spec.containers[{where}].volumeMounts")
    for m in wanted:
        for i, existing in enumerate(mounts):
            if isinstance(existing, dict) and existing.get("mountPath") == m["mountPath"]:
                mounts[i] = dict(m)
                break
        else:
            mounts.append(dict(m))


def _find_container(containers: list[Any], name: str) -> dict[str, Any] | None:
    return next((c for c in containers if isinstance(c, dict) and c.get("name") == name), None)


def _describe(volume: Mapping[str, Any]) -> str:
    kinds = [k for k in volume if k != "name"]
    if "hostPath" in volume and isinstance(volume["hostPath"], dict):
        return f"a hostPath volume of {volume['hostPath'].get('path')!r}"
    return f"a {'/'.join(kinds) or 'bare'} volume"


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refused(where, "must be an object")
    return value


def _list_field(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    """``obj[key]`` as a list that belongs to ``obj`` (created when absent or null)."""
    if obj.get(key) is None:
        obj[key] = []
    return _list(obj[key], where)


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Refused(where, "must be a list")
    return value
