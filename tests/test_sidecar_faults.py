"""The hook sidecar's socket directory unusable: read-only (a read-only tmpfs mounted over it in a
private mount namespace, ``unshare --mount``, since root writes anywhere else). A missing directory
is ``tests/test_sidecar_cli.py::test_serve_needs_an_existing_socket_dir`` (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_read_only_socket_directory_is_a_clear_error(tmp_path: Path) -> None:
    sock_dir = tmp_path / "hooks"
    sock_dir.mkdir()
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o ro,size=64k tmpfs {sock_dir} && exec "$@"', "sh",
         sys.executable, "-m", "hooksidecar.cli", "serve", "--socket-dir", str(sock_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    (line,) = [json.loads(ln) for ln in out.stderr.splitlines() if ln.startswith("{")]
    assert line["event"] == "error"
    assert line["error"] == f"cannot listen on {sock_dir}/diskhooks.sock: Read-only file system"
    assert list(sock_dir.iterdir()) == []
