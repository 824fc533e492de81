"""The capacity accounting (``diskplan/capacity.py``): every case of docs/CAPACITY.md, table by table.

Pure functions only: what a directory counts, what a launcher Pod requests, what the node
advertises, prepare's verdict, and the summary file's format. The cases are those the issue lists:
images of running VMs, of stopped VMs still on the node, a VM starting on its home node, detached
disks, persistent roots, a VM whose images already exist at full size, images kept larger than
planned, and orphans; then overcommit and the reserve.
"""

from __future__ import annotations

import datetime
import json
import random
from dataclasses import replace
from fractions import Fraction

import pytest

from diskplan import capacity as C
from diskplan.errors import Malformed
from diskplan.plan import DetachedDisk, PersistRoot, Plan, PlannedDisk
from diskplan.policy import CapacityPolicy

GiB = C.GIB
FS = 100 * GiB
ONE = CapacityPolicy()  # overcommit 1, reserve 5%
NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)


def disk(name: str, gib: float) -> PlannedDisk:
    return PlannedDisk(name=name, size_bytes=int(gib * GiB), bus="virtio", cache="none", io="native",
                       discard="unmap")


def plan(*disks: PlannedDisk, node: str | None = None, persist: bool = False,
         detached: tuple[DetachedDisk, ...] = ()) -> Plan:
    return Plan(namespace="vms", vm="pg", host_dir="/var/lib/diskhooks/vms/vms/pg", image_library=None,
                sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0", disks=disks,
                persist_root=PersistRoot("root", "quay.io/containerdisks/fedora:41", 0) if persist else None,
                detached=detached, node=node)


def images(**gib: float) -> dict[str, C.ImageFile]:
    """``data=10`` -> {"data.qcow2": 10 GiB virtual, 1 MiB allocated}."""
    return {f"{k.replace('_', '.')}.qcow2": C.ImageFile(int(v * GiB), 1 << 20) for k, v in gib.items()}


def node(*dirs: C.DirFacts, fs: int = FS, free: int = FS, capacity: CapacityPolicy = ONE) -> C.NodeAccount:
    return C.account_node(dirs, filesystem_bytes=fs, free_bytes=free, capacity=capacity)


# ------------------------------------------------------------------------------------------------
# what a plan promises and what its launcher Pod requests
# ------------------------------------------------------------------------------------------------
def test_planned_images_are_the_attached_disks_rounded_to_sectors() -> None:
    p = plan(disk("data", 10), PlannedDisk("odd", 1000, "virtio", "none", "native", "unmap"), persist=True,
             detached=(DetachedDisk("old", 5 * GiB),))
    assert C.planned_images(p) == {"data.qcow2": 10 * GiB, "odd.qcow2": 1024}


@pytest.mark.parametrize(("p", "gib"), [
    (plan(disk("data", 10)), 10),  # a first start: everything it plans may be new
    (plan(disk("a", 10), disk("b", 0.5)), 11),  # rounded up to whole GiB
    (plan(disk("a", 0.001)), 1),
    (plan(disk("data", 10), node="node-a"), 0),  # homed: counted by the home node's agent
    (plan(disk("data", 10), persist=True), 10),  # a persistent root's size is not in the plan
    (plan(disk("data", 10), detached=(DetachedDisk("old", 50 * GiB),)), 10),  # detached: kept, not made
    (plan(persist=True), 0),
])
def test_launcher_request(p: Plan, gib: int) -> None:
    assert C.launcher_request_gib(p) == gib


# ------------------------------------------------------------------------------------------------
# the cases of the issue
# ------------------------------------------------------------------------------------------------
def test_a_running_vm_started_here_is_counted_once_pod_hold_or_images() -> None:
    """A first start: the Pod holds 20 GiB (the scheduler subtracts it); the images it made count
    20 GiB; the directory counts max of the two, not their sum."""
    p = plan(disk("data", 20))
    before_prepare = C.DirFacts("vms", "pg", images={}, plans=(C.planned_images(p),),
                                hold_gib=C.launcher_request_gib(p), state=C.RUNNING)
    after_prepare = replace(before_prepare, images=images(data=20))
    for facts in (before_prepare, after_prepare):
        account = node(facts)
        assert account.counted_bytes == 20 * GiB
        assert account.held_gib == 20
        # the node advertises the hold plus the room: the scheduler, subtracting the Pod's 20, sees
        # exactly the 80 GiB left of a 100 GiB budget
        assert account.advertised_gib - account.held_gib == 80
    assert node(replace(before_prepare, plans=())).counted_bytes == 20 * GiB  # the hold alone


def test_a_running_vm_at_home_is_counted_by_its_images() -> None:
    p = plan(disk("data", 20), node="node-a")
    facts = C.DirFacts("vms", "pg", images=images(data=20), plans=(C.planned_images(p),),
                       hold_gib=C.launcher_request_gib(p), state=C.RUNNING)
    account = node(facts)
    assert (account.counted_bytes, account.held_gib, account.advertised_gib) == (20 * GiB, 0, 80)


def test_a_stopped_vms_images_keep_their_space() -> None:
    stopped = C.DirFacts("vms", "pg", images=images(data=30), plans=(C.planned_images(plan(disk("data", 30))),),
                         state=C.STOPPED)
    account = node(stopped)
    assert account.advertised_gib == 70
    assert account.by_state()[C.STOPPED] == 30 * GiB


def test_a_vm_starting_on_its_home_node_adds_nothing() -> None:
    """Its Pod requests 0, its directory counts the same stopped or running: no double count, so a
    node full with this VM's own images still starts it."""
    p = plan(disk("data", 95), node="node-a")
    at_home = C.DirFacts("vms", "pg", images=images(data=95), plans=(C.planned_images(p),), state=C.STOPPED)
    stopped = node(at_home)
    running = node(replace(at_home, hold_gib=C.launcher_request_gib(p), state=C.RUNNING))
    assert C.launcher_request_gib(p) == 0
    assert stopped.counted_bytes == running.counted_bytes == 95 * GiB
    assert stopped.advertised_gib == running.advertised_gib == 5
    # prepare at that start: nothing to create or grow, never refused (even on a full node)
    verdict = C.check_start(_start(p, own={"data.qcow2": 95 * GiB}, others=40 * GiB, free=0))
    assert verdict.refusal is None and verdict.figures["result"] == "nothing-new"


def test_a_stopped_vm_at_home_keeps_the_space_of_a_grown_plan() -> None:
    """An UPDATE grew the disk and added one while the VM was stopped: the home node counts the plan's
    sizes from then on, so the room is kept for the next start (whose Pod requests 0)."""
    grown = plan(disk("data", 30), disk("logs", 5), node="node-a")
    facts = C.DirFacts("vms", "pg", images=images(data=20), plans=(C.planned_images(grown),), state=C.STOPPED)
    d = C.account_dir(facts)
    assert (d.planned_bytes, d.missing) == (35 * GiB, 1)


def test_detached_disks_count_by_their_files() -> None:
    p = plan(disk("data", 10), detached=(DetachedDisk("old", 40 * GiB),))
    facts = C.DirFacts("vms", "pg", images=images(data=10, old=40), plans=(C.planned_images(p),),
                       state=C.STOPPED)
    assert C.account_dir(facts).planned_bytes == 50 * GiB


def test_persistent_roots_count_by_their_files() -> None:
    facts = C.DirFacts("vms", "pg", images=images(data=10, **{"persist-root_root": 8}),
                       plans=(C.planned_images(plan(disk("data", 10), persist=True)),), state=C.RUNNING)
    assert set(facts.images) == {"data.qcow2", "persist-root.root.qcow2"}
    assert C.account_dir(facts).planned_bytes == 18 * GiB


def test_images_at_full_size_add_nothing() -> None:
    p = plan(disk("data", 10), disk("logs", 2))
    on_disk = images(data=10, logs=2)
    assert C.footprint({n: i.virtual_bytes for n, i in on_disk.items()}) == \
        C.footprint({n: i.virtual_bytes for n, i in on_disk.items()}, [C.planned_images(p)]) == 12 * GiB
    verdict = C.check_start(_start(p, own={"data.qcow2": 10 * GiB, "logs.qcow2": 2 * GiB}, others=200 * GiB,
                                   free=0))
    assert verdict.refusal is None  # the node is far over its budget: a start that needs nothing goes


def test_images_kept_larger_than_planned_count_the_larger() -> None:
    p = plan(disk("data", 10))
    facts = C.DirFacts("vms", "pg", images=images(data=25), plans=(C.planned_images(p),), state=C.STOPPED)
    d = C.account_dir(facts)
    assert (d.planned_bytes, d.larger) == (25 * GiB, ("data.qcow2",))
    # growing an image already larger than needed is no growth: never refused
    assert C.check_start(_start(p, own={"data.qcow2": 25 * GiB}, others=99 * GiB)).refusal is None


def test_orphans_are_counted_and_listed() -> None:
    orphan = C.DirFacts("vms", "gone", images=images(data=40), state=C.ORPHAN)
    live = C.DirFacts("vms", "pg", images=images(data=10), state=C.STOPPED)
    account = node(orphan, live)
    assert [(d.namespace, d.vm) for d in account.orphans] == [("vms", "gone")]
    assert account.counted_bytes == 50 * GiB and account.advertised_gib == 50
    assert account.by_state() == {C.RUNNING: 0, C.STOPPED: 10 * GiB, C.UNHOMED: 0, C.ORPHAN: 40 * GiB,
                                  C.UNKNOWN: 0}


@pytest.mark.parametrize(("running", "homed", "exists", "state"), [
    (True, True, True, C.RUNNING), (True, False, None, C.RUNNING), (False, True, True, C.STOPPED),
    (False, False, True, C.UNHOMED), (False, False, False, C.ORPHAN), (False, False, None, C.UNKNOWN),
])
def test_dir_state(running: bool, homed: bool, exists: bool | None, state: str) -> None:
    assert C.dir_state(running=running, homed_here=homed, vm_exists=exists) == state


# ------------------------------------------------------------------------------------------------
# overcommit and the reserve
# ------------------------------------------------------------------------------------------------
def test_overcommit_applies_to_virtual_sizes() -> None:
    thin = C.DirFacts("vms", "pg", images={"data.qcow2": C.ImageFile(120 * GiB, 1 * GiB)}, state=C.STOPPED)
    assert node(thin).advertised_gib == 0  # 120 GiB promised on a 100 GiB filesystem: no room
    assert node(thin).room_bytes == -20 * GiB
    one_and_half = CapacityPolicy(overcommit=Fraction(3, 2))
    assert node(thin, capacity=one_and_half).advertised_gib == 30


def test_below_the_reserve_there_is_no_room_but_the_holds_stay() -> None:
    held = C.DirFacts("vms", "new", plans=({"data.qcow2": 10 * GiB},), hold_gib=10, state=C.RUNNING)
    assert node(held, free=6 * GiB).advertised_gib == 10 + 90  # 5 GiB reserve, 6 GiB free: room
    full = node(held, free=4 * GiB)
    assert full.full and full.advertised_gib == 10  # the bound Pod's own request, and no more
    bytes_reserve = CapacityPolicy(reserve_percent=None, reserve_bytes=50 * GiB)
    assert node(held, free=40 * GiB, capacity=bytes_reserve).advertised_gib == 10


def test_advertised_never_drops_below_what_live_pods_hold() -> None:
    over = C.DirFacts("vms", "big", images=images(data=150), state=C.ORPHAN)
    held = C.DirFacts("vms", "new", plans=({"data.qcow2": 10 * GiB},), hold_gib=10, state=C.RUNNING)
    account = node(over, held)
    assert account.room_bytes < 0 and account.advertised_gib == 10


def test_room_is_whole_gib_rounded_down() -> None:
    facts = C.DirFacts("vms", "pg", images={"data.qcow2": C.ImageFile(GiB // 2)}, state=C.STOPPED)
    assert node(facts).advertised_gib == 99


def test_the_scheduler_and_the_guard_never_overfill_a_node() -> None:
    """Placement as kube-scheduler does it with the advertised figure (a Pod fits when its request is
    at most the advertised GiB minus the requests of the Pods bound here), then prepare's guard,
    then the agent's next count: across random starts, stops and restarts at home the planned
    total never passes the budget, and the room the scheduler sees is the account's room."""
    rng = random.Random(7)
    for _ in range(40):
        dirs: dict[str, C.DirFacts] = {}
        for step in range(30):
            account = node(*dirs.values())
            bound = sum(d.hold_gib for d in dirs.values())
            assert account.advertised_gib - bound == account.room_gib
            name = f"vm{rng.randrange(12)}"
            current = dirs.get(name)
            if current is None:  # a first start somewhere: this node if the scheduler lets it
                p = replace(plan(disk("data", rng.choice((1, 5, 20, 40)))), vm=name)
                request = C.launcher_request_gib(p)
                if request > account.advertised_gib - bound:
                    continue
                start = C.check_start(_start(p, own={}, others=account.counted_bytes,
                                             free=FS, changes=(C.Change("data.qcow2", None,
                                                                        p.disks[0].size_bytes),)))
                assert start.refusal is None  # what the scheduler placed, prepare lets through
                dirs[name] = C.DirFacts("vms", name, images=images(data=p.disks[0].size_bytes / GiB),
                                        plans=(C.planned_images(p),), hold_gib=request, state=C.RUNNING)
            elif current.state == C.RUNNING:  # stops (and gets its home): the hold goes
                dirs[name] = replace(current, hold_gib=0, state=C.STOPPED)
            else:  # starts again at home: requests 0, adds nothing
                dirs[name] = replace(current, state=C.RUNNING)
            after = node(*dirs.values())
            assert after.planned_bytes <= after.counted_bytes <= after.budget_bytes, step
        assert dirs, "no VM was ever placed: the test proves nothing"


# ------------------------------------------------------------------------------------------------
# prepare's verdict
# ------------------------------------------------------------------------------------------------
def _start(p: Plan, *, own: dict[str, int], others: int | None, free: int = FS,
           changes: tuple[C.Change, ...] = (), capacity: CapacityPolicy = ONE) -> C.StartCheck:
    return C.StartCheck(node="node-a", root="/var/lib/diskhooks/vms", namespace=p.namespace, vm=p.vm,
                        filesystem_bytes=FS, free_bytes=free, capacity=capacity, others_bytes=others,
                        own_images=own, planned=C.planned_images(p), changes=changes)


def test_a_start_that_fits() -> None:
    p = plan(disk("data", 20))
    v = C.check_start(_start(p, own={}, others=70 * GiB, changes=(C.Change("data.qcow2", None, 20 * GiB),)))
    assert v.refusal is None
    assert (v.figures["result"], v.figures["plannedBytes"], v.figures["thisVMNewBytes"]) == \
        ("fits", 90 * GiB, 20 * GiB)


def test_a_start_over_the_budget_is_refused_naming_node_figures_and_share() -> None:
    p = plan(disk("data", 20), disk("logs", 5))
    v = C.check_start(_start(p, own={"data.qcow2": 10 * GiB, "old.qcow2": 3 * GiB}, others=70 * GiB,
                             changes=(C.Change("data.qcow2", 10 * GiB, 20 * GiB),
                                      C.Change("logs.qcow2", None, 5 * GiB))))
    assert v.refusal is None and v.figures["plannedBytes"] == 98 * GiB  # 70 + 20 + 5 + 3: fits
    v = C.check_start(_start(p, own={"data.qcow2": 10 * GiB, "old.qcow2": 3 * GiB}, others=80 * GiB,
                             changes=(C.Change("data.qcow2", 10 * GiB, 20 * GiB),
                                      C.Change("logs.qcow2", None, 5 * GiB))))
    assert v.refusal is not None and v.figures["result"] == "refused"
    assert "node node-a has no room for the images of VM vms/pg" in v.refusal
    assert "growing data.qcow2 from 10.00 GiB to 20.00 GiB, creating logs.qcow2 (5.00 GiB)" in v.refusal
    assert "the planned virtual size of the images under /var/lib/diskhooks/vms would be 108.00 GiB, above " \
        "this node's budget of 100.00 GiB (overcommit 1 x filesystem 100.00 GiB)" in v.refusal
    assert "This VM's share would be 28.00 GiB (15.00 GiB new); the other VMs' images count 80.00 GiB" \
        in v.refusal
    assert "Nothing was created or changed" in v.refusal


def test_a_start_below_the_reserve_is_refused() -> None:
    p = plan(disk("data", 1))
    v = C.check_start(_start(p, own={}, others=0, free=5 * GiB,
                             changes=(C.Change("data.qcow2", None, GiB),)))
    assert v.refusal is not None
    assert "has 5.00 GiB free, and the reserve keeps 5.00 GiB (5%) free" in v.refusal  # 1 MiB metadata
    assert C.check_start(_start(p, own={}, others=0, free=5 * GiB + C.METADATA_ESTIMATE,
                                changes=(C.Change("data.qcow2", None, GiB),))).refusal is None


def test_without_a_summary_only_the_vms_own_images_count() -> None:
    p = plan(disk("data", 120))
    v = C.check_start(_start(p, own={}, others=None, changes=(C.Change("data.qcow2", None, 120 * GiB),)))
    assert v.refusal is not None and "the node agent's capacity summary is missing" in v.refusal
    assert v.figures["otherVMsBytes"] is None


# ------------------------------------------------------------------------------------------------
# the summary file
# ------------------------------------------------------------------------------------------------
def test_summary_round_trip_and_others() -> None:
    account = node(C.DirFacts("vms", "pg", images=images(data=10), state=C.STOPPED),
                   C.DirFacts("vms", "new", plans=({"data.qcow2": 3 * GiB},), hold_gib=5, state=C.RUNNING))
    summary = C.summary_of(account, node="node-a", now=NOW)
    back = C.parse_summary(C.summary_json(summary))
    assert back == summary
    assert back.counted_bytes == 15 * GiB
    assert back.others("vms", "pg") == 5 * GiB and back.others("vms", "new") == 10 * GiB
    assert back.others("vms", "unknown") == 15 * GiB
    text = C.summary_json(summary).decode()
    assert "pg" not in text and "vms" not in text  # the file names no VM
    assert C.dir_key("vms", "pg") != C.dir_key("vm", "spg")


def _doc(**members: object) -> bytes:
    doc: dict[str, object] = {"version": 1, "node": "node-a", "writtenAt": "2026-03-01T12:00:00Z",
                              "countedBytes": 10, "dirs": {"0" * 32: 10}}
    doc.update(members)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize(("data", "where"), [
    (_doc(extra=1), "summary.json.extra"),
    (_doc(version=2), "summary.json.version"),
    (_doc(version=True), "summary.json.version"),
    (_doc(node="Node A"), "summary.json.node"),
    (_doc(writtenAt="yesterday"), "summary.json.writtenAt"),
    (_doc(countedBytes=-1), "summary.json.countedBytes"),
    (_doc(countedBytes=1.5), "summary.json.countedBytes"),
    (_doc(countedBytes=5), "summary.json.countedBytes"),  # less than its directories
    (_doc(dirs={"vms/pg": 1}), "summary.json.dirs"),
    (_doc(dirs=[]), "summary.json.dirs"),
    (_doc(dirs={"0" * 32: "10"}), "summary.json.dirs." + "0" * 32),
    (b"[]", "summary.json"),
    (b"\xff", "summary.json"),
    (b" " * (C.MAX_SUMMARY_BYTES + 1), "summary.json"),
])
def test_summary_refuses_what_it_does_not_expect(data: bytes, where: str) -> None:
    with pytest.raises(Malformed) as exc:
        C.parse_summary(data)
    assert exc.value.field == where
