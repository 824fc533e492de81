"""Shared test fixtures: where the repository and the shared KubeVirt material live."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
KUBEVIRT = SHARED / "kubevirt"
SAMPLES = KUBEVIRT / "samples"
ADMISSION = KUBEVIRT / "admission"
SWAGGER = KUBEVIRT / "openapi" / "swagger.json"
EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SAMPLES.is_dir(), f"the shared KubeVirt material is missing at {SHARED}"
    return SHARED


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    """A fresh socket directory, as /var/run/kubevirt-hooks is for one launcher."""
    d = tmp_path / "hooks"
    d.mkdir()
    return d
