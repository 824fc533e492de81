"""The shape of a VirtualMachine / VirtualMachineInstance and small readers for decoded JSON.

Pure, no policy. :func:`shape_of` checks what every mutation relies on (a mapping of the right
``kind`` and ``apiVersion``, ``metadata`` and ``spec`` objects) and raises
:class:`~diskplan.errors.Malformed` otherwise; :class:`Target` says where one mutation reads its
requests and writes its results (a VM's metadata and template, or a bare VMI); the other helpers read
what may be missing or mistyped without crashing, and :func:`json_copy` makes the copy a mutation
works on (the admitted object is never modified).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diskplan.errors import Malformed, Refused

VM_KIND = "VirtualMachine"
VMI_KIND = "VirtualMachineInstance"


@dataclass
class Target:
    """Where requests are read from and results written to: a VM's metadata and template, or a
    bare VMI (both at its top level)."""

    kind: str
    user_meta: dict[str, Any]
    plan_meta: dict[str, Any]
    spec: dict[str, Any]  # a VMI spec
    spec_path: str
    meta_path: str
    vm_spec: dict[str, Any] | None  # the VM's spec (instancetype, preference)


def shape_of(obj: Any, kind: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise Malformed("", f"the object must be a {kind}, not {type(obj).__name__}")
    if obj.get("kind", kind) != kind:
        raise Malformed("kind", f"expected {kind}, not {str(obj.get('kind'))[:60]!r}")
    api = obj.get("apiVersion")
    if api is not None and (not isinstance(api, str) or not api.startswith("kubevirt.io/")):
        raise Malformed("apiVersion", f"expected kubevirt.io/v1, not {str(api)[:60]!r}")
    meta = checked_mapping(obj.get("metadata"), "metadata")
    annotations = meta.get("annotations")
    if annotations is not None and not isinstance(annotations, Mapping):
        raise Malformed("metadata.annotations", "must be an object")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise Malformed("spec", f"a {kind} needs a spec object")
    return meta, spec


def as_map(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (for reading what may be missing)."""
    return value if isinstance(value, Mapping) else {}


def as_seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def checked_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Malformed(where, "must be an object")
    return value


def list_at(parent: Mapping[str, Any], key: str, where: str = "") -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise Refused(f"{where}.{key}" if where else key, "must be a list")
    return value


def meta_of(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    if meta is None:
        meta = obj["metadata"] = {}
    return meta


def spec_of(obj: dict[str, Any], where: str) -> dict[str, Any]:
    spec = obj.get("spec")
    if spec is None:
        spec = obj["spec"] = {}
    if not isinstance(spec, dict):
        raise Malformed(f"{where}.spec" if where else "spec", "must be an object")
    return spec


def name_of(meta: Mapping[str, Any]) -> str:
    name = meta.get("name")
    return name if isinstance(name, str) else ""


def json_copy(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy; JSON round trip when possible (several times faster than copy.deepcopy)."""
    try:
        out = json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        out = copy.deepcopy(dict(obj))
    return out  # type: ignore[no-any-return]
