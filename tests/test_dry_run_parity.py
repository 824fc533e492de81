"""``diskhooks-webhook dry-run`` answers what the served webhook answers, also for large objects.

The served webhook reads review bodies up to 4 MiB (the API server sends objects up to 3 MiB), so a
VM carrying a 1.1 MB annotation reaches the admission core and is denied naming the annotation.
dry-run must read the same objects and give the same denial (exit 1), not refuse the file as
unusable input (exit 2). The server is the real one (gunicorn, TLS), started as ``serve`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from diskplan import keys as K
from tests.conftest import EXAMPLE_POLICY, ROOT
from tests.test_server import Server, sample
from tests.test_webhook_cli import run
from webhook import app, cli

BIG = 1_100_000  # bytes of annotation value: over dry-run's old 1 MiB file limit, under 3 MiB


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("parity-server"))
    try:
        yield srv
    finally:
        srv.stop()


def _vm_with(annotation: str, value: str) -> dict[str, object]:
    vm = sample("vm-create.json")["request"]["object"]
    vm["metadata"]["annotations"][annotation] = value
    return dict(vm)


@pytest.mark.parametrize("annotation", [K.ANN_DISKS, K.ANN_PASSTHROUGH, K.ANN_CPU])
def test_a_one_megabyte_annotation_gets_the_servers_denial(served: Server, tmp_path: Path,
                                                           annotation: str) -> None:
    vm = _vm_with(annotation, "x" * BIG)
    review = sample("vm-create.json")
    review["request"]["object"] = vm
    body = json.dumps(review).encode()
    assert 1024 * 1024 < len(body) < 3 * 1024 * 1024
    conn = served.connect()
    answer = served.review(conn, review)
    conn.close()
    assert answer["allowed"] is False
    message = answer["status"]["message"]
    assert message.startswith(annotation + ": "), message

    path = tmp_path / "vm.yaml"
    path.write_text(yaml.safe_dump(vm))
    assert path.stat().st_size > 1024 * 1024
    out = run("dry-run", "--config", EXAMPLE_POLICY, "--plan-keys-dir", served.keys_dir,
              "--cluster-objects", ROOT / "examples" / "demo" / "cluster-objects.yaml", path)
    assert out.returncode == cli.EXIT_DENIED, out.stderr
    assert message in out.stderr, (message, out.stderr)


def test_dry_run_reads_what_the_server_reads() -> None:
    assert cli.MAX_OBJECT_BYTES == app.DEFAULT_MAX_BODY_BYTES


def test_an_object_file_over_the_servers_limit_is_unusable_input(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("a: " + "x" * (cli.MAX_OBJECT_BYTES + 1) + "\n")
    out = run("dry-run", "--config", EXAMPLE_POLICY, path)
    assert out.returncode == cli.EXIT_USAGE
    assert f"larger than {cli.MAX_OBJECT_BYTES} bytes" in out.stderr, out.stderr
