"""Online expansion's pure decisions and its reading of the node (``nodeagent.expand``), no daemon.

The pure parts (which disks, to what size, or why not) are checked on KubeVirt's real domain XML
(``tests/data/kubevirt/samples``); :func:`launcher_socket` and the socket checks of
:func:`expand_online` on real unix sockets and symbolic links in a temporary directory, and with the
real libvirt client library where a connection is tried. The growth of a running domain through a
real daemon is ``test_expand_libvirt.py``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskplan.errors import Malformed
from diskplan.plan import PersistRoot, Plan, PlannedDisk
from nodeagent.expand import (
    MAX_DOMAIN_XML_CHARS,
    RUNTIME_DIR_PARTS,
    DomainDisk,
    GrowResult,
    Resize,
    confirm,
    decide,
    domain_disks,
    expand_online,
    find_disk,
    grow_targets,
    launcher_socket,
)
from tests.conftest import SAMPLES

GiB = 1 << 30
POD_UID = "0f4b2c1e-8a7d-4e5f-9b3c-2d1a0e9f8c7b"


def disk(name: str, size: int) -> PlannedDisk:
    return PlannedDisk(name=name, size_bytes=size, bus="virtio", cache="none", io="native", discard="unmap")


def plan(*disks: PlannedDisk, persist: PersistRoot | None = None) -> Plan:
    return Plan(namespace="default", vm="db01", host_dir="/var/lib/diskhooks/vms/default/db01",
                image_library=None, sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
                disks=tuple(disks), persist_root=persist)


def qcow2_disk(target: str = "vdb", alias: str | None = "ua-pgdata") -> DomainDisk:
    return DomainDisk(target=target, alias=alias, source="/x.qcow2", driver_type="qcow2", device="disk")


# ------------------------------------------------------------------------------------------------
# grow_targets
# ------------------------------------------------------------------------------------------------
def test_targets_are_the_planned_disks_in_plan_order_never_the_persistent_root() -> None:
    p = plan(disk("pgdata", 20 * GiB), disk("logs", 3 * GiB),
             persist=PersistRoot(volume="rootdisk", image="quay.io/containerdisks/fedora:41", volume_index=0))
    assert list(grow_targets(p).items()) == [("pgdata", 20 * GiB), ("logs", 3 * GiB)]


def test_a_plan_with_only_a_persistent_root_has_no_targets_and_expands_nothing() -> None:
    p = plan(persist=PersistRoot(volume="rootdisk", image="quay.io/containerdisks/fedora:41", volume_index=0))
    assert grow_targets(p) == {}
    # no target: no socket is even opened (this path does not exist)
    assert expand_online(p, socket_path="/nonexistent/sock", domain_name="default_db01") == []


# ------------------------------------------------------------------------------------------------
# the domain XML
# ------------------------------------------------------------------------------------------------
def test_disks_of_kubevirts_own_domain_xml() -> None:
    xml = (SAMPLES / "02-vmi-two-hostdisks-disk.domain.xml").read_text()
    disks = domain_disks(xml)
    assert [(d.target, d.alias, d.driver_type, d.device) for d in disks] == [
        ("vda", "ua-os", "raw", "disk"), ("vdb", "ua-pgdata", "raw", "disk")]
    assert disks[1].source == "/var/run/kubevirt-private/vmi-disks/pgdata/pgdata.img"


def test_disk_found_by_alias_else_by_the_plans_launcher_path() -> None:
    p = plan(disk("pgdata", GiB), disk("logs", GiB))
    by_alias = DomainDisk("vdc", "ua-pgdata", "/elsewhere.qcow2", "qcow2", "disk")
    by_path = DomainDisk("vdd", None, "/var/run/kubevirt-private/vmi-disks/logs/logs.qcow2", "qcow2", "disk")
    decoy = DomainDisk("vde", None, "/var/run/kubevirt-private/vmi-disks/pgdata/pgdata.qcow2", "qcow2", "disk")
    disks = (decoy, by_alias, by_path)
    assert find_disk(disks, p, "pgdata") == by_alias
    assert find_disk(disks, p, "logs") == by_path
    assert find_disk(disks, p, "absent") is None
    assert find_disk((decoy,), p, "logs") is None


@pytest.mark.parametrize(("xml", "words"), [
    ('<!DOCTYPE domain [<!ENTITY x "y">]><domain><name>&x;</name></domain>', "<!DOCTYPE"),
    ('<domain><!ENTITY x SYSTEM "file:///etc/shadow"></domain>', "<!ENTITY"),
    ("<domain><devices><disk></devices></domain>", "not well-formed"),
    ("<network><name>x</name></network>", "<network>, not <domain>"),
    ("", "not well-formed"),
])
def test_unsafe_or_unreadable_domain_xml_is_refused(xml: str, words: str) -> None:
    with pytest.raises(Malformed) as exc:
        domain_disks(xml)
    assert exc.value.field == "domainXML"
    assert words in exc.value.reason


def test_oversized_domain_xml_is_refused_before_parsing() -> None:
    xml = "<domain>" + " " * MAX_DOMAIN_XML_CHARS + "</domain>"
    with pytest.raises(Malformed, match="more than the 524288 accepted"):
        domain_disks(xml)


# ------------------------------------------------------------------------------------------------
# decide / confirm
# ------------------------------------------------------------------------------------------------
def test_a_smaller_running_disk_is_grown_to_exactly_the_planned_size() -> None:
    assert decide("pgdata", 2 * GiB, qcow2_disk(), GiB) == Resize("pgdata", "vdb", GiB, 2 * GiB)


def test_an_unaligned_planned_size_is_rounded_up_to_a_sector_as_prepare_does() -> None:
    step = decide("pgdata", GiB + 1, qcow2_disk(), GiB)
    assert isinstance(step, Resize) and step.size == GiB + 512


@pytest.mark.parametrize("capacity", [2 * GiB, 3 * GiB])
def test_a_disk_at_or_above_the_planned_size_is_already_done_never_shrunk(capacity: int) -> None:
    result = decide("pgdata", 2 * GiB, qcow2_disk(), capacity)
    assert isinstance(result, GrowResult)
    assert (result.volume, result.before, result.after, result.outcome) == ("pgdata", capacity, capacity,
                                                                             "already")
    assert "never shrunk" in result.reason


def test_a_volume_the_running_domain_does_not_have_is_skipped_until_the_next_start() -> None:
    result = decide("newdisk", GiB, None, None)
    assert isinstance(result, GrowResult) and result.outcome == "skipped"
    assert "ua-newdisk" in result.reason and "next start" in result.reason


@pytest.mark.parametrize(("found", "words"), [
    (DomainDisk("vdb", "ua-pgdata", "/x", "raw", "disk"), "driver type 'raw', not 'qcow2'"),
    (DomainDisk("vdb", "ua-pgdata", "/x", None, "disk"), "driver type None"),
    (DomainDisk("sda", "ua-pgdata", "/x", "qcow2", "cdrom"), "'cdrom' device"),
])
def test_a_disk_diskhooks_does_not_grow_fails_with_the_reason(found: DomainDisk, words: str) -> None:
    result = decide("pgdata", 2 * GiB, found, GiB)
    assert isinstance(result, GrowResult) and result.outcome == "failed"
    assert words in result.reason and result.before == GiB


def test_the_capacity_read_back_confirms_the_growth_or_fails_it() -> None:
    step = Resize("pgdata", "vdb", GiB, 2 * GiB)
    assert confirm(step, 2 * GiB).outcome == "grown"
    short = confirm(step, GiB)
    assert (short.outcome, short.before, short.after) == ("failed", GiB, GiB)
    assert "not the planned 2147483648" in short.reason


# ------------------------------------------------------------------------------------------------
# launcher_socket: real sockets and links on disk
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def pods(tmp_path: Path) -> Path:
    d = tmp_path / "pods"
    d.joinpath(POD_UID, *RUNTIME_DIR_PARTS).mkdir(parents=True)
    return d


def runtime(pods: Path) -> Path:
    return pods.joinpath(POD_UID, *RUNTIME_DIR_PARTS)


@pytest.fixture
def bound() -> Iterator[list[socket.socket]]:
    """Sockets bound by relative name (the directory's path is too long for a socket address)."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def bind_in(directory: Path, name: str, made: list[socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.chdir(directory)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(name)
        made.append(s)


def test_virtqemud_socket_is_preferred_to_libvirtds(pods: Path, bound: list[socket.socket],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bind_in(runtime(pods), "libvirt-sock", bound, monkeypatch)
    assert launcher_socket(str(pods), POD_UID) == str(runtime(pods) / "libvirt-sock")
    bind_in(runtime(pods), "virtqemud-sock", bound, monkeypatch)
    assert launcher_socket(str(pods), POD_UID) == str(runtime(pods) / "virtqemud-sock")


def test_no_socket_no_pod_or_not_a_pod_uid_is_none(pods: Path, tmp_path: Path) -> None:
    assert launcher_socket(str(pods), POD_UID) is None
    assert launcher_socket(str(pods), "7d1c0b2a-0000-4000-8000-000000000000") is None
    assert launcher_socket(str(tmp_path / "no-such-dir"), POD_UID) is None
    for bad in ("..", "../pods", f"{POD_UID}/volumes", "", "-x"):
        assert launcher_socket(str(pods), bad) is None


def test_a_regular_file_or_a_link_in_place_of_the_socket_is_not_used(
        pods: Path, tmp_path: Path, bound: list[socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "host-libvirt"
    elsewhere.mkdir()
    bind_in(elsewhere, "libvirt-sock", bound, monkeypatch)  # a real socket outside the Pod
    (runtime(pods) / "virtqemud-sock").symlink_to(elsewhere / "libvirt-sock")
    (runtime(pods) / "libvirt-sock").write_text("not a socket")
    assert launcher_socket(str(pods), POD_UID) is None


def test_a_linked_runtime_directory_is_not_followed(tmp_path: Path, bound: list[socket.socket],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pods = tmp_path / "pods"
    real = tmp_path / "elsewhere"
    real.mkdir()
    bind_in(real, "virtqemud-sock", bound, monkeypatch)
    parent = pods.joinpath(POD_UID, *RUNTIME_DIR_PARTS[:-1])
    parent.mkdir(parents=True)
    (parent / RUNTIME_DIR_PARTS[-1]).symlink_to(real)
    assert launcher_socket(str(pods), POD_UID) is None


# ------------------------------------------------------------------------------------------------
# expand_online before any daemon answers: every problem is a failed result, never an exception
# ------------------------------------------------------------------------------------------------
def failed_reasons(results: list[GrowResult]) -> list[str]:
    assert [r.outcome for r in results] == ["failed", "failed"]
    assert all(r.before is None and r.after is None for r in results)
    return [r.reason for r in results]


TWO = plan(disk("pgdata", 2 * GiB), disk("logs", GiB))


def test_a_missing_socket_fails_every_volume_naming_it(pods: Path) -> None:
    path = str(runtime(pods) / "virtqemud-sock")
    reasons = failed_reasons(expand_online(TWO, socket_path=path, domain_name="default_db01"))
    assert reasons[0] == reasons[1]
    assert reasons[0].startswith(f"no libvirt socket at {path}")


def test_a_symlink_or_a_file_as_the_socket_is_refused_without_connecting(
        pods: Path, tmp_path: Path, bound: list[socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "host-libvirt"
    elsewhere.mkdir()
    bind_in(elsewhere, "libvirt-sock", bound, monkeypatch)
    bound[0].listen()
    bound[0].settimeout(0.2)
    link = runtime(pods) / "virtqemud-sock"
    link.symlink_to(elsewhere / "libvirt-sock")
    reasons = failed_reasons(expand_online(TWO, socket_path=str(link), domain_name="default_db01"))
    assert "is a symbolic link: refused" in reasons[0]
    with pytest.raises(TimeoutError):
        bound[0].accept()  # nothing connected to the socket the link points at
    plain = runtime(pods) / "libvirt-sock"
    plain.write_text("")
    assert "is not a socket: refused" in failed_reasons(
        expand_online(TWO, socket_path=str(plain), domain_name="default_db01"))[0]


def test_a_socket_nobody_listens_on_fails_with_libvirts_reason(
        pods: Path, bound: list[socket.socket], monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    bind_in(runtime(pods), "virtqemud-sock", bound, monkeypatch)  # bound, never listening
    path = str(runtime(pods) / "virtqemud-sock")
    assert len(path) > 107  # a socket address could not hold it: the connection goes through /proc
    reasons = failed_reasons(expand_online(TWO, socket_path=path, domain_name="default_db01"))
    assert reasons[0].startswith(f"cannot connect to the launcher's libvirt at {path}: ")
    assert "onnection refused" in reasons[0]
    assert os.listdir(runtime(pods)) == ["virtqemud-sock"]
    assert capfd.readouterr().err == ""  # libvirt printed nothing: its errors are results


def test_a_daemon_that_never_answers_fails_after_the_timeout_and_is_not_called_again_meanwhile(
        pods: Path, bound: list[socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt's client waits for good on a server that accepts and never answers (a launcher's
    runtime directory is the VM pod's to write: anything may listen there)."""
    bind_in(runtime(pods), "virtqemud-sock", bound, monkeypatch)
    server = bound[0]
    server.listen()
    path = str(runtime(pods) / "virtqemud-sock")
    first = failed_reasons(expand_online(TWO, socket_path=path, domain_name="default_db01", timeout=0.5))
    assert first[0].startswith(f"the launcher's libvirt at {path} did not answer within 0.5 s")
    server.settimeout(5)
    conn, _ = server.accept()  # the call connected and still waits for an answer
    second = failed_reasons(expand_online(TWO, socket_path=path, domain_name="default_db01", timeout=0.5))
    assert second[0] == (f"an earlier call to the launcher's libvirt at {path} has not been answered yet: "
                         "not connecting again until it ends")
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        server.accept()  # the second call did not connect
    conn.close()  # the server hangs up: the waiting call ends with libvirt's error
    server.close()
    for _ in range(100):
        third = failed_reasons(expand_online(TWO, socket_path=path, domain_name="default_db01", timeout=5))
        if not third[0].startswith("an earlier call"):
            break
        time.sleep(0.05)
    assert third[0].startswith(f"cannot connect to the launcher's libvirt at {path}: ")
