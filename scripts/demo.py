"""The local demo: one VM start of examples/demo/vm.yaml through every part of diskhooks, no cluster.

Run with ``./scripts/demo.sh`` (it installs what is needed first). Starts the real webhook (gunicorn,
self-signed TLS on 127.0.0.1) and the real sidecar (gRPC on a unix socket in a temp directory); the
parts a cluster would play (kube-apiserver, virt-controller, kubelet, virt-launcher) are played by
this script, which sends what they would send and shows what comes back.
"""

from __future__ import annotations

import argparse
import base64
import copy
import difflib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
POLICY = ROOT / "examples" / "policy.yaml"
VMI_UID = "0d6c4c2e-8f0a-4b51-9a51-6e2f8b7c9d01"
DEMO_NODE = "demo-node"  # the node the scheduler would bind the launcher Pod to (the temp dir plays it)

BOLD, DIM, GREEN, RED, CYAN, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[36m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RED = CYAN = RESET = ""


def step(n: int, title: str) -> None:
    print(f"\n{BOLD}{CYAN}== {n}. {title}{RESET}")


def show(text: str, *, limit: int = 80) -> None:
    lines = text.rstrip("\n").splitlines()
    for line in lines[:limit]:
        if line.startswith("+") and not line.startswith("+++"):
            print(f"  {GREEN}{line}{RESET}")
        elif line.startswith("-") and not line.startswith("---"):
            print(f"  {RED}{line}{RESET}")
        else:
            print(f"  {line}")
    if len(lines) > limit:
        print(f"  {DIM}... {len(lines) - limit} more lines{RESET}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not come up within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child started with ``start_new_session`` and everything in its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # a gunicorn worker may outlive its master by a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through main's finally, which stops the servers


class Webhook:
    """The real webhook server, talked to over HTTPS with the CA it generated.

    The process is added to ``children`` as soon as it exists, before waiting for it to come up,
    so the demo's cleanup stops it whatever happens next."""

    def __init__(self, work: Path, keys_dir: Path, children: list[subprocess.Popen[bytes]]) -> None:
        self.port = free_port()
        self.state = work / "webhook-tls"
        self.state.mkdir()
        cmd = [sys.executable, "-m", "webhook.cli", "serve", "--config", str(POLICY),
               "--self-signed", "--tls-dir", str(self.state), "--bind-address", "127.0.0.1",
               "--port", str(self.port), "--workers", "1", "--plan-keys-dir", str(keys_dir),
               "--drain-seconds", "0",  # a local run: nobody to drain for
               "--cluster-objects", str(DEMO / "cluster-objects.yaml")]
        self.log = open(work / "webhook.log", "wb")  # noqa: SIM115 - held while the server runs
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        children.append(self.proc)
        wait_for(lambda: (self.state / "ca.crt").exists() and self._healthy(), "the webhook")
        self.ctx = ssl.create_default_context(cafile=str(self.state / "ca.crt"))
        self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=10)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            self.log.flush()
            tail = Path(self.log.name).read_text(errors="replace").splitlines()[-15:]
            raise SystemExit("demo: the webhook exited; the end of its log:\n" + "\n".join(tail))
        try:
            ctx = ssl.create_default_context(cafile=str(self.state / "ca.crt"))
            c = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=2)
            c.request("GET", "/readyz")
            return c.getresponse().status == 200
        except (OSError, ssl.SSLError):
            return False

    def review(self, path: str, *, obj: dict[str, Any], kind: str, resource: str, group: str,
               operation: str = "CREATE") -> dict[str, Any]:
        review = {
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": f"demo-{secrets.token_hex(4)}",
                "kind": {"group": group, "version": "v1", "kind": kind},
                "resource": {"group": group, "version": "v1", "resource": resource},
                "requestKind": {"group": group, "version": "v1", "kind": kind},
                "requestResource": {"group": group, "version": "v1", "resource": resource},
                "name": obj["metadata"].get("name", ""), "namespace": "vms", "operation": operation,
                "userInfo": {"username": "demo"}, "object": obj, "oldObject": None, "dryRun": False,
            },
        }
        self.conn.request("POST", f"{path}?timeout=10s", body=json.dumps(review),
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"demo: {path} answered HTTP {resp.status}: {body[:300]!r}")
        return dict(json.loads(body)["response"])

    def close(self) -> None:
        if hasattr(self, "conn"):
            self.conn.close()
        self.log.close()


def apply_response(obj: dict[str, Any], response: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    if not response.get("patch"):
        return obj, []
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(obj, ops), ops


def summarise_patch(ops: list[dict[str, Any]]) -> str:
    out = []
    def short(value: Any, width: int) -> str:
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= width else text[:width - 3] + "..."

    for op in ops:
        value = op.get("value")
        if isinstance(value, dict) and any(isinstance(v, str) and len(v) > 60 for v in value.values()):
            out.append(f"{op['op']:8} {op['path']}")  # annotations: one line per key
            out.extend(f"{'':10}{k}: {short(v, 100)}" for k, v in value.items())
        else:
            out.append(f"{op['op']:8} {op['path']}  {short(value, 150) if 'value' in op else ''}")
    return "\n".join(out)


def qemu_img_create(path: Path, size: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)


def qemu_img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def container_env(container: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
    """A container's environment as kubelet would give it (values, and fieldRefs to Pod labels and
    to spec.nodeName, the scheduler's binding)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        path = e["valueFrom"]["fieldRef"]["fieldPath"]  # metadata.labels['<key>'] or spec.nodeName
        if path == "spec.nodeName":
            env[e["name"]] = str(pod.get("spec", {}).get("nodeName") or DEMO_NODE)
            continue
        env[e["name"]] = str(pod["metadata"]["labels"][path[len("metadata.labels['"):-2]])
    return env


def launcher_vmi(vm: dict[str, Any]) -> dict[str, Any]:
    """The VMI virt-controller creates from the (mutated) VM template."""
    tmpl = vm["spec"]["template"]
    meta = copy.deepcopy(tmpl.get("metadata", {}))
    meta.update({"name": vm["metadata"]["name"], "namespace": "vms"})
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta,
            "spec": copy.deepcopy(tmpl["spec"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="diskhooks-demo-"))
    keys = work / "plan-keys"
    keys.mkdir()
    (keys / "current").write_text(secrets.token_urlsafe(32))
    prefix = work / "launcher"  # plays the virt-launcher pod's filesystem
    print(f"{BOLD}diskhooks demo{RESET} — work directory {work}")
    children: list[subprocess.Popen[bytes]] = []  # stopped, with their process groups, at the end
    webhook: Webhook | None = None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        step(1, "Start the webhook (gunicorn, self-signed TLS) and send the VirtualMachine")
        webhook = Webhook(work, keys, children)
        print(f"  webhook ready on https://127.0.0.1:{webhook.port} (CA {webhook.state / 'ca.crt'})")
        vm = yaml.safe_load((DEMO / "vm.yaml").read_text())
        resp = webhook.review("/mutate", obj=vm, kind="VirtualMachine", resource="virtualmachines",
                              group="kubevirt.io")
        if not resp.get("allowed"):
            raise SystemExit(f"demo: the VM was denied: {resp.get('status')}")
        vm2, ops = apply_response(vm, resp)
        print(f"  allowed, {len(ops)} JSONPatch operations:")
        show(summarise_patch(ops))
        for w in resp.get("warnings", []):
            print(f"  {DIM}warning: {w}{RESET}")
        again = webhook.review("/mutate", obj=vm2, kind="VirtualMachine", resource="virtualmachines",
                               group="kubevirt.io")
        print(f"  reinvocation on its own output: {'no patch' if not again.get('patch') else 'PATCH!'}")
        plan_text = vm2["spec"]["template"]["metadata"]["annotations"]["diskhooks.io/plan"]
        plan = json.loads(plan_text)
        print("  the plan (diskhooks.io/plan on the template):")
        show(json.dumps({k: v for k, v in plan.items() if k != "auth"}, indent=2), limit=60)

        step(2, "virt-controller creates the VMI: its plan verifies; a forged plan is denied")
        vmi = launcher_vmi(vm2)
        resp = webhook.review("/mutate", obj=vmi, kind="VirtualMachineInstance",
                              resource="virtualmachineinstances", group="kubevirt.io")
        print(f"  VMI from the template: allowed={resp['allowed']}, patch={'yes' if resp.get('patch') else 'none'}")
        forged = copy.deepcopy(vmi)
        doc = json.loads(plan_text)
        doc["hostDir"] = "/etc"
        forged["metadata"]["annotations"]["diskhooks.io/plan"] = json.dumps(doc)
        resp = webhook.review("/mutate", obj=forged, kind="VirtualMachineInstance",
                              resource="virtualmachineinstances", group="kubevirt.io")
        print(f"  VMI with hostDir edited to /etc: allowed={resp['allowed']}")
        print(f"  {DIM}{resp.get('status', {}).get('message', '')}{RESET}")

        step(3, "virt-controller creates the virt-launcher Pod: the Pod mutation adds prepare")
        pod = yaml.safe_load((DEMO / "launcher-pod.yaml").read_text())
        pod["metadata"]["labels"].update(vmi["metadata"].get("labels", {}))
        pod["metadata"]["annotations"].update(vmi["metadata"].get("annotations", {}))
        resp = webhook.review("/mutate-pod", obj=pod, kind="Pod", resource="pods", group="")
        if not resp.get("allowed"):
            raise SystemExit(f"demo: the Pod was denied: {resp.get('status')}")
        pod2, ops = apply_response(pod, resp)
        init = next(c for c in pod2["spec"]["initContainers"] if c["name"] == "diskhooks-prepare")
        print(f"  init container {init['name']}: image {init['image']}, args {init.get('args')}")
        for m in init.get("volumeMounts", []):
            print(f"    mount {m['name']:28} {m['mountPath']}{' (ro)' if m.get('readOnly') else ''}")
        caps = init.get("securityContext", {}).get("capabilities", {})
        print(f"    capabilities: drop {caps.get('drop')} add {caps.get('add')}")

        step(4, "prepare runs in the init container: real qcow2 images (temp dir plays the node)")
        # What the node and the image volume hold before the VM's first start:
        qemu_img_create(prefix / "var/run/kubevirt-private/diskhooks/images/almalinux-9.qcow2", "10G")
        qemu_img_create(prefix / "var/run/kubevirt-image-volume/disk_0/disk/almalinux-9.qcow2", "10G")
        for d in plan["disks"]:
            (prefix / "var/run/kubevirt-private/vmi-disks" / d["name"]).mkdir(parents=True, exist_ok=True)
        (prefix / "var/run/kubevirt-private/diskhooks/vm").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **container_env(init, pod2))  # the env the Pod mutation wrote
        for attempt in ("first start", "second start (nothing to do)"):
            out = subprocess.run([sys.executable, "-m", "hooksidecar.cli", "prepare", "--plan-from-env",
                                  "--path-prefix", str(prefix)], env=env, capture_output=True, text=True, check=False)
            print(f"  prepare, {attempt}: exit {out.returncode}")
            show(out.stdout + out.stderr, limit=12)
            if out.returncode != 0:
                raise SystemExit("demo: prepare failed")
        for d in plan["disks"]:
            img = prefix / "var/run/kubevirt-private/vmi-disks" / d["name"] / f"{d['name']}.qcow2"
            info = qemu_img_info(img)
            print(f"  qemu-img info {d['name']}.qcow2: format {info['format']}, virtual size "
                  f"{info['virtual-size'] / 2**30:.0f} GiB, backing {info.get('backing-filename', '-')}"
                  f" ({info.get('backing-filename-format', '-')})")
            record = img.with_name(f"{d['name']}.base.json")  # written before the overlay
            if d.get("backing"):
                rec = json.loads(record.read_text())
                print(f"  base record {record.name}: {rec['file']} sha256 {rec['sha256'][:16]}…, identity "
                      f"inode {rec['identity']['ino']} size {rec['identity']['size']} (checked at every start)")
        root = prefix / "var/run/kubevirt-private/diskhooks/vm/persist-root.root.qcow2"
        info = qemu_img_info(root)
        print(f"  qemu-img info persist-root.root.qcow2: virtual size {info['virtual-size'] / 2**30:.0f} GiB,"
              f" backing {info.get('backing-filename')} ({info.get('backing-filename-format')})")

        step(5, "virt-launcher calls the sidecar over gRPC: Info, then OnDefineDomain")
        sock_dir = work / "hooks" / "hook-sidecar-0"
        sock_dir.mkdir(parents=True)
        # the Pod mutation gives the hook-sidecar container the plan it verified (DISKHOOKS_PLAN): the
        # only plan the sidecar applies; a VMI whose annotation differs is refused
        hook_sidecar = next(c for c in pod2["spec"]["containers"] if c["name"] == "hook-sidecar-0")
        sidecar_env = dict(os.environ, **container_env(hook_sidecar, pod2))
        sidecar = subprocess.Popen([sys.executable, "-m", "hooksidecar.cli", "serve", "--socket-dir",
                                    str(sock_dir), "--path-prefix", str(prefix)], cwd=ROOT, env=sidecar_env,
                                   stderr=open(work / "sidecar.log", "wb"),  # noqa: SIM115
                                   start_new_session=True)
        children.append(sidecar)
        sock = sock_dir / "diskhooks.sock"
        wait_for(sock.exists, "the sidecar socket", timeout=15)
        from hooksidecar.client import call_info, call_on_define_domain, call_shutdown

        info_result = call_info(sock)
        print(f"  Info: name={info_result['name']} versions={info_result['versions']} "
              f"hookPoints={info_result['hookPoints']}")
        domain_in = (DEMO / "domain.first-call.xml").read_bytes()
        vmi_launcher = copy.deepcopy(vmi)
        vmi_launcher["metadata"]["uid"] = VMI_UID
        vmi_json = json.dumps(vmi_launcher).encode()
        t0 = time.perf_counter()
        domain_out = call_on_define_domain(sock, domain_in, vmi_json)
        ms = (time.perf_counter() - t0) * 1000
        print(f"  OnDefineDomain (v1alpha3, new connection): {ms:.1f} ms; the XML diff:")
        diff = difflib.unified_diff(domain_in.decode().splitlines(), domain_out.decode().splitlines(),
                                    "domain (KubeVirt)", "domain (diskhooks)", lineterm="", n=1)
        show("\n".join(diff), limit=90)
        second = call_on_define_domain(sock, domain_out, vmi_json)
        print(f"  second call on its own output: {'identical' if second == domain_out else 'DIFFERENT!'}")
        edited = copy.deepcopy(vmi_launcher)  # the VM owner edits the VMI's plan after Pod admission
        edited_plan = json.loads(plan_text)
        edited_plan["hostDir"] = "/etc"
        edited["metadata"]["annotations"]["diskhooks.io/plan"] = json.dumps(edited_plan)
        import grpc

        try:
            call_on_define_domain(sock, domain_in, json.dumps(edited).encode())
            print("  VMI plan edited after Pod admission: ACCEPTED!")
        except grpc.RpcError as exc:
            print(f"  VMI plan edited after Pod admission: {exc.code().name}")
            print(f"  {DIM}{str(exc.details())[:160]}...{RESET}")
        (work / "domain.out.xml").write_bytes(domain_out)
        call_shutdown(sock)
        sidecar.wait(10)
        print(f"  Shutdown: sidecar exited with {sidecar.returncode}, socket removed: {not sock.exists()}")
        print(f"\n{BOLD}{GREEN}demo complete{RESET}")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
        if webhook is not None:
            webhook.close()
        for child in children:
            stop_group(child)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
