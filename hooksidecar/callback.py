"""``OnDefineDomain`` as a function: domain XML bytes and VMI JSON bytes in, domain XML bytes out.

This is what the gRPC servicers (``server.py``) and the dry-run CLI call. Which plan is applied:

- served (``admitted_plan`` given, ``None`` included): the plan verified when the launcher Pod was
  admitted, which the Pod mutation hands to the sidecar container as ``DISKHOOKS_PLAN``. The VMI's
  ``diskhooks.io/plan`` annotation stays editable by the VM owner after that (no webhook sees VMI
  updates), so it is only compared: identical -> the plan is applied; different, or missing while
  a plan was verified -> :class:`Refused`; present (with something for the domain) while no plan
  was verified -> :class:`Refused` (the Pod webhook did not run). No plan anywhere -> unchanged.
- dry run (``admitted_plan`` left at :data:`PLAN_FROM_VMI`): the VMI's annotation is the plan.

The sidecar holds no key: it checks the VMI against the plan, parses the domain XML safely, checks
the images it can see (unless ``check_images`` is off, as in a dry run) and applies the pure domain
core.

- No plan, or a plan with nothing for the domain (sizing only): the input bytes come back
  unchanged, byte for byte, and the domain XML is not parsed at all.
- Errors: :class:`~diskplan.errors.Malformed` when the input cannot be read (XML or JSON not
  well-formed, too large, a plan that does not parse); :class:`~diskplan.errors.Refused` when the
  plan cannot be applied safely. Either way nothing is answered but the error: there is no partial
  result.

Imports stay light (lxml, json, the diskplan core): the sidecar runs under a 64M memory limit.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.plan import PersistRoot, Plan, load_json_object, parse_plan
from hooksidecar import domain, images, xmlsafe

#: 512 KiB: a launcher VMI is a few KiB (annotations are capped at 256 KiB in all by the API server;
#: KubeVirt's own sidecar-shim passes at most 128 KiB); parsed JSON costs ~20x its text in memory
MAX_VMI_JSON_BYTES = 512 * 1024
VMI_FIELD = "vmi"
PLAN_FIELD = f"{VMI_FIELD}.metadata.annotations[{K.ANN_PLAN}]"


class _PlanSource(enum.Enum):
    VMI = "the VMI's own annotation"


#: ``admitted_plan`` for a dry run: the plan is taken from the VMI itself
PLAN_FROM_VMI = _PlanSource.VMI


def on_define_domain(domain_xml: bytes, vmi_json: bytes, *, path_prefix: str = "",
                     check_images: bool = True,
                     admitted_plan: str | None | _PlanSource = PLAN_FROM_VMI,
                     on_facts: Callable[[images.ImageFacts], None] | None = None,
                     on_vmi: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    """The domain XML to hand back to virt-launcher for this VMI.

    ``path_prefix`` is prepended to every launcher path before a file is looked at (tests point it
    at a temporary directory; in the pod it is empty). ``admitted_plan`` is the plan verified at
    Pod admission (``None``: none was), or :data:`PLAN_FROM_VMI` for a dry run; see the module doc.
    ``on_facts`` (optional) is given what the image checks learnt once they passed (e.g. images
    kept larger than planned), and ``on_vmi`` (optional) the parsed VMI as soon as it was read (so
    the caller's log can name it without parsing it again); neither changes the answer.
    """
    vmi = parse_vmi(vmi_json)
    if on_vmi is not None:
        on_vmi(vmi)
    if admitted_plan is PLAN_FROM_VMI:
        plan_text = plan_annotation(vmi)
        plan = None if plan_text is None else parse_plan(plan_text)
    else:
        plan_text = plan_to_apply(plan_annotation(vmi), admitted_plan)
        plan = None if plan_text is None else admitted(plan_text)
    if plan is None or not has_work(plan):
        return domain_xml
    check_vmi(plan, vmi)
    uid = vmi_uid(vmi) if check_images and plan.persist_root else ""
    del vmi  # nothing else needs the VMI's objects: free them before the domain tree is built
    root = xmlsafe.parse_domain(domain_xml)
    base_format = None
    if check_images:
        facts = images.check_images(plan, vmi_uid=uid, path_prefix=path_prefix)
        base_format = facts.persist_root_base_format
        if on_facts is not None:
            on_facts(facts)
    # the tree is ours and dropped after this call: edit it in place (a copy of an lxml tree costs as
    # much memory as the parse; the sidecar runs under a 64M limit)
    domain.apply_plan(root, plan, persist_root_base_format=base_format)
    return xmlsafe.serialise_domain(root, like=domain_xml)


@functools.lru_cache(maxsize=1)
def admitted(plan_text: str) -> Plan:
    """The admitted plan, parsed once per process: serving, it is the same text at every call
    (``DISKHOOKS_PLAN`` does not change during the sidecar's life), :func:`parse_plan` is pure and a
    :class:`Plan` immutable. Only the verified plan goes through here (see :func:`plan_to_apply`),
    never a VMI's own annotation; a text that does not parse raises every time."""
    return parse_plan(plan_text)


def has_work(plan: Plan) -> bool:
    """Whether ``plan`` changes anything in the domain (a sizing-only plan does not)."""
    return bool(plan.disks or plan.persist_root or plan.passthrough)


def plan_to_apply(vmi_plan: str | None, admitted_plan: str | None) -> str | None:
    """The plan text to apply when serving: the admitted one, if the VMI still carries exactly it.

    Raises :class:`Refused` when the VMI's plan differs from the admitted one (or was removed), and
    when the VMI has a plan with something for the domain but none was admitted.
    """
    if admitted_plan is not None:
        if vmi_plan != admitted_plan:
            change = "has no diskhooks.io/plan any more" if vmi_plan is None else \
                "has a diskhooks.io/plan that differs from"
            raise Refused(PLAN_FIELD, f"the VMI {change} the plan verified when the launcher Pod was "
                          f"admitted ({K.ENV_PLAN} of the diskhooks hook-sidecar container): VMI "
                          "annotations can be edited after the Pod was created, so only the verified "
                          "plan is used and the VM does not start on another one; restore the "
                          "annotation or restart the VM so the webhook recomputes and verifies the plan")
        return admitted_plan
    if vmi_plan is None:
        return None
    if not has_work(parse_plan(vmi_plan)):
        return None  # sizing only: nothing in the domain depends on it, nothing to verify
    raise Refused(PLAN_FIELD, f"the VMI's diskhooks.io/plan was not verified at Pod admission: the "
                  f"diskhooks hook-sidecar container has no {K.ENV_PLAN}; check the diskhooks Pod "
                  f"webhook ran (its MutatingWebhookConfiguration, and the {K.LABEL_MANAGED} label on "
                  "the launcher Pod), then restart the VM")


# ------------------------------------------------------------------------------------------------
# reading the VMI (pure)
# ------------------------------------------------------------------------------------------------
def parse_vmi(data: bytes) -> dict[str, Any]:
    """The VMI JSON as a dict; :class:`Malformed` if it is too large, not JSON or not an object."""
    return load_json_object(data, field=VMI_FIELD, what="the VMI JSON", max_bytes=MAX_VMI_JSON_BYTES)


def plan_annotation(vmi: dict[str, Any]) -> str | None:
    """The ``diskhooks.io/plan`` annotation's text, or None when the VMI has none."""
    meta = vmi.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise Malformed(f"{VMI_FIELD}.metadata", "must be an object")
    annotations = meta.get("annotations")
    if annotations is None:
        return None
    if not isinstance(annotations, dict):
        raise Malformed(f"{VMI_FIELD}.metadata.annotations", "must be an object")
    text = annotations.get(K.ANN_PLAN)
    if text is None:
        return None
    if not isinstance(text, str):
        raise Malformed(f"{VMI_FIELD}.metadata.annotations[{K.ANN_PLAN}]", "must be a string")
    return text


def vmi_uid(vmi: dict[str, Any]) -> str:
    uid = (vmi.get("metadata") or {}).get("uid")
    if not isinstance(uid, str) or not uid:
        raise Malformed(f"{VMI_FIELD}.metadata.uid", "the VMI has no uid; it is needed to match the "
                        "persistent root's base record to this start")
    return uid


def check_vmi(plan: Plan, vmi: dict[str, Any]) -> None:
    """What the plan assumes about the VMI must hold (today: the persistent root's volume)."""
    if plan.persist_root is not None:
        _check_persist_root_volume(plan.persist_root, vmi)


def _check_persist_root_volume(pr: PersistRoot, vmi: dict[str, Any]) -> None:
    field = f"volume {pr.volume}"
    spec = vmi.get("spec")
    volumes = spec.get("volumes") if isinstance(spec, dict) else None
    if not isinstance(volumes, list):
        raise Malformed(f"{VMI_FIELD}.spec.volumes", "the VMI has no volume list")
    index = next((i for i, v in enumerate(volumes) if isinstance(v, dict) and v.get("name") == pr.volume),
                 None)
    if index is None:
        raise Refused(field, f"the plan keeps the root disk {pr.volume} persistent but the VMI has no "
                      f"volume named {pr.volume}")
    if index != pr.volume_index:
        raise Refused(field, f"volume {pr.volume} is at index {index} of the VMI's spec.volumes but the "
                      f"plan expects index {pr.volume_index} (KubeVirt's base file is "
                      f"disk_<index>.img); update the VirtualMachine so the webhook recomputes the plan")
    container_disk = volumes[index].get("containerDisk")
    if not isinstance(container_disk, dict):
        raise Refused(field, f"volume {pr.volume} is not a containerDisk; only a containerDisk root can "
                      "be kept persistent")
    image = container_disk.get("image")
    if image != pr.image:
        raise Refused(field, f"the base image changed: the VMI runs containerDisk {image!r} but the plan "
                      f"and the persistent overlay were made for {pr.image!r}; update the "
                      "VirtualMachine so the webhook recomputes the plan")
