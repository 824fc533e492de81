"""The repository stands on its own: a copy of it, with nothing beside it, passes its tests.

A user's clone has nothing beside it: every fixture must live inside the repository. This test copies
the files git knows about (tracked, plus untracked ones that are not ignored; never ``.venv/`` or
``.tools/``) into a temporary directory whose parent holds nothing else, and runs a fast subset of the
suite there with this interpreter, the copy as the working directory and as ``PYTHONPATH``, so that
the copy's packages, tests and fixtures are the ones imported (checked), not this checkout's editable
install. The subset reads every kind of fixture: KubeVirt's samples and domain XML, the
AdmissionReviews and the OpenAPI schema, and runs real libvirt's parser.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SUBSET = (
    "tests/test_domain.py",  # KubeVirt's samples and domain XML
    "tests/test_libvirt_accepts.py",  # the samples through real libvirt
    "tests/test_admission.py",  # the AdmissionReviews
    "tests/test_pod_mutation.py",  # the virt-launcher Pod review
    "tests/test_vm_mutation.py",  # the samples' VMs and KubeVirt's OpenAPI schema
)
MIN_PASSED = 300  # the subset has about 400 tests; far fewer means it did not really run
EXCLUDED_TOP = {".git", ".venv", ".tools"}


def repository_files(root: Path) -> list[str]:
    """Tracked files and untracked, not ignored ones, as git lists them (deleted ones left out)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout.decode()
    names = sorted({n for n in out.split("\0") if n})
    return [n for n in names if n.split("/", 1)[0] not in EXCLUDED_TOP
            and (root / n).is_file()]


def copy_repository(root: Path, dest: Path) -> None:
    for name in repository_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)


def test_a_copy_with_nothing_beside_it_passes(tmp_path: Path) -> None:
    copy = tmp_path / "alone" / "diskhooks"
    copy_repository(ROOT, copy)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["diskhooks"]  # no ``shared`` beside it
    assert (copy / "tests" / "conftest.py").is_file() and not (copy / ".venv").exists()
    env = {**os.environ, "PYTHONPATH": str(copy)}

    where = ("import diskplan, hooksidecar, webhook, tests.conftest as c\n"
             "for m in (diskplan, hooksidecar, webhook, c): print(m.__file__)\n"
             "print(c.ROOT)")
    probe = subprocess.run([sys.executable, "-c", where],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=60, check=True)
    *modules, conftest_root = probe.stdout.split()
    for path in modules:
        assert Path(path).is_relative_to(copy), f"imported from outside the copy: {path}"
    assert Path(conftest_root) == copy

    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *SUBSET],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600, check=False)
    tail = "\n".join((res.stdout + res.stderr).splitlines()[-40:])
    assert res.returncode == 0, f"the subset failed in the copy at {copy}:\n{tail}"
    summary = res.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= MIN_PASSED, f"too few tests ran: {summary}"
    # A skip here would be a fixture the copy lacks (a skipped test in CI is a defect anyway).
    assert "skipped" not in summary and "error" not in summary, summary
