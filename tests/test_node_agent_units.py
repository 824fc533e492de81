"""The node agent's small parts without an API server: Event bodies, slim cache copies, the work
queue, the marker scan on a real filesystem, the metrics and the CLI's refusals."""

from __future__ import annotations

import datetime
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.homemarker import MAX_MARKER_BYTES, HomeMarker, marker_json
from nodeagent.cli import main
from nodeagent.events import event_body
from nodeagent.metrics import AgentMetrics
from nodeagent.objects import active_pods_on, slim_vm, slim_vmi
from nodeagent.scan import MarkerError, MarkerPlace, find_markers, host_path, read_marker
from nodeagent.workqueue import WorkQueue

NOW = datetime.datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=datetime.UTC)
VM = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
      "metadata": {"name": "pg01", "namespace": "vms", "uid": "u-1", "resourceVersion": "7",
                   "managedFields": [{"manager": "kubectl"}], "creationTimestamp": "2026-03-01T09:00:00Z",
                   "labels": {"app": "db", K.LABEL_NODE: "node-a"},
                   "annotations": {K.ANN_NODE: "node-a", "kubectl.kubernetes.io/last-applied": "x" * 1000}},
      "spec": {"running": True, "template": {"metadata": {"annotations": {K.ANN_PLAN: "{}", "other": "y"}},
                                             "spec": {"domain": {"devices": {"disks": [{"name": "a"}]}}}}}}


# --- Events ---------------------------------------------------------------------------------------
def test_event_body_names_the_vm_and_the_agent() -> None:
    body = event_body(VM, reason=K.EVENT_HOME_NODE_RECORDED, message="home node recorded: node-a",
                      event_type="Normal", node="node-a", now=NOW, suffix="18c2d3e4f5a6b7c8")
    assert (body["apiVersion"], body["kind"]) == ("events.k8s.io/v1", "Event")
    assert body["metadata"] == {"name": "pg01.18c2d3e4f5a6b7c8", "namespace": "vms"}
    assert body["regarding"] == {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                 "namespace": "vms", "name": "pg01", "uid": "u-1", "resourceVersion": "7"}
    assert (body["reason"], body["type"], body["note"]) == ("HomeNodeRecorded", "Normal",
                                                            "home node recorded: node-a")
    assert (body["reportingController"], body["reportingInstance"], body["action"]) == (
        "diskhooks.io/node-agent", "node-a", "RecordHomeNode")
    assert body["eventTime"] == "2026-03-01T10:00:00.123456Z"  # MicroTime: exactly six digits


def test_event_body_bounds_what_comes_from_outside() -> None:
    node = "n" * 253
    body = event_body(VM, reason="DiskExpandFailed", message="\u00e9" * 5000, event_type="Warning", node=node,
                      now=NOW.replace(microsecond=0), suffix="1")
    assert len(body["note"].encode()) <= 1024 and body["note"].endswith("...")
    assert body["reportingInstance"] == node[:128]
    assert body["eventTime"] == "2026-03-01T10:00:00.000000Z"


# --- slim copies ----------------------------------------------------------------------------------
def test_slim_vm_keeps_what_decisions_read() -> None:
    slim = slim_vm(VM)
    meta = slim["metadata"]
    assert "managedFields" not in meta
    assert meta["annotations"] == {K.ANN_NODE: "node-a"}
    assert meta["labels"] == {K.LABEL_NODE: "node-a"}
    assert (meta["uid"], meta["resourceVersion"]) == ("u-1", "7")
    assert meta["creationTimestamp"] == "2026-03-01T09:00:00Z"
    assert slim["spec"] == {"template": {"metadata": {"annotations": {K.ANN_PLAN: "{}"}}}}
    assert VM["metadata"]["managedFields"]  # type: ignore[index]  # the input is untouched


def test_slim_vmi_keeps_the_node_label_and_launcher_pods() -> None:
    vmi: dict[str, Any] = {
        "metadata": {"name": "pg01", "namespace": "vms",
                     "labels": {"kubevirt.io/nodeName": "node-a", "x": "y"},
                     "ownerReferences": [{"kind": "VirtualMachine"}]},
        "spec": {"domain": {}},
        "status": {"phase": "Running", "activePods": {"p1": "node-a", "p0": "node-b", "p2": "node-a"},
                   "conditions": [{"type": "Ready"}]}}
    slim = slim_vmi(vmi)
    assert slim["metadata"]["labels"] == {"kubevirt.io/nodeName": "node-a"}
    assert slim["metadata"]["ownerReferences"] == [{"kind": "VirtualMachine"}]
    assert "spec" not in slim and "conditions" not in slim["status"]
    assert active_pods_on(slim, "node-a") == ["p1", "p2"]
    assert active_pods_on({"status": {"activePods": "garbage"}}, "node-a") == []


# --- work queue -----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_waits_once_and_comes_back_if_added_while_worked_on() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.add("b")
    q.add("a")
    assert len(q) == 2
    assert q.get(0) == "a"
    q.add("a")  # while a worker has it
    assert q.get(0) == "b"
    assert q.get(0) is None  # "a" is not handed to a second worker
    q.done("a")
    assert q.get(0) == "a"


def test_retries_back_off_exponentially_and_forget_resets() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock, base_delay=0.5, max_delay=3.0)
    assert [q.retry("k") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert q.failures("k") == 5
    assert q.get(0) is None
    clock.now += 0.5
    assert q.get(0) == "k"
    q.done("k")
    q.forget("k")
    assert q.failures("k") == 0 and q.retry("k") == 0.5


def test_close_wakes_a_waiting_worker() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.close()
    t.join(5)
    assert got == [None] and not t.is_alive()


# --- the marker scan ------------------------------------------------------------------------------
def put_marker(root: Path, ns: str, vm: str, data: bytes | None = None) -> Path:
    d = root / ns / vm
    d.mkdir(parents=True, exist_ok=True)
    path = d / K.HOME_MARKER
    path.write_bytes(data if data is not None else marker_json(HomeMarker(
        ns, vm, "u-1", "node-a", datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC))))
    return path


def test_find_markers_enters_only_name_shaped_real_directories(tmp_path: Path) -> None:
    root = tmp_path / "vms"
    put_marker(root, "vms", "pg01")
    put_marker(root, "vms", "web.v2")
    (root / "vms" / "empty").mkdir()
    put_marker(root, "Bad_NS", "pg01", b"{}")
    put_marker(root, "vms", "-dash", b"{}")
    put_marker(tmp_path / "elsewhere", "vms", "linked")
    (root / "vms" / "linked").symlink_to(tmp_path / "elsewhere" / "vms" / "linked")
    (root / "other").symlink_to(root / "vms")
    (root / "vms" / "dirmarker" / K.HOME_MARKER).mkdir(parents=True)
    put_marker(root, "vms", "linkmarker", b"")
    (root / "vms" / "linkmarker" / K.HOME_MARKER).unlink()
    (root / "vms" / "linkmarker" / K.HOME_MARKER).symlink_to(root / "vms" / "pg01" / K.HOME_MARKER)
    assert list(find_markers(str(root))) == [MarkerPlace("vms", "pg01"), MarkerPlace("vms", "web.v2")]
    assert list(find_markers(str(tmp_path / "missing"))) == []


def test_read_marker_reads_a_good_one(tmp_path: Path) -> None:
    put_marker(tmp_path, "vms", "pg01")
    assert read_marker(str(tmp_path), MarkerPlace("vms", "pg01")).node == "node-a"


def test_read_marker_refuses_links_bad_content_and_big_files(tmp_path: Path) -> None:
    good = put_marker(tmp_path / "real", "vms", "pg01")
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "linked").symlink_to(good.parent)  # a VM directory swapped for a link
    with pytest.raises(MarkerError, match="cannot be read.*never followed"):
        read_marker(str(tmp_path), MarkerPlace("vms", "linked"))
    put_marker(tmp_path, "vms", "filelink", b"")
    (tmp_path / "vms" / "filelink" / K.HOME_MARKER).unlink()
    (tmp_path / "vms" / "filelink" / K.HOME_MARKER).symlink_to(good)
    with pytest.raises(MarkerError, match="never followed"):
        read_marker(str(tmp_path), MarkerPlace("vms", "filelink"))
    put_marker(tmp_path, "vms", "garbage", b"{\"version\": 9}")
    with pytest.raises(MarkerError, match="home.node.json.version"):
        read_marker(str(tmp_path), MarkerPlace("vms", "garbage"))
    put_marker(tmp_path, "vms", "huge", b" " * (MAX_MARKER_BYTES + 1))
    with pytest.raises(MarkerError, match="more than"):
        read_marker(str(tmp_path), MarkerPlace("vms", "huge"))
    fifo_dir = tmp_path / "vms" / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / K.HOME_MARKER)
    with pytest.raises(MarkerError, match="not a regular file"):
        read_marker(str(tmp_path), MarkerPlace("vms", "fifo"))
    with pytest.raises(MarkerError, match="gone"):
        read_marker(str(tmp_path), MarkerPlace("vms", "absent"))
    with pytest.raises(MarkerError, match="not a namespace/VM name"):
        read_marker(str(tmp_path), MarkerPlace("..", "pg01"))


@pytest.mark.parametrize(("prefix", "expected"), [
    ("", "/var/lib/x"), ("/", "/var/lib/x"), ("/host", "/host/var/lib/x"), ("/host/", "/host/var/lib/x")])
def test_host_path(prefix: str, expected: str) -> None:
    assert host_path(prefix, "/var/lib/x") == expected


# --- metrics --------------------------------------------------------------------------------------
def test_every_figure_carries_the_node() -> None:
    m = AgentMetrics("node-a")
    m.set_vmis(3)
    m.decision("vmi", "record")
    m.recorded("marker")
    m.expansion("grown")
    m.reconciled("vm", 0.02, failed=True)
    m.watch_restart("vmis", "gone")
    text = m.exposition().decode()
    for sample in ('diskhooks_node_vmis{node="node-a"} 3.0',
                   'diskhooks_node_home_decisions_total{node="node-a",outcome="record",source="vmi"} 1.0',
                   'diskhooks_node_homes_recorded_total{node="node-a",source="marker"} 1.0',
                   'diskhooks_node_expansions_total{node="node-a",outcome="grown"} 1.0',
                   'diskhooks_node_reconcile_errors_total{kind="vm",node="node-a"} 1.0',
                   'diskhooks_node_reconcile_seconds_bucket{kind="vm",le="0.025",node="node-a"} 1.0',
                   'diskhooks_node_watch_restarts_total{node="node-a",reason="gone",resource="vmis"} 1.0'):
        assert sample in text, sample
    assert AgentMetrics("node-b").exposition().count(b"node-a") == 0  # a registry per agent


# --- the CLI's refusals ---------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text("sidecar:\n  image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "current").write_bytes(b"0123456789abcdef0123")
    return {"policy": str(policy), "keys": str(keys), "tmp": str(tmp_path)}


@pytest.mark.parametrize(("args", "words"), [
    (["--node-name", "Node_A"], "not a node name"),
    (["--node-name", "node-a", "--metrics-port", "70000"], "not a port number"),
    (["--node-name", "node-a", "--host-prefix", "relative/dir"], "must be an absolute path"),
    (["--node-name", "node-a", "--kubelet-pods-dir", "pods"], "must be an absolute path"),
])
def test_bad_arguments_exit_2_naming_the_flag(args: list[str], words: str, files: dict[str, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", files["policy"], "--plan-keys-dir", files["keys"], *args])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(("which", "content", "words"), [
    ("policy", None, "policy"),
    ("policy", "hostDisks:\n  onlineExpand: maybe\n", "hostDisks.onlineExpand"),
    ("keys", None, "plan key"),
])
def test_unusable_files_exit_2_with_the_reason(
        which: str, content: str | None, words: str, files: dict[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    target = Path(files[which])
    if which == "keys":
        (target / "current").unlink()
    elif content is None:
        target.unlink()
    else:
        target.write_text(content)
    assert main(["serve", "--config", files["policy"], "--plan-keys-dir", files["keys"],
                 "--node-name", "node-a", "--kubeconfig", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diskhooks-node: ") and words in err


def test_no_credentials_exit_1(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", files["policy"], "--plan-keys-dir", files["keys"],
                 "--node-name", "node-a", "--kubeconfig", files["tmp"] + "/missing-kubeconfig"]) == 1
    assert "cannot build a Kubernetes client" in capsys.readouterr().err


def test_a_taken_metrics_port_exits_1(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = Path(files["tmp"]) / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\ncurrent-context: c\n"
                          "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                          "users: [{name: u, user: {token: t}}]\n"
                          "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--config", files["policy"], "--plan-keys-dir", files["keys"], "--node-name",
                     "node-a", "--kubeconfig", str(kubeconfig), "--metrics-port", str(port)]) == 1
    assert f"cannot serve /metrics on port {port}" in capsys.readouterr().err


def test_an_event_name_cut_from_a_long_object_name_stays_a_valid_name() -> None:
    import re

    from nodeagent.events import event_name

    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    subdomain = re.compile(rf"{label}(\.{label})*")  # the API server's IsDNS1123Subdomain
    for name in ("a" * 199 + "-b" * 20, "a" * 199 + ".b" * 20, "a" * 198 + "-.b" * 10, "pg01"):
        got = event_name(name, "home-0123456789abcdef0123")
        assert subdomain.fullmatch(got) and len(got) <= 253, got
    assert event_name("pg01", "x") == "pg01.x"
