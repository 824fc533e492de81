"""The README's first command plays the whole flow; this runs the same demo (without the install
step, which .ci/run has just done) and checks what a newcomer is shown.

The parts a cluster would play (kube-apiserver, virt-controller, the kubelet and its mounts,
virt-handler) are played by the demo script itself: there is no cluster here. The webhook, the
sidecar, prepare, qemu-img, the node agent's decision and expansion code, and the launcher-shaped
libvirt (uid 107 session daemon, TCG QEMU) are the real ones.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from tests.conftest import ROOT


def test_the_demo_plays_one_vm_start_end_to_end() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISKHOOKS_")}
    out = subprocess.run([sys.executable, "-m", "scripts.demo"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    # 1. the VM went through /mutate over HTTPS and came back with hostDisks and a plan
    assert '"hostDisk":{"path":"/var/lib/diskhooks/vms/vms/pg01/pgdata.qcow2"' in text
    assert "reinvocation on its own output: no patch" in text
    # 2. the VMI's plan verifies; a forged one is denied with the reason
    assert "VMI from the template: allowed=True" in text
    assert "VMI with hostDir edited to /etc: allowed=False" in text
    assert "signature does not verify" in text
    # 3. the Pod mutation added prepare with only the capabilities it needs
    assert "init container diskhooks-prepare" in text
    assert "add ['CHOWN', 'DAC_OVERRIDE']" in text
    # 4. real images: the overlay on the library base, then nothing to do on the second start
    assert "backing /var/run/kubevirt-private/diskhooks/images/almalinux-9.qcow2 (qcow2)" in text
    assert '"result": "unchanged"' in text
    # 5. the sidecar rewrote the domain and is idempotent; it shut down and removed its socket
    assert '+\t\t\t<driver cache="writeback" error_policy="stop" name="qemu" type="qcow2"' in text
    assert "second call on its own output: identical" in text
    assert "VMI plan edited after Pod admission: FAILED_PRECONDITION" in text  # the Pod's copy rules
    assert "socket removed: True" in text
    # 6. prepare's marker vouches for the VMI: the agent's code records the home, a hand-made VMI
    # with the same labels, owner and plan is refused; the webhook admits the agent's UPDATE only
    assert '"vmiUID": "0d6c4c2e-8f0a-4b51-9a51-6e2f8b7c9d01", "node": "demo-node"' in text
    assert "on demo-node: record node demo-node" in text
    assert "a hand-made VMI with the same labels, owner and plan: skip (marker-other-vmi)" in text
    assert "UPDATE by system:serviceaccount:diskhooks-system:diskhooks-node: allowed" in text
    assert ('required node affinity [{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"In",'
            '"values":["demo-node"]}]}]; plan version 3, node demo-node') in text
    assert "the same annotation from user demo: allowed=False" in text
    # 7. the running disk grew online, as QEMU and the file both say, and the next start has nothing to do
    assert "before: virsh domblkinfo vms_pg01 vda -> Capacity 21474836480 (20 GiB); qemu-img info -U " \
        "pgdata.qcow2 -> virtual size 20 GiB" in text
    assert "pgdata: grown — grown online from 21474836480 to 25769803776 bytes" in text
    assert "after : virsh domblkinfo vms_pg01 vda -> Capacity 25769803776 (24 GiB); qemu-img info -U " \
        "pgdata.qcow2 -> virtual size 24 GiB" in text
    assert "the domain is still running: True" in text
    assert "next start, prepare (exit 0): pgdata unchanged, virtual size 24 GiB" in text
    assert "demo complete" in text
    # nothing left behind: the launcher's libvirt and its QEMU ended, their directory removed
    launcher = re.search(r"libvirt-runtime/\S+ \((/tmp/dh-lv-\w+)\)", text)
    assert launcher is not None, text
    assert _processes_mentioning(launcher.group(1)) == []
    assert not os.path.exists(launcher.group(1))


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


@contextmanager
def _demo_ended_by_sigterm() -> Iterator[tuple[subprocess.Popen[str], IO[str]]]:
    """The demo started as a user would (no ``DISKHOOKS_`` settings; output unbuffered, stderr in
    stdout): yields it and its output; when the block ends, SIGTERM and a wait for the end (killed
    instead when the block fails or the demo outlives the wait)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISKHOOKS_")}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "scripts.demo"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_demo_stopped_midway_leaves_nothing_running() -> None:
    """SIGTERM (Ctrl-C in a CI job, a timeout) while the webhook runs: the webhook's whole process
    group is stopped and the temp directory removed, as the README promises."""
    with _demo_ended_by_sigterm() as (proc, out):
        first = out.readline()
        work = first.rsplit("work directory ", 1)[-1].strip()
        assert work.startswith("/") and "diskhooks-demo-" in work, first
        for line in out:  # wait until the webhook answers
            if "webhook ready on" in line:
                break
        assert _processes_mentioning(work), "the webhook should be running now"
    assert proc.returncode == 128 + signal.SIGTERM
    assert _processes_mentioning(work) == []
    assert not os.path.exists(work)


def test_a_demo_stopped_while_the_vm_runs_leaves_nothing_running() -> None:
    """SIGTERM while the launcher's libvirt starts the domain: the daemon, its QEMU and the webhook
    end, and both temp directories are removed."""
    with _demo_ended_by_sigterm() as (proc, out):
        first = out.readline()
        work = first.rsplit("work directory ", 1)[-1].strip()
        launcher = None
        for line in out:  # the daemon answers; the domain is being started
            found = re.search(r"libvirt-runtime/\S+ \((/tmp/dh-lv-\w+)\)", line)
            if found:
                launcher = found.group(1)
                break
        assert launcher is not None and work.startswith("/"), first
        assert _processes_mentioning(launcher), "the launcher's libvirt should be running now"
    assert proc.returncode == 128 + signal.SIGTERM
    assert _processes_mentioning(work) == []
    assert _processes_mentioning(launcher) == []
    assert not os.path.exists(work) and not os.path.exists(launcher)
