"""The domain-XML core of the hook sidecar: a plan and a ``<domain>`` tree in, a new tree out.

Pure: no I/O, no globals, no environment. :func:`mutate_domain` never changes the input tree (it works
on a deep copy); :func:`apply_plan` is the same edit in place, for a tree the caller owns (the
sidecar's freshly parsed domain, which it then serialises and drops). Everything it does is driven
by the plan; disks the plan does not name are left exactly as they were, and so is everything that
is not a planned disk (interfaces, metadata, namespaces...).

For every planned disk, found by its alias ``ua-<volume>`` (never by position: later
``OnDefineDomain`` calls carry libvirt's read-back, with disks reordered and addresses added):

- qcow2 host disk: ``<driver name="qemu" type="qcow2" cache io discard>`` from the plan (other driver
  attributes such as ``error_policy`` kept); the source must already be the planned launcher path
  (KubeVirt sets it from the hostDisk volume); the backing chain is written out in full, replacing
  whatever arrived (a later call brings it cut to one level): with a base,
  ``<backingStore type="file"><format/><source file=base/><backingStore/></backingStore>``; without
  one, an empty ``<backingStore/>``. The empty element states that the image has no backing file, so
  libvirt neither probes the image header for a chain nor opens a backing file someone wrote into it,
  and the disk reads the same on every call.
- persistent containerDisk root: source = the overlay in the VM directory, driver type qcow2 (KubeVirt's
  cache/discard kept), chain = KubeVirt's containerDisk file with the base format prepare recorded.
- passthrough: driver ``cache``/``io`` from the plan; a ``lun`` must already be ``device="lun"``.

Anything that cannot be applied as planned raises :class:`~diskplan.errors.Refused` naming the volume
and what to check; the caller then answers with an error and the VM does not start with wrong disks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lxml import etree

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.plan import BASE_FORMATS, Passthrough, PersistRoot, Plan, PlannedDisk

#: where virt-launcher puts a containerDisk's ephemeral overlay: <dir>/<volume>/disk.qcow2
EPHEMERAL_DISK_DATA = "/var/run/kubevirt-ephemeral-disks/disk-data"
#: caches that give qemu cache.direct=on, which aio=native requires
DIRECT_CACHES = ("none", "directsync")


@dataclass(frozen=True)
class ChainLink:
    """One backing image below a disk's top image."""

    format: str
    path: str


def mutate_domain(root: etree._Element, plan: Plan, *,
                  persist_root_base_format: str | None = None) -> etree._Element:
    """Return a copy of the ``<domain>`` element ``root`` with ``plan`` applied.

    ``persist_root_base_format`` is the containerDisk base format prepare recorded (from the base
    record next to the overlay); without it (a dry run that reads no files) the format KubeVirt stated
    for the base is kept, qcow2 if it stated none. Raises :class:`Refused`.
    """
    out = copy.deepcopy(root)
    apply_plan(out, plan, persist_root_base_format=persist_root_base_format)
    return out


def apply_plan(root: etree._Element, plan: Plan, *, persist_root_base_format: str | None = None) -> None:
    """:func:`mutate_domain` without the copy: edits ``root`` itself.

    For a tree the caller owns and throws away on error (the sidecar's freshly parsed domain): a
    copy of an lxml tree costs as much memory as the parse, and the sidecar runs under a 64M limit.
    On :class:`Refused` the tree may be half edited and must not be used.
    """
    out = root
    disks = _disks_by_alias(out)
    _refuse_double_planning(plan)
    for planned in plan.disks:
        _apply_host_disk(_planned_disk_element(disks, planned.name), planned)
    if plan.persist_root is not None:
        pr = plan.persist_root
        _apply_persist_root(_planned_disk_element(disks, pr.volume), pr, persist_root_base_format)
    for pt in plan.passthrough:
        _apply_passthrough(_planned_disk_element(disks, pt.name), pt)


# ------------------------------------------------------------------------------------------------
# finding disks
# ------------------------------------------------------------------------------------------------
def _disks_by_alias(root: etree._Element) -> dict[str, list[etree._Element]]:
    found: dict[str, list[etree._Element]] = {}
    devices = _child(root, "devices")
    if devices is None:
        return found
    for disk in _children(devices, "disk"):
        alias = _child(disk, "alias")
        name = alias.get("name") if alias is not None else None
        if name:
            found.setdefault(name, []).append(disk)
    return found


def _planned_disk_element(disks: dict[str, list[etree._Element]], volume: str) -> etree._Element:
    alias = K.disk_alias(volume)
    matches = disks.get(alias, [])
    if not matches:
        raise Refused(_field(volume), f"the plan names volume {volume} but the domain has no disk with "
                      f"alias {alias}; check that the VMI still has a disk and a volume named {volume} "
                      "(the webhook adds them) and that no other hook sidecar removed it")
    if len(matches) > 1:
        raise Refused(_field(volume), f"the domain has {len(matches)} disks with alias {alias}; "
                      "refusing to guess which one is the planned disk")
    return matches[0]


def _refuse_double_planning(plan: Plan) -> None:
    if plan.persist_root is not None and plan.persist_root.volume in plan.managed_volumes:
        vol = plan.persist_root.volume
        raise Refused(_field(vol), f"volume {vol} is planned both as a persistent root and as a "
                      "host disk or passthrough device")


# ------------------------------------------------------------------------------------------------
# the three kinds of planned disk
# ------------------------------------------------------------------------------------------------
def _apply_host_disk(disk: etree._Element, planned: PlannedDisk) -> None:
    vol = planned.name
    source = _file_source(disk, vol, what="qcow2 host disk")
    current = source.get("file")
    if current != planned.launcher_path:
        raise Refused(_field(vol), f"KubeVirt points disk {planned.alias} at {current!r}, not at the "
                      f"planned image {planned.launcher_path}: the VMI's hostDisk volume {vol} no longer "
                      "has the path the webhook set; update the VirtualMachine so the webhook "
                      "recomputes its volumes")
    _check_cache_io(vol, planned.cache, planned.io)
    layout = _Layout.of(disk)
    _set_driver(disk, type="qcow2", cache=planned.cache, io=planned.io, discard=planned.discard)
    chain = () if planned.backing is None else (
        ChainLink(format=planned.backing.format, path=planned.backing.launcher_path),)
    _set_chain(disk, source, chain)
    layout.apply(disk)


def _apply_persist_root(disk: etree._Element, pr: PersistRoot, base_format: str | None) -> None:
    vol = pr.volume
    source = _file_source(disk, vol, what="persistent containerDisk root")
    current = source.get("file")
    ephemeral = f"{EPHEMERAL_DISK_DATA}/{vol}/disk.qcow2"
    if current not in (ephemeral, pr.launcher_path):
        raise Refused(_field(vol), f"disk {pr.alias} points at {current!r}, which is neither KubeVirt's "
                      f"containerDisk overlay {ephemeral} nor the persistent overlay "
                      f"{pr.launcher_path}; is volume {vol} still a containerDisk?")
    stated = _first_link(disk)
    if stated is not None and stated.path and stated.path != pr.base_path:
        raise Refused(_field(vol), f"KubeVirt's containerDisk base for {vol} is {stated.path}, not "
                      f"{pr.base_path} as planned (volume index {pr.volume_index}); was the volume "
                      "moved in spec.volumes, or does KubeVirt serve containerDisks from image "
                      "volumes here?")
    if base_format is None:
        fmt = stated.format if stated is not None and stated.format in BASE_FORMATS else "qcow2"
    else:
        if base_format not in BASE_FORMATS:
            raise Refused(_field(vol), f"the recorded base format {base_format!r} is not one of "
                          f"{', '.join(BASE_FORMATS)}")
        if stated is not None and stated.format and stated.format != base_format:
            raise Refused(_field(vol), f"KubeVirt reads the containerDisk base of {vol} as "
                          f"{stated.format}, but prepare recorded it as {base_format}: the base image "
                          "changed or was probed differently; refusing to start on it")
        fmt = base_format
    layout = _Layout.of(disk)
    _set_driver(disk, type="qcow2")
    source.set("file", pr.launcher_path)
    _set_chain(disk, source, (ChainLink(format=fmt, path=pr.base_path),))
    layout.apply(disk)


def _apply_passthrough(disk: etree._Element, pt: Passthrough) -> None:
    vol = pt.name
    if _has_data_store(disk):
        raise Refused(_field(vol), f"disk {pt.alias} is an IncrementalBackup overlay; diskhooks cannot "
                      "tune a passthrough device KubeVirt has wrapped")
    device = disk.get("device", "disk")
    if device != pt.mode:
        raise Refused(_field(vol), f"the plan gives volume {vol} as a {pt.mode} but KubeVirt made disk "
                      f"{pt.alias} device={device!r}; the VMI's disk {vol} must be a "
                      f"{'lun' if pt.mode == 'lun' else 'disk'} (the webhook sets it: update the "
                      "VirtualMachine so it recomputes the disk)")
    _check_cache_io(vol, pt.cache, pt.io)
    layout = _Layout.of(disk)
    _set_driver(disk, cache=pt.cache, io=pt.io)
    layout.apply(disk)


# ------------------------------------------------------------------------------------------------
# element helpers
# ------------------------------------------------------------------------------------------------
def _field(volume: str) -> str:
    return f"volume {volume}"


def _child(el: etree._Element, tag: str) -> etree._Element | None:
    """``el.find(tag)`` for a plain tag name, without ElementPath's parsing (a third of the cost)."""
    return next(el.iterchildren(tag), None)


def _children(el: etree._Element, tag: str) -> list[etree._Element]:
    """``el.findall(tag)`` for a plain tag name."""
    return list(el.iterchildren(tag))


def _has_data_store(disk: etree._Element) -> bool:
    source = _child(disk, "source")
    return source is not None and _child(source, "dataStore") is not None


def _file_source(disk: etree._Element, vol: str, *, what: str) -> etree._Element:
    alias = K.disk_alias(vol)
    if _has_data_store(disk):
        raise Refused(_field(vol), f"KubeVirt turned disk {alias} into an IncrementalBackup overlay "
                      "with a raw data store; a diskhooks qcow2 image would then be read as raw "
                      f"data, so the {what} cannot be used with incremental backup")
    if disk.get("type") != "file":
        raise Refused(_field(vol), f"disk {alias} has type={disk.get('type')!r}; a {what} must be a "
                      "file disk")
    device = disk.get("device", "disk")
    if device != "disk":
        raise Refused(_field(vol), f"disk {alias} has device={device!r}; a {what} must be a disk")
    source = _child(disk, "source")
    if source is None:
        raise Refused(_field(vol), f"disk {alias} has no <source>")
    return source


def _check_cache_io(vol: str, cache: str, io: str) -> None:
    if io == "native" and cache not in DIRECT_CACHES:
        raise Refused(_field(vol), f"io=native needs cache none or directsync, the plan has "
                      f"cache={cache}; qemu would refuse to start the VM")


def _first_link(disk: etree._Element) -> ChainLink | None:
    store = _child(disk, "backingStore")
    if store is None:
        return None
    fmt = _child(store, "format")
    src = _child(store, "source")
    return ChainLink(format=(fmt.get("type") or "") if fmt is not None else "",
                     path=(src.get("file") or "") if src is not None else "")


def _set_driver(disk: etree._Element, **attrs: str) -> None:
    """Set ``<driver name="qemu" ...>`` (added after ``<target>`` or ``<source>`` when missing). The
    caller re-indents the disk afterwards (:class:`_Layout`, taken before the first edit), once for
    all its edits."""
    driver = _child(disk, "driver")
    if driver is None:
        driver = etree.Element("driver")
        anchor = _child(disk, "target")
        if anchor is None:
            anchor = _child(disk, "source")
        if anchor is not None:
            anchor.addnext(driver)
        else:
            disk.append(driver)
    driver.set("name", "qemu")
    for key, value in attrs.items():
        driver.set(key, value)


def _set_chain(disk: etree._Element, source: etree._Element, chain: tuple[ChainLink, ...]) -> None:
    """Replace every ``<backingStore>`` of ``disk`` by ``chain`` (ending with an empty one).

    The new element goes where the old chain was, else right after ``<alias>`` (where KubeVirt's own
    marshalling puts it), else after ``<source>``. The caller re-indents the disk afterwards.
    """
    olds = _children(disk, "backingStore")
    # where KubeVirt itself puts it (its Disk struct marshals backingStore right after alias), or
    # where the previous chain was: the result then reads the same on every call
    anchor = olds[0].getprevious() if olds else _child(disk, "alias")
    for old in olds:
        disk.remove(old)
    if anchor is None or anchor.getparent() is not disk:
        anchor = source
    top = etree.Element("backingStore")
    cursor = top
    for link in chain:
        cursor.set("type", "file")
        etree.SubElement(cursor, "format", type=link.format)
        etree.SubElement(cursor, "source", file=link.path)
        cursor = etree.SubElement(cursor, "backingStore")
    anchor.addnext(top)


@dataclass(frozen=True)
class _Layout:
    """The whitespace style of a disk element, so inserted elements look like KubeVirt's own."""

    indent: str | None  # the disk's own indentation; None for compact XML without whitespace
    unit: str

    @classmethod
    def of(cls, disk: etree._Element) -> _Layout:
        text = disk.text or ""
        if "\n" not in text or text.strip():
            return cls(indent=None, unit="")
        child = text.rsplit("\n", 1)[1]
        prev = disk.getprevious()
        before = prev.tail if prev is not None else (
            disk.getparent().text if disk.getparent() is not None else None)
        own = before.rsplit("\n", 1)[1] if before and "\n" in before and not before.strip() else ""
        unit = child[len(own):] if child.startswith(own) and len(child) > len(own) else "\t"
        return cls(indent=own, unit=unit)

    def apply(self, disk: etree._Element) -> None:
        self._format(disk, 0)

    def _format(self, el: etree._Element, level: int) -> None:
        children = list(el)
        if not children:
            return
        if self.indent is None:
            if _blank(el.text):
                el.text = None
            for c in children:
                if _blank(c.tail):
                    c.tail = None
                if len(c):
                    self._format(c, level + 1)
            return
        inner = "\n" + self.indent + self.unit * (level + 1)
        outer = "\n" + self.indent + self.unit * level
        if _blank(el.text):
            el.text = inner
        for i, c in enumerate(children):
            if _blank(c.tail):
                c.tail = outer if i == len(children) - 1 else inner
            if len(c):  # a leaf has nothing to format
                self._format(c, level + 1)


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()
