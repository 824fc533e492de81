"""The plan: what the webhook decided for one VM, and everything the prepare step and sidecar need.

Wire form: the value of the ``diskhooks.io/plan`` annotation is one JSON object (documented in
``docs/PLAN.md``)::

    {"version": 1, "namespace": "vms", "vm": "pg01", "hostDir": "/var/lib/diskhooks/vms/pg01",
     "imageLibrary": "/var/lib/diskhooks/images", "sidecarImage": "...",
     "disks": [...], "persistRoot": null | {...}, "passthrough": [...],
     "auth": {"keyId": "k-1a2b3c4d", "hmac": "<hex sha256>"}}

Version 2 adds ``"detached": [{"name": ..., "sizeBytes": ...}]``: disks removed from the VM whose
images stay on the node, with the largest size ever planned (a disk re-added under that name may
not be smaller). Version 3 adds ``"node": "<node name>"``: the VM's home node, the node that holds
its images (``diskhooks.io/node``, recorded by the node agent); prepare refuses to run anywhere
else. Each plan is written with the lowest version that can carry it (1 without detached disks
and node, 2 with detached disks, 3 with a node), so plans that need no newer member stay readable
by older readers; the sidecar and prepare act on ``disks``/``persistRoot``/``passthrough`` (and
prepare on ``node``).

The HMAC covers the canonical JSON (sorted keys, no spaces) of everything but ``auth``; that body
carries the namespace and VM name, so a plan copied to another VM or namespace fails verification.
Only the webhook holds the keys. Parsing is strict: unknown keys, wrong types, names that are not
DNS labels, or paths that are not clean and absolute make :class:`~diskplan.errors.Malformed`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from diskplan import keys as K
from diskplan.errors import Malformed, Refused

PLAN_VERSION = 3  # the newest version read and written; see Plan.version
PLAN_VERSIONS = (1, 2, 3)
MAX_PLAN_BYTES = 64 * 1024
MAX_DETACHED = 128  # detached disks one plan remembers (bounds the plan's size)
MAX_INTEGER = 2**63 - 1  # the largest number a plan holds (a Kubernetes quantity's, qemu's image size)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
# a DNS-1123 subdomain is what Kubernetes allows for namespaces-as-labels and VM names
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
# a Kubernetes node name: a DNS-1123 subdomain proper (dot-separated DNS labels, at most 253
# characters), see is_node_name
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
MAX_NODE_NAME = 253
_CLEAN_ABS_PATH = re.compile(r"^(/[A-Za-z0-9._+-]+)+\Z")
_BASE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")

BUSES = ("virtio", "scsi", "sata")
CACHES = ("none", "writethrough", "writeback", "directsync", "unsafe")
IOS = ("native", "threads", "io_uring")
DISCARDS = ("unmap", "ignore")
PASSTHROUGH_MODES = ("disk", "lun")
BASE_FORMATS = ("qcow2", "raw")


def is_node_name(name: object) -> bool:
    """Whether ``name`` is a valid Kubernetes node name: a DNS-1123 subdomain (lower-case
    alphanumerics and ``-``, dot-separated labels each starting and ending with an alphanumeric,
    at most 253 characters)."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NODE_NAME \
        and _DNS1123_SUBDOMAIN.match(name) is not None


def is_clean_abs_path(path: str) -> bool:
    """Absolute, no ``..``/``.`` segments, no doubled or trailing slashes, a conservative alphabet."""
    if not _CLEAN_ABS_PATH.match(path):
        return False
    return all(seg not in (".", "..") for seg in path.split("/")[1:])


@dataclass(frozen=True)
class Backing:
    """A base image from the platform's image library that a disk overlays."""

    image: str  # the library name the user gave, e.g. "almalinux-9"
    file: str  # file name inside hostDisks.imageLibrary, e.g. "almalinux-9.qcow2"
    format: str  # "qcow2" or "raw"

    @property
    def launcher_path(self) -> str:
        return f"{K.LAUNCHER_IMAGE_LIBRARY}/{self.file}"


@dataclass(frozen=True)
class PlannedDisk:
    """One qcow2 host disk. ``name`` is both the VMI volume name and the disk name."""

    name: str
    size_bytes: int
    bus: str
    cache: str
    io: str
    discard: str
    backing: Backing | None = None
    serial: str | None = None
    boot_order: int | None = None

    @property
    def file(self) -> str:
        return K.disk_file_name(self.name)

    @property
    def launcher_dir(self) -> str:
        return K.launcher_disk_dir(self.name)

    @property
    def launcher_path(self) -> str:
        return f"{self.launcher_dir}/{self.file}"

    @property
    def base_record(self) -> str:
        """File name of the record of the library base (only meaningful with ``backing``)."""
        return K.disk_base_record_name(self.name)

    @property
    def base_record_path(self) -> str:
        return f"{self.launcher_dir}/{self.base_record}"

    @property
    def alias(self) -> str:
        return K.disk_alias(self.name)


@dataclass(frozen=True)
class PersistRoot:
    """The containerDisk root whose overlay lives in the VM's host directory."""

    volume: str
    image: str  # containerDisk image reference, recorded to detect a changed base
    volume_index: int  # index of the volume in spec.volumes: KubeVirt's disk_<index>.img

    @property
    def file(self) -> str:
        return K.persist_root_file_name(self.volume)

    @property
    def marker(self) -> str:
        return K.persist_root_marker_name(self.volume)

    @property
    def launcher_path(self) -> str:
        return f"{K.LAUNCHER_VM_DIR}/{self.file}"

    @property
    def marker_path(self) -> str:
        return f"{K.LAUNCHER_VM_DIR}/{self.marker}"

    @property
    def base_path(self) -> str:
        return K.container_disk_path(self.volume_index)

    @property
    def alias(self) -> str:
        return K.disk_alias(self.volume)


@dataclass(frozen=True)
class Passthrough:
    """A Block-mode PVC handed to the guest as a virtio disk or a SCSI lun."""

    name: str  # VMI volume and disk name
    claim: str
    mode: str  # "disk" | "lun"
    cache: str = "none"
    io: str = "native"

    @property
    def alias(self) -> str:
        return K.disk_alias(self.name)


@dataclass(frozen=True)
class DetachedDisk:
    """A disk removed from the VM: its image stays on the node (diskhooks never deletes images),
    ``size_bytes`` is the largest size ever planned for it. Nothing acts on it but the webhook,
    which refuses to re-attach the name with a smaller size."""

    name: str
    size_bytes: int


@dataclass(frozen=True)
class Plan:
    namespace: str
    vm: str
    host_dir: str  # node path <hostDisks.root>/<namespace>/<vm>
    image_library: str | None  # node path of the image library, when any disk has a backing base
    sidecar_image: str
    disks: tuple[PlannedDisk, ...] = ()
    persist_root: PersistRoot | None = None
    passthrough: tuple[Passthrough, ...] = ()
    detached: tuple[DetachedDisk, ...] = ()  # version 2: only the webhook reads it
    node: str | None = None  # version 3: the home node (prepare refuses to run elsewhere)

    @property
    def version(self) -> int:
        """The wire version: 3 when the plan names a home node, 2 when it remembers detached disks
        (the members those versions add), else 1, so plans without them stay readable by older
        readers (an older sidecar)."""
        if self.node is not None:
            return 3
        return 2 if self.detached else 1

    @property
    def holds_files(self) -> bool:
        """Whether the VM has images on a node: planned disks, a persistent root, or detached
        disks (whose images stay where they were made). Such a VM is pinned to its home node."""
        return bool(self.disks or self.persist_root is not None or self.detached)

    @property
    def needs_launcher(self) -> bool:
        """Whether the launcher has anything to do (disks, a persistent root, passthrough): then
        the VMI needs the diskhooks sidecar and the label that selects its Pod. A plan that only
        remembers detached disks needs neither."""
        return bool(self.disks or self.persist_root is not None or self.passthrough)

    @property
    def managed_volumes(self) -> tuple[str, ...]:
        """Volume names diskhooks added to the VMI spec (hostDisks and passthrough PVCs)."""
        return tuple(d.name for d in self.disks) + tuple(p.name for p in self.passthrough)

    def disk(self, name: str) -> PlannedDisk | None:
        return next((d for d in self.disks if d.name == name), None)

    # --- wire form ---------------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        """The JSON body (without ``auth``), camelCase, ``None`` members omitted inside items."""
        def disk(d: PlannedDisk) -> dict[str, Any]:
            out: dict[str, Any] = {
                "name": d.name, "sizeBytes": d.size_bytes, "bus": d.bus, "cache": d.cache,
                "io": d.io, "discard": d.discard,
            }
            if d.backing is not None:
                out["backing"] = asdict(d.backing)
            if d.serial is not None:
                out["serial"] = d.serial
            if d.boot_order is not None:
                out["bootOrder"] = d.boot_order
            return out

        body: dict[str, Any] = {
            "version": self.version,
            "namespace": self.namespace,
            "vm": self.vm,
            "hostDir": self.host_dir,
            "imageLibrary": self.image_library,
            "sidecarImage": self.sidecar_image,
            "disks": [disk(d) for d in self.disks],
            "persistRoot": None if self.persist_root is None else {
                "volume": self.persist_root.volume, "image": self.persist_root.image,
                "volumeIndex": self.persist_root.volume_index,
            },
            "passthrough": [
                {"name": p.name, "claim": p.claim, "mode": p.mode, "cache": p.cache, "io": p.io}
                for p in self.passthrough
            ],
        }
        if self.detached:
            body["detached"] = [{"name": d.name, "sizeBytes": d.size_bytes} for d in self.detached]
        if self.node is not None:
            body["node"] = self.node
        return body


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ------------------------------------------------------------------------------------------------
# keys and authentication
# ------------------------------------------------------------------------------------------------
# hashlib/hmac are imported where used: the sidecar only parses plans and must stay small in memory.
def key_id(secret: bytes) -> str:
    import hashlib

    return "k-" + hashlib.sha256(secret).hexdigest()[:12]


@dataclass(frozen=True)
class PlanKeys:
    """The webhook's plan-authentication keys: sign with ``current``, accept any of ``accepted``.

    Rotation: add the new key as current and keep the old one accepted until every VM has been
    updated (or restarted) once; then drop it.
    """

    current: bytes
    previous: tuple[bytes, ...] = ()
    _by_id: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.current) < 16:
            raise ValueError("plan key: the current key must be at least 16 bytes")
        for k in (self.current, *self.previous):
            self._by_id[key_id(k)] = k

    def lookup(self, kid: str) -> bytes | None:
        return self._by_id.get(kid)


def _mac(secret: bytes, body: Mapping[str, Any]) -> str:
    import hashlib
    import hmac

    return hmac.new(secret, canonical_json(body), hashlib.sha256).hexdigest()


def sign_plan(plan: Plan, plan_keys: PlanKeys) -> str:
    """The annotation value for ``plan``: canonical JSON with an ``auth`` member."""
    body = plan.body()
    doc = dict(body)
    doc["auth"] = {"keyId": key_id(plan_keys.current), "hmac": _mac(plan_keys.current, body)}
    return canonical_json(doc).decode()


def verify_plan(text: str, plan_keys: PlanKeys, *, namespace: str, vm: str,
                field_path: str = K.ANN_PLAN) -> Plan:
    """Parse and authenticate a plan annotation for the object ``namespace``/``vm`` (a launcher
    Pod: the VMI name of its ``kubevirt.io/domain`` annotation). Raises :class:`Refused` naming
    ``field_path`` (:class:`Malformed` for text that is not a plan at all).
    """
    doc = _load(text, field_path)
    auth = doc.get("auth")
    if not isinstance(auth, dict) or not isinstance(auth.get("keyId"), str) \
            or not isinstance(auth.get("hmac"), str):
        raise Refused(field_path, "the plan is not signed by diskhooks (no auth.keyId/auth.hmac); "
                      "plans are written only by the diskhooks webhook")
    secret = plan_keys.lookup(auth["keyId"])
    body = {k: v for k, v in doc.items() if k != "auth"}
    import hmac

    if secret is None or not hmac.compare_digest(_mac(secret, body), auth["hmac"]):
        raise Refused(field_path, "the plan's signature does not verify (forged, edited by hand, or "
                      "signed with a key that is no longer accepted); remove the annotation and let "
                      "the webhook recompute it by updating the VirtualMachine")
    plan = plan_from_body(body, field_path)
    if plan.namespace != namespace:
        raise Refused(field_path, f"the plan was made for namespace {plan.namespace!r}, "
                      f"not {namespace!r}")
    if plan.vm != vm:
        raise Refused(field_path, f"the plan was made for VM {plan.vm!r}, not {vm!r}")
    return plan


def parse_plan(text: str | bytes, field_path: str = K.ANN_PLAN) -> Plan:
    """Parse a plan without authenticating it (the sidecar and prepare step, which run only
    for objects the webhook already verified). Raises :class:`Malformed`."""
    doc = _load(text, field_path)
    return plan_from_body({k: v for k, v in doc.items() if k != "auth"}, field_path)


def _load(text: str | bytes, field_path: str) -> dict[str, Any]:
    return load_json_object(text, field=field_path, what="the plan", max_bytes=MAX_PLAN_BYTES)


def load_json_object(data: str | bytes, *, field: str, what: str, max_bytes: int) -> dict[str, Any]:
    """A JSON object from untrusted text, size-bounded; :class:`Malformed` naming ``field``.

    Bytes must be UTF-8 (what Kubernetes and KubeVirt send; ``json.loads`` would otherwise also
    guess UTF-16/32), without a byte-order mark. Nesting deeper than the interpreter's recursion
    limit is refused as "nested too deeply" instead of escaping as a ``RecursionError``.
    """
    if len(data) > max_bytes:
        raise Malformed(field, f"{what} is {len(data)} bytes, more than the {max_bytes} accepted")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Malformed(field, f"{what} is not UTF-8 (invalid byte at offset {exc.start}); only "
                            "UTF-8 JSON is accepted") from None
    else:
        text = data
    try:
        doc = json.loads(text)
    except RecursionError:
        raise Malformed(field, f"{what} is nested too deeply to be read") from None
    except ValueError as exc:
        raise Malformed(field, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Malformed(field, f"{what} must be a JSON object")
    return doc


# ------------------------------------------------------------------------------------------------
# strict parsing of the body
# ------------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, doc: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        if not isinstance(doc, Mapping):
            raise Malformed(path, "must be an object")
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise Malformed(f"{path}.{unknown[0]}", "unknown key in plan")
        self.doc, self.path = doc, path

    def text(self, key: str, *, choices: tuple[str, ...] | None = None, optional: bool = False,
            pattern: re.Pattern[str] | None = None, path_like: bool = False) -> Any:
        v = self.doc.get(key)
        where = f"{self.path}.{key}"
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v:
            raise Malformed(where, "must be a non-empty string")
        if choices is not None and v not in choices:
            raise Malformed(where, f"must be one of {', '.join(choices)}, not {v!r}")
        if pattern is not None and not pattern.match(v):
            raise Malformed(where, f"{v!r} is not a valid name")
        if path_like and not is_clean_abs_path(v):
            raise Malformed(where, f"{v!r} is not a clean absolute path")
        return v

    def integer(self, key: str, *, minimum: int = 0, optional: bool = False) -> Any:
        v = self.doc.get(key)
        where = f"{self.path}.{key}"
        if v is None and optional:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise Malformed(where, f"must be an integer >= {minimum}")
        if v > MAX_INTEGER:  # no size, index or order is larger; qemu-img takes at most this
            raise Malformed(where, f"{v} is larger than {MAX_INTEGER}")
        return v

    def items(self, key: str) -> list[Any]:
        v = self.doc.get(key, [])
        if not isinstance(v, list):
            raise Malformed(f"{self.path}.{key}", "must be a list")
        return v


def plan_from_body(body: Mapping[str, Any], path: str = K.ANN_PLAN) -> Plan:
    if not isinstance(body, Mapping):
        raise Malformed(path, "must be an object")
    version = _Reader(body, path, set(body)).integer("version", minimum=1)
    if version not in PLAN_VERSIONS:
        raise Malformed(f"{path}.version", f"plan version {version} is not supported "
                        f"(this diskhooks reads versions {', '.join(map(str, PLAN_VERSIONS))})")
    members = {"version", "namespace", "vm", "hostDir", "imageLibrary", "sidecarImage", "disks",
               "persistRoot", "passthrough"}
    if version >= 2:
        members |= {"detached"}
    if version >= 3:
        members |= {"node"}
    r = _Reader(body, path, members)
    disks = []
    seen: set[str] = set()
    for i, raw in enumerate(r.items("disks")):
        d = _Reader(raw, f"{path}.disks[{i}]", {"name", "sizeBytes", "bus", "cache", "io", "discard",
                                                "backing", "serial", "bootOrder"})
        backing = None
        if raw.get("backing") is not None:
            b = _Reader(raw["backing"], f"{d.path}.backing", {"image", "file", "format"})
            backing = Backing(image=b.text("image", pattern=DNS_SUBDOMAIN),
                              file=b.text("file", pattern=_BASE_FILE),
                              format=b.text("format", choices=BASE_FORMATS))
        disk = PlannedDisk(
            name=d.text("name", pattern=DNS_LABEL), size_bytes=d.integer("sizeBytes", minimum=1),
            bus=d.text("bus", choices=BUSES), cache=d.text("cache", choices=CACHES),
            io=d.text("io", choices=IOS), discard=d.text("discard", choices=DISCARDS),
            backing=backing, serial=d.text("serial", optional=True),
            boot_order=d.integer("bootOrder", minimum=1, optional=True),
        )
        seen_check(seen, disk.name, f"{d.path}.name")
        disks.append(disk)
    persist = None
    if body.get("persistRoot") is not None:
        p = _Reader(body["persistRoot"], f"{path}.persistRoot", {"volume", "image", "volumeIndex"})
        persist = PersistRoot(volume=p.text("volume", pattern=DNS_LABEL), image=p.text("image"),
                              volume_index=p.integer("volumeIndex"))
    passthrough = []
    for i, raw in enumerate(r.items("passthrough")):
        q = _Reader(raw, f"{path}.passthrough[{i}]", {"name", "claim", "mode", "cache", "io"})
        item = Passthrough(name=q.text("name", pattern=DNS_LABEL), claim=q.text("claim", pattern=DNS_SUBDOMAIN),
                           mode=q.text("mode", choices=PASSTHROUGH_MODES),
                           cache=q.text("cache", choices=CACHES), io=q.text("io", choices=IOS))
        seen_check(seen, item.name, f"{q.path}.name")
        passthrough.append(item)
    detached = []
    raw_detached = r.items("detached")
    if len(raw_detached) > MAX_DETACHED:
        raise Malformed(f"{path}.detached", f"lists {len(raw_detached)} disks, more than {MAX_DETACHED}")
    for i, raw in enumerate(raw_detached):
        x = _Reader(raw, f"{path}.detached[{i}]", {"name", "sizeBytes"})
        gone = DetachedDisk(name=x.text("name", pattern=DNS_LABEL), size_bytes=x.integer("sizeBytes", minimum=1))
        seen_check(seen, gone.name, f"{x.path}.name")
        detached.append(gone)
    node = r.text("node", optional=True)
    if node is not None and not is_node_name(node):
        raise Malformed(f"{path}.node", f"{node[:80]!r} is not a node name (a DNS-1123 subdomain)")
    return Plan(
        namespace=r.text("namespace", pattern=DNS_SUBDOMAIN), vm=r.text("vm", pattern=DNS_SUBDOMAIN),
        host_dir=r.text("hostDir", path_like=True),
        image_library=r.text("imageLibrary", optional=True, path_like=True),
        sidecar_image=r.text("sidecarImage"),
        disks=tuple(disks), persist_root=persist, passthrough=tuple(passthrough),
        detached=tuple(detached), node=node,
    )


def seen_check(seen: set[str], name: str, where: str) -> None:
    if name in seen:
        raise Malformed(where, f"volume name {name!r} appears twice in the plan")
    seen.add(name)
