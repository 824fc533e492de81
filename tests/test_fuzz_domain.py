"""Fuzz properties of the sidecar's domain-XML core (target group ``domain``): ``OnDefineDomain`` as
the served sidecar runs it (``hooksidecar.callback.on_define_domain`` with the admitted plan; image
files are not looked at here, ``tests/test_images.py`` does that) on KubeVirt's sample domains
(``tests/data/kubevirt/samples/``, first and later calls) with a generated plan and generated disks:
each planned volume's ``<disk>`` as KubeVirt renders it or with its type, device, source, driver,
alias, backing chain (nested, pointing at ``/etc/shadow``), data store (IncrementalBackup) or
whitespace changed, unplanned disks with odd aliases, and hostile attributes on other elements. A
second property sends hostile bytes: DOCTYPE and entity declarations (XXE, parameter entities,
entity bombs), other encodings, byte-order marks, NULs, truncation, deep nesting and huge values.

Properties, for every input: nothing escapes but ``Refused``/``Malformed`` naming a field and a
reason; an answer parses with the sidecar's own strict parser; a second call on the answer returns
it byte for byte (virt-launcher calls the hook 2-3 times); and the answer keeps every element it
did not mean to change: the two trees are equal once the planned disks are removed, and inside a
planned disk only the driver, the source file and the backing chain differ.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from typing import Any
from xml.sax.saxutils import quoteattr

from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from diskplan import keys as K
from diskplan.errors import DiskhooksError
from diskplan.plan import Plan, PlanKeys, sign_plan
from hooksidecar import xmlsafe
from hooksidecar.callback import has_work, on_define_domain
from tests.conftest import SAMPLES
from tests.fuzzing import NASTY, check_error, fuzz, plans, ran

KEYS = PlanKeys(current=b"fuzz-domain-key-0123456789abcdef")
SAMPLE_NAMES = (
    "01-vm-containerdisk-hostdisk-cloudinit",
    "02-vmi-two-hostdisks-disk",
    "03-vmi-pvc-cloudinit",
    "05-vm-mixed-smbios",
)
XML = {
    (n, which): (SAMPLES / f"{n}.domain{'.first-call' if which == 'first' else ''}.xml").read_bytes()
    for n in SAMPLE_NAMES
    for which in ("first", "later")
}
VMI_TEXT = {n: (SAMPLES / f"{n}.launcher-vmi.json").read_text() for n in SAMPLE_NAMES}
#: the samples' own hostDisk volumes, and names that are new to them
VOLUMES = st.lists(
    st.sampled_from(["datadisk", "os", "pgdata", "root", "scratch", "shared", "logs", "new-1", "new-2"]),
    max_size=4,
    unique=True,
)
_PLAIN = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
TALLY: Counter[str] = Counter()


# ================================================================================================
# generated disks
# ================================================================================================
def _disk_xml(alias: str, source: str, variant: int, indent: str) -> bytes:
    """A ``<disk>`` as KubeVirt would render it for ``alias``, or less so, decoded from ``variant``."""
    v = variant
    v, kind = divmod(v, 8)  # 0-4: as KubeVirt renders a hostDisk; 5 block; 6 no type; 7 volume
    v, device = divmod(v, 6)  # 0-3 disk; 4 lun; 5 cdrom
    v, driver = divmod(v, 6)  # 0-2 raw; 3 qcow2; 4 none; 5 odd attributes
    v, chain = divmod(v, 6)  # 0-2 none; 3 one level; 4 nested to /etc/shadow; 5 data store (CBT)
    v, src = divmod(v, 5)  # 0-3 as given; 4 missing
    v, extra = divmod(v, 4)  # 0-1 none; 2 address; 3 hostile attribute on the disk
    d = {0: "disk", 1: "disk", 2: "disk", 3: "disk", 4: "lun", 5: "cdrom"}[device]
    t = {5: "block", 6: None, 7: "volume"}.get(kind, "file")
    i1, i2, i3 = indent + "\t", indent + "\t\t", indent + "\t\t\t"
    attrs = f' device="{d}"' + (f' type="{t}"' if t else "") + ' model="virtio-non-transitional"'
    if extra == 3:
        attrs += " data-x=" + quoteattr("\u202e../../etc/shadow\u200b")
    parts = [f"<disk{attrs}>"]
    if src != 4:
        inner = ""
        if chain == 5:
            inner = (
                f'\n{i2}<dataStore type="file"><format type="raw"></format>'
                f"<source file={quoteattr(source)}></source></dataStore>\n{i1}"
            )
        key = "dev" if t == "block" else "file"
        parts.append(f"{i1}<source {key}={quoteattr(source)}>{inner}</source>")
    parts.append(f'{i1}<target bus="virtio" dev="vd{"bcdefghijk"[variant % 10]}"></target>')
    if driver < 4:
        kind_of = "qcow2" if driver == 3 else "raw"
        parts.append(
            f'{i1}<driver cache="none" error_policy="stop" name="qemu" type="{kind_of}" '
            'discard="unmap"></driver>'
        )
    elif driver == 5:
        parts.append(
            f'{i1}<driver name="qemu" type="raw" cache="writeback" io="native" iothread="1" '
            'copy_on_read="on"></driver>'
        )
    parts.append(f"{i1}<alias name={quoteattr(alias)}></alias>")
    if chain == 3:
        parts.append(
            f'{i1}<backingStore type="file">\n{i2}<format type="qcow2"></format>\n'
            f'{i2}<source file="/var/run/kubevirt-private/diskhooks/images/other.qcow2"></source>\n'
            f"{i1}</backingStore>"
        )
    elif chain == 4:
        parts.append(
            f'{i1}<backingStore type="file">\n{i2}<format type="raw"></format>\n'
            f'{i2}<source file="/etc/shadow"></source>\n{i2}<backingStore type="file">\n'
            f'{i3}<format type="qcow2"></format>\n{i3}<source file="/dev/sda"></source>\n'
            f"{i2}</backingStore>\n{i1}</backingStore>"
        )
    if extra == 2:
        parts.append(
            f'{i1}<address type="pci" domain="0x0000" bus="0x07" slot="0x00" function="0x0"></address>'
        )
    parts.append(f"{indent}</disk>")
    return "\n".join(parts).encode()


Case = tuple[bytes, bytes, str, Plan]  # domain XML, VMI JSON, admitted plan text, plan


@st.composite
def domains(draw: st.DrawFn) -> list[Case]:
    """One generated start, as the first and as a later ``OnDefineDomain`` call would see it.

    The plan is drawn by hypothesis; the many small choices of how KubeVirt's XML looks come from
    a ``random.Random`` seeded by a drawn integer (the same choices for both calls): drawing each
    through hypothesis would cost ten times the call itself."""
    sample = draw(st.sampled_from(SAMPLE_NAMES))
    vmi_doc: dict[str, Any] = json.loads(VMI_TEXT[sample])
    plan = draw(
        plans(namespace=vmi_doc["metadata"]["namespace"], vm=vmi_doc["metadata"]["name"], names=VOLUMES)
    )
    seed = draw(st.integers(0, 2**32 - 1))
    if plan.persist_root is not None and (sample != SAMPLE_NAMES[0] or seed % 4 == 3):
        plan = replace(plan, persist_root=None)  # only sample 01 boots from a containerDisk
    text = sign_plan(plan, KEYS)
    vmi_doc["metadata"].setdefault("annotations", {})[K.ANN_PLAN] = text
    if plan.persist_root is not None and seed % 3:
        vmi_doc["spec"]["volumes"][0] = {
            "name": "rootdisk",
            "containerDisk": {"image": plan.persist_root.image},
        }
    vmi = json.dumps(vmi_doc).encode()
    return [
        (_render(XML[(sample, which)], plan, random.Random(seed)), vmi, text, plan)
        for which in ("first", "later")
    ]


def _name(rng: random.Random) -> str:
    word = rng.choice(["data", "os", "x" * 64, "Data", "a-", "new-1"])
    return rng.choice([word, word + rng.choice(NASTY), rng.choice(NASTY) + word])


def _render(xml: bytes, plan: Plan, rng: random.Random) -> bytes:
    """``xml`` with the planned volumes' disks as KubeVirt would render them, or not quite."""
    compact = rng.random() < 0.1
    new_disks: list[bytes] = []
    for volume in [d.name for d in plan.disks] + [p.name for p in plan.passthrough]:
        alias = f"ua-{volume}".encode()
        planned = next((d for d in plan.disks if d.name == volume), None)
        source = planned.launcher_path if planned else f"/dev/{volume}"
        if rng.random() < 0.15:
            source = rng.choice(
                [
                    "/etc/shadow",
                    f"/var/run/kubevirt-private/vmi-disks/{volume}/x.img",
                    source + "\n",
                    "../" + source,
                ]
            )
        start = xml.find(b'<alias name="' + alias + b'"')
        begin = xml.rindex(b"<disk ", 0, start) if start >= 0 else -1
        end = xml.index(b"</disk>", start) + len(b"</disk>") if start >= 0 else -1
        if start >= 0 and rng.random() < 0.5:  # KubeVirt's own disk: point it at the planned file
            old = xml[begin:end]
            old_src = old[old.index(b'<source file="') + 14 :]
            old_src = old_src[: old_src.index(b'"')]
            xml = xml[:begin] + old.replace(old_src, source.encode()) + xml[end:]
            continue
        if start >= 0:  # replaced by a generated one
            xml = xml[:begin].rstrip(b"\t") + xml[end:].lstrip(b"\n")
        pt = next((p for p in plan.passthrough if p.name == volume), None)
        # two in three as KubeVirt renders it (a file disk, or a block disk or lun for passthrough),
        # with or without an address; else anything
        good = (5 + 8 * (4 if pt.mode == "lun" else 0)) if pt else 0
        variant = (
            good + 2 * 8 * 6 * 6 * 6 * 5 * rng.randrange(2)
            if rng.random() < 0.67
            else rng.randrange(8 * 6 * 6 * 6 * 5 * 4)
        )
        new_disks.append(_disk_xml(alias.decode(), source, variant, "\t\t"))
    for _ in range(rng.randrange(3)):  # disks nobody planned, odd aliases included
        new_disks.append(
            _disk_xml(
                "ua-" + _name(rng),
                "/var/run/kubevirt-private/vmi-disks/x/x.img",
                rng.randrange(10_000),
                "\t\t",
            )
        )
    if rng.random() < 0.1 and new_disks:  # the same disk twice
        new_disks.append(new_disks[0])
    anchor = b'\t\t<serial type="unix">'
    xml = xml.replace(anchor, b"".join(b"\t\t" + d.lstrip() + b"\n" for d in new_disks) + anchor, 1)
    if rng.random() < 0.25:  # a hostile attribute value somewhere else
        value = "".join(rng.choice(NASTY) for _ in range(rng.randrange(1, 4)))
        xml = xml.replace(b"<interface ", b"<interface data-x=" + quoteattr(value).encode() + b" ", 1)
    if compact:  # no whitespace between elements (what a non-Go marshaller might send)
        xml = b">".join(part.rstrip() for part in xml.split(b">"))
        xml = b"<".join(part.lstrip() if i else part for i, part in enumerate(xml.split(b"<")))
    return xml


# ================================================================================================
# the properties
# ================================================================================================
def _planned_aliases(plan: Plan) -> set[str]:
    vols = [d.name for d in plan.disks] + [p.name for p in plan.passthrough]
    if plan.persist_root is not None:
        vols.append(plan.persist_root.volume)
    return {K.disk_alias(v) for v in vols}


def _without(root: etree._Element, aliases: set[str]) -> tuple[bytes, dict[str, etree._Element]]:
    """The tree's canonical form with the planned disks taken out, and those disks by alias."""
    taken = {}
    devices = root.find("devices")
    for disk in [] if devices is None else devices.findall("disk"):
        alias = disk.find("alias")
        name = alias.get("name") if alias is not None else None
        if name in aliases:
            taken[name] = disk
            devices.remove(disk)  # (with its tail: the same whitespace goes on both sides)
    return etree.tostring(root, method="c14n"), taken


def _children(disk: etree._Element) -> list[str]:
    return [str(c.tag) for c in disk if c.tag not in ("driver", "backingStore", "source")]


def check_answer(xml: bytes, out: bytes, vmi: bytes, text: str, plan: Plan) -> None:
    if not has_work(plan):  # nothing for the domain: the bytes come back as they are, not even parsed
        assert out == xml
        TALLY["unchanged"] += 1
        return
    root = xmlsafe.parse_domain(out)  # the answer passes the sidecar's own strict parser
    assert root.tag == "domain"
    again = on_define_domain(out, vmi, check_images=False, admitted_plan=text)
    assert again == out, "a second call changed the answer"
    aliases = _planned_aliases(plan)
    before, old_disks = _without(etree.fromstring(xml, _PLAIN), aliases)
    after, new_disks = _without(etree.fromstring(out, _PLAIN), aliases)
    assert before == after, "an element the plan does not name was changed"
    assert old_disks.keys() == new_disks.keys() == aliases
    chained = aliases - {K.disk_alias(p.name) for p in plan.passthrough}
    for alias, new in new_disks.items():
        old = old_disks[alias]
        assert dict(new.attrib) == dict(old.attrib), alias  # type, device, model... as KubeVirt made them
        assert _children(new) == _children(old), alias  # target, alias, address... kept, in order
        if alias not in chained:  # passthrough: only the driver's cache and io
            assert [c.tag for c in new if c.tag != "driver"] == [c.tag for c in old if c.tag != "driver"]
            continue
        stores = new.findall("backingStore")
        assert len(stores) == 1, alias  # one chain, written in full, ending with an empty element
        tail = stores[0]
        while tail.find("backingStore") is not None:
            tail = tail.find("backingStore")
        assert len(tail) == 0 and not tail.attrib, alias
        for src in new.iter("source"):
            assert src.get("file") != "/etc/shadow", alias
    TALLY["answered"] += 1


def call(xml: bytes, vmi: bytes, text: str, plan: Plan) -> None:
    try:
        out = on_define_domain(xml, vmi, check_images=False, admitted_plan=text)
    except DiskhooksError as exc:
        check_error(exc)
        TALLY["refused"] += 1
        return
    check_answer(xml, out, vmi, text, plan)


@given(domains())
@fuzz(3500)
def _domain_property(cases: list[Case]) -> None:
    for case in cases:
        ran("domain")
        call(*case)


def test_generated_disks_in_kubevirts_domains() -> None:
    TALLY.clear()
    _domain_property()
    assert TALLY["answered"] >= 1500 and TALLY["refused"] >= 1500, TALLY


# ------------------------------------------------------------------------------------------------
# hostile bytes
# ------------------------------------------------------------------------------------------------
ENTITY_BOMB = (
    b'<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
)
PREFIXES = [
    ENTITY_BOMB,
    b'<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/shadow">]>',
    b'<!DOCTYPE domain [<!ENTITY % p SYSTEM "file:///etc/shadow"> %p;]>',
    b'<!DOCTYPE domain SYSTEM "http://127.0.0.1:1/x.dtd">',
    b"<!doctype domain>",
    b"<! DOCTYPE domain>",
    b'<?xml version="1.0" encoding="ISO-8859-1"?>',
    b'<?xml version="1.0" encoding="UTF-16"?>',
    b'<?xml version="1.0"?>',
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\x00",
    b"<!-- a comment -->",
    b"<?pi x?>",
]


def _spoil(case: Case, rng: random.Random) -> Case:
    xml, vmi, text, plan = case
    how = rng.choice(
        ["prefix", "entity-use", "utf16", "truncate", "byte", "deep", "huge", "nul", "root", "cdata"]
    )
    if how == "prefix":
        xml = rng.choice(PREFIXES) + xml
    elif how == "entity-use":
        xml = ENTITY_BOMB + xml.replace(b"<name>", b"<name>&c;", 1)
    elif how == "utf16":
        xml = xml.decode().encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))
    elif how == "truncate":
        xml = xml[: rng.randrange(len(xml) + 1)]
    elif how == "byte":
        at = rng.randrange(len(xml))
        xml = xml[:at] + bytes([rng.randrange(256)]) + xml[at + 1 :]
    elif how == "deep":
        depth = rng.choice([10, 255, 300, 5000, 50_000])
        xml = xml.replace(b"</metadata>", b"<a>" * depth + b"</a>" * depth + b"</metadata>", 1)
    elif how == "huge":
        size = rng.choice([1 << 10, 1 << 16, 600 << 10])
        xml = xml.replace(b"<name>", b'<name x="' + b"A" * size + b'">', 1)
    elif how == "nul":
        xml = xml.replace(b"<name>", b"<name>\x00", 1)
    elif how == "root":
        xml = xml.replace(b"<domain", b"<domainx", 1).replace(b"</domain>", b"</domainx>")
    elif how == "cdata":
        xml = xml.replace(b"<name>", b"<name><![CDATA[<!DOCTYPE x>]]>", 1)
    return xml, vmi, text, plan


@st.composite
def hostile(draw: st.DrawFn) -> list[Case]:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return [_spoil(case, rng) for case in draw(domains())]


@given(hostile())
@fuzz(1500)
def _hostile_property(cases: list[Case]) -> None:
    for case in cases:
        ran("domain")
        call(*case)


def test_hostile_domain_bytes() -> None:
    TALLY.clear()
    _hostile_property()
    assert TALLY["refused"] >= 1500 and TALLY["answered"] >= 50, TALLY
