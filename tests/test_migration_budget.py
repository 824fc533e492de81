"""A cold migration's target checks its capacity budget at preflight, not only its free space
(docs/CAPACITY.md, docs/MIGRATION.md): the decision (pure), the footprint on the wire and in the
staging record, and end to end with two agents, the real API server and a small tmpfs target.
"""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest

from diskplan import capacity as C
from diskplan import keys as K
from diskplan.capacitypolicy import CapacityPolicy
from diskplan.errors import Malformed
from diskplan.migration import FileEntry, WireRequest, parse_request, request_json
from tests.migration_support import (
    Agents,
    GiB,
    MiB,
    NodeFiles,
    Setup,
    file_hashes,
    make_base,
    make_vm_dir,
    policy_with_capacity,
    run_command,
    tmpfs_wrap,
    wait_for,
)
from tests.node_agent_support import AgentProcess

NS, VM = "vms", "pg01"
POLICY = CapacityPolicy(overcommit=Fraction(2))


def _account(*dirs: C.DirFacts, filesystem: int = 10 * GiB) -> C.NodeAccount:
    return C.account_node(dirs, filesystem_bytes=filesystem, free_bytes=filesystem, capacity=POLICY)


def _check(account: C.NodeAccount, images: dict[str, int], *plans: dict[str, int]) -> C.IncomingVerdict:
    return C.check_incoming(C.IncomingCheck(node="node-b", namespace=NS, vm=VM,
                                            images=images, plans=plans, account=account, capacity=POLICY))


# ------------------------------------------------------------------------------------------------
# the decision (pure)
# ------------------------------------------------------------------------------------------------
def test_the_footprint_must_fit_what_the_budget_has_left_not_the_free_space() -> None:
    """Budget 20 GiB (overcommit 2 x 10 GiB); a stopped VM at home promises 12 GiB (its plan, its
    image still small), a kept copy counts 3 GiB: 5 GiB left, whatever the free space says."""
    other = C.DirFacts(NS, "db", images={"data.qcow2": C.ImageFile(1 * GiB, 1 * MiB)},
                       plans=({"data.qcow2": 12 * GiB},), state=C.STOPPED)
    kept = C.DirFacts(NS, ".kept/web.0123456789abcdef", images={"data.qcow2": C.ImageFile(3 * GiB)},
                      state=C.UNHOMED)
    account = _account(other, kept)
    assert account.room_bytes == 5 * GiB

    # per image the larger of the header's size and the plan's; an image only the plan names counts
    # too, and one no plan names (a persistent root) counts its header's
    verdict = _check(account, {"data.qcow2": 4 * GiB, "persist-root.rootdisk.qcow2": 1 * GiB},
                     {"data.qcow2": 5 * GiB, "logs.qcow2": GiB // 2})
    assert verdict.needed_bytes == 5 * GiB + GiB // 2 + 1 * GiB
    assert verdict.available_bytes == 5 * GiB and verdict.others_bytes == 15 * GiB
    assert verdict.refusal is not None
    for words in ("node node-b", f"VM {NS}/{VM}", f"needs {verdict.needed_bytes} bytes", "(6.50 GiB",
                  f"and {5 * GiB} (5.00 GiB) are left of {20 * GiB}", "no room in its capacity budget",
                  "overcommit 2 x 10.00 GiB", f"{15 * GiB} counted already"):
        assert words in verdict.refusal, (words, verdict.refusal)

    # exactly the room: fits; a header larger than the plan is what counts
    assert _check(account, {"data.qcow2": 4 * GiB, "persist-root.rootdisk.qcow2": 1 * GiB},
                  {"data.qcow2": 2 * GiB}).refusal is None
    assert _check(account, {"data.qcow2": 5 * GiB + 1}, {"data.qcow2": 2 * GiB}).refusal is not None


def test_the_vms_own_earlier_copy_here_is_not_counted_against_it() -> None:
    """An earlier attempt's staging copy (with the footprint its preflight recorded) and a committed
    copy taken back are this VM's: its footprint replaces them. Another VM's staging copy counts."""
    mine = C.DirFacts(NS, f".incoming/{VM}", images={"data.qcow2": C.ImageFile(GiB)},
                      plans=({"data.qcow2": 8 * GiB},), state=C.UNHOMED)
    committed = C.DirFacts(NS, VM, images={"data.qcow2": C.ImageFile(8 * GiB)}, state=C.UNHOMED)
    theirs = C.DirFacts(NS, ".incoming/web", plans=({"disk.qcow2": 14 * GiB},), state=C.UNHOMED)
    assert _check(_account(mine, committed), {"data.qcow2": 8 * GiB}).refusal is None
    verdict = _check(_account(mine, committed, theirs), {"data.qcow2": 8 * GiB})
    assert verdict.others_bytes == 14 * GiB and verdict.available_bytes == 6 * GiB
    assert verdict.refusal is not None
    # a node already over its budget: nothing left, said as 0
    over = _check(_account(theirs, filesystem=5 * GiB), {"data.qcow2": 1})
    assert over.available_bytes == -4 * GiB and over.refusal is not None and "and 0 (0 bytes) are left" in over.refusal


def test_the_preflight_request_carries_each_images_virtual_size() -> None:
    files = (FileEntry("data.qcow2", 200 * MiB, 64 * MiB, virtual=GiB), FileEntry("home.node.json", 300, 4096))
    wire = WireRequest(op="preflight", id="0123456789abcdef", namespace=NS, vm=VM,
                       vm_uid="0d5c0000-1111-2222-3333-444455556666", source="node-a", target="node-b", files=files)
    assert parse_request(request_json(wire)).files == files
    doc = json.loads(request_json(wire))
    assert doc["files"][0]["virtual"] == GiB and "virtual" not in doc["files"][1]
    doc["files"][0]["virtual"] = -1
    with pytest.raises(Malformed) as bad:
        parse_request(json.dumps(doc).encode())
    assert bad.value.field == "request.files[0].virtual"
    doc["files"][0]["virtual"] = True
    with pytest.raises(Malformed):
        parse_request(json.dumps(doc).encode())


def test_a_staging_copy_counts_what_its_preflight_accepted_from_the_start(tmp_path: Path) -> None:
    """The capacity pass counts an incoming copy at least at the footprint its record holds, so a
    second preflight (and the scheduler) sees the whole VM before its bytes arrive."""
    from nodeagent.capacity import migration_copies

    root = tmp_path / "vms"
    incoming = root / ".diskhooks" / "migrate" / "incoming" / NS
    (incoming / VM).mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(incoming / VM / "data.qcow2"), str(GiB)],
                   check=True)
    (incoming / f"{VM}.json").write_text(json.dumps({"state": "receiving", "images": {
        "data.qcow2": 2 * GiB, "logs.qcow2": 256 * MiB}}))
    (incoming / "web").mkdir()  # no record: what has arrived only
    (incoming / "web.json").write_text(json.dumps({"images": {"disk.qcow2": "many"}}))
    facts = {f.vm: f for f in migration_copies(str(root))}
    assert C.account_dir(facts[f".incoming/{VM}"]).planned_bytes == 2 * GiB + 256 * MiB
    assert C.account_dir(facts[".incoming/web"]).planned_bytes == 0


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
FOOTPRINT = GiB + 256 * MiB + 128 * MiB  # data (plan and header), logs (plan), persistent root (header)


def _homed_on_a_b_on_tmpfs(s: Setup, agents: Agents, tmp_path: Path, vm: str, capacity: str,
                           ) -> tuple[str, str, NodeFiles, NodeFiles, dict[str, str], AgentProcess, AgentProcess]:
    """Two agents: ``vm`` made and homed on a; b's root a 640 MiB tmpfs, ``hostDisks.capacity``
    ``capacity`` (flow YAML), listening. (a, b, their files, the VM's hashes on a, the agents.)"""
    a, b = sorted(s.nodes)
    fa, fb = NodeFiles(tmp_path / "node-a"), NodeFiles(tmp_path / "node-b")
    make_base(fa.library)
    make_base(fb.library)
    s.create_vm(vm)
    make_vm_dir(fa, s.namespace, vm, node_name=a)
    before = file_hashes(fa.vm_dir(s.namespace, vm))
    agent_a = agents.start(a, fa)
    agent_b = agents.start(b, fb, wrap=tmpfs_wrap(fb.root, 640),
                           policy=policy_with_capacity(s, "policy-b.yaml", capacity))
    wait_for("the home", lambda: s.annotations(vm).get(K.ANN_NODE) == a, 60, agent_a)
    wait_for("b's listener", lambda: agent_b.records("migrate.listening"), 30, agent_b)
    return a, b, fa, fb, before, agent_a, agent_b


def test_a_target_with_free_space_but_no_budget_left_refuses_before_any_byte_moves(
        migration_setup: Setup, agents: Agents, tmp_path: Path) -> None:
    """Node b: a 640 MiB tmpfs, overcommit 4 (budget 2.5 GiB), 1.5 GiB of it promised to a thin
    image of another VM that takes almost no space. The VM (a 1.375 GiB footprint, ~60 MiB on disk)
    fits the free space, not the budget: refused at preflight, nothing copied, still homed on a.
    With that image gone, the same command moves it."""
    s = migration_setup
    a, b, fa, fb, before, agent_a, agent_b = _homed_on_a_b_on_tmpfs(s, agents, tmp_path, "pg09",
                                                                    "{overcommit: 4}")
    seen_by_b = Path(f"/proc/{agent_b.proc.pid}/root{fb.root}")  # the tmpfs, in b's mount namespace
    other = seen_by_b / s.namespace / "other" / "data.qcow2"
    other.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), str(3 * GiB // 2)], check=True)

    done = run_command(s, "migrate", f"{s.namespace}/pg09", "--to", b, "--no-progress")
    logs = done.stderr + agent_a.stderr_text()[-4000:] + agent_b.stderr_text()[-4000:]
    assert done.returncode == 1, logs
    checked = agent_b.records("migrate.target.budget")[-1]
    assert checked["neededBytes"] == FOOTPRINT and checked["othersBytes"] == 3 * GiB // 2, checked
    available = checked["budgetBytes"] - 3 * GiB // 2
    assert checked["availableBytes"] == available and 0 < available < FOOTPRINT, checked
    status = s.status("pg09")
    assert status is not None and status["phase"] == "Failed" and status["bytes"] == 0, status
    for words in (f"node {b} has no room in its capacity budget", f"needs {FOOTPRINT} bytes",
                  f"and {available} (", "nothing was copied"):
        assert words in status["error"] and words in done.stderr, (words, status["error"])
    assert "bytes free" not in status["error"]  # the free space was enough
    assert s.annotations("pg09")[K.ANN_NODE] == a
    assert file_hashes(fa.vm_dir(s.namespace, "pg09")) == before
    assert not (seen_by_b / s.namespace / "pg09").exists()
    assert not Path(f"/proc/{agent_b.proc.pid}/root{fb.staging(s.namespace, 'pg09')}").exists()
    assert not agent_b.records("migrate.target.rsync")  # no byte moved

    other.unlink()  # the promise is gone: the budget has room
    again = run_command(s, "migrate", f"{s.namespace}/pg09", "--to", b, "--no-progress")
    assert again.returncode == 0, again.stderr + agent_a.stderr_text()[-4000:] + agent_b.stderr_text()[-4000:]
    assert s.annotations("pg09")[K.ANN_NODE] == b
    checked = agent_b.records("migrate.target.budget")[-1]
    assert checked["neededBytes"] == FOOTPRINT and checked["availableBytes"] == checked["budgetBytes"]
    moved = seen_by_b / s.namespace / "pg09"
    assert {k: v for k, v in file_hashes(moved).items() if k != K.HOME_MARKER} == \
        {k: v for k, v in before.items() if k != K.HOME_MARKER}


def test_a_copy_that_would_eat_into_the_reserve_is_refused_before_any_byte_moves(
        migration_setup: Setup, agents: Agents, tmp_path: Path) -> None:
    """Node b: a 640 MiB tmpfs keeping 600 MiB free (``reserve: 600Mi``; the budget, overcommit 4, has
    room). The VM's ~60 MiB (and the 64 MiB margin) fit the free space but not above the reserve:
    refused at preflight naming the reserve, nothing copied, still homed on a, as prepare refuses
    an image that would leave less than the reserve."""
    s = migration_setup
    a, b, fa, fb, before, agent_a, agent_b = _homed_on_a_b_on_tmpfs(s, agents, tmp_path, "pg08",
                                                                    "{overcommit: 4, reserve: 600Mi}")

    done = run_command(s, "migrate", f"{s.namespace}/pg08", "--to", b, "--no-progress")
    logs = done.stderr + agent_a.stderr_text()[-4000:] + agent_b.stderr_text()[-4000:]
    assert done.returncode == 1, logs
    status = s.status("pg08")
    assert status is not None and status["phase"] == "Failed" and status["bytes"] == 0, status
    for words in (f"node {b} has ", f"keeps {600 * MiB} free (hostDisks.capacity.reserve)", "nothing was copied"):
        assert words in status["error"] and words in done.stderr, (words, status["error"])
    assert "capacity budget" not in status["error"]  # the budget had room: the reserve refused it
    assert s.annotations("pg08")[K.ANN_NODE] == a
    assert file_hashes(fa.vm_dir(s.namespace, "pg08")) == before
    seen_by_b = Path(f"/proc/{agent_b.proc.pid}/root{fb.root}")
    assert not (seen_by_b / s.namespace / "pg08").exists()
    assert not agent_b.records("migrate.target.rsync")  # no byte moved
