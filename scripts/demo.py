"""The local demo: one VM start of examples/demo/vm.yaml through every part of diskhooks, no cluster.

Run with ``./scripts/demo.sh`` (it installs what is needed first), as root. Starts the real webhook
(gunicorn, self-signed TLS on 127.0.0.1) and the real sidecar (gRPC on a unix socket in a temp
directory), runs the real prepare, calls the node agent's own code, and starts a real
virt-launcher-shaped libvirt (an unprivileged session libvirtd as uid 107, a TCG domain on the
images prepare made: ``tests/libvirt_launcher.py``). The parts a cluster would play
(kube-apiserver, virt-controller, the kubelet and its mounts, virt-handler) are played by this
script, which sends what they would send and shows what comes back: a temp directory plays the
node (``node/``) and each container runs in a mount namespace of its own with the Pod's hostPath
and image volumes bind-mounted where its spec says (``unshare``), as the kubelet would.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import difflib
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonpatch
import yaml

if TYPE_CHECKING:
    from tests.libvirt_launcher import LauncherDaemon

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
POLICY = ROOT / "examples" / "policy.yaml"
VMI_UID = "0d6c4c2e-8f0a-4b51-9a51-6e2f8b7c9d01"
VM_UID = "7a3e9d10-51c2-4f6b-8e0d-2b9c4a6f1e23"  # what the API server assigned the VM
POD_UID = "c1f4b2a8-6d3e-4a9b-b7c0-5e8f2d1a9b34"  # the virt-launcher Pod's
DEMO_NODE = "demo-node"  # the node the scheduler would bind the launcher Pod to (the temp dir plays it)
GiB = 1 << 30

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
               operation: str = "CREATE", old: dict[str, Any] | None = None,
               user: str = "demo") -> dict[str, Any]:
        review = {
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": f"demo-{secrets.token_hex(4)}",
                "kind": {"group": group, "version": "v1", "kind": kind},
                "resource": {"group": group, "version": "v1", "resource": resource},
                "requestKind": {"group": group, "version": "v1", "kind": kind},
                "requestResource": {"group": group, "version": "v1", "resource": resource},
                "name": obj["metadata"].get("name", ""), "namespace": "vms", "operation": operation,
                "userInfo": {"username": user}, "object": obj, "oldObject": old, "dryRun": False,
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


def mount_lines(container: dict[str, Any], pod: dict[str, Any], node: Path, view: Path) -> list[str]:
    """Shell lines that mount, as the kubelet would, the container's hostPath volumes (from ``node``,
    made first when ``DirectoryOrCreate``) and image volumes (``node/image-volumes/<name>``) at their
    mount paths below ``view``. emptyDirs (the hook sockets) play no part here."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    lines = []
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if "hostPath" in vol:
            source = node / vol["hostPath"]["path"].lstrip("/")
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                source.mkdir(parents=True, exist_ok=True)
        elif "image" in vol:
            source = node / "image-volumes" / m["name"]
        else:
            continue
        target = view / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        opts = "bind,ro" if m.get("readOnly") else "bind"
        lines.append(f"mount -o {opts} {shlex.quote(str(source))} {shlex.quote(str(target))}")
    return lines


def in_container(container: dict[str, Any], pod: dict[str, Any], node: Path, view: Path,
                 argv: list[str]) -> list[str]:
    """``argv`` run in a mount namespace of its own with the container's volumes mounted (the
    mounts end with it)."""
    script = "set -e\n" + "\n".join(mount_lines(container, pod, node, view)) + "\nexec " + \
        " ".join(shlex.quote(a) for a in argv)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]


def merge_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies the agent's PATCH."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def qemu_img_size(path: Path) -> int:
    """The image's virtual size, read with ``-U`` (the running QEMU holds the lock)."""
    out = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)["virtual-size"])


def show_sizes(when: str, daemon: LauncherDaemon, domain: str, image: Path) -> None:
    virsh = daemon.virsh("domblkinfo", domain, "vda")
    match = re.search(r"^Capacity:\s+(\d+)$", virsh, re.MULTILINE)
    capacity = int(match.group(1)) if match else -1
    print(f"  {when}: virsh domblkinfo {domain} vda -> Capacity {capacity} ({capacity / GiB:g} GiB); "
          f"qemu-img info -U pgdata.qcow2 -> virtual size {qemu_img_size(image) / GiB:g} GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("demo: run it as root (./scripts/demo.sh does): it mounts the Pod's volumes as the "
                         "kubelet would and starts a uid-107 libvirt as virt-launcher runs it")

    work = Path(tempfile.mkdtemp(prefix="diskhooks-demo-"))
    work.chmod(0o711)  # the uid-107 QEMU reaches the images below it (nothing can be listed)
    keys = work / "plan-keys"
    keys.mkdir(mode=0o700)
    (keys / "current").write_text(secrets.token_urlsafe(32))
    node = work / "node"  # plays the node's filesystem
    prefix = work / "launcher"  # plays the virt-launcher pod's filesystem (mount points only)
    from diskplan.policy import load_policy

    policy = load_policy(POLICY.read_text())
    node_root = node / policy.host_disks.root.lstrip("/")
    vm_dir = node_root / "vms" / "pg01"
    print(f"{BOLD}diskhooks demo{RESET} — work directory {work}")
    children: list[subprocess.Popen[bytes]] = []  # stopped, with their process groups, at the end
    webhook: Webhook | None = None
    daemons: list[LauncherDaemon] = []  # the launcher libvirt, stopped at the end
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
        pod2["metadata"]["uid"] = POD_UID  # the API server's
        pod2["spec"]["nodeName"] = DEMO_NODE  # the scheduler's binding
        init = next(c for c in pod2["spec"]["initContainers"] if c["name"] == "diskhooks-prepare")
        print(f"  init container {init['name']}: image {init['image']}, args {init.get('args')}")
        for m in init.get("volumeMounts", []):
            print(f"    mount {m['name']:28} {m['mountPath']}{' (ro)' if m.get('readOnly') else ''}")
        caps = init.get("securityContext", {}).get("capabilities", {})
        print(f"    capabilities: drop {caps.get('drop')} add {caps.get('add')}")

        step(4, f"prepare runs in the init container on {DEMO_NODE}: real qcow2 images in the VM's node "
                "directory")
        # What the node and the image volume hold before the VM's first start:
        library_base = node / (policy.host_disks.image_library or "/missing").lstrip("/") / "almalinux-9.qcow2"
        qemu_img_create(library_base, "10G")
        qemu_img_create(node / "image-volumes" / "root" / "disk" / "almalinux-9.qcow2", "10G")
        env = dict(os.environ, **container_env(init, pod2))  # the env the Pod mutation wrote
        prepare_argv = in_container(init, pod2, node, prefix, [
            sys.executable, "-m", "hooksidecar.cli", "prepare", "--plan-from-env", "--path-prefix", str(prefix)])
        for attempt in ("first start", "second start (nothing to do)"):
            out = subprocess.run(prepare_argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
            print(f"  prepare, {attempt}: exit {out.returncode}")
            show(out.stdout + out.stderr, limit=12)
            if out.returncode != 0:
                raise SystemExit("demo: prepare failed")
        print(f"  on the node, {vm_dir.relative_to(node.parent)}/: {', '.join(sorted(os.listdir(vm_dir)))}")
        for d in plan["disks"]:
            img = vm_dir / f"{d['name']}.qcow2"
            info = qemu_img_info(img)
            print(f"  qemu-img info {d['name']}.qcow2: format {info['format']}, virtual size "
                  f"{info['virtual-size'] / 2**30:.0f} GiB, backing {info.get('backing-filename', '-')}"
                  f" ({info.get('backing-filename-format', '-')})")
            record = img.with_name(f"{d['name']}.base.json")  # written before the overlay
            if d.get("backing"):
                rec = json.loads(record.read_text())
                print(f"  base record {record.name}: {rec['file']} sha256 {rec['sha256'][:16]}…, identity "
                      f"inode {rec['identity']['ino']} size {rec['identity']['size']} (checked at every start)")
        info = qemu_img_info(vm_dir / "persist-root.root.qcow2")
        print(f"  qemu-img info persist-root.root.qcow2: virtual size {info['virtual-size'] / 2**30:.0f} GiB,"
              f" backing {info.get('backing-filename')} ({info.get('backing-filename-format')})")

        step(5, "virt-launcher calls the sidecar over gRPC: Info, then OnDefineDomain")
        sock_dir = work / "hooks" / "hook-sidecar-0"
        sock_dir.mkdir(parents=True)
        # the Pod mutation gives the hook-sidecar container the plan it verified (DISKHOOKS_PLAN): the
        # only plan the sidecar applies; a VMI whose annotation differs is refused
        hook_sidecar = next(c for c in pod2["spec"]["containers"] if c["name"] == "hook-sidecar-0")
        sidecar_env = dict(os.environ, **container_env(hook_sidecar, pod2))
        sidecar = subprocess.Popen(
            in_container(hook_sidecar, pod2, node, work / "sidecar-view", [
                sys.executable, "-m", "hooksidecar.cli", "serve", "--socket-dir", str(sock_dir),
                "--path-prefix", str(work / "sidecar-view")]),
            cwd=ROOT, env=sidecar_env, stderr=open(work / "sidecar.log", "wb"),  # noqa: SIM115
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

        vm3 = home_node(webhook, vm2, vmi_launcher, keys=keys, node_root=node_root, policy_user=str(
            policy.node_agent.username))
        vm4 = grow_online(webhook, vm3, keys=keys, vm_dir=vm_dir, library_base=library_base, daemons=daemons)
        next_start(webhook, vm4, node=node, view=prefix, daemons=daemons)
        print(f"\n{BOLD}{GREEN}demo complete{RESET}")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
        if daemons:
            from tests.libvirt_launcher import stop_daemon

            for d in daemons:
                stop_daemon(d)  # destroys the domain, ends the daemon and QEMU by PID, removes its dir
        if webhook is not None:
            webhook.close()
        for child in children:
            stop_group(child)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def home_node(webhook: Webhook, vm2: dict[str, Any], vmi: dict[str, Any], *, keys: Path, node_root: Path,
              policy_user: str) -> dict[str, Any]:
    """Step 6: the node agent's decision from the running VMI and prepare's marker, its PATCH
    admitted by the webhook as the agent's ServiceAccount; the VM as stored afterwards."""
    from diskplan import keys as K
    from diskplan.homemarker import marker_json
    from nodeagent.home import decide_from_vmi, home_patch
    from nodeagent.scan import MarkerPlace, read_marker
    from webhook.reload import watch_plan_keys

    step(6, f"The node agent on {DEMO_NODE} records the VM's home: prepare's marker vouches for the VMI")
    plan_keys = watch_plan_keys(keys).get()  # the agent's reader of the plan-key Secret
    marker = read_marker(str(node_root), MarkerPlace("vms", "pg01"))
    where = node_root / "vms" / "pg01" / K.HOME_MARKER
    print(f"  the agent reads <node>/{where.relative_to(node_root.parents[3])} (prepare wrote it through the "
          "Pod's hostPath mount, before the first image):")
    show(marker_json(marker).decode())
    # what the API server stores, and the VMI as virt-handler on demo-node leaves it running
    stored = copy.deepcopy(vm2)
    created = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    stored["metadata"].update({"uid": VM_UID, "resourceVersion": "1001", "generation": 1,
                               "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")})
    running = copy.deepcopy(vmi)
    running["metadata"].setdefault("labels", {})["kubevirt.io/nodeName"] = DEMO_NODE
    running["metadata"]["ownerReferences"] = [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                               "name": "pg01", "uid": VM_UID, "controller": True}]
    running["status"] = {"phase": "Running", "nodeName": DEMO_NODE, "activePods": {POD_UID: DEMO_NODE}}
    decision = decide_from_vmi(running, stored, node=DEMO_NODE, keys=plan_keys, marker=marker)
    print(f"  VMI {VMI_UID[:8]}… on {DEMO_NODE}: {BOLD}{decision.action} node {DEMO_NODE}{RESET} "
          f"({decision.reason})")
    forged = copy.deepcopy(running)  # a VMI someone created by hand: labelled, owned, the VM's own plan
    forged["metadata"].update({"name": "pg01-forged", "uid": "9e8d7c6b-0000-4000-8000-00000000f0f0"})
    verdict = decide_from_vmi(forged, stored, node=DEMO_NODE, keys=plan_keys, marker=marker)
    print(f"  a hand-made VMI with the same labels, owner and plan: {verdict.action} ({verdict.code})")
    print(f"  {DIM}{verdict.reason[:150]}...{RESET}")

    patch = home_patch(DEMO_NODE, decision.resource_version)
    print(f"  the agent's merge PATCH of the VM: {json.dumps(patch, separators=(',', ':'))}")
    asked = merge_patch(stored, patch)
    resp = webhook.review("/mutate", obj=asked, old=stored, operation="UPDATE", kind="VirtualMachine",
                          resource="virtualmachines", group="kubevirt.io", user=policy_user)
    if not resp.get("allowed"):
        raise SystemExit(f"demo: the agent's UPDATE was denied: {resp.get('status')}")
    vm3, ops = apply_response(asked, resp)
    print(f"  UPDATE by {policy_user}: allowed, the webhook adds:")
    show(summarise_patch(ops))
    terms = vm3["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    new_plan = json.loads(vm3["spec"]["template"]["metadata"]["annotations"]["diskhooks.io/plan"])
    print(f"  -> required node affinity {json.dumps(terms, separators=(',', ':'))}; "
          f"plan version {new_plan['version']}, node {new_plan.get('node')}")
    user_try = merge_patch(stored, {"metadata": {"annotations": {"diskhooks.io/node": "node-b"}}})
    denied = webhook.review("/mutate", obj=user_try, old=stored, operation="UPDATE", kind="VirtualMachine",
                            resource="virtualmachines", group="kubevirt.io", user="demo")
    print(f"  the same annotation from user demo: allowed={denied['allowed']}")
    print(f"  {DIM}{denied.get('status', {}).get('message', '')[:160]}{RESET}")
    vm3["metadata"]["resourceVersion"] = "1002"
    return vm3


def grow_online(webhook: Webhook, vm3: dict[str, Any], *, keys: Path, vm_dir: Path, library_base: Path,
                daemons: list[LauncherDaemon]) -> dict[str, Any]:
    """Step 7: the launcher's own libvirt runs the VM on prepare's images; a user's UPDATE grows
    pgdata; the node agent's expand code grows the running disk."""
    from diskplan import keys as K
    from nodeagent.expand import expand_online, launcher_socket
    from nodeagent.home import Decision, template_plan_text, verified_plan
    from tests.libvirt_launcher import DomainDiskSpec, daemon_binary, start_daemon, start_domain
    from webhook.reload import watch_plan_keys

    step(7, "The VM runs in virt-launcher's libvirt; the user grows pgdata; the agent grows it online")
    daemon = start_daemon(pod_uid=POD_UID)
    daemons.append(daemon)
    print(f"  launcher libvirt: {Path(daemon_binary()[0]).name} as uid {K.QEMU_UID} (session), socket "
          f"<kubelet pods>/{POD_UID[:8]}…/volumes/kubernetes.io~empty-dir/libvirt-runtime/{daemon.socket_path.name}"
          f" ({daemon.root})")
    domain = "vms_pg01"
    pgdata = vm_dir / "pgdata.qcow2"
    started = start_domain(daemon, domain, [
        DomainDiskSpec(K.disk_alias("pgdata"), pgdata, "vda"),
        DomainDiskSpec(K.disk_alias("scratch"), vm_dir / "scratch.qcow2", "vdb", backing=library_base)])
    print(f"  domain {domain} running (TCG) on pgdata.qcow2 and scratch.qcow2 from {vm_dir.name}/ "
          f"(started in {started.started_in:.1f} s)")
    show_sizes("before", daemon, domain, pgdata)

    grown = copy.deepcopy(vm3)
    ann = grown["metadata"]["annotations"]
    ann["diskhooks.io/disks"] = ann["diskhooks.io/disks"].replace("{name: pgdata, size: 20Gi}",
                                                                  "{name: pgdata, size: 24Gi}")
    resp = webhook.review("/mutate", obj=grown, old=vm3, operation="UPDATE", kind="VirtualMachine",
                          resource="virtualmachines", group="kubevirt.io", user="demo")
    if not resp.get("allowed"):
        raise SystemExit(f"demo: growing pgdata was denied: {resp.get('status')}")
    vm4, _ = apply_response(grown, resp)
    plan = verified_plan(template_plan_text(vm4), watch_plan_keys(keys).get(), namespace="vms", vm="pg01",
                         where="VM vms/pg01 spec.template diskhooks.io/plan")
    if isinstance(plan, Decision):
        raise SystemExit(f"demo: the new plan does not verify: {plan.reason}")
    sizes = {d.name: d.size_bytes for d in plan.disks}
    print(f"  user demo's UPDATE (pgdata 20Gi -> 24Gi): allowed; the new signed plan: pgdata "
          f"{sizes['pgdata']} bytes, node {plan.node}")

    socket_path = launcher_socket(str(daemon.pods_dir), POD_UID)
    assert socket_path is not None, "the launcher's socket is where the kubelet puts it"
    t0 = time.perf_counter()
    results = expand_online(plan, socket_path=socket_path, domain_name=domain)
    took = (time.perf_counter() - t0) * 1000
    print(f"  the agent's expand_online ({took:.0f} ms): virDomainBlockResize through the launcher's socket")
    for r in results:
        print(f"    {r.volume}: {BOLD if r.outcome == 'grown' else ''}{r.outcome}{RESET} — {r.reason}")
    show_sizes("after ", daemon, domain, pgdata)
    print(f"  the domain is still running: {daemon.conn.lookupByName(domain).isActive() == 1}")
    return vm4


def next_start(webhook: Webhook, vm4: dict[str, Any], *, node: Path, view: Path,
               daemons: list[LauncherDaemon]) -> None:
    """The VM's next start: its launcher Pod (with the grown plan) is admitted and prepare finds the
    image already at the planned size."""
    from tests.libvirt_launcher import stop_daemon

    for d in daemons:
        stop_daemon(d)  # the VM stops: its domain, QEMU and the launcher's libvirt end
    daemons.clear()
    vmi = launcher_vmi(vm4)
    pod = yaml.safe_load((DEMO / "launcher-pod.yaml").read_text())
    pod["metadata"]["labels"].update(vmi["metadata"].get("labels", {}))
    pod["metadata"]["annotations"].update(vmi["metadata"].get("annotations", {}))
    resp = webhook.review("/mutate-pod", obj=pod, kind="Pod", resource="pods", group="")
    if not resp.get("allowed"):
        raise SystemExit(f"demo: the next start's Pod was denied: {resp.get('status')}")
    pod2, _ = apply_response(pod, resp)
    pod2["spec"]["nodeName"] = DEMO_NODE
    init = next(c for c in pod2["spec"]["initContainers"] if c["name"] == "diskhooks-prepare")
    out = subprocess.run(in_container(init, pod2, node, view, [
        sys.executable, "-m", "hooksidecar.cli", "prepare", "--plan-from-env", "--path-prefix", str(view)]),
        cwd=ROOT, env=dict(os.environ, **container_env(init, pod2)), capture_output=True, text=True,
        check=False)
    lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    pgdata: dict[str, Any] = next((ln for ln in lines if ln.get("volume") == "pgdata"), {})
    print(f"  next start, prepare (exit {out.returncode}): pgdata {pgdata.get('result')}, virtual size "
          f"{int(pgdata.get('virtualSize', 0)) / GiB:g} GiB (grown online already: nothing to do)")
    if out.returncode != 0:
        show(out.stdout + out.stderr, limit=12)
        raise SystemExit("demo: prepare failed at the next start")


if __name__ == "__main__":
    raise SystemExit(main())
