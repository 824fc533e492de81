"""What the fuzz properties share (``tests/test_fuzz_*.py``): settings profiles, input counts, hostile
text, and the one check every refusal must pass. Loaded as a pytest plugin by ``tests/conftest.py``,
which makes it print how many generated inputs each target group ran at the end of the session.

Profiles (hypothesis, selected by ``DISKHOOKS_FUZZ``):

- ``ci`` (the default): every property runs its ``ci`` count of inputs, derandomized (the same
  inputs on every run, so a CI failure reproduces on a laptop), no example database, no deadline.
  Tuned so that each target group (parsers, admission, pod, domain) runs at least 10,000 inputs
  and the whole fuzz run stays around a minute on 2 cores.
- ``long``: :data:`LONG_FACTOR` times as many inputs, randomized (a new seed per run; hypothesis
  prints the seed and a reproduction blob on failure): ``DISKHOOKS_FUZZ=long .venv/bin/python -m
  pytest tests/test_fuzz_*.py -q -p no:cacheprovider``.

``DISKHOOKS_FUZZ_REPORT=FILE`` also writes the counts as JSON to FILE.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Generator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from diskplan.errors import DiskhooksError
from diskplan.plan import Backing, DetachedDisk, Passthrough, PersistRoot, Plan, PlannedDisk

PROFILE = os.environ.get("DISKHOOKS_FUZZ", "ci")
LONG_FACTOR = 20
_COMMON: dict[str, Any] = {
    "database": None,
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
}
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
if PROFILE not in ("ci", "long"):
    raise ValueError(f"DISKHOOKS_FUZZ={PROFILE!r}: use ci (the default) or long")
settings.load_profile(PROFILE)

#: inputs run per target group in this process since the last test report took them
COUNTS: Counter[str] = Counter()
#: inputs run per target group as the test reports tell it (what the session summary prints): with
#: parallel workers (pytest-xdist) the counting happens in the workers, and each test's report
#: carries its own count back to the controller as a user property
REPORTED: Counter[str] = Counter()
PROPERTY = "fuzz_inputs"
GROUPS = ("parsers", "admission", "pod", "domain")


def fuzz(n: int) -> settings:
    """Settings for one property: ``n`` inputs under ``ci``, ``n * LONG_FACTOR`` under ``long``."""
    return settings(max_examples=n * (LONG_FACTOR if PROFILE == "long" else 1))


def ran(group: str) -> None:
    """Count one input run against ``group`` (call it first thing in a property)."""
    assert group in GROUPS, group
    COUNTS[group] += 1


# ------------------------------------------------------------------------------------------------
# the error contract
# ------------------------------------------------------------------------------------------------
def check_error(exc: BaseException) -> None:
    """A refusal must be one of the project's two families and name a field and a reason, with the
    message ``field: reason``. Anything else escaping a core is a bug (re-raised as it is)."""
    if not isinstance(exc, DiskhooksError):
        raise exc
    assert isinstance(exc.field, str) and exc.field.strip(), f"no field: {exc!r}"
    assert isinstance(exc.reason, str) and exc.reason.strip(), f"no reason: {exc!r}"
    assert str(exc) == f"{exc.field}: {exc.reason}", str(exc)


# a denial message in an AdmissionReview: "<field>: <reason>", the field without line breaks
DENIAL = re.compile(r"\A[^\n:][^\n]*?: \S")


# ------------------------------------------------------------------------------------------------
# hostile text
# ------------------------------------------------------------------------------------------------
#: characters that make names and paths lie: path separators and dots, NUL and other controls, a
#: trailing newline (``$`` in a regex matches before it), right-to-left override, zero-width
#: characters, a fullwidth solidus, a non-ASCII digit, a homoglyph
NASTY = (
    "/",
    "..",
    ".",
    "\x00",
    "\n",
    "\r",
    "\t",
    " ",
    "\u202e",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\uff0f",
    "\u0663",
    "\u0430",
    "~",
    "*",
    "&",
    "!",
    "%",
    ":",
    "#",
    "'",
    '"',
    "\\",
    "{",
    "[",
)
NASTY_TEXT = st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=4)), max_size=6).map("".join)
WORDS = st.sampled_from(
    [
        "data",
        "os",
        "pgdata",
        "wal",
        "scratch",
        "rootdisk",
        "a",
        "x" * 63,
        "x" * 64,
        "Data",
        "-a",
        "a-",
        "a.b",
        "almalinux-9",
        "debian-12",
    ]
)


def _label(text: str) -> str:
    return text.strip("-") or "a"


#: DNS labels of up to 12 characters (``st.text`` and a fix-up: several times cheaper than from_regex)
LABELS = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(_label)


def name_like() -> st.SearchStrategy[str]:
    """Mostly DNS labels, often with something hostile before, after or inside."""
    return st.one_of(
        WORDS,
        LABELS,
        st.tuples(WORDS, st.sampled_from(NASTY)).map("".join),
        st.tuples(st.sampled_from(NASTY), WORDS).map("".join),
        st.tuples(WORDS, st.sampled_from(NASTY), WORDS).map("".join),
        NASTY_TEXT,
    )


# ------------------------------------------------------------------------------------------------
# plans (what the webhook signs)
# ------------------------------------------------------------------------------------------------
_BUSES, _CACHES, _IOS = (
    ("virtio", "scsi", "sata"),
    ("none", "writeback", "directsync", "writethrough"),
    ("native", "threads", "io_uring"),
)
_BASES = (
    None,
    Backing("almalinux-9", "almalinux-9.qcow2", "qcow2"),
    Backing("debian-12", "debian-12.raw", "raw"),
)


def _pick(variant: int, choices: tuple[Any, ...]) -> tuple[Any, int]:
    variant, i = divmod(variant, len(choices))
    return choices[i], variant


def planned_disk(name: str, variant: int, size: int) -> PlannedDisk:
    """A valid planned disk whose members are all decoded from one drawn integer (one draw instead
    of eight: generating inputs is most of a fuzz run's time)."""
    bus, v = _pick(variant, _BUSES)
    cache, v = _pick(v, _CACHES)
    io, v = _pick(v, _IOS)
    if io == "native" and cache not in ("none", "directsync"):
        io = "threads"
    discard, v = _pick(v, ("unmap", "ignore"))
    backing, v = _pick(v, _BASES)
    serial, v = _pick(v, (None, "S1", "disk-serial_2.x"))
    boot, v = _pick(v, (None, 1, 2, 7))
    return PlannedDisk(
        name=name,
        size_bytes=size,
        bus=bus,
        cache=cache,
        io=io,
        discard=discard,
        backing=backing,
        serial=serial,
        boot_order=boot,
    )


@st.composite
def plans(
    draw: st.DrawFn,
    *,
    namespace: str | None = None,
    vm: str | None = None,
    names: st.SearchStrategy[list[str]] | None = None,
) -> Plan:
    """Valid plans (what the webhook writes), every member exercised."""
    vols = draw(names if names is not None else st.lists(LABELS, max_size=4, unique=True))
    vols = [v for v in vols if v != "rootdisk"]
    cut = draw(st.integers(0, len(vols)))
    variants = draw(st.lists(st.integers(0, 2**20), min_size=len(vols), max_size=len(vols)))
    disks = tuple(planned_disk(n, variants[i], (variants[i] + 1) << 20) for i, n in enumerate(vols[:cut]))
    passthrough = tuple(
        Passthrough(
            name=n,
            claim=f"claim-{n}",
            mode=("disk", "lun")[variants[cut + i] % 2],
            cache=("none", "directsync")[variants[cut + i] // 2 % 2],
        )
        for i, n in enumerate(vols[cut:])
    )
    shape = draw(st.integers(0, 63))
    persist = PersistRoot("rootdisk", "quay.io/containerdisks/fedora:41", shape % 3) if shape & 4 else None
    detached = tuple(DetachedDisk(f"gone-{i}", (i + 1) << 30) for i in range(shape >> 4))
    return Plan(
        namespace=namespace or ("vms", "default", "team-a")[shape % 3],
        vm=vm or draw(LABELS),
        host_dir=f"/var/lib/diskhooks/vms/{namespace or 'vms'}/{vm or 'x'}",
        image_library="/var/lib/diskhooks/images" if any(d.backing for d in disks) else None,
        sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
        disks=disks,
        persist_root=persist,
        passthrough=passthrough,
        detached=detached,
        node=(None, "node-a", "node-b.example.com")[shape // 8 % 3],
    )


# ------------------------------------------------------------------------------------------------
# the session summary
# ------------------------------------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    if call.when != "call":
        return
    if COUNTS:
        outcome.get_result().user_properties.append((PROPERTY, dict(COUNTS)))
        COUNTS.clear()


def pytest_runtest_logreport(report: Any) -> None:
    for name, value in report.user_properties:
        if name == PROPERTY:
            REPORTED.update(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORTED:
        return
    line = ", ".join(f"{g} {REPORTED[g]}" for g in GROUPS if REPORTED[g])
    terminalreporter.write_line(f"fuzz inputs run (profile {PROFILE}): {line}")
    report = os.environ.get("DISKHOOKS_FUZZ_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as fh:
            json.dump({"profile": PROFILE, "inputs": dict(REPORTED)}, fh, indent=1, sort_keys=True)
