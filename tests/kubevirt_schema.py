"""Check VirtualMachine / VirtualMachineInstance dicts the way KubeVirt would (a reusable test helper).

Two layers, both real material, no guessing:

1. **Schema**: KubeVirt's own OpenAPI document (``tests/data/kubevirt/openapi/swagger.json``),
   ``#/definitions/v1.VirtualMachine`` / ``v1.VirtualMachineInstance`` with every ``$ref``
   resolved, validated with :mod:`jsonschema` (Draft 4, the dialect of Swagger 2.0). By default
   *strict*: every object schema that lists its properties also refuses unknown ones — the API
   server prunes unknown fields of KubeVirt's structural CRD schemas silently, so a field the
   webhook misspells would simply vanish; here it fails.
2. **KubeVirt's admission checks** that the schema cannot express, as read from upstream
   ``pkg/virt-api/webhooks/validating-webhook/admitters/vmi-create-admitter.go`` (facts, not
   code): unique volume and disk names, exactly one source per volume, every disk has a volume
   and (VMI) every volume a disk, hostDisk path non-empty / type Disk|DiskOrCreate / capacity only
   with DiskOrCreate (and needed with it), disk names DNS labels, one target per disk, buses,
   serial alphabet, cache/io values, boot orders positive and unique (disks and interfaces), lun
   disks only on PVC/DataVolume volumes and with bus scsi, requests <= limits, guest <= memory
   limit, sockets <= maxSockets, and the hook-sidecar annotation being a JSON list of objects.

Usage: ``assert_valid_vm(vm)`` / ``assert_valid_vmi(vmi)``, or ``vm_errors(vm)`` for the list.
The schema is loaded and compiled once per process.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from typing import Any

import jsonschema

from tests.conftest import SWAGGER

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
SERIAL = re.compile(r"^[A-Za-z0-9_.+-]+\Z")
QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?\Z")
_SUFFIX: dict[str, int | Decimal] = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
VOLUME_SOURCES = ("persistentVolumeClaim", "sysprep", "cloudInitNoCloud", "cloudInitConfigDrive",
                  "containerDisk", "ephemeral", "emptyDisk", "hostDisk", "dataVolume", "configMap",
                  "secret", "downwardAPI", "serviceAccount", "downwardMetrics", "memoryDump")
DISK_BUSES = ("virtio", "scsi", "sata", "usb")
HOOK_SIDECARS = "hooks.kubevirt.io/hookSidecars"


# ------------------------------------------------------------------------------------------------
# schema
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _definitions(strict: bool) -> dict[str, Any]:
    defs = copy.deepcopy(json.loads(SWAGGER.read_text())["definitions"])
    if strict:
        for schema in defs.values():
            _close(schema)
    return dict(defs)


def _close(schema: Any) -> None:
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _close(value)
    elif isinstance(schema, list):
        for value in schema:
            _close(value)


@lru_cache(maxsize=8)
def _validator(definition: str, strict: bool) -> jsonschema.Draft4Validator:
    defs = _definitions(strict)
    if definition not in defs:
        raise KeyError(f"{definition} is not in KubeVirt's swagger.json")
    schema = {"$ref": f"#/definitions/{definition}", "definitions": defs}
    return jsonschema.Draft4Validator(schema)


def schema_errors(obj: Any, definition: str, *, strict: bool = True) -> list[str]:
    """Errors of ``obj`` against ``#/definitions/<definition>`` (e.g. ``v1.VirtualMachine``)."""
    out = []
    for err in sorted(_validator(definition, strict).iter_errors(obj), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"schema {definition} at {where}: {err.message[:300]}")
    return out


# ------------------------------------------------------------------------------------------------
# KubeVirt's admission checks
# ------------------------------------------------------------------------------------------------
def quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity as a number (bytes, or cores for CPU); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    m = QUANTITY.match(value.strip())
    if not m:
        return None
    number = value.strip()
    suffix = m.group(3) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(number)
    unit = _SUFFIX[suffix]
    return Decimal(number[: len(number) - len(suffix)] if suffix else number) * \
        (unit if isinstance(unit, Decimal) else Decimal(unit))


def vmi_spec_errors(spec: Mapping[str, Any], *, path: str, is_vmi: bool,
                    require_memory: bool = True) -> list[str]:
    errors: list[str] = []
    volumes = spec.get("volumes") or []
    domain = spec.get("domain") or {}
    devices = domain.get("devices") or {}
    disks = devices.get("disks") or []
    interfaces = devices.get("interfaces") or []
    filesystems = devices.get("filesystems") or []

    by_name: dict[str, Mapping[str, Any]] = {}
    for j, v in enumerate(volumes):
        where = f"{path}.volumes[{j}]"
        name = v.get("name")
        if name in by_name:
            errors.append(f"{where}.name: duplicate volume name {name!r}")
        by_name[name] = v
        sources = [s for s in VOLUME_SOURCES if v.get(s) is not None]
        if len(sources) != 1:
            errors.append(f"{where}: must have exactly one source type set, has {sources}")
        hd = v.get("hostDisk")
        if hd is not None:
            if not hd.get("path"):
                errors.append(f"{where}.hostDisk.path: is required for hostDisk volume")
            if hd.get("type") not in ("Disk", "DiskOrCreate"):
                errors.append(f"{where}.hostDisk.type: {hd.get('type')!r} is not Disk or DiskOrCreate")
            capacity = hd.get("capacity")
            if hd.get("type") == "Disk" and capacity is not None and quantity(capacity) != 0:
                errors.append(f"{where}.hostDisk.capacity: only allowed with type DiskOrCreate")
            if hd.get("type") == "DiskOrCreate" and not capacity:
                errors.append(f"{where}.hostDisk.capacity: DiskOrCreate without capacity fails at "
                              "image creation")
            size = quantity(capacity) if capacity is not None else None
            if capacity is not None and (size is None or size <= 0):
                errors.append(f"{where}.hostDisk.capacity: {capacity!r} is not a positive quantity")

    names: set[str] = set()
    boot_orders: dict[int, str] = {}
    for k, d in enumerate(disks):
        where = f"{path}.domain.devices.disks[{k}]"
        name = d.get("name")
        if name in names:
            errors.append(f"{where}.name: duplicate disk name {name!r}")
        names.add(name)
        if not isinstance(name, str) or len(name) > 63 or not DNS_LABEL.match(name):
            errors.append(f"{where}.name: {name!r} is not a DNS-1123 label")
        targets = [t for t in ("disk", "lun", "cdrom") if d.get(t) is not None]
        if len(targets) > 1:
            errors.append(f"{where}: can only have a single target type defined, has {targets}")
        target = targets[0] if targets else None
        bus = (d.get(target) or {}).get("bus") if target else None
        if bus:
            if bus not in DISK_BUSES:
                errors.append(f"{where}.{target}.bus: unrecognized bus {bus!r}")
            if target == "cdrom" and bus == "virtio":
                errors.append(f"{where}.cdrom.bus: virtio is invalid for a CD-ROM")
        if target == "lun" and bus != "scsi":
            errors.append(f"{where}.lun.bus: SCSI passthrough needs bus scsi, not {bus!r}")
        vol = by_name.get(name)
        if vol is None and target != "cdrom":
            errors.append(f"{where}.name: disk {name!r} has no volume")
        if target == "lun" and vol is not None and vol.get("persistentVolumeClaim") is None \
                and vol.get("dataVolume") is None:
            errors.append(f"{where}.lun: can only be mapped to a DataVolume or PVC volume")
        order = d.get("bootOrder")
        if order is not None:
            if not isinstance(order, int) or order < 1:
                errors.append(f"{where}.bootOrder: must be > 0")
            elif order in boot_orders:
                errors.append(f"{where}.bootOrder: {order} already set for {boot_orders[order]}")
            else:
                boot_orders[order] = where
        serial = d.get("serial")
        if serial is not None and serial != "":
            if not SERIAL.match(serial):
                errors.append(f"{where}.serial: must be made of [A-Za-z0-9_.+-]")
            if len(serial) > 256:
                errors.append(f"{where}.serial: longer than 256 characters")
        if d.get("cache") not in (None, "", "none", "writethrough", "writeback"):
            errors.append(f"{where}.cache: invalid value {d.get('cache')!r}")
        if d.get("io") not in (None, "", "native", "threads"):
            errors.append(f"{where}.io: invalid value {d.get('io')!r}")
    for k, iface in enumerate(interfaces):
        order = iface.get("bootOrder")
        if order is not None:
            where = f"{path}.domain.devices.interfaces[{k}].bootOrder"
            if order in boot_orders:
                errors.append(f"{where}: {order} already set for {boot_orders[order]}")
            boot_orders[order] = where

    if is_vmi:
        attached = names | {f.get("name") for f in filesystems}
        for j, v in enumerate(volumes):
            if v.get("memoryDump") is None and v.get("name") not in attached:
                errors.append(f"{path}.volumes[{j}].name: volume {v.get('name')!r} has no disk")

    resources = domain.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for key in ("cpu", "memory"):
        for bag, label in ((requests, "requests"), (limits, "limits")):
            if key in bag and quantity(bag[key]) is None:
                errors.append(f"{path}.domain.resources.{label}.{key}: {bag[key]!r} is not a quantity")
        req, lim = quantity(requests.get(key)), quantity(limits.get(key))
        if req is not None and lim is not None and lim > 0 and req > lim:
            errors.append(f"{path}.domain.resources.requests.{key}: {requests[key]} is greater "
                          f"than the limit {limits[key]}")
    mem_req = quantity(requests.get("memory"))
    if mem_req is not None and 0 < mem_req < 10**6:
        errors.append(f"{path}.domain.resources.requests.memory: must be at least 1M")
    memory = domain.get("memory") or {}
    guest, mem_lim = quantity(memory.get("guest")), quantity(limits.get("memory"))
    if guest is not None and mem_lim is not None and mem_lim != 0 and mem_lim < guest:
        errors.append(f"{path}.domain.memory.guest: {memory['guest']} is more than the memory limit "
                      f"{limits['memory']}")
    max_guest = quantity(memory.get("maxGuest"))
    if guest is not None and max_guest is not None and guest > max_guest:
        errors.append(f"{path}.domain.memory.guest: more than maxGuest")
    cpu = domain.get("cpu") or {}
    if cpu.get("maxSockets") and (cpu.get("sockets") or 0) > cpu["maxSockets"]:
        errors.append(f"{path}.domain.cpu.sockets: greater than maxSockets")
    for key in ("sockets", "cores", "threads"):
        if key in cpu and (not isinstance(cpu[key], int) or cpu[key] < 1):
            errors.append(f"{path}.domain.cpu.{key}: must be an integer >= 1")
    if cpu.get("dedicatedCpuPlacement"):
        for key in ("cpu", "memory"):
            req, lim = quantity(requests.get(key)), quantity(limits.get(key))
            if req is not None and lim is not None and req != lim:
                errors.append(f"{path}.domain.resources: requests.{key} must equal limits.{key} "
                              "with dedicatedCpuPlacement")
    if is_vmi and require_memory and not mem_req and guest is None and memory.get("hugepages") is None:
        errors.append(f"{path}.domain: no memory requested (memory.guest, hugepages or "
                      "resources.requests.memory)")
    return errors


def metadata_errors(meta: Mapping[str, Any] | None, *, path: str) -> list[str]:
    errors: list[str] = []
    meta = meta or {}
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        if not isinstance(value, str):
            errors.append(f"{path}.annotations[{key}]: must be a string")
    total = sum(len(k) + len(v) for k, v in annotations.items() if isinstance(v, str))
    if total > 256 * 1024:
        errors.append(f"{path}.annotations: {total} bytes, more than Kubernetes' 256 KiB")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or \
                (value and not re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", value)):
            errors.append(f"{path}.labels[{key}]: {value!r} is not a valid label value")
    raw = annotations.get(HOOK_SIDECARS)
    if raw is not None:
        try:
            entries = json.loads(raw)
        except ValueError as exc:
            errors.append(f"{path}.annotations[{HOOK_SIDECARS}]: not JSON: {exc}")
        else:
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                errors.append(f"{path}.annotations[{HOOK_SIDECARS}]: must be a JSON list of objects")
    return errors


def vm_errors(vm: Mapping[str, Any], *, strict: bool = True) -> list[str]:
    """Everything KubeVirt (schema + admission checks) would object to in a VirtualMachine."""
    errors = schema_errors(vm, "v1.VirtualMachine", strict=strict)
    spec = vm.get("spec") or {}
    template = spec.get("template") or {}
    errors += metadata_errors(vm.get("metadata"), path="metadata")
    errors += metadata_errors(template.get("metadata"), path="spec.template.metadata")
    tspec = template.get("spec") or {}
    errors += vmi_spec_errors(tspec, path="spec.template.spec", is_vmi=False)
    if spec.get("instancetype"):
        domain = tspec.get("domain") or {}
        cpu = domain.get("cpu") or {}
        if any(cpu.get(k) for k in ("sockets", "cores", "threads")) or \
                (domain.get("memory") or {}).get("guest"):
            errors.append("spec.template.spec.domain: CPU/memory conflict with spec.instancetype")
    return errors


def vmi_errors(vmi: Mapping[str, Any], *, strict: bool = True, require_memory: bool = True) -> list[str]:
    """Everything KubeVirt would object to in a VirtualMachineInstance (at creation).
    ``require_memory=False`` skips the "some memory must be requested" check, which KubeVirt makes
    after its own defaults (a VMI derived by hand from a VM template without memory lacks them)."""
    errors = schema_errors(vmi, "v1.VirtualMachineInstance", strict=strict)
    errors += metadata_errors(vmi.get("metadata"), path="metadata")
    errors += vmi_spec_errors(vmi.get("spec") or {}, path="spec", is_vmi=True,
                              require_memory=require_memory)
    return errors


def assert_valid_vm(vm: Mapping[str, Any], *, strict: bool = True) -> None:
    errors = vm_errors(vm, strict=strict)
    assert not errors, "KubeVirt would refuse this VirtualMachine:\n  " + "\n  ".join(errors)


def assert_valid_vmi(vmi: Mapping[str, Any], *, strict: bool = True, require_memory: bool = True) -> None:
    errors = vmi_errors(vmi, strict=strict, require_memory=require_memory)
    assert not errors, "KubeVirt would refuse this VirtualMachineInstance:\n  " + "\n  ".join(errors)
