"""Other encrypted transports for rsync, measured in the migrate benchmark's rounds for comparison.

The issue asks the agents' path for 0.8x the throughput of *plaintext* rsync. These references show
what the usual encrypted ways of running rsync reach on the same machine, in the same run, with the
same file and options, so the gap can be read against them and not only against no encryption:

- ``ssh``: **rsync over OpenSSH** (the transport the issue names as the alternative to TLS): a private
  ``sshd`` on 127.0.0.4 (its own host key, one authorized key, no PAM), ``rsync -e ssh`` with
  OpenSSH's default cipher (``--ssh-cipher`` to choose another), receiving with ``rsync --server``;
- ``socat``: **rsync's daemon protocol through two socat OpenSSL relays** (what ``rsync-ssl``-style
  set-ups do: C relays over OpenSSL, mutual TLS 1.3 with the benchmark's own certificates): ``rsync
  -e <socat client> src/ host::dst/`` to ``socat OPENSSL-LISTEN ... EXEC:'rsync --server --daemon'``.

Each needs its tool (``/usr/sbin/sshd`` from ``openssh-server``, ``ssh``; ``socat``); a missing one is
reported and not measured. The CPU of a path counts both ends: the client side as this process's
reaped children, the server side from the listener's ``/proc`` entry (it reaps its connections).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSH_ADDRESS = "127.0.0.4"
SOCAT_ADDRESS = "127.0.0.5"
SOCAT_BUFFER = 256 << 10


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _wait_listening(address: str, port: int, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start ({proc.returncode})")
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start listening on {address}:{port}") from None
            time.sleep(0.05)


class Reference:
    """One transport: :meth:`command` is the rsync command line (options and source given) that sends
    through it; :attr:`listener` the server-side process (its CPU and its reaped children's)."""

    name = ""
    listener: subprocess.Popen[bytes] | None = None

    def command(self, options: list[str], source_dir: Path) -> list[str]:
        raise NotImplementedError

    def stop(self) -> None:
        if self.listener is not None and self.listener.poll() is None:
            self.listener.terminate()
            try:
                self.listener.wait(10)
            except subprocess.TimeoutExpired:
                self.listener.kill()
                self.listener.wait()


def missing_tools(name: str) -> str | None:
    """Why the reference ``name`` cannot run here, or None."""
    if name == "ssh":
        if not Path("/usr/sbin/sshd").is_file() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
            return "needs /usr/sbin/sshd and ssh (apt-get install openssh-server openssh-client)"
        return None
    if name == "socat":
        return None if shutil.which("socat") else "needs socat (apt-get install socat)"
    return f"unknown reference {name!r} (ssh, socat)"


class SshReference(Reference):
    name = "rsync over OpenSSH"

    def __init__(self, work: Path, dest: Path, cipher: str | None) -> None:
        self.dir = work / "ssh"
        self.dir.mkdir()
        self.dest = dest
        for key in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / key)], check=True)
        (self.dir / "authorized_keys").write_bytes((self.dir / "user.pub").read_bytes())
        self.port = _free_port(SSH_ADDRESS)
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress {SSH_ADDRESS}\nHostKey {self.dir / 'host'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile none\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.listener = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(SSH_ADDRESS, self.port, "sshd", self.listener)
        self.ssh = ["ssh", "-p", str(self.port), "-i", str(self.dir / "user"), "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
        if cipher:
            self.ssh += ["-c", cipher]
        self.cipher = cipher or _default_cipher(self.ssh)
        self.name = f"rsync over OpenSSH ({self.cipher})"

    def command(self, options: list[str], source_dir: Path) -> list[str]:
        user = os.environ.get("USER") or "root"
        return ["rsync", *options, "-e", " ".join(self.ssh), f"{source_dir}/", f"{user}@{SSH_ADDRESS}:{self.dest}/"]


def _default_cipher(ssh: list[str]) -> str:
    """The cipher OpenSSH's client offers first (what it gets from its own sshd)."""
    out = subprocess.run([*ssh, "-G", SSH_ADDRESS], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("ciphers "):
            return line.split()[1].split(",")[0]
    return "OpenSSH's default"


class SocatReference(Reference):
    name = "rsync through socat OpenSSL relays"

    def __init__(self, work: Path, dest: Path, tls_dir: Path, peer_name: str) -> None:
        self.dir = work / "socat"
        self.dir.mkdir()
        conf = self.dir / "rsyncd.conf"
        conf.write_text(f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n[dst]\n"
                        f"path = {dest}\nread only = no\n")
        self.port = _free_port(SOCAT_ADDRESS)
        tls = f"cert={tls_dir / 'tls.crt'},key={tls_dir / 'tls.key'},cafile={tls_dir / 'ca.crt'},verify=1"
        self.listener = subprocess.Popen(
            ["socat", "-b", str(SOCAT_BUFFER),
             f"OPENSSL-LISTEN:{self.port},bind={SOCAT_ADDRESS},reuseaddr,fork,{tls}",
             f"EXEC:rsync --server --daemon --config={conf} ."],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(SOCAT_ADDRESS, self.port, "socat", self.listener)
        self.client = self.dir / "connect"
        self.client.write_text("#!/bin/sh\n# rsync's remote shell: the arguments (host, command) are not used\n"
                               f"exec socat -b {SOCAT_BUFFER} STDIO "
                               f"OPENSSL:{SOCAT_ADDRESS}:{self.port},{tls},commonname={peer_name}\n")
        self.client.chmod(0o755)

    def command(self, options: list[str], source_dir: Path) -> list[str]:
        return ["rsync", *options, "-e", str(self.client), f"{source_dir}/", "bench::dst/"]
