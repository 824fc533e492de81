"""The README's first command plays the whole flow; this runs the same demo (without the install
step, which .ci/run has just done) and checks what a newcomer is shown.

The parts a cluster would play (kube-apiserver, virt-controller, kubelet, virt-launcher) are played
by the demo script itself: there is no cluster here. The webhook, the sidecar, prepare and qemu-img
are the real ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
    assert "demo complete" in text


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


def test_a_demo_stopped_midway_leaves_nothing_running() -> None:
    """SIGTERM (Ctrl-C in a CI job, a timeout) while the webhook runs: the webhook's whole process
    group is stopped and the temp directory removed, as the README promises."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISKHOOKS_")}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "scripts.demo"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        work = first.rsplit("work directory ", 1)[-1].strip()
        assert work.startswith("/") and "diskhooks-demo-" in work, first
        for line in proc.stdout:  # wait until the webhook answers
            if "webhook ready on" in line:
                break
        assert _processes_mentioning(work), "the webhook should be running now"
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert _processes_mentioning(work) == []
    assert not os.path.exists(work)
