"""The node's base catalog: each library base hashed once per node, never trusted for a changed file.

Real files, real ``flock``, real ``qemu-img`` and the real prepare command as subprocesses
(``python -m hooksidecar.prepare --path-prefix``, the layout of ``tests/test_prepare.py``); the node
agent's :func:`nodeagent.catalog.refresh_catalog` is called in-process on the same directories. The
catalog is ``LAUNCHER_BASE_CATALOG`` under the prefix, as prepare sees it; the agent is given the
same directory (on a node both are ``<hostDisks.root>/.diskhooks/catalog``, which the Pod mutation
test at the end checks with the kubelet's mounts emulated).

Each case where a changed base could slip through is tried: same size and mtime but other content
(ctime differs), mtime restored with ``os.utime``, a base replaced by rename, a base edited while
the catalog is being built, a catalog entry forged (another file's identity or entry, a stale
identity with a wrong digest, not JSON, a link) or stale; and 20 prepares started at once on one
base hash it once. Bases that tests do not change are made once per module and left to settle
(a file is hashed for the catalog only once its ctime is 2 s old).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diskplan import basecatalog
from diskplan import keys as K
from diskplan.basecatalog import CatalogEntry
from diskplan.errors import Malformed
from diskplan.plan import Backing, Plan, sign_plan
from hooksidecar.prepare import catalog as files
from nodeagent.catalog import CatalogRefresher, refresh_catalog, run_once_cli
from tests.conftest import ROOT
from tests.test_prepare import HOST_DIR, KEYS, VMI_UID, MiB, Node, make_disk, make_plan, qimg, sha256_of

SETTLED = ("alma.raw", "rocky.qcow2", "par.raw")


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtimeNs": st.st_mtime_ns,
            "ctimeNs": st.st_ctime_ns}


def settle(*paths: Path) -> None:
    """Wait until every file's last change is older than the catalog's quiet period."""
    last = max(p.stat().st_ctime_ns for p in paths)
    left = (last + basecatalog.QUIET_NS - time.time_ns()) / 1e9
    if left > 0:
        time.sleep(left + 0.05)


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    node = Node(tmp_path_factory.mktemp("catalog") / "node")
    lib = node.library()
    random_file(lib / "alma.raw", 8 * MiB)
    qimg("create", "-q", "-f", "qcow2", str(lib / "rocky.qcow2"), str(8 * MiB))
    random_file(lib / "par.raw", 64 * MiB)
    settle(*(lib / n for n in SETTLED))
    return node


@pytest.fixture
def node(shared_node: Node) -> Iterator[Node]:
    """The module's node with an empty catalog, no VM directories and only the settled bases."""
    cat = shared_node.path(K.LAUNCHER_BASE_CATALOG)
    shutil.rmtree(cat, ignore_errors=True)
    cat.mkdir(parents=True)
    shutil.rmtree(shared_node.path(K.LAUNCHER_VMI_DISKS), ignore_errors=True)
    yield shared_node
    for p in shared_node.library().iterdir():
        if p.name not in SETTLED:
            p.unlink()


def catalog(node: Node) -> Path:
    return node.path(K.LAUNCHER_BASE_CATALOG)


def entry(node: Node, file: str) -> dict[str, Any] | None:
    p = catalog(node) / K.catalog_entry_name(file)
    return json.loads(p.read_text()) if p.exists() else None


def agent(node: Node, **kw: Any) -> dict[str, Any]:
    return refresh_catalog(str(node.library()), str(catalog(node)), **kw).as_dict()


def backed(node: Node, disk: str, file: str) -> Plan:
    node.mount_volume(disk)
    fmt = "qcow2" if file.endswith(".qcow2") else "raw"
    return make_plan(make_disk(disk, 64 * MiB, Backing(file.split(".")[0], file, fmt)))


def start(node: Node, plan: Plan) -> subprocess.Popen[str]:
    disk = plan.disks[0].name
    plan_file = node.root.parent / f"plan-{disk}.json"
    plan_file.write_text(sign_plan(plan, KEYS))
    env = {"PATH": os.environ["PATH"], "TMPDIR": "/nonexistent-tmp", "PYTHONDONTWRITEBYTECODE": "1",
           K.ENV_VMI_UID: VMI_UID}
    return subprocess.Popen([sys.executable, "-m", "hooksidecar.prepare", "--plan", str(plan_file),
                             "--path-prefix", str(node.root)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=120)
    lines = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    line: dict[str, Any] = next((ln for ln in lines if ln.get("volume") != K.HOME_MARKER), {})
    return proc.returncode, line, err


def prepare(node: Node, plan: Plan) -> dict[str, Any]:
    code, line, err = finish(start(node, plan))
    assert code == 0, err
    return line


def refused(node: Node, plan: Plan) -> str:
    code, _, err = finish(start(node, plan))
    assert code == 1, err
    return err


def record(node: Node, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(node.path(plan.disks[0].base_record_path).read_text())
    return out


def rewrite_in_place(path: Path, content: bytes, *, keep_mtime: bool) -> None:
    """``cp new old``: same inode, same size; with ``keep_mtime`` the old mtime put back (os.utime)."""
    st = path.stat()
    with path.open("r+b") as fh:
        fh.write(content)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def replace_by_rename(path: Path, content: bytes) -> None:
    """A new file moved in under the old name, with the old file's mtime (``rsync -t``)."""
    st = path.stat()
    new = path.with_name(".incoming")
    new.write_bytes(content)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)


# ------------------------------------------------------------------------------------------------
# first starts
# ------------------------------------------------------------------------------------------------
def test_first_start_on_a_base_the_agent_hashed_reads_nothing_and_records_as_before(node: Node) -> None:
    from hooksidecar.images import check_images

    summary = agent(node)
    assert sorted(summary["hashed"]) == sorted(SETTLED) and summary["failed"] == {}
    base = node.library() / "alma.raw"
    assert entry(node, "alma.raw") == {
        "version": 1, "file": "alma.raw", **_identity(base), "sha256": sha256_of(base),
        "hashedAt": entry(node, "alma.raw")["hashedAt"], "hashedBy": "node-agent"}  # type: ignore[index]
    plan = backed(node, "d1", "alma.raw")

    line = prepare(node, plan)

    assert (line["result"], line["baseRecord"], line["baseHashed"], line["baseSha256"]) == \
        ("created", "written", False, sha256_of(base))
    assert record(node, plan) == {"base": "alma", "file": "alma.raw", "format": "raw",
                                  "virtualSize": 8 * MiB, "sha256": sha256_of(base),
                                  "overlay": "d1.qcow2", "identity": _identity(base)}
    check_images(plan, vmi_uid=VMI_UID, path_prefix=str(node.root))  # the sidecar is unchanged
    assert agent(node)["current"] == sorted(SETTLED)  # a later pass costs a stat per file


def test_catalog_miss_is_hashed_by_prepare_once_for_every_later_vm(node: Node) -> None:
    base = node.library() / "rocky.qcow2"
    first = prepare(node, backed(node, "d1", "rocky.qcow2"))
    assert (first["result"], first["baseHashed"], first["baseSha256"]) == \
        ("created", True, sha256_of(base))
    e = entry(node, "rocky.qcow2")
    assert e is not None and (e["hashedBy"], e["sha256"]) == ("prepare", sha256_of(base))
    assert {k: e[k] for k in _identity(base)} == _identity(base)
    assert oct((catalog(node) / K.catalog_entry_name("rocky.qcow2")).stat().st_mode & 0o777) == "0o644"

    second = prepare(node, backed(node, "d2", "rocky.qcow2"))
    assert (second["result"], second["baseHashed"], second["baseSha256"]) == \
        ("created", False, sha256_of(base))
    assert "rocky.qcow2" in agent(node)["current"]  # the agent finds the prepare's entry good


def test_twenty_parallel_first_starts_hash_the_base_once(node: Node) -> None:
    base = node.library() / "par.raw"
    plans = [backed(node, f"p{i}", "par.raw") for i in range(20)]
    procs = [start(node, p) for p in plans]
    lines = []
    for proc in procs:
        code, line, err = finish(proc)
        assert code == 0, err
        lines.append(line)
    assert [ln["result"] for ln in lines] == ["created"] * 20
    assert sum(ln["baseHashed"] for ln in lines) == 1, [ln["baseHashed"] for ln in lines]
    assert {ln["baseSha256"] for ln in lines} == {sha256_of(base)}
    assert {record(node, p)["sha256"] for p in plans} == {sha256_of(base)}
    assert entry(node, "par.raw")["hashedBy"] == "prepare"  # type: ignore[index]


def test_prepare_waits_for_whoever_holds_the_lock_and_takes_its_entry(node: Node) -> None:
    base = node.library() / "alma.raw"
    cat = str(catalog(node))
    with files.file_lock(cat, "alma.raw", wait_s=0) as held:
        assert held
        proc = start(node, backed(node, "d1", "alma.raw"))
        time.sleep(1.0)  # prepare found no entry and waits for the lock (a holder hashing)
        fd = os.open(base, os.O_RDONLY)
        try:
            files.write_entry(cat, files.entry_of("alma.raw", files.hash_for_catalog(fd), by="node-agent"))
        finally:
            os.close(fd)
    code, line, err = finish(proc)
    assert code == 0, err
    assert (line["baseHashed"], line["baseSha256"]) == (False, sha256_of(base))


def test_the_agent_leaves_a_base_that_a_prepare_is_hashing(node: Node) -> None:
    with files.file_lock(str(catalog(node)), "alma.raw", wait_s=0) as held:
        assert held
        summary = agent(node)
    assert "alma.raw" in summary["busy"] and entry(node, "alma.raw") is None
    assert "alma.raw" in agent(node)["hashed"]


# ------------------------------------------------------------------------------------------------
# changed bases are never taken for the old ones
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_mtime", [False, True], ids=["same size", "same size, mtime restored"])
def test_base_rewritten_in_place_is_hashed_again_and_refused_for_the_old_overlay(
        node: Node, keep_mtime: bool) -> None:
    base = random_file(node.library() / "inplace.raw", 8 * MiB)
    settle(base)
    assert "inplace.raw" in agent(node)["hashed"]
    old = sha256_of(base)
    plan = backed(node, "d1", "inplace.raw")
    assert prepare(node, plan)["baseHashed"] is False
    before = _identity(base)

    rewrite_in_place(base, os.urandom(8 * MiB), keep_mtime=keep_mtime)
    now = _identity(base)
    assert (now["ino"], now["size"]) == (before["ino"], before["size"]) and now["ctimeNs"] != before["ctimeNs"]
    assert (now["mtimeNs"] == before["mtimeNs"]) is keep_mtime
    new = sha256_of(base)

    assert agent(node)["settling"] == ["inplace.raw"]  # changed just now: not hashed yet
    fresh = prepare(node, backed(node, "d2", "inplace.raw"))  # another VM's first start
    assert (fresh["baseHashed"], fresh["baseSha256"]) == (True, new)  # never the stale entry's
    assert entry(node, "inplace.raw")["sha256"] == new  # type: ignore[index]
    err = refused(node, plan)  # the first VM's next start: its overlay was made on the old content
    assert f"changed since the overlay {HOST_DIR}/d1.qcow2 was made on it (sha256 {old} -> {new})" in err


def test_base_replaced_by_rename_with_the_old_size_and_mtime_is_caught(node: Node) -> None:
    base = random_file(node.library() / "renamed.raw", 8 * MiB)
    settle(base)
    agent(node)
    old = sha256_of(base)
    plan = backed(node, "d1", "renamed.raw")
    assert prepare(node, plan)["baseHashed"] is False

    replace_by_rename(base, os.urandom(8 * MiB))
    new = sha256_of(base)
    settle(base)
    assert agent(node)["hashed"] == ["renamed.raw"]  # the agent sees the new inode and hashes it
    assert entry(node, "renamed.raw")["sha256"] == new  # type: ignore[index]

    err = refused(node, plan)
    assert f"(sha256 {old} -> {new})" in err
    assert prepare(node, backed(node, "d2", "renamed.raw"))["baseSha256"] == new


def test_base_edited_while_the_agent_hashes_it_gets_no_entry(tmp_path: Path) -> None:
    lib, cat = tmp_path / "lib", tmp_path / "catalog"
    lib.mkdir()
    base = lib / "busy.raw"
    with base.open("wb") as fh:  # 192 MiB, a hashing pass long enough to be written to meanwhile
        fh.truncate(192 * MiB)
        fh.write(os.urandom(MiB))
    settle(base)
    asked = []

    def writer() -> bool:  # asked before the file, then every 64 MiB read: a job writes the base
        asked.append(1)
        if len(asked) == 2:
            with base.open("r+b") as fh:
                fh.seek(100 * MiB)
                fh.write(b"edited while hashed")
        return False

    summary = refresh_catalog(str(lib), str(cat), should_stop=writer)
    assert len(asked) > 2 and summary.changed == ["busy.raw"]
    assert not (cat / K.catalog_entry_name("busy.raw")).exists()
    # the quiet rule: written a moment ago -> left for later (written again here, because the
    # pass above can take longer than the quiet period on a loaded machine)
    with base.open("r+b") as again:
        again.seek(101 * MiB)
        again.write(b"written again")
    assert refresh_catalog(str(lib), str(cat)).settling == ["busy.raw"]
    settle(base)
    assert refresh_catalog(str(lib), str(cat)).hashed == ["busy.raw"]
    e = json.loads((cat / K.catalog_entry_name("busy.raw")).read_text())
    assert e["sha256"] == sha256_of(base)


def test_base_written_just_now_is_left_for_later_and_prepare_waits_for_it_to_settle(node: Node) -> None:
    base = random_file(node.library() / "fresh.raw", 8 * MiB)
    summary = agent(node)
    assert summary["settling"] == ["fresh.raw"] and entry(node, "fresh.raw") is None
    assert 0 < summary["retryInS"] <= basecatalog.QUIET_NS / 1e9

    line = prepare(node, backed(node, "d1", "fresh.raw"))

    e = entry(node, "fresh.raw")
    assert line["baseHashed"] is True and e is not None and e["hashedBy"] == "prepare"
    hashed_at = basecatalog.parse_entry((catalog(node) / K.catalog_entry_name("fresh.raw")).read_bytes())
    assert hashed_at.hashed_at.timestamp() * 1e9 - _identity(base)["ctimeNs"] >= basecatalog.QUIET_NS


# ------------------------------------------------------------------------------------------------
# forged and stale entries
# ------------------------------------------------------------------------------------------------
def _other_files_identity(node: Node, e: dict[str, Any]) -> None:
    other = node.library() / "rocky.qcow2"
    e.update(_identity(other), sha256=sha256_of(other))


def _stale_identity_wrong_digest(node: Node, e: dict[str, Any]) -> None:
    e.update(mtimeNs=e["mtimeNs"] - 1, sha256="0" * 64)


def _another_files_entry(node: Node, e: dict[str, Any]) -> None:
    e.clear()
    e.update(json.loads((catalog(node) / K.catalog_entry_name("rocky.qcow2")).read_text()))


@pytest.mark.parametrize("forge", [_other_files_identity, _stale_identity_wrong_digest,
                                   _another_files_entry, "not JSON", "unknown member", "symlink",
                                   "oversize"])
def test_forged_or_stale_entry_is_not_trusted_and_is_replaced(node: Node, forge: Any) -> None:
    agent(node)
    path = catalog(node) / K.catalog_entry_name("alma.raw")
    e = json.loads(path.read_text())
    if callable(forge):
        forge(node, e)
        path.write_text(json.dumps(e))
    elif forge == "not JSON":
        path.write_text("{")
    elif forge == "unknown member":
        path.write_text(json.dumps({**e, "trusted": True, "sha256": "0" * 64}))
    elif forge == "symlink":  # a good-looking entry elsewhere, linked in
        elsewhere = node.root.parent / "elsewhere.json"
        elsewhere.write_text(json.dumps({**e, "sha256": "0" * 64}))
        path.unlink()
        path.symlink_to(elsewhere)
    else:
        path.write_text(json.dumps({**e, "sha256": "0" * 64}) + " " * basecatalog.MAX_ENTRY_BYTES)
    base = node.library() / "alma.raw"

    line = prepare(node, backed(node, "d1", "alma.raw"))

    assert (line["baseHashed"], line["baseSha256"]) == (True, sha256_of(base))
    fixed = entry(node, "alma.raw")
    assert fixed is not None and not path.is_symlink()
    assert (fixed["sha256"], fixed["hashedBy"]) == (sha256_of(base), "prepare")


def test_an_entry_is_taken_on_its_identity_alone_like_a_base_record(node: Node) -> None:
    """What the catalog trusts, shown with an entry whose digest was edited but whose identity is
    the file's: the base is not read (the edit is not noticed). Only root on the node can write the
    catalog, as it can the base records and the library itself (docs/BASE-CATALOG.md)."""
    agent(node)
    path = catalog(node) / K.catalog_entry_name("alma.raw")
    path.write_text(json.dumps({**json.loads(path.read_text()), "sha256": "ab" * 32}))
    line = prepare(node, backed(node, "d1", "alma.raw"))
    assert (line["baseHashed"], line["baseSha256"]) == (False, "ab" * 32)


def test_entry_of_a_base_that_left_the_library_is_removed(node: Node) -> None:
    base = random_file(node.library() / "gone.raw", MiB)
    settle(base)
    assert "gone.raw" in agent(node)["hashed"]
    base.unlink()
    assert agent(node)["removed"] == ["gone.raw"]
    assert not (catalog(node) / K.catalog_entry_name("gone.raw")).exists()
    assert not (catalog(node) / K.catalog_lock_name("gone.raw")).exists()


# ------------------------------------------------------------------------------------------------
# the node agent's pass and thread
# ------------------------------------------------------------------------------------------------
def test_agent_skips_links_directories_and_names_no_plan_can_give(tmp_path: Path) -> None:
    lib, cat = tmp_path / "lib", tmp_path / "root" / ".diskhooks" / "catalog"
    lib.mkdir()
    target = random_file(tmp_path / "outside.raw", MiB)
    (lib / "link.raw").symlink_to(target)
    (lib / "sub").mkdir()
    random_file(lib / ".hidden.raw", MiB)
    os.mkfifo(lib / "fifo.raw")
    stale = cat / f".x.raw.entry.json{files.TMP_INFIX}0123456789abcdef"
    first = refresh_catalog(str(lib), str(cat))  # makes the catalog directory
    assert cat.is_dir() and oct(cat.stat().st_mode & 0o777) == "0o755"
    assert first.skipped == {"link.raw": "a symbolic link", "sub": "not a regular file",
                             ".hidden.raw": "not a name a plan can give a base",
                             "fifo.raw": "not a regular file"}
    stale.write_text("{}")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    again = refresh_catalog(str(lib), str(cat))
    assert set(again.skipped) == {"link.raw", "sub", ".hidden.raw", "fifo.raw"}
    assert again.skipped["link.raw"] == "a symbolic link"
    assert again.hashed == [] and not stale.exists() and sorted(os.listdir(cat)) == []


def test_agent_gives_up_a_file_when_asked_to_stop(tmp_path: Path) -> None:
    lib, cat = tmp_path / "lib", tmp_path / "catalog"
    lib.mkdir()
    with (lib / "big.raw").open("wb") as fh:
        fh.truncate(256 * MiB)
    settle(lib / "big.raw")
    asked = []

    def stop() -> bool:  # no between files, yes at the first look while hashing
        asked.append(1)
        return len(asked) > 1

    summary = refresh_catalog(str(lib), str(cat), should_stop=stop)
    assert len(asked) == 2 and summary.hashed == [] and os.listdir(cat) == ["big.raw.lock"]


def test_refresher_thread_hashes_a_new_base_once_it_settles_and_stops_promptly(tmp_path: Path) -> None:
    from hooksidecar.logfmt import JsonLog

    lib, cat, log = tmp_path / "lib", tmp_path / "catalog", tmp_path / "agent.log"
    lib.mkdir()
    with log.open("w") as stream:
        refresher = CatalogRefresher(dirs=lambda: (str(lib), str(cat)), log=JsonLog(stream),
                                     interval_s=0.5)
        refresher.start()
        time.sleep(0.2)
        base = random_file(lib / "new.raw", 4 * MiB)  # appears after the first pass
        try:
            deadline = time.monotonic() + 10
            while refresher.last is None or "new.raw" not in refresher.last.current + refresher.last.hashed:
                assert time.monotonic() < deadline, "the refresher never hashed the new base"
                time.sleep(0.1)
        finally:
            began = time.monotonic()
            assert refresher.stop(5.0)
            assert time.monotonic() - began < 1.0
    e = json.loads((cat / "new.raw.entry.json").read_text())
    assert (e["sha256"], e["hashedBy"]) == (sha256_of(base), "node-agent")
    events = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [ev["hashed"] for ev in events if ev["event"] == "catalog"] == [["new.raw"]]


def test_run_once_cli_uses_the_policy_directories_under_the_host_prefix(tmp_path: Path) -> None:
    from dataclasses import replace

    from diskplan.policy import load_policy
    from tests.conftest import EXAMPLE_POLICY

    example = load_policy(EXAMPLE_POLICY.read_text())
    policy = replace(example, host_disks=replace(example.host_disks, root="/data/vms",
                                                 image_library="/data/images"))
    lib = tmp_path / "data" / "images"
    lib.mkdir(parents=True)
    base = random_file(lib / "base.raw", MiB)
    settle(base)
    code, summary = run_once_cli(policy, host_prefix=str(tmp_path))
    assert (code, summary["hashed"]) == (0, ["base.raw"])
    assert summary["catalog"] == f"{tmp_path}/data/vms/.diskhooks/catalog"
    assert (tmp_path / "data/vms/.diskhooks/catalog/base.raw.entry.json").is_file()
    none = replace(policy, host_disks=replace(policy.host_disks, image_library=None))
    assert run_once_cli(none, host_prefix=str(tmp_path))[0] == 0


# ------------------------------------------------------------------------------------------------
# the entry format (pure)
# ------------------------------------------------------------------------------------------------
IDENT = {"dev": 2049, "ino": 12, "size": 4096, "mtimeNs": 10**18, "ctimeNs": 10**18 + 5}
AT = datetime.datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=datetime.UTC)
GOOD = CatalogEntry(file="alma-9.qcow2", identity=IDENT, sha256="a" * 64, hashed_at=AT,
                    hashed_by="node-agent")


def test_entry_round_trip_and_the_trust_rule() -> None:
    data = basecatalog.entry_json(GOOD)
    assert json.loads(data) == {"version": 1, "file": "alma-9.qcow2", **IDENT, "sha256": "a" * 64,
                                "hashedAt": "2026-01-02T03:04:05.25Z", "hashedBy": "node-agent"}
    assert basecatalog.parse_entry(data, file="alma-9.qcow2") == GOOD
    assert basecatalog.mismatch(GOOD, file="alma-9.qcow2", identity=IDENT) is None
    assert basecatalog.mismatch(GOOD, file="alma-9.qcow2", identity={**IDENT, "ctimeNs": 1}) == \
        f"the file changed since it was hashed (ctimeNs {10**18 + 5} -> 1)"
    assert basecatalog.mismatch(GOOD, file="rocky.qcow2", identity=IDENT) is not None
    assert basecatalog.mismatch(GOOD, file="alma-9.qcow2", identity={**IDENT, "ino": 13}) is not None


def test_quiet_rule_is_on_ctime() -> None:
    q = basecatalog.QUIET_NS
    assert basecatalog.is_quiet(IDENT, now_ns=IDENT["ctimeNs"] + q)
    assert not basecatalog.is_quiet(IDENT, now_ns=IDENT["ctimeNs"] + q - 1)
    assert not basecatalog.is_quiet({**IDENT, "mtimeNs": 0}, now_ns=IDENT["ctimeNs"] + 1)


def _doc(**kw: Any) -> bytes:
    doc = json.loads(basecatalog.entry_json(GOOD))
    doc.update(kw)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize("data, field, words", [
    (_doc(extra=1), "catalog entry.extra", "unknown member"),
    (_doc(sha256=...), "catalog entry.sha256", "is missing"),
    (_doc(version=2), "catalog entry.version", "must be 1"),
    (_doc(version=True), "catalog entry.version", "must be 1"),
    (_doc(ino=True), "catalog entry.ino", "non-negative integer"),
    (_doc(size=-1), "catalog entry.size", "non-negative integer"),
    (_doc(sha256="A" * 64), "catalog entry.sha256", "64 lower-case hex"),
    (_doc(file="../etc/passwd"), "catalog entry.file", "not a library base file name"),
    (_doc(file=".hidden"), "catalog entry.file", "not a library base file name"),
    (_doc(hashedBy="someone"), "catalog entry.hashedBy", "must be one of"),
    (_doc(hashedAt="yesterday"), "catalog entry.hashedAt", "not an RFC 3339 time"),
    (b"[]", "catalog entry", "must be a JSON object"),
    (b"\xff{}", "catalog entry", "not UTF-8"),
    (b" " * (basecatalog.MAX_ENTRY_BYTES + 1), "catalog entry", "more than the 4096 accepted"),
])
def test_entry_reader_is_strict(data: bytes, field: str, words: str) -> None:
    with pytest.raises(Malformed) as err:
        basecatalog.parse_entry(data)
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_entry_is_read_only_under_its_own_name() -> None:
    with pytest.raises(Malformed, match="names 'alma-9.qcow2', not 'rocky.qcow2'"):
        basecatalog.parse_entry(basecatalog.entry_json(GOOD), file="rocky.qcow2")


def test_a_bad_entry_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(Malformed):
        files.write_entry(str(tmp_path), CatalogEntry(file="x.raw", identity=IDENT, sha256="nope",
                                                      hashed_at=AT, hashed_by="prepare"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("file", ["alma.raw", "a", "x.entry.json", "base.lock"])
def test_catalog_names_never_meet(file: str) -> None:
    names = {K.catalog_entry_name(file), K.catalog_lock_name(file)}
    assert len(names) == 2 and not any(n.startswith(".") for n in names)
    assert K.catalog_entry_name(file) != K.catalog_lock_name(file + ".entry")  # lock of another file
    assert K.catalog_dir("/var/lib/diskhooks/vms/") == "/var/lib/diskhooks/vms/.diskhooks/catalog"



# ------------------------------------------------------------------------------------------------
# the Pod mutation: the catalog is prepare's alone
# ------------------------------------------------------------------------------------------------
def test_pod_mutation_mounts_the_catalog_read_write_in_prepare_only() -> None:
    from diskplan.policy import load_policy
    from tests.conftest import EXAMPLE_POLICY
    from tests.test_pod_mutation import container, managed_pod, mounts, mutate, sample_plan, volume

    policy = load_policy(EXAMPLE_POLICY.read_text())
    out = mutate(managed_pod(sample_plan(policy, backing=True, persist=True)), policy)
    assert volume(out, K.POD_VOLUME_BASE_CATALOG) == {
        "name": K.POD_VOLUME_BASE_CATALOG,
        "hostPath": {"path": "/var/lib/diskhooks/vms/.diskhooks/catalog", "type": "DirectoryOrCreate"}}
    assert mounts(container(out, K.PREPARE_CONTAINER))[K.LAUNCHER_BASE_CATALOG] == \
        (K.POD_VOLUME_BASE_CATALOG, False)
    for name in ("compute", "hook-sidecar-0"):  # VM owners' code never sees it
        c = container(out, name)
        assert all(m["name"] != K.POD_VOLUME_BASE_CATALOG for m in c.get("volumeMounts", []))
    assert mutate(out, policy) == out
    plain = mutate(managed_pod(sample_plan(policy, backing=False, persist=True)), policy)
    assert volume(plain, K.POD_VOLUME_BASE_CATALOG) is None  # nothing to look up without a base


def test_rendered_prepare_fills_the_node_catalog(tmp_path: Path) -> None:
    """Kubelet emulated as in tests/test_pod_mutation.py (hostPath bind mounts in a private mount
    namespace); the mutation, prepare, qemu-img and the catalog are real. A second VM's first start
    on the same base finds the entry the first one left on the node."""
    from dataclasses import replace

    from diskplan.policy import load_policy
    from tests.conftest import EXAMPLE_POLICY
    from tests.test_pod_mutation import (
        LIBRARY,
        _run_in,
        container,
        data_disk,
        managed_pod,
        mutate,
        sample_plan,
    )

    policy = load_policy(EXAMPLE_POLICY.read_text())
    node = tmp_path / "node"
    base = node / LIBRARY.lstrip("/") / "almalinux-9.qcow2"
    base.parent.mkdir(parents=True)
    qimg("create", "-q", "-f", "qcow2", str(base), "1G")
    plan = replace(sample_plan(policy, backing=True, persist=False), disks=(data_disk(
        backing=Backing("almalinux-9", "almalinux-9.qcow2", "qcow2")),))
    lines = []
    for vm in ("one", "two"):
        vm_plan = replace(plan, vm=vm, host_dir=f"/var/lib/diskhooks/vms/vms/{vm}")
        pod = managed_pod(vm_plan)
        pod["metadata"]["annotations"][K.ANN_DOMAIN] = vm
        pod["metadata"]["labels"]["vm.kubevirt.io/name"] = vm
        pod["spec"].pop("hostname", None)
        pod = mutate(pod, policy)
        pod["spec"]["nodeName"] = "node-a"
        init = container(pod, K.PREPARE_CONTAINER)
        view = tmp_path / f"view-{vm}"
        proc = _run_in(init, pod, node, view, [sys.executable, "-m", "hooksidecar.cli", *init["args"],
                                               "--path-prefix", str(view)])
        assert proc.returncode == 0, proc.stderr
        lines.append(next(json.loads(ln) for ln in proc.stdout.splitlines()
                          if json.loads(ln)["volume"] == "datadisk"))
    assert [ln["baseHashed"] for ln in lines] == [True, False]
    e = json.loads((node / "var/lib/diskhooks/vms/.diskhooks/catalog/almalinux-9.qcow2.entry.json")
                   .read_text())
    assert (e["sha256"], e["hashedBy"], e["ino"]) == (sha256_of(base), "prepare", base.stat().st_ino)


def test_diskhooks_node_catalog_command(tmp_path: Path) -> None:
    from tests.conftest import EXAMPLE_POLICY

    library = tmp_path / "var/lib/diskhooks/images"  # the example policy's imageLibrary
    library.mkdir(parents=True)
    base = random_file(library / "almalinux-9.qcow2", MiB)
    settle(base)
    argv = [sys.executable, "-m", "nodeagent", "catalog", "--config", str(EXAMPLE_POLICY),
            "--host-prefix", str(tmp_path)]
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["hashed"], summary["catalog"]) == \
        (["almalinux-9.qcow2"], f"{tmp_path}/var/lib/diskhooks/vms/.diskhooks/catalog")
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert json.loads(again.stdout)["current"] == ["almalinux-9.qcow2"]
    missing = subprocess.run([*argv[:5], str(tmp_path / "nope.yaml")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
