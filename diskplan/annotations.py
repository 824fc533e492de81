"""User annotations -> typed requests, checked against the platform policy, with precise errors.

Pure: :func:`parse_requests` reads the ``diskhooks.io/*`` annotations of a VirtualMachine (or of a
bare VirtualMachineInstance) and returns :class:`Requests`, or raises
:class:`~diskplan.errors.Refused` whose field names the annotation, the item and the key, e.g.
``diskhooks.io/disks[1].size: 9Ti exceeds the platform limit 2Ti``. It knows nothing about the
rest of the object: name clashes with the VM's own volumes, claims in the cluster, instancetypes,
and the per-VM total ``maxTotalPerVM`` (which counts the VM's detached disks and lets a VM already
above it keep what it holds) are checked by the mutation (``webhook/vm/``). Nor does it
know the VM's past: a disk above ``maxDiskSize`` is refused unless the caller passes, in
``kept_sizes``, a size that disk already holds (the mutation passes those of the old object's
verified plan, so a disk keeps its size when the platform lowers the limit, and warns about it).

Values are YAML or JSON, loaded by :mod:`diskplan.yamlsafe` (size-bounded, no anchors/aliases, no
tags). No value ever becomes a path: disk names are DNS labels and base-image names are checked
names that the webhook turns into file names itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.plan import BUSES, CACHES, DISCARDS, DNS_LABEL, DNS_SUBDOMAIN, IOS, PASSTHROUGH_MODES
from diskplan.policy import MIB, NATIVE_IO_CACHES, Policy
from diskplan.quantity import format_bytes, parse_bytes
from diskplan.yamlsafe import load_document

MAX_DISKS = 32
MAX_PASSTHROUGH = 16
SECTOR = 512
SERIAL = re.compile(r"^[A-Za-z0-9_.+-]{1,36}\Z")  # KubeVirt's alphabet; 36: the longest SCSI serial
BACKING = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,126}[a-z0-9])?\Z")
MAX_BOOT_ORDER = 10_000

DISK_KEYS = ("name", "size", "bus", "cache", "io", "discard", "serial", "bootOrder", "backing")
PASSTHROUGH_KEYS = ("name", "claim", "mode")
CPU_KEYS = ("sockets", "cores", "threads")


@dataclass(frozen=True)
class DiskRequest:
    """One entry of ``diskhooks.io/disks``, with policy defaults filled in."""

    index: int  # position in the annotation, for messages
    name: str
    size_bytes: int
    size_text: str  # as the user wrote it, for messages
    bus: str
    cache: str
    io: str
    discard: str
    serial: str | None = None
    boot_order: int | None = None
    backing: str | None = None  # a library image name, e.g. "almalinux-9"

    @property
    def field(self) -> str:
        return f"{K.ANN_DISKS}[{self.index}]"


@dataclass(frozen=True)
class PassthroughRequest:
    """One entry of ``diskhooks.io/passthrough``."""

    index: int
    name: str
    claim: str
    mode: str  # "disk" | "lun"

    @property
    def field(self) -> str:
        return f"{K.ANN_PASSTHROUGH}[{self.index}]"


@dataclass(frozen=True)
class CpuTopology:
    sockets: int
    cores: int
    threads: int

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads


@dataclass(frozen=True)
class Sizing:
    """Static sizing: a CPU topology and/or guest memory (bytes). ``source`` says where it came
    from, for warnings and errors (``diskhooks.io/profile=medium``, ``defaultProfile=small``)."""

    cpu: CpuTopology | None
    memory: int | None
    source: str
    from_annotations: bool = True


@dataclass(frozen=True)
class Requests:
    disks: tuple[DiskRequest, ...] = ()
    persist_root: bool = False
    passthrough: tuple[PassthroughRequest, ...] = ()
    sizing: Sizing | None = None

    @property
    def wants_plan(self) -> bool:
        """Disks, a persistent root or passthrough need a plan (and the sidecar); sizing does not."""
        return bool(self.disks or self.persist_root or self.passthrough)

    @property
    def names(self) -> tuple[str, ...]:
        """Volume names these requests add to the VM."""
        return tuple(d.name for d in self.disks) + tuple(p.name for p in self.passthrough)


def user_annotation_keys(annotations: Mapping[str, Any] | None) -> list[str]:
    """The ``diskhooks.io/`` annotations a user wrote (the webhook's own plan, the node agent's
    home node and the migration annotations excluded: none is a disk request)."""
    if not annotations:
        return []
    return [k for k in annotations if isinstance(k, str) and k.startswith(K.PREFIX)
            and k not in (K.ANN_PLAN, K.ANN_NODE, *K.MIGRATION_ANNOTATIONS)]


def parse_requests(annotations: Mapping[str, Any], policy: Policy, *,
                   kept_sizes: Mapping[str, int] | None = None) -> Requests:
    """Read every ``diskhooks.io/`` annotation. Raises :class:`Refused` for the first problem.

    ``kept_sizes``: per disk name, the size the VM already holds for it (bytes); a disk of that
    name up to that size is admitted even above ``maxDiskSize`` (grandfathered: the platform
    lowered the limit since). Only ever sizes from a plan that verifies, never from the user's
    annotations or template; none (the default) for a new object."""
    for key in user_annotation_keys(annotations):
        if key not in K.USER_ANNOTATIONS:
            raise Refused(key, "unknown diskhooks annotation (known: "
                          f"{', '.join(K.USER_ANNOTATIONS)})")
    disks = _disks(annotations[K.ANN_DISKS], policy, kept_sizes or {}) \
        if K.ANN_DISKS in annotations else ()
    passthrough = (_passthrough(annotations[K.ANN_PASSTHROUGH], policy)
                   if K.ANN_PASSTHROUGH in annotations else ())
    seen = {d.name: d.field for d in disks}
    for p in passthrough:
        if p.name in seen:
            raise Refused(f"{p.field}.name", f"{p.name!r} is already the name of {seen[p.name]}")
    persist = _persist_root(annotations[K.ANN_PERSIST_ROOT]) if K.ANN_PERSIST_ROOT in annotations else False
    sizing = _sizing(annotations, policy)
    return Requests(disks=disks, persist_root=persist, passthrough=passthrough, sizing=sizing)


def default_sizing(policy: Policy) -> Sizing | None:
    """The sizing of ``policy.default_profile`` (for VMs without sizing annotations), if any."""
    if policy.default_profile is None:
        return None
    profile = policy.sizing.profiles[policy.default_profile]
    return Sizing(cpu=CpuTopology(1, profile.cpu, 1), memory=profile.memory,
                  source=f"defaultProfile={policy.default_profile}", from_annotations=False)


def quantity_text(n: int) -> str:
    """The canonical quantity for ``n`` bytes (:func:`diskplan.quantity.format_bytes`, the shortest
    exact form: 214748364800 -> '200Gi', 10**10 -> '10G'); what the webhook writes into KubeVirt
    spec and messages, never the user's own text."""
    return format_bytes(n)


# ------------------------------------------------------------------------------------------------
# the annotations
# ------------------------------------------------------------------------------------------------
def _load_list(value: Any, key: str, example: str, limit: int) -> list[Any]:
    doc = load_document(value, field=key)
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise Refused(key, f"must be a list such as {example}, not {_type(doc)}")
    if len(doc) > limit:
        raise Refused(key, f"lists {len(doc)} items; at most {limit} are allowed")
    return doc


def _item(raw: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise Refused(where, f"must be a mapping with keys {', '.join(allowed)}, not {_type(raw)}")
    for key in raw:
        if key not in allowed:
            raise Refused(f"{where}.{_key_text(key)}", f"unknown key (allowed: {', '.join(allowed)})")
    return raw


def _name(raw: Mapping[str, Any], where: str) -> str:
    name = raw.get("name")
    if name is None:
        raise Refused(f"{where}.name", "is required")
    if not isinstance(name, str):
        raise Refused(f"{where}.name", f"must be a string, not {_type(name)}")
    if not DNS_LABEL.match(name):
        raise Refused(f"{where}.name", f"{_short(name)} is not a DNS label (lowercase letters, digits "
                      "and '-', starting and ending with a letter or digit, at most 63 characters)")
    return name


def _choice(raw: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...],
            default: str) -> str:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise Refused(f"{where}.{key}", f"must be one of {', '.join(choices)}, not {_short(value)}")
    return value


def _disks(value: Any, policy: Policy, kept: Mapping[str, int]) -> tuple[DiskRequest, ...]:
    hd = policy.host_disks
    items = _load_list(value, K.ANN_DISKS, "[{name: data, size: 20Gi}]", MAX_DISKS)
    disks: list[DiskRequest] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(items):
        where = f"{K.ANN_DISKS}[{i}]"
        item = _item(raw, where, DISK_KEYS)
        name = _name(item, where)
        if name in seen:
            raise Refused(f"{where}.name", f"{name!r} is already the name of {K.ANN_DISKS}[{seen[name]}]")
        seen[name] = i
        size, size_text = _size(item, where, hd.max_disk_size, kept.get(name, 0))
        cache = _choice(item, "cache", where, CACHES, hd.defaults.cache)
        io = _choice(item, "io", where, IOS, "")
        if io == "":
            # the policy's default, unless it cannot work with the cache mode the user chose
            io = hd.defaults.io if hd.defaults.io != "native" or cache in NATIVE_IO_CACHES else "threads"
        elif io == "native" and cache not in NATIVE_IO_CACHES:
            raise Refused(f"{where}.io", f"native needs cache {' or '.join(NATIVE_IO_CACHES)} "
                          f"(cache is {cache}); use io: threads")
        backing = _backing(item, where, policy)
        disks.append(DiskRequest(
            index=i, name=name, size_bytes=size, size_text=size_text,
            bus=_choice(item, "bus", where, BUSES, hd.defaults.bus), cache=cache, io=io,
            discard=_choice(item, "discard", where, DISCARDS, hd.defaults.discard),
            serial=_serial(item, where), boot_order=_boot_order(item, where), backing=backing,
        ))
    return tuple(disks)


def _size(item: Mapping[str, Any], where: str, limit: int, kept: int = 0) -> tuple[int, str]:
    """The size in bytes and as written; above ``limit`` only up to ``kept`` (what the disk
    already holds, see :func:`parse_requests`)."""
    value = item.get("size")
    if value is None:
        raise Refused(f"{where}.size", "is required (a quantity such as 20Gi)")
    try:
        size = parse_bytes(value)
    except ValueError as exc:
        raise Refused(f"{where}.size", str(exc)) from None
    text = str(value).strip()
    if size < MIB:
        raise Refused(f"{where}.size", f"{text} is {size} bytes; a disk needs at least 1Mi "
                      "(did you mean Gi?)")
    if size % SECTOR:
        raise Refused(f"{where}.size", f"{text} is not a whole number of 512-byte sectors; "
                      "use a binary suffix such as Mi or Gi")
    if size > limit and size > kept:
        held = (f"; the disk may keep its current {quantity_text(kept)}, but not grow until the limit "
                "is raised") if kept > limit else ""
        raise Refused(f"{where}.size", f"{text} exceeds the platform limit {quantity_text(limit)}{held}")
    return size, text


def _serial(item: Mapping[str, Any], where: str) -> str | None:
    value = item.get("serial")
    if value is None:
        return None
    if not isinstance(value, str):
        raise Refused(f"{where}.serial", f"must be a string (quote it in YAML), not {_type(value)}")
    if not SERIAL.match(value):
        raise Refused(f"{where}.serial", "must be 1 to 36 characters of A-Z, a-z, 0-9 and '_.+-'")
    return value


def _boot_order(item: Mapping[str, Any], where: str) -> int | None:
    value = item.get("bootOrder")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BOOT_ORDER:
        raise Refused(f"{where}.bootOrder", f"must be an integer between 1 and {MAX_BOOT_ORDER}")
    return value


def _backing(item: Mapping[str, Any], where: str, policy: Policy) -> str | None:
    value = item.get("backing")
    if value is None:
        return None
    if not isinstance(value, str):
        raise Refused(f"{where}.backing", f"must be the name of a base image, not {_type(value)}")
    if "/" in value or ".." in value or not BACKING.match(value):
        raise Refused(f"{where}.backing", f"{_short(value)} is not a base image name (lowercase "
                      "letters, digits, '-' and '.', no '/' or '..', at most 128 characters)")
    if policy.host_disks.image_library is None:
        raise Refused(f"{where}.backing", "this platform has no image library "
                      "(hostDisks.imageLibrary), so disks cannot have a backing image")
    return value


def _persist_root(value: Any) -> bool:
    if value == "true":
        return True
    if value == "false":
        return False
    raise Refused(K.ANN_PERSIST_ROOT, f'must be "true" or "false", not {_short(value)}')


def _passthrough(value: Any, policy: Policy) -> tuple[PassthroughRequest, ...]:
    items = _load_list(value, K.ANN_PASSTHROUGH, "[{name: fast0, claim: my-nvme, mode: disk}]",
                       MAX_PASSTHROUGH)
    if items and not policy.passthrough.storage_classes:
        raise Refused(K.ANN_PASSTHROUGH, "passthrough is not enabled on this platform "
                      "(the policy allows no StorageClass)")
    out: list[PassthroughRequest] = []
    names: dict[str, int] = {}
    claims: dict[str, int] = {}
    for i, raw in enumerate(items):
        where = f"{K.ANN_PASSTHROUGH}[{i}]"
        item = _item(raw, where, PASSTHROUGH_KEYS)
        name = _name(item, where)
        if name in names:
            raise Refused(f"{where}.name", f"{name!r} is already the name of "
                          f"{K.ANN_PASSTHROUGH}[{names[name]}]")
        names[name] = i
        claim = item.get("claim")
        if claim is None:
            raise Refused(f"{where}.claim", "is required (the name of a PersistentVolumeClaim)")
        if not isinstance(claim, str) or len(claim) > 253 or not DNS_SUBDOMAIN.match(claim):
            raise Refused(f"{where}.claim", f"{_short(claim)} is not a PersistentVolumeClaim name")
        if claim in claims:
            raise Refused(f"{where}.claim", f"claim {claim!r} is already used by "
                          f"{K.ANN_PASSTHROUGH}[{claims[claim]}]")
        claims[claim] = i
        mode = _choice(item, "mode", where, PASSTHROUGH_MODES, "disk")
        if mode == "lun" and not policy.passthrough.allow_lun:
            raise Refused(f"{where}.mode", "lun (SCSI passthrough) is not allowed by the platform "
                          "policy; use mode: disk")
        out.append(PassthroughRequest(index=i, name=name, claim=claim, mode=mode))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# sizing
# ------------------------------------------------------------------------------------------------
def _sizing(annotations: Mapping[str, Any], policy: Policy) -> Sizing | None:
    sp = policy.sizing
    cpu: CpuTopology | None = None
    memory: int | None = None
    sources: list[str] = []
    if K.ANN_PROFILE in annotations:
        name = load_document(annotations[K.ANN_PROFILE], field=K.ANN_PROFILE)
        if not isinstance(name, str) or name not in sp.profiles:
            known = ", ".join(sorted(sp.profiles)) or "none are defined"
            raise Refused(K.ANN_PROFILE, f"{_short(name)} is not a profile of this platform ({known})")
        profile = sp.profiles[name]
        cpu, memory = CpuTopology(1, profile.cpu, 1), profile.memory
        sources.append(f"{K.ANN_PROFILE}={name}")
    if K.ANN_CPU in annotations:
        cpu = _cpu(annotations[K.ANN_CPU], policy)
        sources.append(K.ANN_CPU)
    if K.ANN_MEMORY in annotations:
        memory = _memory(annotations[K.ANN_MEMORY], policy)
        sources.append(K.ANN_MEMORY)
    if not sources:
        return None
    return Sizing(cpu=cpu, memory=memory, source=", ".join(sources))


def _cpu(value: Any, policy: Policy) -> CpuTopology:
    sp = policy.sizing
    doc = load_document(value, field=K.ANN_CPU)
    if isinstance(doc, int) and not isinstance(doc, bool):
        if not 1 <= doc <= sp.max_cpu:
            raise Refused(K.ANN_CPU, f"{doc} vCPUs: must be between 1 and the platform limit {sp.max_cpu}")
        return CpuTopology(1, doc, 1)
    if not isinstance(doc, Mapping):
        raise Refused(K.ANN_CPU, f"must be a number of vCPUs or {{sockets, cores, threads}}, "
                      f"not {_type(doc)}")
    item = _item(doc, K.ANN_CPU, CPU_KEYS)
    parts = {}
    for key in CPU_KEYS:
        v = item.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= sp.max_cpu:
            raise Refused(f"{K.ANN_CPU}.{key}", f"must be an integer between 1 and {sp.max_cpu}")
        parts[key] = v
    topology = CpuTopology(**parts)
    if topology.sockets > sp.max_sockets:
        raise Refused(f"{K.ANN_CPU}.sockets", f"{topology.sockets} exceeds the platform limit "
                      f"{sp.max_sockets}")
    if topology.vcpus > sp.max_cpu:
        raise Refused(K.ANN_CPU, f"{topology.sockets}x{topology.cores}x{topology.threads} = "
                      f"{topology.vcpus} vCPUs exceeds the platform limit {sp.max_cpu}")
    return topology


def _memory(value: Any, policy: Policy) -> int:
    doc = load_document(value, field=K.ANN_MEMORY)
    try:
        memory = parse_bytes(doc)
    except ValueError as exc:
        raise Refused(K.ANN_MEMORY, str(exc)) from None
    text = str(doc).strip()
    if memory < MIB:
        raise Refused(K.ANN_MEMORY, f"{text} is {memory} bytes; did you mean {memory}Gi?")
    if memory % MIB:
        raise Refused(K.ANN_MEMORY, f"{text} is not a whole number of Mi (write e.g. 4Gi or 4096Mi)")
    if memory > policy.sizing.max_memory:
        raise Refused(K.ANN_MEMORY, f"{text} exceeds the platform limit "
                      f"{quantity_text(policy.sizing.max_memory)}")
    return memory


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _key_text(key: object) -> str:
    """A key as part of a field path: itself when it is a plain word, else quoted and cut short."""
    if isinstance(key, str) and re.match(r"^[A-Za-z0-9_.-]{1,40}$", key):
        return key
    return _short(key)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
