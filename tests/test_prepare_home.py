"""prepare and the home node (``hooksidecar/prepare/home.py``): the real command, real files, real
``qemu-img``.

A plan that names a home node is refused on any other node (or an unknown one) before anything
is looked at or made; the home marker ``home.node.json`` is written in the VM directory before
the first image, left alone when it names this node and this VMI (rewritten for a new VMI),
replaced when it cannot be read, and a marker naming another node stops a VM without a home. Every run is ``python -m hooksidecar.prepare`` as a
subprocess with ``--path-prefix`` (the layout of ``tests/test_prepare.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from diskplan import keys as K
from diskplan.homemarker import HomeMarker, marker_json, parse_marker
from diskplan.plan import Plan, sign_plan
from hooksidecar.prepare.actions import CreateImage, KeepHomeMarker, Refuse, WriteHomeMarker
from hooksidecar.prepare.decide import plan_actions
from hooksidecar.prepare.observe import inspect
from tests.conftest import ROOT
from tests.test_prepare import HOST_DIR, KEYS, VMI_UID, MiB, Node, make_disk, make_plan, qinfo, snapshot

MARKER = f"{K.LAUNCHER_VM_DIR}/{K.HOME_MARKER}"
NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)


def run(node: Node, plan: Plan, *, env_node: str | None = None, node_name: str | None = None,
        uid: str | None = VMI_UID, from_env: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "TMPDIR": "/nonexistent-tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    text = sign_plan(plan, KEYS)
    if uid is not None:
        env[K.ENV_VMI_UID] = uid
    if env_node is not None:
        env[K.ENV_NODE_NAME] = env_node
    if from_env:
        env[K.ENV_PLAN] = text
        source = ["--plan-from-env"]
    else:
        plan_file = node.root.parent / "plan.json"
        plan_file.write_text(text)
        source = ["--plan", str(plan_file)]
    extra = [] if node_name is None else ["--node-name", node_name]
    return subprocess.run([sys.executable, "-m", "hooksidecar.prepare", *source, "--path-prefix",
                           str(node.root), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def lines(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    assert proc.returncode == 0, proc.stderr
    return {d["volume"]: d for d in map(json.loads, proc.stdout.splitlines())}


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = Node(tmp_path / "node")
    n.mount_volume("data")
    n.vm_dir()
    return n


def plan_with(node_name: str | None = None) -> Plan:
    return replace(make_plan(make_disk("data", 16 * MiB)), node=node_name)


def marker_file(node: Node) -> Path:
    return node.path(MARKER)


def write_marker(node: Node, node_name: str, *, vm: str = "fedora-data") -> bytes:
    data = marker_json(HomeMarker(namespace="vms", vm=vm, vmi_uid="older-vmi", node=node_name,
                                  written_at=NOW))
    marker_file(node).write_bytes(data)
    return data


# ------------------------------------------------------------------------------------------------
# the wrong node
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_node, shown", [("node-b", "this launcher runs on node node-b"),
                                             (None, f"an unknown node (${K.ENV_NODE_NAME} is not set)")])
def test_a_plan_homed_elsewhere_is_refused_before_anything_is_made(node: Node, env_node: str | None,
                                                                   shown: str) -> None:
    before = snapshot(node.root)
    proc = run(node, plan_with("node-a"), env_node=env_node)
    assert proc.returncode == 1
    assert "live on node node-a, its home node" in proc.stderr and shown in proc.stderr
    assert "nothing was created or changed" in proc.stderr
    assert "kubectl diskhooks migrate" in proc.stderr
    assert proc.stdout == ""
    assert snapshot(node.root) == before  # no image, no marker, nothing touched
    assert not list(node.root.rglob("*.qcow2")) and not marker_file(node).exists()


def test_the_home_node_prepares_and_writes_the_marker_first(node: Node) -> None:
    proc = run(node, plan_with("node-a"), env_node="node-a")
    out = lines(proc)
    assert out["data"]["result"] == "created"
    assert out[K.HOME_MARKER] == {"volume": K.HOME_MARKER, "result": "written", "path": MARKER,
                                  "node": "node-a"}
    assert list(out) == [K.HOME_MARKER, "data"]  # the marker's line (and action) comes first
    marker = parse_marker(marker_file(node).read_bytes())
    assert (marker.namespace, marker.vm, marker.vmi_uid, marker.node) == ("vms", "fedora-data", VMI_UID,
                                                                          "node-a")
    age = datetime.datetime.now(datetime.UTC) - marker.written_at
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=2)
    image = node.path(make_disk("data", 1).launcher_path)
    assert marker_file(node).stat().st_mtime_ns <= image.stat().st_mtime_ns
    st = marker_file(node).stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert qinfo(image)["virtual-size"] == 16 * MiB


def test_the_marker_action_comes_before_every_image() -> None:
    plan = plan_with()
    observed = inspect(plan, prefix="/nonexistent-prefix")  # nothing mounted: read as missing
    observed = replace(observed, home=replace(observed.home, kind="missing"),
                       disks={"data": replace(observed.disks["data"], dir_mounted=True)})
    actions = plan_actions(plan, observed, vmi_uid=VMI_UID, node="node-a", now=NOW)
    assert isinstance(actions[0], WriteHomeMarker) and isinstance(actions[1], CreateImage)
    assert parse_marker(actions[0].data).written_at == NOW


def test_node_name_stands_in_for_the_environment(node: Node) -> None:
    out = lines(run(node, plan_with("node-a"), node_name="node-a", from_env=False))
    assert out[K.HOME_MARKER]["result"] == "written"
    refused = run(node, plan_with("node-a"), node_name="node-b", env_node="node-a", from_env=False)
    assert refused.returncode == 1 and "node node-b" in refused.stderr


@pytest.mark.parametrize("value", ["Node_B", "", "a..b"])
def test_a_bad_node_name_exits_2(node: Node, value: str) -> None:
    proc = run(node, plan_with(), node_name=value)
    assert proc.returncode == 2, proc.stderr
    assert "--node-name" in proc.stderr
    if value:  # an empty variable reads as unset
        from_env = run(node, plan_with(), env_node=value)
        assert from_env.returncode == 2 and K.ENV_NODE_NAME in from_env.stderr
    assert not list(node.root.rglob("*.qcow2"))


def test_the_marker_needs_the_vmi_uid(node: Node) -> None:
    proc = run(node, plan_with(), env_node="node-a", uid=None)
    assert proc.returncode == 2 and K.ENV_VMI_UID in proc.stderr and "home marker" in proc.stderr
    assert not list(node.root.rglob("*.qcow2"))


# ------------------------------------------------------------------------------------------------
# the marker
# ------------------------------------------------------------------------------------------------
def test_without_a_node_nothing_changes(node: Node) -> None:
    out = lines(run(node, plan_with()))
    assert list(out) == ["data"] and not marker_file(node).exists()


@pytest.mark.parametrize("home", [None, "node-a"], ids=["no-home-yet", "homed"])
def test_each_start_refreshes_the_marker_once(node: Node, home: str | None) -> None:
    """A marker of another VMI (an older start, a deleted VM of the same name, or the source's start
    in a marker a cold migration brought here) is rewritten for this VMI, homed or not: the agent
    takes a VMI as started here only when the marker names it (and, before a home, never mistakes a
    fresh marker for an orphan); the same VMI's restart leaves it as it is."""
    write_marker(node, "node-a")
    out = lines(run(node, plan_with(home), env_node="node-a"))
    assert out[K.HOME_MARKER]["result"] == "written" and "warning" not in out[K.HOME_MARKER]
    fresh = marker_file(node).read_bytes()
    assert parse_marker(fresh).vmi_uid == VMI_UID and parse_marker(fresh).written_at > NOW
    before = marker_file(node).stat().st_mtime_ns
    again = lines(run(node, plan_with(home), env_node="node-a"))  # the init container restarted
    assert again[K.HOME_MARKER]["result"] == "unchanged" and again["data"]["result"] == "unchanged"
    assert marker_file(node).read_bytes() == fresh and marker_file(node).stat().st_mtime_ns == before


def test_images_made_before_markers_get_one(node: Node) -> None:
    lines(run(node, plan_with()))  # an older start: no node known, no marker
    assert not marker_file(node).exists()
    image = node.path(make_disk("data", 1).launcher_path)
    before = snapshot(image.parent)
    out = lines(run(node, plan_with(), env_node="node-a"))
    assert out["data"]["result"] == "unchanged" and out[K.HOME_MARKER]["result"] == "written"
    assert snapshot(image.parent) == before


def test_a_marker_naming_another_node_stops_a_vm_without_a_home(node: Node) -> None:
    data = write_marker(node, "node-b")
    proc = run(node, plan_with(), env_node="node-a")
    assert proc.returncode == 1
    assert f"{HOST_DIR}/{K.HOME_MARKER} says the images of VM vms/fedora-data were made on node node-b" \
        in proc.stderr
    assert "this is node node-a and the VM has no home node yet" in proc.stderr
    assert not list(node.root.rglob("*.qcow2")) and marker_file(node).read_bytes() == data


def test_a_marker_naming_another_node_is_replaced_on_the_plans_home(node: Node) -> None:
    write_marker(node, "node-b")
    out = lines(run(node, plan_with("node-a"), env_node="node-a"))
    assert out[K.HOME_MARKER]["result"] == "written"
    assert "named node node-b; this VM's home node is now node-a" in str(out[K.HOME_MARKER]["warning"])
    assert parse_marker(marker_file(node).read_bytes()).node == "node-a"


@pytest.mark.parametrize("content, detail", [
    (b"not json", "is not a home marker"),
    (b'{"version": 9}', "is not a home marker"),
])
def test_an_unreadable_marker_is_replaced(node: Node, content: bytes, detail: str) -> None:
    marker_file(node).write_bytes(content)
    out = lines(run(node, plan_with(), env_node="node-a"))
    assert out[K.HOME_MARKER]["result"] == "written" and detail in str(out[K.HOME_MARKER]["warning"])
    assert parse_marker(marker_file(node).read_bytes()).node == "node-a"


def test_a_marker_of_another_vm_is_replaced(node: Node) -> None:
    write_marker(node, "node-a", vm="someone-else")
    out = lines(run(node, plan_with(), env_node="node-a"))
    assert "named VM vms/someone-else" in str(out[K.HOME_MARKER]["warning"])
    assert parse_marker(marker_file(node).read_bytes()).vm == "fedora-data"


def test_a_link_in_place_of_the_marker_is_refused_not_followed(node: Node, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    marker_file(node).symlink_to(target)
    proc = run(node, plan_with(), env_node="node-a")
    assert proc.returncode == 1 and "is a symbolic link; remove it on the node" in proc.stderr
    assert target.read_text() == "{}" and not list(node.root.rglob("*.qcow2"))


def test_an_unmounted_vm_directory_is_refused_when_the_node_is_known(tmp_path: Path) -> None:
    bare = Node(tmp_path / "bare")
    bare.mount_volume("data")
    proc = run(bare, plan_with(), env_node="node-a")
    assert proc.returncode == 1 and f"the VM directory {K.LAUNCHER_VM_DIR} is not mounted" in proc.stderr
    assert not list(bare.root.rglob("*.qcow2"))


def test_pure_decisions_for_each_marker_state() -> None:
    plan = plan_with()
    observed = inspect(plan, prefix="/nonexistent-prefix")
    ok = HomeMarker(namespace="vms", vm="fedora-data", vmi_uid="u", node="node-a", written_at=NOW)
    home = replace(observed.home, kind="ok", marker=ok)
    acts = plan_actions(plan, replace(observed, home=home), vmi_uid="u", node="node-a", now=NOW)
    assert isinstance(acts[0], KeepHomeMarker)
    acts = plan_actions(plan, replace(observed, home=home), vmi_uid="u", node="node-b", now=NOW)
    assert isinstance(acts[0], Refuse) and acts[0].volume == K.HOME_MARKER
    unknown = plan_actions(plan_with("node-a"), observed, vmi_uid="u", node=None)[0]
    assert isinstance(unknown, Refuse) and "an unknown node" in unknown.reason
    assert plan_actions(plan, observed, vmi_uid="u", node=None) == \
        plan_actions(plan, observed, vmi_uid="u")  # no node: no marker, as before
    with pytest.raises(ValueError):
        plan_actions(plan, replace(observed, home=home), vmi_uid="u", node="node-a")
