"""Cold migration end to end: two node agents on this machine, the real kube-apiserver and webhook,
real rsync over mutual TLS, the user's ``kubectl diskhooks migrate`` (see tests/migration_support.py
for what stands in for what: KubeVirt's controllers and the launcher do not run here).
"""

from __future__ import annotations

import json
from pathlib import Path

from diskplan import keys as K
from diskplan.homemarker import parse_marker
from tests.migration_support import (
    Agents,
    NodeFiles,
    Setup,
    allocated,
    compare_images,
    make_base,
    make_vm_dir,
    run_command,
    sha256_file,
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
        (source_allocated, target_allocated)
    assert not source.exists()  # renamed aside, kept
    assert status["sourceKept"].endswith(kept_dir.name)
    assert not fb.staging(s.namespace, "pg01").exists()
