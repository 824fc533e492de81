"""Shared test fixtures: where the repository and its KubeVirt material (``tests/data/kubevirt/``) live.

The tests read nothing outside the repository except the API server binaries (``$KUBEBUILDER_ASSETS``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# the real control plane (etcd + kube-apiserver from $KUBEBUILDER_ASSETS): fixtures envtest, kube_namespace;
# the node agent as a subprocess against it: start_agent, cluster, agent_setup, agent_node;
# the fuzz profiles and the count of generated inputs printed at the end (tests/fuzzing.py)
pytest_plugins = ["tests.envtest", "tests.node_agent_support", "tests.fuzzing", "tests.migration_support"]

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
KUBEVIRT = DATA / "kubevirt"  # what each file is and where it came from: its README.md
SAMPLES = KUBEVIRT / "samples"
ADMISSION = KUBEVIRT / "admission"
SWAGGER = KUBEVIRT / "openapi" / "swagger.json"
KUBEVIRT_CRDS = KUBEVIRT / "crds" / "kubevirt-crds.yaml"
EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    """A fresh socket directory, as /var/run/kubevirt-hooks is for one launcher."""
    d = tmp_path / "hooks"
    d.mkdir()
    return d
