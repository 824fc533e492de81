"""The load-and-soak command, short: ``python -m benchmarks soak`` as a user runs it (the served
webhook with gunicorn, TLS and 2 workers at a fixed rate over 4 kept-alive connections, then the
hook sidecar over its unix socket, a new channel per call). Every answer is checked by the soak
itself; here no request may fail. Latency and RSS are printed, never asserted (the 10-minute
figures are in the note of issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

DURATION, RATE, SIDECAR_CALLS = 6, 100, 200


def test_a_short_soak_answers_every_request(tmp_path: Path) -> None:
    out_file = tmp_path / "soak.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "soak", "--duration", str(DURATION), "--rate", str(RATE),
         "--warmup", "2", "--sidecar-calls", str(SIDECAR_CALLS), "--json", str(out_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    webhook, sidecar = json.loads(out_file.read_text())
    assert webhook["name"] == "webhook" and sidecar["name"] == "sidecar"
    assert webhook["errors"] == 0 and sidecar["errors"] == 0, (webhook, sidecar)
    # every request due in the counted window was sent and answered (open loop, paced)
    assert webhook["requests"] == DURATION * RATE, webhook
    assert sidecar["requests"] == SIDECAR_CALLS
    for part in (webhook, sidecar):
        assert part["rssStartKiB"] > 0 and part["rssEndKiB"] > 0 and part["p99Ms"] > 0
    assert "targets: zero errors met" in out.stdout
