"""Static sizing: a CPU topology and guest memory written into a VMI spec, with requests and limits
derived from the platform's overcommit settings.

Pure, and part of the VM/VMI mutation core: :func:`apply_sizing` edits the *copy* of a VMI spec
(``spec.template.spec`` of a VM, or ``spec`` of a bare VMI) that :mod:`webhook.vm.mutate` made,
and returns warnings for values the user had set differently. :func:`choose_sizing` says which sizing
applies: the sizing annotations (refused beside a KubeVirt instancetype or preference, which size the
VM themselves), else the policy's defaultProfile unless the VM already sizes itself. The rules:

- topology ``sockets/cores/threads`` as requested (an integer N means 1 socket x N cores x 1 thread);
- ``domain.memory.guest`` = the guest memory;
- ``resources.limits.cpu`` = vCPUs, ``resources.requests.cpu`` = ceil(vCPUs x 1000 /
  cpuAllocationRatio) millicores (vCPUs when ``dedicatedCpuPlacement``: KubeVirt requires
  requests = limits there);
- ``resources.limits.memory`` = guest, ``resources.requests.memory`` = guest x 100 /
  memoryOvercommitPercent, rounded up to whole Mi, never above the limit (the guest itself with
  hugepages or dedicated CPUs, which cannot be overcommitted).

Quantities are written in the canonical form (:func:`diskplan.quantity.format_bytes`,
:func:`~diskplan.quantity.format_millicpu`), never in the annotation's own text. A value the user
already wrote in the VM and that equals ours is left as written when KubeVirt's schema takes it (an
integer, or quantity text without surrounding spaces), so no patch rewrites the user's notation;
anything else (a float, text with spaces, an unreadable or hostile quantity) is replaced with a
warning. The user's values are read with :mod:`diskplan.quantity`, bounded like the annotations.

Everything emitted passes KubeVirt's own checks (request <= limit, guest <= limit, sockets <=
maxSockets, guest <= maxGuest, hugepage multiples); a combination that cannot is refused naming
the sizing annotation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from diskplan.annotations import Sizing, default_sizing, quantity_text
from diskplan.errors import Refused
from diskplan.policy import MIB, Policy
from diskplan.quantity import format_millicpu, parse_bytes, parse_millicpu

TOPOLOGY_KEYS = ("sockets", "cores", "threads")


def choose_sizing(requested: Sizing | None, *, vm_spec: Mapping[str, Any], spec: Any,
                  policy: Policy) -> Sizing | None:
    """The sizing to apply to ``spec`` (a VMI spec; ``vm_spec``: its VM's spec, empty for a bare VMI):
    ``requested`` by the sizing annotations, else the policy's default profile; None for none."""
    if requested is not None:
        for key in ("instancetype", "preference"):
            if vm_spec.get(key):
                raise Refused(f"spec.{key}", f"the VM uses a KubeVirt {key}, which sets its CPU and "
                              f"memory; remove it or the sizing annotations ({requested.source})")
        return requested
    if vm_spec.get("instancetype") or vm_spec.get("preference") or sets_own_sizing(spec):
        return None
    return default_sizing(policy)


def wants_default_profile(vm_spec: Mapping[str, Any], spec: Any, policy: Policy) -> bool:
    """Whether the policy's default profile would size ``spec`` (no instancetype, no preference,
    no CPU or memory of its own)."""
    return policy.default_profile is not None and not vm_spec.get("instancetype") \
        and not vm_spec.get("preference") and not sets_own_sizing(spec)


def sets_own_sizing(spec: Any) -> bool:
    """Whether a VMI spec already chooses CPU or memory itself (then a default profile is skipped)."""
    domain = spec.get("domain") if isinstance(spec, dict) else None
    if not isinstance(domain, dict):
        return False
    cpu = domain.get("cpu")
    if isinstance(cpu, dict) and any(cpu.get(k) is not None for k in TOPOLOGY_KEYS):
        return True
    memory = domain.get("memory")
    if isinstance(memory, dict) and memory.get("guest") is not None:
        return True
    resources = domain.get("resources")
    if isinstance(resources, dict):
        for section in ("requests", "limits"):
            values = resources.get(section)
            if isinstance(values, dict) and (values.get("cpu") is not None
                                             or values.get("memory") is not None):
                return True
    return False


def sizing_view(spec: Any) -> tuple[Any, ...]:
    """The sized values of a spec, comparable between an old and a new object."""
    domain = spec.get("domain") if isinstance(spec, dict) else None
    if not isinstance(domain, dict):
        return ()
    cpu, memory = _dict(domain.get("cpu")), _dict(domain.get("memory"))
    resources = _dict(domain.get("resources"))
    requests, limits = _dict(resources.get("requests")), _dict(resources.get("limits"))
    return (tuple(cpu.get(k) for k in TOPOLOGY_KEYS), _bytes(memory.get("guest")),
            _millis(requests.get("cpu")), _millis(limits.get("cpu")),
            _bytes(requests.get("memory")), _bytes(limits.get("memory")))


def apply_sizing(spec: dict[str, Any], sizing: Sizing, policy: Policy, *, spec_path: str) -> list[str]:
    """Write ``sizing`` into ``spec`` (a copy owned by the caller). Returns warnings."""
    warnings: list[str] = []
    domain = child_dict(spec, "domain", spec_path)
    dpath = f"{spec_path}.domain"
    resources = child_dict(domain, "resources", dpath)
    requests = child_dict(resources, "requests", f"{dpath}.resources")
    limits = child_dict(resources, "limits", f"{dpath}.resources")
    field = K.ANN_CPU if sizing.from_annotations else "defaultProfile"
    if sizing.cpu is not None:
        cpu = child_dict(domain, "cpu", dpath)
        topo = sizing.cpu
        max_sockets = cpu.get("maxSockets")
        if isinstance(max_sockets, int) and max_sockets and topo.sockets > max_sockets:
            raise Refused(field, f"{topo.sockets} sockets exceed {dpath}.cpu.maxSockets "
                          f"{max_sockets} set on the VM")
        for key, value in zip(TOPOLOGY_KEYS, (topo.sockets, topo.cores, topo.threads), strict=True):
            _set(cpu, key, value, f"{dpath}.cpu.{key}", sizing, warnings, same=lambda a, b: a == b)
        vcpus = topo.vcpus
        dedicated = cpu.get("dedicatedCpuPlacement") is True
        request = vcpus * 1000 if dedicated else \
            math.ceil(vcpus * 1000 / policy.sizing.cpu_ratio)
        _set(requests, "cpu", format_millicpu(max(request, 1)), f"{dpath}.resources.requests.cpu",
             sizing, warnings, same=_same_cpu)
        _set(limits, "cpu", str(vcpus), f"{dpath}.resources.limits.cpu", sizing, warnings,
             same=_same_cpu)
    if sizing.memory is not None:
        mfield = K.ANN_MEMORY if sizing.from_annotations else "defaultProfile"
        memory = child_dict(domain, "memory", dpath)
        guest = sizing.memory
        max_guest = _bytes(memory.get("maxGuest"))
        if max_guest is not None and guest > max_guest:
            raise Refused(mfield, f"{quantity_text(guest)} exceeds {dpath}.memory.maxGuest "
                          f"{memory.get('maxGuest')} set on the VM")
        hugepages = memory.get("hugepages")
        cpu_spec = domain.get("cpu")
        no_overcommit = hugepages is not None or (isinstance(cpu_spec, dict)
                                                   and cpu_spec.get("dedicatedCpuPlacement") is True)
        if isinstance(hugepages, dict):
            page = _bytes(hugepages.get("pageSize"))
            if page and guest % page:
                raise Refused(mfield, f"{quantity_text(guest)} is not a multiple of the hugepage size "
                              f"{hugepages.get('pageSize')} set on the VM")
        if no_overcommit:
            request = guest
        else:
            raw = -(-guest * 100 // policy.sizing.memory_overcommit_percent)
            request = min(guest, -(-raw // MIB) * MIB)
        _set(memory, "guest", quantity_text(guest), f"{dpath}.memory.guest", sizing, warnings,
             same=_same_bytes)
        _set(requests, "memory", quantity_text(request), f"{dpath}.resources.requests.memory",
             sizing, warnings, same=_same_bytes)
        _set(limits, "memory", quantity_text(guest), f"{dpath}.resources.limits.memory", sizing,
             warnings, same=_same_bytes)
    return warnings


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def child_dict(parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """``parent[key]``, created empty when missing; :class:`Refused` if it is not an object."""
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    if not isinstance(value, dict):
        raise Refused(f"{path}.{key}", "must be an object")
    return value


def _set(target: dict[str, Any], key: str, value: Any, path: str, sizing: Sizing,
         warnings: list[str], *, same: Any) -> None:
    old = target.get(key)
    if old is not None and not same(old, value):
        warnings.append(f"{path}: {old} is replaced by {value} from {sizing.source}")
    if old is None or not same(old, value):
        target[key] = value  # an equal value in the user's own notation is kept


def _same_bytes(a: Any, b: Any) -> bool:
    return _as_written(a) and _bytes(a) is not None and _bytes(a) == _bytes(b)


def _same_cpu(a: Any, b: Any) -> bool:
    return _as_written(a) and _millis(a) is not None and _millis(a) == _millis(b)


def _as_written(value: Any) -> bool:
    """Whether the user's own value may stay as written when it equals ours: an integer, or text
    without surrounding whitespace. KubeVirt's CRD schema takes a quantity as an integer or a
    string matching the quantity pattern (no spaces, no floating-point numbers), so anything else
    is replaced by the canonical form even when its value is the same."""
    if isinstance(value, str):
        return value == value.strip()
    return isinstance(value, int) and not isinstance(value, bool)


def _bytes(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError:
        return None


def _millis(value: Any) -> int | None:
    """A CPU quantity in whole millicores (``"500m"``, ``"2"``, ``"1.5"``, ``1.5``, ``"2e0"``); None
    when it is not a quantity or not a whole number of millicores (then it never equals what
    diskhooks writes, and is replaced with a warning)."""
    if value is None:
        return None
    try:
        return parse_millicpu(value)
    except ValueError:
        return None
