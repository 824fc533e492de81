"""The migrate benchmark still runs against the current target (a change to the target's preflight
broke it once unnoticed): one small round of each path, its summary read back."""

from __future__ import annotations

import json

import pytest

from benchmarks import migrate_bench


def test_the_migrate_benchmark_runs_one_small_round(capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate_bench.main(["--rounds", "1", "--size", "128Mi", "--references", "none"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fileBytes"] > 64 << 20
    assert summary["sentDiskhooks"] >= summary["allocatedBytes"] * 0.9
    assert 0.9 <= summary["targetAllocatedPerSource"] <= 1.1
    assert summary["ratio"] > 0
    assert summary["references"] == {}
