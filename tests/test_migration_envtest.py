"""Cold migration end to end: two node agents on this machine, the real kube-apiserver and webhook,
real rsync over mutual TLS, the user's ``kubectl diskhooks migrate`` (see tests/migration_support.py
for what stands in for what: KubeVirt's controllers and the launcher do not run here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.homemarker import parse_marker
from diskplan.migration import FileEntry, WireRequest, request_json
from nodeagent.migrate.connector import exchange, open_channel
from nodeagent.migrate.tlsfiles import TlsFiles
from tests.migration_support import (
    Agents,
    MiB,
    NodeFiles,
    Setup,
    allocated,
    compare_images,
    file_hashes,
    make_base,
    make_vm_dir,
    policy_with_capacity,
    qio,
    run_command,
    sha256_file,
    start_command,
    tmpfs_wrap,
    wait_for,
)
from webhook.vm.home import REQUIRED, home_expression


def two_nodes(setup: Setup, tmp_path: Path) -> tuple[str, NodeFiles, str, NodeFiles]:
    a, b = sorted(setup.nodes)
    fa, fb = NodeFiles(tmp_path / "node-a"), NodeFiles(tmp_path / "node-b")
    make_base(fa.library)
    make_base(fb.library)  # the same base, copied to both nodes' libraries
    return a, fa, b, fb


def homed_vm(setup: Setup, agents: Agents, name: str, a: str, fa: NodeFiles, **kw: int) -> None:
    """A VM made through the webhook, its directory on node a, and agent a recording its home."""
    setup.create_vm(name)
    make_vm_dir(fa, setup.namespace, name, node_name=a, **kw)


def test_a_stopped_vm_moves_with_its_disks_to_another_node(migration_setup: Setup, agents: Agents,
                                                          tmp_path: Path) -> None:
    s = migration_setup
    a, fa, b, fb = two_nodes(s, tmp_path)
    homed_vm(s, agents, "pg01", a, fa)
    source = fa.vm_dir(s.namespace, "pg01")
    data = source / "data.qcow2"
    qio(data, f"discard 0 {12 * MiB}", f"discard {256 * MiB} {12 * MiB}")  # a guest's discards: holes
    assert allocated(source) < 0.75 * sum(f.stat().st_size for f in source.iterdir())  # mostly holes
    before = {f.name: sha256_file(f) for f in source.iterdir()}
    source_allocated = allocated(source)
    total = sum(f.stat().st_size for f in source.iterdir())
    agent_a = agents.start(a, fa)
    agent_b = agents.start(b, fb)
    wait_for("the home recorded from the marker", lambda: s.annotations("pg01").get(K.ANN_NODE) == a, 60,
             agent_a)

    done = run_command(s, "migrate", f"{s.namespace}/pg01", "--to", b, "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr + agent_a.stderr_text()[-6000:] \
        + agent_b.stderr_text()[-4000:]
    assert f"moved to node {b}" in done.stderr
    assert "100%" in done.stderr and "ETA" in done.stderr  # the progress lines, one per phase seen

    vm = s.vm("pg01")
    ann = vm["metadata"]["annotations"]
    assert ann[K.ANN_NODE] == b and vm["metadata"]["labels"][K.LABEL_NODE] == b
    assert "diskhooks.io/migrate-to" not in ann
    status = json.loads(ann["diskhooks.io/migration-status"])
    assert status["phase"] == "Succeeded" and status["source"] == a and status["target"] == b
    assert status["bytes"] == status["total"] == total
    terms = vm["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [home_expression(b)]}]  # the webhook re-pinned it
    reasons = s.events("pg01")
    assert "MigrationStarted" in reasons and "MigrationSucceeded" in reasons

    target = fb.vm_dir(s.namespace, "pg01")
    assert sorted(f.name for f in target.iterdir()) == sorted(before)
    for name, digest in before.items():
        if name != K.HOME_MARKER:
            assert sha256_file(target / name) == digest, name
    kept_dir = next(p for p in fa.kept(s.namespace).glob("pg01.*") if p.is_dir())
    for image in ("data.qcow2", "logs.qcow2", "persist-root.rootdisk.qcow2"):
        compare_images(kept_dir / image, fa.library, target / image, fb.library)
    marker = parse_marker((target / K.HOME_MARKER).read_bytes())
    assert marker.node == b and marker.vm == "pg01"
    target_allocated = allocated(target)
    assert abs(target_allocated - source_allocated) <= 0.1 * source_allocated, \
        (source_allocated, target_allocated)  # holes stayed holes
    copied = agent_a.records("migrate.copied")[-1]
    assert copied["sent"] < 1.1 * source_allocated  # zeros of the holes did not cross (compressed)
    assert not source.exists()  # renamed aside, kept
    assert status["sourceKept"].endswith(kept_dir.name)
    assert not fb.staging(s.namespace, "pg01").exists()


# ------------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------------
def copying(s: Setup, name: str) -> bool:
    status = s.status(name)
    return status is not None and status["phase"] == "Copying" and status["bytes"] > 0


def assert_still_at_home(s: Setup, name: str, a: str, fa: NodeFiles, fb: NodeFiles,
                         before: dict[str, str]) -> None:
    """Bound to node a, its images there untouched, nothing in place on node b."""
    assert s.annotations(name)[K.ANN_NODE] == a
    assert file_hashes(fa.vm_dir(s.namespace, name)) == before
    assert not fb.vm_dir(s.namespace, name).exists()


@pytest.mark.parametrize("victim", ["source", "target"])
def test_an_agent_killed_mid_transfer_leaves_the_vm_at_home_and_the_move_resumes(
        migration_setup: Setup, agents: Agents, tmp_path: Path, victim: str) -> None:
    s = migration_setup
    a, fa, b, fb = two_nodes(s, tmp_path)
    homed_vm(s, agents, "pg02", a, fa, data_mib=160)
    source = fa.vm_dir(s.namespace, "pg02")
    before = file_hashes(source)
    slow = ("--migration-bandwidth", "12")  # ~15 s for the images: time to kill it mid-way
    agent_a = agents.start(a, fa, extra=slow)
    agent_b = agents.start(b, fb)
    wait_for("the home", lambda: s.annotations("pg02").get(K.ANN_NODE) == a, 60, agent_a)
    command = start_command(s, "migrate", f"{s.namespace}/pg02", "--to", b, "--no-progress")
    try:
        wait_for("the copy under way", lambda: copying(s, "pg02"), 60, agent_a, agent_b)
        staged = fb.staging(s.namespace, "pg02")
        wait_for("bytes on the target", lambda: staged.exists() and allocated(staged) > 20 * MiB, 60,
                 agent_a, agent_b)
        agents.kill(agent_a if victim == "source" else agent_b)
        assert_still_at_home(s, "pg02", a, fa, fb, before)
        assert "diskhooks.io/migrate-to" in s.annotations("pg02")  # the request stands
        time.sleep(3)  # the survivor notices (the source retries, the target's rsync ends)
        assert_still_at_home(s, "pg02", a, fa, fb, before)
        partial = allocated(staged)
        assert partial > 20 * MiB  # the partial copy stays: the next attempt starts from it
        if victim == "source":
            agent_a = agents.start(a, fa, extra=slow)
        else:
            agent_b = agents.start(b, fb)
        _, err = command.communicate(timeout=240)
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
    assert command.returncode == 0, err + agent_a.stderr_text()[-5000:] + agent_b.stderr_text()[-5000:]
    target = fb.vm_dir(s.namespace, "pg02")
    assert s.annotations("pg02")[K.ANN_NODE] == b
    kept_dir = next(p for p in fa.kept(s.namespace).glob("pg02.*") if p.is_dir())
    assert file_hashes(kept_dir) == before
    after = file_hashes(target)
    assert {k: v for k, v in after.items() if k != K.HOME_MARKER} == \
        {k: v for k, v in before.items() if k != K.HOME_MARKER}
    status = s.status("pg02")
    assert status is not None and status["phase"] == "Succeeded"
    if victim == "source":
        assert status["attempt"] >= 2  # the restarted agent ran the same migration again
    else:
        assert "MigrationRetrying" in s.events("pg02")


def test_a_vm_directory_of_too_many_files_fails_clearly_and_stays(migration_setup: Setup, agents: Agents,
                                                                    tmp_path: Path) -> None:
    """More files than a request may list (diskplan.migration.MAX_FILES): the source cannot describe
    the directory to the target. The migration ends Failed saying so (not a crashed thread leaving
    the status in Preflight), nothing is moved, the VM stays bound to node a."""
    from diskplan.migration import MAX_FILES

    s = migration_setup
    a, fa, b, fb = two_nodes(s, tmp_path)
    homed_vm(s, agents, "pg21", a, fa)
    for i in range(MAX_FILES):
        (fa.vm_dir(s.namespace, "pg21") / f"note-{i}.txt").write_text(f"{i}\n")
    before = file_hashes(fa.vm_dir(s.namespace, "pg21"))
    agent_a = agents.start(a, fa)
    agents.start(b, fb)
    wait_for("the home", lambda: s.annotations("pg21").get(K.ANN_NODE) == a, 60, agent_a)
    done = run_command(s, "migrate", f"{s.namespace}/pg21", "--to", b, "--no-progress")
    assert done.returncode == 1, done.stderr + agent_a.stderr_text()[-4000:]
    status = s.status("pg21")
    assert status is not None and status["phase"] == "Failed", status
    assert "request.files" in status["error"] and f"at most {MAX_FILES}" in status["error"], status
    assert "nothing was moved" in status["error"] and "nothing was moved" in done.stderr
    assert not agent_a.records("migrate.crashed")
    assert_still_at_home(s, "pg21", a, fa, fb, before)


def test_a_target_too_small_refuses_before_any_byte_moves(migration_setup: Setup, agents: Agents,
                                                          tmp_path: Path) -> None:
    s = migration_setup
    a, fa, b, fb = two_nodes(s, tmp_path)
    homed_vm(s, agents, "pg03", a, fa, data_mib=160)
    before = file_hashes(fa.vm_dir(s.namespace, "pg03"))
    agent_a = agents.start(a, fa)
    agent_b = agents.start(b, fb, wrap=tmpfs_wrap(fb.root, 96))
    wait_for("the home", lambda: s.annotations("pg03").get(K.ANN_NODE) == a, 60, agent_a)
    done = run_command(s, "migrate", f"{s.namespace}/pg03", "--to", b, "--no-progress")
    assert done.returncode == 1, done.stderr + agent_a.stderr_text()[-4000:] + agent_b.stderr_text()[-4000:]
    assert "failed" in done.stderr and "bytes free" in done.stderr and "nothing was copied" in done.stderr
    status = s.status("pg03")
    assert status is not None and status["phase"] == "Failed" and status["bytes"] == 0
    assert_still_at_home(s, "pg03", a, fa, fb, before)
    ann = s.annotations("pg03")
    assert "diskhooks.io/migrate-to" not in ann  # the request is over: the VM may start again
    assert not fb.staging(s.namespace, "pg03").exists()
    assert "MigrationFailed" in s.events("pg03")
    started = s.alice_patch("pg03", {"spec": {"runStrategy": "Always"}})  # the webhook admits a start
    assert started["spec"]["runStrategy"] == "Always"


def test_a_withdrawn_request_stops_the_copy_and_drops_the_targets_copy(migration_setup: Setup, agents: Agents,
                                                                       tmp_path: Path) -> None:
    s = migration_setup
    a, fa, b, fb = two_nodes(s, tmp_path)
    homed_vm(s, agents, "pg04", a, fa, data_mib=160)
    before = file_hashes(fa.vm_dir(s.namespace, "pg04"))
    agent_a = agents.start(a, fa, extra=("--migration-bandwidth", "12"))
    agent_b = agents.start(b, fb)
    wait_for("the home", lambda: s.annotations("pg04").get(K.ANN_NODE) == a, 60, agent_a)
    command = start_command(s, "migrate", f"{s.namespace}/pg04", "--to", b, "--no-progress")
    try:
        wait_for("the copy under way", lambda: copying(s, "pg04"), 60, agent_a, agent_b)
        with pytest.raises(Exception) as refused:  # while asked, the webhook refuses a start
            s.alice_patch("pg04", {"spec": {"runStrategy": "Always"}})
        assert "cannot start until the migration ends" in str(getattr(refused.value, "body", refused.value))
        cancel = run_command(s, "migrate", "--cancel", f"{s.namespace}/pg04")
        assert cancel.returncode == 0, cancel.stderr + agent_a.stderr_text()[-4000:]
        assert "cancelled" in cancel.stderr.lower()
        _, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
    assert command.returncode == 1 and "cancelled" in err
    assert_still_at_home(s, "pg04", a, fa, fb, before)
    assert s.status("pg04")["phase"] == "Cancelled"  # type: ignore[index]
    wait_for("the target's copy dropped", lambda: not fb.staging(s.namespace, "pg04").exists(), 30, agent_b)
    assert "MigrationCancelled" in s.events("pg04")
    assert s.alice_patch("pg04", {"spec": {"runStrategy": "Always"}})["spec"]["runStrategy"] == "Always"


def test_a_peer_with_a_valid_certificate_gets_only_what_the_cluster_asked_for(
        migration_setup: Setup, agents: Agents, tmp_path: Path) -> None:
    """The target checks every request against the VM in the API server and runs only its own
    rsync --server command line: a certificate alone moves nothing anywhere."""
    s = migration_setup
    a, _, b, fb = two_nodes(s, tmp_path)
    s.create_vm("pg05")
    uid = s.vm("pg05")["metadata"]["uid"]
    s.agent_patch("pg05", {"metadata": {"annotations": {K.ANN_NODE: a}}})
    agent_b = agents.start(b, fb)
    wait_for("the listener", lambda: agent_b.records("migrate.listening"), 30, agent_b)
    tls = TlsFiles(str(s.tls_dir))

    def ask(op: str, *, source: str = a, args: tuple[str, ...] = ()) -> dict[str, Any]:
        channel = open_channel(s.nodes[b], s.port, tls)
        try:
            wire = WireRequest(op=op, id="00112233445566778899", namespace=s.namespace, vm="pg05", vm_uid=uid,
                               source=source, target=b, rsync_args=args,
                               files=(FileEntry("data.qcow2", 1 << 20, 1 << 20),))
            reply, _ = exchange(channel, request_json(wire), timeout=30)
            return reply
        finally:
            channel.sock.close()

    refused = ask("preflight")
    assert refused["ok"] is False and "does not ask to move" in refused["error"] and refused["permanent"]
    s.alice_patch("pg05", {"metadata": {"annotations": {"diskhooks.io/migrate-to": b}}})
    forged = ask("preflight", source="node-x")
    assert forged["ok"] is False and "not the requesting node 'node-x'" in forged["error"]
    assert ask("preflight")["ok"] is True
    staging = fb.staging(s.namespace, "pg05")
    assert staging.is_dir() and not any(staging.iterdir())
    sender = ("rsync", "--server", "--sender", "-ogtprSe.LsfxCIvu", ".", "staging/")
    elsewhere = ("rsync", "--server", "-ogtprSe.LsfxCIvu", "--inplace", ".", "/etc/")
    for args in (sender, elsewhere, ("sh", "-c", "id")):
        reply = ask("rsync", args=args)
        assert reply["ok"] is False and "request.args" in reply["error"], reply
    assert not any(staging.iterdir())
    assert ask("abort")["ok"] is True and not staging.exists()


def test_the_command_says_when_no_agent_answers_and_refusals_reach_the_user(migration_setup: Setup,
                                                                           tmp_path: Path) -> None:
    """No agent runs: the request is admitted, nothing answers, the command says what may be wrong
    and gives up at its timeout (exit 1; the request stands). The webhook's refusals reach the user
    as they are."""
    import io

    from kubernetes import config

    from nodeagent.migrate.command import Migrate, Vms, parser

    s = migration_setup
    a, b = sorted(s.nodes)
    s.create_vm("pg06")
    s.agent_patch("pg06", {"metadata": {"annotations": {K.ANN_NODE: a}}})
    api = config.new_client_from_config(config_file=str(s.alice_kubeconfig))
    try:
        out = io.StringIO()
        args = parser().parse_args(["migrate", f"{s.namespace}/pg06", "--to", b, "--timeout", "4"])
        from nodeagent.migrate.command import CommandError

        with pytest.raises(CommandError, match="timed out after 4 s"):
            Migrate(Vms(api), args, out, silent_after=1.0).run()
        assert "no agent has answered" in out.getvalue() and "nodeAgent.migration.enabled" in out.getvalue()
        assert s.annotations("pg06")["diskhooks.io/migrate-to"] == b
        other = parser().parse_args(["migrate", f"{s.namespace}/pg06", "--to", a])
        with pytest.raises(CommandError, match="under way"):
            Migrate(Vms(api), other, out).run()
        cancel = parser().parse_args(["migrate", "--cancel", f"{s.namespace}/pg06"])
        assert Migrate(Vms(api), cancel, out).run() == 0
        assert "diskhooks.io/migrate-to" not in s.annotations("pg06")
        nowhere = parser().parse_args(["migrate", f"{s.namespace}/pg06", "--to", "node-nowhere"])
        with pytest.raises(CommandError, match="no Node named 'node-nowhere'"):  # the webhook's words
            Migrate(Vms(api), nowhere, out).run()
        s.alice_patch("pg06", {"spec": {"runStrategy": "Always"}})
        running = parser().parse_args(["migrate", f"{s.namespace}/pg06", "--to", b])
        with pytest.raises(CommandError, match="not stopped .*add --stop"):
            Migrate(Vms(api), running, out).run()
        stopping = parser().parse_args(["migrate", f"{s.namespace}/pg06", "--to", b, "--stop", "--timeout", "2"])
        with pytest.raises(CommandError, match="timed out"):  # stopped (no VMI here), asked, no agent
            Migrate(Vms(api), stopping, out, silent_after=60).run()
        vm = s.vm("pg06")
        assert vm["spec"]["runStrategy"] == "Halted" and vm["metadata"]["annotations"]["diskhooks.io/migrate-to"] == b
    finally:
        api.close()


def test_a_copy_committed_but_never_handed_over_is_taken_back_or_cleaned_up(
        migration_setup: Setup, agents: Agents, tmp_path: Path) -> None:
    """A crash between the target's commit and the source's handover leaves the target's copy in
    place while the VM stays on the source: the next attempt's preflight takes it back as its
    staging basis; a copy whose migration ended without the VM coming is removed by housekeeping."""
    import os
    import threading

    from hooksidecar.logfmt import JsonLog
    from nodeagent.kube import Kube, load_client
    from nodeagent.migrate import vmdir
    from nodeagent.migrate.service import MigrationConfig, Migrations
    from nodeagent.reconcile import Paths
    from webhook.reload import watch_policy

    s = migration_setup
    a, fa, b, fb = two_nodes(s, tmp_path)
    homed_vm(s, agents, "pg07", a, fa)
    source = fa.vm_dir(s.namespace, "pg07")
    uid = s.vm("pg07")["metadata"]["uid"]
    s.agent_patch("pg07", {"metadata": {"annotations": {K.ANN_NODE: a}}})
    s.alice_patch("pg07", {"metadata": {"annotations": {"diskhooks.io/migrate-to": b}}})
    agent_b = agents.start(b, fb)
    wait_for("the listener", lambda: agent_b.records("migrate.listening"), 30, agent_b)
    tls = TlsFiles(str(s.tls_dir))
    files = tuple(FileEntry(f.name, f.size, f.allocated, vmdir.hash_file(str(f.path)).sha256)
                  for f in (_entry(p) for p in sorted(source.iterdir())))

    def ask(op: str, ident: str) -> dict[str, Any]:
        channel = open_channel(s.nodes[b], s.port, tls)
        try:
            wire = WireRequest(op=op, id=ident, namespace=s.namespace, vm="pg07", vm_uid=uid, source=a,
                               target=b, files=files)
            reply, _ = exchange(channel, request_json(wire), timeout=60)
            return reply
        finally:
            channel.sock.close()

    assert ask("preflight", "aaaaaaaaaaaaaaaa")["ok"]
    staging = fb.staging(s.namespace, "pg07")
    for f in source.iterdir():  # the bytes, as rsync would leave them
        (staging / f.name).write_bytes(f.read_bytes())
    assert ask("commit", "aaaaaaaaaaaaaaaa")["ok"]
    live = fb.vm_dir(s.namespace, "pg07")
    assert live.is_dir() and not staging.exists()
    # the source never handed over (it crashed); a new attempt (another id) takes the copy back
    again = ask("preflight", "bbbbbbbbbbbbbbbb")
    assert again["ok"] and again["staged"] > 0
    assert staging.is_dir() and not live.exists()
    assert sorted(p.name for p in staging.iterdir()) == sorted(f.name for f in files)

    # the request is withdrawn and nothing comes back: housekeeping removes the copy
    s.alice_patch("pg07", {"metadata": {"annotations": {"diskhooks.io/migrate-to": None}}})
    policy = watch_policy(s.policy)
    api = load_client(str(s.agent_kubeconfig))
    lines = tmp_path / "housekeeping.log"
    with open(lines, "w") as log_file:
        migrations = Migrations(node=b, kube=Kube(api), policy=policy.get,
                                paths=Paths(host_prefix=str(fb.prefix), kubelet_pods_dir="/pods"),
                                log=JsonLog(log_file), stopping=threading.Event(),
                                config=MigrationConfig(tls_dir=str(s.tls_dir), address="127.0.0.1", port=0,
                                                       stale_seconds=0.0))
        try:
            assert migrations.housekeeping() == {"incoming": 1, "stranded": 0, "released": 0}
        finally:
            migrations.server.stop()
            api.close()
    assert not staging.exists() and not live.exists()
    assert not os.path.exists(vmdir.incoming_record(str(fb.root), s.namespace, "pg07"))
    assert file_hashes(source) == {f.name: f.sha256 for f in files}  # the source untouched throughout


def _entry(path: Path) -> Any:
    from types import SimpleNamespace

    st = path.stat()
    return SimpleNamespace(name=path.name, size=st.st_size, allocated=st.st_blocks * 512, path=path)


def test_the_target_filling_up_during_the_copy_fails_cleanly_and_a_new_run_completes(
        migration_setup: Setup, agents: Agents, tmp_path: Path) -> None:
    """The target's filesystem (a 320 MiB tmpfs in the target agent's own mount namespace) has room
    at preflight; once the copy is under way another writer fills it: rsync hits ENOSPC, the
    migration fails saying so, the target's partial copy goes, the VM stays homed on the source and
    may start there. With the space freed, the same command (with --stop) moves it. (Overcommit 8 on
    node b: the VM's 1.375 GiB footprint fits its budget, so the free space is what runs out.)"""
    import errno

    s = migration_setup
    a, fa, b, fb = two_nodes(s, tmp_path)
    homed_vm(s, agents, "pg08", a, fa, data_mib=160)
    before = file_hashes(fa.vm_dir(s.namespace, "pg08"))
    agent_a = agents.start(a, fa, extra=("--migration-bandwidth", "12"))
    agent_b = agents.start(b, fb, wrap=tmpfs_wrap(fb.root, 320),
                           policy=policy_with_capacity(s, "policy-b.yaml", "{overcommit: 8}"))
    wait_for("the home", lambda: s.annotations("pg08").get(K.ANN_NODE) == a, 60, agent_a)
    # node b's filesystem as its agent sees it (the tmpfs is mounted in the agent's namespace only)
    seen_by_b = Path(f"/proc/{agent_b.proc.pid}/root{fb.root}")
    staged = Path(f"/proc/{agent_b.proc.pid}/root{fb.staging(s.namespace, 'pg08')}")
    command = start_command(s, "migrate", f"{s.namespace}/pg08", "--to", b, "--no-progress")
    try:
        wait_for("the copy under way", lambda: copying(s, "pg08"), 60, agent_a, agent_b)
        wait_for("bytes on the target", lambda: staged.exists() and allocated(staged) > 20 * MiB, 60,
                 agent_a, agent_b)
        filler = seen_by_b / "filler"  # another writer on the node's filesystem takes what is left
        with open(filler, "wb", buffering=0) as f:
            chunk = b"\x01" * MiB
            with pytest.raises(OSError) as full:
                while True:
                    f.write(chunk)
        assert full.value.errno == errno.ENOSPC
        _, err = command.communicate(timeout=120)
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
    logs = err + agent_a.stderr_text()[-5000:] + agent_b.stderr_text()[-5000:]
    assert command.returncode == 1, logs
    status = s.status("pg08")
    assert status is not None and status["phase"] == "Failed", logs
    assert "ran out of space" in status["error"] and "No space left on device" in status["error"], \
        (status, agent_a.records("migrate.retry"), agent_b.records("migrate.target.rsync"))
    assert "ran out of space" in err  # the user is told why
    assert_still_at_home(s, "pg08", a, fa, fb, before)
    assert "diskhooks.io/migrate-to" not in s.annotations("pg08")
    wait_for("the target's partial copy removed", lambda: not staged.exists(), 30, agent_b)
    assert "MigrationFailed" in s.events("pg08")
    started = s.alice_patch("pg08", {"spec": {"runStrategy": "Always"}})  # the webhook admits a start
    assert started["spec"]["runStrategy"] == "Always"

    filler.unlink()  # space freed: the same command moves it (stopping it first)
    again = run_command(s, "migrate", f"{s.namespace}/pg08", "--to", b, "--no-progress", "--stop")
    assert again.returncode == 0, again.stderr + agent_a.stderr_text()[-4000:] + agent_b.stderr_text()[-4000:]
    assert s.annotations("pg08")[K.ANN_NODE] == b
    moved = Path(f"/proc/{agent_b.proc.pid}/root{fb.vm_dir(s.namespace, 'pg08')}")
    assert {k: v for k, v in file_hashes(moved).items() if k != K.HOME_MARKER} == \
        {k: v for k, v in before.items() if k != K.HOME_MARKER}
