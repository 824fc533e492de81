"""The platform policy: where disks live, limits, profiles, allowed images — parsed strictly.

Pure: :func:`load_policy` turns the YAML text of the policy file (the Helm chart's ConfigMap, or
``examples/policy.yaml``) into frozen dataclasses, or raises
:class:`~diskplan.errors.Refused` naming the key (``sizing.maxCPU``) and the reason. Unknown keys
are refused with their path, so a misspelt key is an error at load time instead of a silently
ignored setting. It reads no files and no environment: the transport (``webhook/reload.py``)
reads the file and keeps the last good policy when a new one is refused.

It also names the node agent's identity (``nodeAgent.serviceAccount``): the one user the webhook
lets set or change a VM's home-node annotation; KubeVirt's (``kubevirt.controllerServiceAccount``):
the one user whose launcher Pods get diskhooks' prepare step; and how much disk a node may promise
(``hostDisks.capacity``: :class:`~diskplan.capacitypolicy.CapacityPolicy`, docs/CAPACITY.md).

What the policy deliberately does not hold: the webhook's ``failurePolicy``, its timeout and the
namespaces that take part. Those belong to the MutatingWebhookConfiguration, which the Helm chart
renders (``values.yaml``); a key for them here is refused with a pointer to the chart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from diskplan.capacitypolicy import CapacityPolicy, parse_overcommit, parse_reserve
from diskplan.errors import Refused
from diskplan.migration import KEEP_SOURCE_CHOICES, KEEP_UNTIL_STARTED
from diskplan.plan import BUSES, CACHES, DISCARDS, DNS_LABEL, IOS, is_clean_abs_path
from diskplan.quantity import parse_bytes
from diskplan.yamlsafe import load_document

MAX_POLICY_BYTES = 1024 * 1024
MIB = 1024 * 1024
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# Cache modes that allow io=native (QEMU needs O_DIRECT for Linux native AIO).
NATIVE_IO_CACHES = ("none", "directsync")
# Node directories a typo must not hand to VMs: hostDisks.root/imageLibrary may not lie inside them.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys",
               "/usr", "/var/run", "/var/lib/kubelet")
# An OCI image reference (registry/path:tag or @digest), conservatively.
IMAGE_REF = re.compile(r"^[a-z0-9]([a-z0-9._:-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*"
                       r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?\Z")
__all__ = ["CapacityPolicy", "DriverDefaults", "HostDiskPolicy", "KubeVirtPolicy", "MigrationPolicy",
           "NodeAgentPolicy",
           "PassthroughPolicy", "Policy", "Profile", "SidecarPolicy", "SizingPolicy", "image_repository",
           "load_policy", "parse_overcommit", "parse_reserve", "service_account_username"]
_CHART_KEYS = {
    "failurePolicy": "the webhook's failurePolicy is set in the Helm chart (values.yaml), "
                     "not in the policy",
    "namespaceSelector": "the namespaces that take part are set in the Helm chart (values.yaml)",
    "timeoutSeconds": "the webhook timeout is set in the Helm chart (values.yaml)",
}


@dataclass(frozen=True)
class DriverDefaults:
    """Driver settings of disks that do not state their own (``hostDisks.defaults``).

    Defaults: ``bus: virtio``, ``cache: none``, ``io: native``, ``discard: unmap``. ``io: native``
    needs ``cache`` ``none`` or ``directsync`` (QEMU's rule), so other combinations are refused.
    """

    bus: str = "virtio"
    cache: str = "none"
    io: str = "native"
    discard: str = "unmap"


@dataclass(frozen=True)
class HostDiskPolicy:
    """``hostDisks``: where qcow2 disks live on the nodes and how big they may be.

    - ``root`` (default ``/var/lib/diskhooks/vms``): node directory of the disks; a disk's file is
      ``<root>/<namespace>/<vm>/<disk>.qcow2``. Clean and absolute.
    - ``image_library`` (``imageLibrary``, default none): node directory of the base images VM
      owners may name as ``backing``; without it ``backing`` is refused. Must not overlap ``root``.
    - ``max_disk_size`` (``maxDiskSize``, default ``2Ti``): largest disk, in bytes; a disk already
      planned larger keeps that size when the limit is lowered (``webhook/vm/updates.py``).
    - ``max_total_per_vm`` (``maxTotalPerVM``, default ``8Ti``): largest sum of one VM's
      disks, its detached ones included (their images stay on the node; ``webhook/vm/updates.py``).
    - ``defaults``: :class:`DriverDefaults`.
    - ``online_expand`` (``onlineExpand``, default true): the node agent grows a running VM's disks
      through the launcher's libvirt when an admitted update grows them; false: a grown disk takes
      effect at the next start only (prepare grows the image then).
    - ``capacity``: :class:`CapacityPolicy`.
    """

    root: str = "/var/lib/diskhooks/vms"
    image_library: str | None = None
    max_disk_size: int = 2 * 1024**4
    max_total_per_vm: int = 8 * 1024**4
    defaults: DriverDefaults = field(default_factory=DriverDefaults)
    online_expand: bool = True
    capacity: CapacityPolicy = field(default_factory=CapacityPolicy)

    def vm_dir(self, namespace: str, vm: str) -> str:
        """Node directory of one VM's disks (``namespace`` and ``vm`` are validated names)."""
        return f"{self.root}/{namespace}/{vm}"

    def disk_path(self, namespace: str, vm: str, disk: str) -> str:
        """Node path of one diskhooks disk; ``disk`` is a validated DNS label."""
        return f"{self.vm_dir(namespace, vm)}/{disk}.qcow2"

    def reserved_dirs(self) -> tuple[str, ...]:
        """Node directories only diskhooks may hand to a VM."""
        return (self.root,) if self.image_library is None else (self.root, self.image_library)


@dataclass(frozen=True)
class PassthroughPolicy:
    """``passthrough``: which PVCs may be handed to guests as whole devices.

    - ``storage_classes`` (``storageClasses``, default empty: passthrough is refused): the
      StorageClasses whose Block-mode claims may be passed through (e.g. local PVs of whole disks).
    - ``allow_lun`` (``allowLun``, default false): allow ``mode: lun`` (SCSI passthrough, which
      lets the guest send SCSI commands to the device).
    """

    storage_classes: tuple[str, ...] = ()
    allow_lun: bool = False


@dataclass(frozen=True)
class Profile:
    """A named sizing: ``cpu`` vCPUs (one socket) and ``memory`` bytes of guest memory."""

    cpu: int
    memory: int


@dataclass(frozen=True)
class SizingPolicy:
    """``sizing``: CPU/memory profiles, limits and overcommit.

    - ``profiles`` (default none): name (a DNS label) -> :class:`Profile`.
    - ``max_cpu`` (``maxCPU``, default 64): most vCPUs of one VM.
    - ``max_memory`` (``maxMemory``, default ``256Gi``): most guest memory of one VM, in bytes.
    - ``cpu_allocation_ratio`` (``cpuAllocationRatio``, default 1, at least 1): vCPUs per
      requested CPU; ``requests.cpu = ceil(vCPUs * 1000 / ratio)`` millicores.
    - ``memory_overcommit_percent`` (``memoryOvercommitPercent``, default 100, 100..1000): as
      KubeVirt's setting, ``requests.memory = guest * 100 / percent``.
    - ``max_sockets`` (``maxSockets``, default 2): most sockets in a requested CPU topology.
    """

    profiles: dict[str, Profile] = field(default_factory=dict)
    max_cpu: int = 64
    max_memory: int = 256 * 1024**3
    cpu_allocation_ratio: float = 1.0
    memory_overcommit_percent: int = 100
    max_sockets: int = 2

    @property
    def cpu_ratio(self) -> Fraction:
        """``cpu_allocation_ratio`` as an exact fraction (``1.5`` -> 3/2), for exact rounding."""
        return Fraction(repr(self.cpu_allocation_ratio))


@dataclass(frozen=True)
class SidecarPolicy:
    """``sidecar``: the diskhooks image and the other hook sidecars VM owners may request.

    - ``image`` (required; the chart fills it): the diskhooks hook-sidecar image, also used for
      the prepare init container.
    - ``image_pull_policy`` (``imagePullPolicy``, default ``IfNotPresent``).
    - ``allowed_images`` (``allowedImages``, default empty): the other images allowed in
      ``hooks.kubevirt.io/hookSidecars``: an exact reference, or a prefix ending in ``*``
      (``registry.example.com/hooks/*``). A lone ``*`` is refused. The allowlist applies to every
      VM and VMI in an opted-in namespace, whether or not it uses diskhooks (KubeVirt's Sidecar
      gate lets any VM owner run code in virt-launcher); an entry with diskhooks' own image is
      accepted only as exactly the entry the webhook writes.
    """

    image: str
    image_pull_policy: str = "IfNotPresent"
    allowed_images: tuple[str, ...] = ()

    @property
    def repository(self) -> str:
        """``image`` without its tag or digest: entries of this repository are ours."""
        return image_repository(self.image)

    def allows(self, image: str) -> bool:
        """Whether ``image`` may be requested as another hook sidecar."""
        for pattern in self.allowed_images:
            if pattern.endswith("*"):
                if image.startswith(pattern[:-1]):
                    return True
            elif image == pattern:
                return True
        return False


def service_account_username(service_account: str | None) -> str | None:
    """The user name the API server gives a ServiceAccount's requests (the AdmissionReview's
    ``userInfo.username``): ``<namespace>/<name>`` -> ``system:serviceaccount:<namespace>:<name>``;
    None for None. ``service_account`` is one the loader accepted."""
    if service_account is None:
        return None
    namespace, name = service_account.split("/")
    return f"system:serviceaccount:{namespace}:{name}"


@dataclass(frozen=True)
class MigrationPolicy:
    """``nodeAgent.migration``: what the agents do around a cold migration (docs/MIGRATION.md).

    - ``keep_source`` (``keepSource``, default ``untilStarted``): the source node's copy of a moved
      VM, renamed aside after the handover (unless the request said ``--delete-source``), is deleted
      by the source's agent once the VM has run on its new node (``untilStarted``: the target's
      agent saw it running there and wrote ``targetStarted`` in the migration status), or kept until
      an operator deletes it (``forever``). Read when the source's housekeeping looks (every few
      minutes), so a change applies to copies already kept.
    """

    keep_source: str = KEEP_UNTIL_STARTED


@dataclass(frozen=True)
class NodeAgentPolicy:
    """``nodeAgent``: who the node agent (``diskhooks-node``) is, and what it does after migrations.

    - ``service_account`` (``serviceAccount``, ``<namespace>/<name>``, both DNS labels; default
      none): the agent's ServiceAccount, the only user allowed to set or change a VM's
      ``diskhooks.io/node`` annotation. The Helm chart writes it when it installs the agent. Without
      it nobody may (no VM gets a home node).
    - ``migration``: :class:`MigrationPolicy`.
    """

    service_account: str | None = None
    migration: MigrationPolicy = field(default_factory=MigrationPolicy)

    @property
    def username(self) -> str | None:
        """The agent's user name (:func:`service_account_username`); None without one."""
        return service_account_username(self.service_account)


@dataclass(frozen=True)
class KubeVirtPolicy:
    """``kubevirt``: who KubeVirt is.

    - ``controller_service_account`` (``controllerServiceAccount``, ``<namespace>/<name>``, both DNS
      labels; default none): virt-controller's ServiceAccount, the only user whose virt-launcher
      Pods (label ``diskhooks.io/managed``) the Pod webhook prepares; a managed Pod anyone else
      creates is refused. The Helm chart writes ``kubevirt/kubevirt-controller`` by default. Without
      it the creator is not checked (docs/SECURITY.md).
    """

    controller_service_account: str | None = None

    @property
    def username(self) -> str | None:
        """virt-controller's user name (:func:`service_account_username`); None without one."""
        return service_account_username(self.controller_service_account)


@dataclass(frozen=True)
class Policy:
    """The whole policy. ``default_profile`` (``defaultProfile``, default none) names a profile
    applied to VMs that have no sizing annotation and set no CPU/memory of their own (nor use an
    instancetype or preference), and likewise to bare VMIs (not made from a VM). ``node_agent``:
    :class:`NodeAgentPolicy`; ``kubevirt``: :class:`KubeVirtPolicy`."""

    host_disks: HostDiskPolicy
    passthrough: PassthroughPolicy
    sizing: SizingPolicy
    sidecar: SidecarPolicy
    default_profile: str | None = None
    node_agent: NodeAgentPolicy = field(default_factory=NodeAgentPolicy)
    kubevirt: KubeVirtPolicy = field(default_factory=KubeVirtPolicy)


def image_repository(image: str) -> str:
    """``registry:5000/a/b:tag@sha256:...`` -> ``registry:5000/a/b``."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def load_policy(text: str) -> Policy:
    """Parse the policy YAML. Raises :class:`Refused` naming the first bad key and why."""
    doc = load_document(text, field="policy", max_bytes=MAX_POLICY_BYTES, max_nodes=20000,
                        key_paths=True)
    if doc is None:
        doc = {}
    top = _Section(doc, "", {"hostDisks", "passthrough", "sizing", "sidecar", "defaultProfile",
                             "nodeAgent", "kubevirt"})
    host_disks = _host_disks(top.section("hostDisks", {"root", "imageLibrary", "maxDiskSize",
                                                       "maxTotalPerVM", "defaults", "onlineExpand",
                                                       "capacity"}))
    passthrough = _passthrough(top.section("passthrough", {"storageClasses", "allowLun"}))
    sizing = _sizing(top.section("sizing", {"profiles", "maxCPU", "maxMemory", "cpuAllocationRatio",
                                            "memoryOvercommitPercent", "maxSockets"}))
    sidecar = _sidecar(top.section("sidecar", {"image", "imagePullPolicy", "allowedImages"},
                                   required=True))
    agent_section = top.section("nodeAgent", {"serviceAccount", "migration"})
    migration = agent_section.section("migration", {"keepSource"})
    node_agent = NodeAgentPolicy(
        service_account=_service_account(agent_section, "serviceAccount"),
        migration=MigrationPolicy(keep_source=migration.string("keepSource", KEEP_UNTIL_STARTED,
                                                               choices=KEEP_SOURCE_CHOICES)))
    kubevirt = KubeVirtPolicy(controller_service_account=_service_account(
        top.section("kubevirt", {"controllerServiceAccount"}), "controllerServiceAccount"))
    default_profile = top.optional_str("defaultProfile")
    if default_profile == "":
        default_profile = None  # the chart renders "" for "none"
    if default_profile is not None and default_profile not in sizing.profiles:
        known = ", ".join(sorted(sizing.profiles)) or "none are defined"
        raise Refused("defaultProfile", f"{default_profile!r} is not a profile in sizing.profiles "
                      f"({known})")
    return Policy(host_disks=host_disks, passthrough=passthrough, sizing=sizing, sidecar=sidecar,
                  default_profile=default_profile, node_agent=node_agent, kubevirt=kubevirt)


class _Section:
    """One mapping of the policy, with its path, refusing unknown keys up front."""

    def __init__(self, doc: Any, path: str, allowed: set[str]) -> None:
        if not isinstance(doc, Mapping):
            raise Refused(path or "policy", f"must be a mapping, not {_type(doc)}")
        for key in doc:
            if key not in allowed:
                where = self._join(path, str(key))
                hint = _CHART_KEYS.get(str(key))
                raise Refused(where, hint or f"unknown key (allowed here: {', '.join(sorted(allowed))})")
        self.doc = doc
        self.path = path

    @staticmethod
    def _join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def where(self, key: str) -> str:
        return self._join(self.path, key)

    def has(self, key: str) -> bool:
        return self.doc.get(key) is not None

    def section(self, key: str, allowed: set[str], *, required: bool = False) -> _Section:
        value = self.doc.get(key)
        if value is None:
            if required:
                raise Refused(self.where(key), "is required")
            value = {}
        return _Section(value, self.where(key), allowed)

    def optional_str(self, key: str) -> str | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise Refused(self.where(key), f"must be a string, not {_type(value)}")
        return value

    def string(self, key: str, default: str | None = None, *,
               choices: tuple[str, ...] | None = None) -> str:
        value = self.optional_str(key)
        if value is None:
            if default is None:
                raise Refused(self.where(key), "is required")
            return default
        if not value:
            raise Refused(self.where(key), "must not be empty")
        if choices is not None and value not in choices:
            raise Refused(self.where(key), f"must be one of {', '.join(choices)}, not {value[:40]!r}")
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.doc.get(key)
        if value is None:
            return default
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
                or (maximum is not None and value > maximum):
            raise Refused(self.where(key), f"must be an integer {bounds}")
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.doc.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not minimum <= value <= maximum:
            raise Refused(self.where(key), f"must be a number between {minimum:g} and {maximum:g}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.doc.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise Refused(self.where(key), "must be true or false")
        return value

    def quantity(self, key: str, default: int) -> int:
        value = self.doc.get(key)
        if value is None:
            return default
        try:
            return parse_bytes(value)
        except ValueError as exc:
            raise Refused(self.where(key), str(exc)) from None

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.doc.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise Refused(self.where(key), f"must be a list of strings, not {_type(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise Refused(f"{self.where(key)}[{i}]", "must be a non-empty string")
        if len(set(value)) != len(value):
            raise Refused(self.where(key), "lists an entry twice")
        return tuple(value)


def _host_disks(s: _Section) -> HostDiskPolicy:
    root = _node_dir(s, "root", HostDiskPolicy.root)
    library = _node_dir(s, "imageLibrary", None) if s.has("imageLibrary") else None
    if library is not None and _overlaps(root, library):
        raise Refused(s.where("imageLibrary"), f"{library} overlaps hostDisks.root {root}: VMs "
                      "could write into the image library, or see other VMs' disks")
    max_disk = s.quantity("maxDiskSize", HostDiskPolicy.max_disk_size)
    max_total = s.quantity("maxTotalPerVM", HostDiskPolicy.max_total_per_vm)
    if max_total < max_disk:
        raise Refused(s.where("maxTotalPerVM"), "must be at least hostDisks.maxDiskSize")
    d = s.section("defaults", {"bus", "cache", "io", "discard"})
    defaults = DriverDefaults(bus=d.string("bus", "virtio", choices=BUSES),
                              cache=d.string("cache", "none", choices=CACHES),
                              io=d.string("io", "native", choices=IOS),
                              discard=d.string("discard", "unmap", choices=DISCARDS))
    if defaults.io == "native" and defaults.cache not in NATIVE_IO_CACHES:
        raise Refused(d.where("io"), f"native needs cache {' or '.join(NATIVE_IO_CACHES)} "
                      f"(cache is {defaults.cache}); use io: threads")
    return HostDiskPolicy(root=root, image_library=library, max_disk_size=max_disk,
                          max_total_per_vm=max_total, defaults=defaults,
                          online_expand=s.boolean("onlineExpand", True),
                          capacity=_capacity(s.section("capacity", {"overcommit", "reserve"})))


def _capacity(s: _Section) -> CapacityPolicy:
    defaults = CapacityPolicy()
    overcommit = defaults.overcommit
    if s.has("overcommit"):
        overcommit = parse_overcommit(s.doc["overcommit"], s.where("overcommit"))
    percent, reserve_bytes = defaults.reserve_percent, defaults.reserve_bytes
    if s.has("reserve"):
        percent, reserve_bytes = parse_reserve(s.doc["reserve"], s.where("reserve"))
    return CapacityPolicy(overcommit=overcommit, reserve_percent=percent, reserve_bytes=reserve_bytes)


def _node_dir(s: _Section, key: str, default: str | None) -> str:
    value = s.string(key, default)
    if not is_clean_abs_path(value):
        raise Refused(s.where(key), f"{value[:80]!r} is not a clean absolute path (no '..', '.', "
                      "'//' or trailing '/'; letters, digits, '._+-')")
    for system in SYSTEM_DIRS:
        if value == system or value.startswith(system + "/"):
            raise Refused(s.where(key), f"{value} lies in the system directory {system}")
    return value


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _passthrough(s: _Section) -> PassthroughPolicy:
    classes = s.strings("storageClasses")
    for i, name in enumerate(classes):
        if not _DNS_SUBDOMAIN.match(name):
            raise Refused(f"{s.where('storageClasses')}[{i}]", f"{name[:80]!r} is not a "
                          "StorageClass name")
    return PassthroughPolicy(storage_classes=classes, allow_lun=s.boolean("allowLun", False))


_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


def _sizing(s: _Section) -> SizingPolicy:
    defaults = SizingPolicy()
    max_cpu = s.integer("maxCPU", defaults.max_cpu, minimum=1, maximum=1024)
    max_memory = s.quantity("maxMemory", defaults.max_memory)
    if max_memory < MIB:
        raise Refused(s.where("maxMemory"), "must be at least 1Mi")
    ratio = s.number("cpuAllocationRatio", defaults.cpu_allocation_ratio, minimum=1, maximum=100)
    percent = s.integer("memoryOvercommitPercent", defaults.memory_overcommit_percent,
                        minimum=100, maximum=1000)
    max_sockets = s.integer("maxSockets", defaults.max_sockets, minimum=1, maximum=max_cpu)
    raw = s.doc.get("profiles")
    profiles: dict[str, Profile] = {}
    if raw is not None:
        if not isinstance(raw, Mapping):
            raise Refused(s.where("profiles"), f"must be a mapping of name to {{cpu, memory}}, "
                          f"not {_type(raw)}")
        for name, body in raw.items():
            where = f"{s.where('profiles')}.{name}"
            if not isinstance(name, str) or not DNS_LABEL.match(name):
                raise Refused(where, "a profile name must be a DNS label (lowercase letters, digits, '-')")
            p = _Section(body, where, {"cpu", "memory"})
            if not p.has("cpu") or not p.has("memory"):
                raise Refused(where, "needs both cpu and memory")
            cpu = p.integer("cpu", 0, minimum=1)
            if cpu > max_cpu:
                raise Refused(p.where("cpu"), f"{cpu} exceeds sizing.maxCPU {max_cpu}")
            memory = p.quantity("memory", 0)
            if memory % MIB:
                raise Refused(p.where("memory"), "must be a whole number of Mi (e.g. 4Gi or 4096Mi)")
            if memory > max_memory:
                raise Refused(p.where("memory"), "exceeds sizing.maxMemory")
            profiles[name] = Profile(cpu=cpu, memory=memory)
    return SizingPolicy(profiles=profiles, max_cpu=max_cpu, max_memory=max_memory,
                        cpu_allocation_ratio=ratio, memory_overcommit_percent=percent,
                        max_sockets=max_sockets)


def _sidecar(s: _Section) -> SidecarPolicy:
    image = s.string("image")
    if not IMAGE_REF.match(image):
        raise Refused(s.where("image"), f"{image[:120]!r} is not an image reference "
                      "(registry/repository:tag or @sha256:digest)")
    allowed = s.strings("allowedImages")
    for i, pattern in enumerate(allowed):
        where = f"{s.where('allowedImages')}[{i}]"
        if pattern == "*":
            raise Refused(where, "a lone '*' would allow any image; list images or registry "
                          "prefixes such as registry.example.com/hooks/*")
        if "*" in pattern[:-1]:
            raise Refused(where, "'*' is only allowed at the end (a prefix)")
        if not IMAGE_REF.match(pattern.rstrip("*").rstrip("/:") or "x"):
            raise Refused(where, f"{pattern[:120]!r} is not an image reference or prefix")
    return SidecarPolicy(image=image,
                         image_pull_policy=s.string("imagePullPolicy", "IfNotPresent",
                                                    choices=PULL_POLICIES),
                         allowed_images=allowed)


def _service_account(s: _Section, key: str) -> str | None:
    """An optional ``<namespace>/<name>`` of a ServiceAccount at ``key``."""
    value = s.optional_str(key)
    if value is None:
        return None
    namespace, slash, name = value.partition("/")
    if not slash or not DNS_LABEL.fullmatch(namespace) or not DNS_LABEL.fullmatch(name):
        raise Refused(s.where(key), f"{value[:120]!r} is not <namespace>/<name> of a ServiceAccount "
                      "(both DNS labels: lowercase letters, digits, '-', at most 63)")
    return value


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


