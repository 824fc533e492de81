"""Plan-key rotation across replicas (diskplan/plankeys.py, webhook/reload.py).

Real key directories on disk, laid out as the kubelet mounts the chart's Secret (``..data``
symlink swapped on update); time is passed in, never read from the clock.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diskplan.errors import Refused
from diskplan.plan import Plan, PlanKeys, key_id, sign_plan, verify_plan
from diskplan.plankeys import PlanKeyRing, parse_not_before
from webhook.reload import SourceError, load_plan_key_ring, load_plan_keys, watch_plan_keys

OLD = b"old-plan-key-0123456789abcdef0123"
NEW = b"new-plan-key-0123456789abcdef0123"
ROTATED_AT = 1_800_000_000
NOT_BEFORE = ROTATED_AT + 300
PLAN = Plan(namespace="vms", vm="pg01", host_dir="/var/lib/diskhooks/vms/vms/pg01", image_library=None,
            sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0")


class SecretDir:
    """A Secret volume as the kubelet writes it: files are symlinks into ``..data``, which is
    swapped atomically to a new timestamped directory on every update."""

    def __init__(self, path: Path, files: dict[str, bytes]) -> None:
        self.path = path
        path.mkdir()
        self._version = 0
        self.update(files)

    def update(self, files: dict[str, bytes]) -> None:
        self._version += 1
        stamp = self.path / f"..2026_{self._version}"
        stamp.mkdir()
        for name, data in files.items():
            (stamp / name).write_bytes(data)
        tmp = self.path / "..data_tmp"
        os.symlink(stamp.name, tmp)
        os.replace(tmp, self.path / "..data")
        for name in files:
            if not (self.path / name).is_symlink():
                os.symlink(f"..data/{name}", self.path / name)


def signer(keys: PlanKeys) -> bytes:
    return keys.current


# ------------------------------------------------------------------------------------------------
# the pure core
# ------------------------------------------------------------------------------------------------
def test_before_not_before_the_previous_key_signs_and_both_verify() -> None:
    ring = PlanKeyRing(current=NEW, previous=OLD, current_not_before=NOT_BEFORE)
    before, at, after = (ring.keys_at(t) for t in (NOT_BEFORE - 1, NOT_BEFORE, NOT_BEFORE + 3600))
    assert signer(before) == OLD and not ring.signs_with_current(NOT_BEFORE - 1)
    assert signer(at) == NEW and signer(after) == NEW
    for keys in (before, at):
        assert keys.lookup(key_id(OLD)) == OLD and keys.lookup(key_id(NEW)) == NEW


@pytest.mark.parametrize("ring", [
    PlanKeyRing(current=NEW),                                          # first install
    PlanKeyRing(current=NEW, previous=OLD),                            # a Secret made by hand
    PlanKeyRing(current=NEW, current_not_before=NOT_BEFORE),           # previous dropped
    PlanKeyRing(current=NEW, previous=NEW, current_not_before=NOT_BEFORE),  # nothing to wait for
], ids=["current-only", "no-not-before", "no-previous", "previous-is-current"])
def test_without_a_previous_key_to_wait_with_current_signs_at_once(ring: PlanKeyRing) -> None:
    assert signer(ring.keys_at(NOT_BEFORE - 1)) == NEW
    assert ring.signs_with_current(0)


def test_short_keys_are_refused_also_as_previous() -> None:
    """A short previous key would become the signing key during the delay: refused at load."""
    with pytest.raises(ValueError, match="previous key must be at least 16 bytes"):
        PlanKeyRing(current=NEW, previous=b"short", current_not_before=NOT_BEFORE)
    with pytest.raises(ValueError, match="current key"):
        PlanKeyRing(current=b"short")


@pytest.mark.parametrize("text, expected", [(b"1800000300\n", 1800000300), (b"  \n", None), (b"", None)])
def test_not_before_parses(text: bytes, expected: int | None) -> None:
    assert parse_not_before(text) == expected


@pytest.mark.parametrize("text", [b"-5", b"1.5", b"soon", b"9" * 13, b"0x10"])
def test_not_before_must_be_unix_seconds(text: bytes) -> None:
    with pytest.raises(ValueError, match="unix time"):
        parse_not_before(text)


# ------------------------------------------------------------------------------------------------
# key files on disk
# ------------------------------------------------------------------------------------------------
def test_rotation_between_two_replicas_whose_mounts_update_at_different_times(tmp_path: Path) -> None:
    """Replica A sees the rotated Secret at once, replica B a while later (the kubelet syncs each
    pod on its own). Whatever A signs during that time, B verifies: A keeps signing with the old
    key until current-not-before, and by then B accepts the new one as well."""
    before = {"current": OLD + b"\n"}
    rotated = {"current": NEW, "previous": OLD, "current-not-before": str(NOT_BEFORE).encode()}
    now = [float(ROTATED_AT)]
    a_dir, b_dir = SecretDir(tmp_path / "a", before), SecretDir(tmp_path / "b", before)
    a = watch_plan_keys(a_dir.path, interval=0, clock=lambda: now[0])
    b = watch_plan_keys(b_dir.path, interval=0, clock=lambda: now[0])
    assert signer(a.get()) == OLD and a.signing() == "current"

    a_dir.update(rotated)  # A's kubelet syncs first
    for t in (ROTATED_AT + 1, ROTATED_AT + 119):
        now[0] = t
        plan_from_a = sign_plan(PLAN, a.get())
        assert a.signing() == "previous"
        verify_plan(plan_from_a, b.get(), namespace="vms", vm="pg01")  # B has only the old key
        verify_plan(sign_plan(PLAN, b.get()), a.get(), namespace="vms", vm="pg01")

    now[0] = ROTATED_AT + 120
    b_dir.update(rotated)  # B's kubelet syncs two minutes later
    assert signer(b.get()) == OLD
    # no file changes at current-not-before: the time alone switches the signer, on both
    now[0] = NOT_BEFORE
    assert signer(a.get()) == NEW and signer(b.get()) == NEW
    assert a.signing() == "current" and a.generation == 2
    for signer_keys, verifier in ((a.get(), b), (b.get(), a)):
        verify_plan(sign_plan(PLAN, signer_keys), verifier.get(), namespace="vms", vm="pg01")
    # plans signed before the switch still verify everywhere
    verify_plan(plan_from_a, b.get(), namespace="vms", vm="pg01")


def test_why_the_delay_matters(tmp_path: Path) -> None:
    """Without current-not-before (what the chart did before), the replica that syncs first signs
    with the new key at once and the replica that has not synced refuses its plans."""
    a_dir = SecretDir(tmp_path / "a", {"current": NEW, "previous": OLD})
    stale = load_plan_keys(SecretDir(tmp_path / "b", {"current": OLD}).path, now=ROTATED_AT)
    plan = sign_plan(PLAN, load_plan_keys(a_dir.path, now=ROTATED_AT))
    with pytest.raises(Refused, match="does not verify"):
        verify_plan(plan, stale, namespace="vms", vm="pg01")


def test_key_directory_files(tmp_path: Path) -> None:
    d = SecretDir(tmp_path / "keys", {"current": b" " + NEW + b"\n", "previous": OLD + b"\n",
                                      "current-not-before": f"{NOT_BEFORE}\n".encode()})
    assert load_plan_key_ring(d.path) == PlanKeyRing(current=NEW, previous=OLD,
                                                     current_not_before=NOT_BEFORE)
    assert signer(load_plan_keys(d.path, now=NOT_BEFORE - 1)) == OLD
    assert signer(load_plan_keys(d.path, now=NOT_BEFORE)) == NEW

    d.update({"current": NEW, "previous": OLD, "current-not-before": b"tomorrow"})
    with pytest.raises(SourceError, match="current-not-before.*unix time"):
        load_plan_key_ring(d.path)
    d.update({"current": NEW, "previous": b"tiny", "current-not-before": b"1"})
    with pytest.raises(SourceError, match="previous key must be at least 16 bytes"):
        load_plan_key_ring(d.path)


def test_a_broken_update_keeps_the_last_good_keys_and_their_timing(tmp_path: Path) -> None:
    d = SecretDir(tmp_path / "keys", {"current": NEW, "previous": OLD,
                                      "current-not-before": str(NOT_BEFORE).encode()})
    now = [float(NOT_BEFORE - 10)]
    keys = watch_plan_keys(d.path, interval=0, clock=lambda: now[0])
    failures: list[str] = []
    keys.on_failure = failures.append
    assert signer(keys.get()) == OLD
    d.update({"current": NEW, "previous": OLD, "current-not-before": b"garbage"})
    assert signer(keys.get()) == OLD and not keys.ready and len(failures) == 1
    assert "current-not-before" in (keys.error or "")
    now[0] = NOT_BEFORE
    assert signer(keys.get()) == NEW  # the last good version's time still applies
