"""The hook-sidecar annotation (``hooks.kubevirt.io/hookSidecars``): diskhooks' own entry and the rules
for every other entry.

Pure. Every VM and VMI in an opted-in namespace has its requested hook sidecars checked, diskhooks or
not (KubeVirt's Sidecar feature gate lets any VM owner run code in virt-launcher): an entry with
diskhooks' own image is accepted only as exactly the entry the webhook writes (``image``,
``imagePullPolicy``, ``args: [serve, --version, v1alpha3]``); on a VM such entries are dropped and
rewritten (:func:`merge_sidecars`, diskhooks' entry last), on a VMI any other entry with a diskhooks
image is refused (it would run arbitrary code: a ``command``, other ``args``, a ``configMap`` or
``pvc`` script). Entries of other images must be in the policy's ``sidecar.allowedImages``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.policy import PULL_POLICIES, Policy, image_repository
from webhook.sizing import child_dict
from webhook.vm.shape import Target

SIDECAR_ARGS = ("serve", "--version", K.HOOK_VERSIONS[0])
MAX_SIDECARS_BYTES = 64 * 1024
SIDECARS = f"annotations[{K.ANN_HOOK_SIDECARS}]"


def _our_sidecar(policy: Policy) -> dict[str, Any]:
    return {"image": policy.sidecar.image, "imagePullPolicy": policy.sidecar.image_pull_policy,
            "args": list(SIDECAR_ARGS)}


def read_sidecars(annotations: Mapping[str, Any] | None, where: str) -> list[Any] | None:
    raw = annotations.get(K.ANN_HOOK_SIDECARS) if isinstance(annotations, Mapping) else None
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise Refused(where, "must be a string holding a JSON list")
    if len(raw) > MAX_SIDECARS_BYTES:
        raise Refused(where, f"is longer than {MAX_SIDECARS_BYTES} bytes")
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise Refused(where, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise Refused(where, "is nested too deeply to be read") from None
    if not isinstance(entries, list):
        raise Refused(where, "must be a JSON list of sidecars")
    return entries


def merge_sidecars(t: Target, policy: Policy, *, want: bool) -> None:
    where = f"{t.meta_path}.{SIDECARS}"
    annotations = t.plan_meta.get("annotations")
    entries = read_sidecars(annotations, where)
    if entries is None and not want:
        return
    entries = entries or []
    repo = policy.sidecar.repository
    kept = []
    for i, e in enumerate(entries):
        image = e.get("image") if isinstance(e, Mapping) else None
        if isinstance(image, str) and image_repository(image) == repo:
            continue  # ours (perhaps an older tag, or with other args): replaced below
        _check_sidecar(e, f"{where}[{i}]", policy)
        kept.append(e)
    new = kept + [_our_sidecar(policy)] if want else kept
    if new == entries:
        return
    if not new:
        assert isinstance(annotations, dict)  # entries came from it
        del annotations[K.ANN_HOOK_SIDECARS]
        if annotations == {}:
            del t.plan_meta["annotations"]
        return
    child_dict(t.plan_meta, "annotations", t.meta_path)[K.ANN_HOOK_SIDECARS] = json.dumps(new)


def check_requested_sidecars(annotations: Any, where: str, policy: Policy) -> None:
    """The Sidecar feature gate lets any VM owner run code in virt-launcher: in opted-in
    namespaces every requested hook sidecar must be exactly diskhooks' own entry or in
    sidecar.allowedImages, whether or not the VM uses diskhooks."""
    entries = read_sidecars(annotations, where)
    for i, e in enumerate(entries or []):
        check_entry(e, f"{where}[{i}]", policy, own_image=policy.sidecar.image)


def check_entry(entry: Any, where: str, policy: Policy, *, own_image: str) -> bool:
    """Check one requested hook sidecar; True when it is exactly diskhooks' own entry.

    An entry using an image of diskhooks' repository (``own_image``'s or the policy's) runs
    diskhooks' code with whatever ``command``, ``args``, ``configMap`` or ``pvc`` it carries, so it
    is accepted only as the very entry the webhook writes; anything else must be allowed by
    ``sidecar.allowedImages``."""
    image = entry.get("image") if isinstance(entry, Mapping) else None
    if isinstance(image, str) and image_repository(image) in (policy.sidecar.repository,
                                                               image_repository(own_image)):
        assert isinstance(entry, Mapping)
        problem = own_entry_problem(entry, own_image)
        if problem is not None:
            raise Refused(where, problem)
        return True
    _check_sidecar(entry, where, policy)
    return False


def own_entry_problem(entry: Mapping[str, Any], own_image: str) -> str | None:
    """Why an entry with a diskhooks image is not the entry diskhooks writes (None: it is)."""
    extra = [str(k)[:40] for k in entry if k not in ("image", "imagePullPolicy", "args")]
    if extra:
        problem = f"with {', '.join(sorted(extra))}"
    elif entry.get("image") != own_image:
        problem = f"instead of {own_image!r}"
    elif entry.get("args") != list(SIDECAR_ARGS):
        problem = f"with args {str(entry.get('args'))[:100]}"
    elif entry.get("imagePullPolicy") not in PULL_POLICIES:
        problem = f"with imagePullPolicy {str(entry.get('imagePullPolicy'))[:40]!r}"
    else:
        return None
    return (f"uses the diskhooks image {str(entry.get('image'))[:200]!r} {problem}, which would run "
            f"other code under diskhooks' name: a diskhooks entry is exactly {{image: {own_image}, "
            f"imagePullPolicy: {'|'.join(PULL_POLICIES)}, args: [{', '.join(SIDECAR_ARGS)}]}} and "
            "nothing else, and the webhook writes it itself for VMs with diskhooks annotations")


def _check_sidecar(entry: Any, where: str, policy: Policy) -> None:
    if not isinstance(entry, Mapping):
        raise Refused(where, "must be an object with an image")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise Refused(f"{where}.image", "is missing: KubeVirt would run its sidecar-shim with a "
                      "user script; only images in the platform's sidecar.allowedImages may run "
                      "beside diskhooks")
    if not policy.sidecar.allows(image):
        raise Refused(f"{where}.image", f"{image[:200]!r} is not an allowed hook-sidecar image on this "
                      "platform (policy sidecar.allowedImages)")


def own_repo_entries(raw: Any, policy: Policy) -> list[Mapping[str, Any]]:
    """The entries of a hookSidecars value that use diskhooks' repository (lenient: a value that
    cannot be read has none; it is refused where it is checked)."""
    if not isinstance(raw, str) or len(raw) > MAX_SIDECARS_BYTES:
        return []
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    return [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("image"), str)
            and image_repository(e["image"]) == policy.sidecar.repository] \
        if isinstance(entries, list) else []
