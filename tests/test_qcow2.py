"""diskplan.qcow2: the header reader, checked against real images made by qemu-img and against
``qemu-img info`` (with an explicit ``-f``) reading the same files."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from diskplan import qcow2
from diskplan.qcow2 import read_header

QEMU_IMG = shutil.which("qemu-img")


def test_qemu_img_is_installed() -> None:
    assert QEMU_IMG, "qemu-img is missing: apt-get install -y qemu-utils"


def qemu_img(*args: str) -> None:
    assert QEMU_IMG, "qemu-img is missing: apt-get install -y qemu-utils"
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


def info(path: Path) -> dict[str, Any]:
    assert QEMU_IMG
    out = subprocess.run([QEMU_IMG, "info", "-f", "qcow2", "--output", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(qcow2.HEADER_READ_BYTES)


# ------------------------------------------------------------------------------------------------
# images made by qemu-img, compared field by field with qemu-img info
# ------------------------------------------------------------------------------------------------
def make_images(tmp: Path) -> dict[str, Path]:
    raw = tmp / "base.raw"
    qemu_img("create", "-f", "raw", str(raw), "1M")
    base = tmp / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "64M")
    images = {
        "plain": tmp / "plain.qcow2",
        "big": tmp / "big.qcow2",
        "overlay-raw": tmp / "overlay-raw.qcow2",
        "overlay-qcow2": tmp / "overlay-qcow2.qcow2",
        "data-file": tmp / "data-file.qcow2",
        "data-file-raw": tmp / "data-file-raw.qcow2",
        "v2": tmp / "v2.qcow2",
        "v2-overlay": tmp / "v2-overlay.qcow2",
        "small-clusters": tmp / "small.qcow2",
    }
    qemu_img("create", "-f", "qcow2", str(images["plain"]), "20G")
    qemu_img("create", "-f", "qcow2", str(images["big"]), "2T")
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(raw), str(images["overlay-raw"]), "10M")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(images["overlay-qcow2"]))
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp / 'data.raw'}", str(images["data-file"]),
             "10M")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp / 'data2.raw'},data_file_raw=on",
             str(images["data-file-raw"]), "10M")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(images["v2"]), "10M")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-F", "raw", "-b", str(raw),
             str(images["v2-overlay"]), "10M")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", str(images["small-clusters"]), "1M")
    return images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("qcow2"))


@pytest.mark.parametrize("name", ["plain", "big", "overlay-raw", "overlay-qcow2", "data-file",
                                  "data-file-raw", "v2", "v2-overlay", "small-clusters"])
def test_header_matches_qemu_img_info(images: dict[str, Path], name: str) -> None:
    path = images[name]
    h = read_header(head(path))
    ref = info(path)
    specific = ref["format-specific"]["data"]
    assert h.virtual_size == ref["virtual-size"]
    assert 1 << h.cluster_bits == ref["cluster-size"]
    assert h.version == (2 if specific["compat"] == "0.10" else 3)
    assert h.backing_file == ref.get("backing-filename")
    assert h.backing_format == ref.get("backing-filename-format")
    assert h.data_file == specific.get("data-file")
    assert h.has_external_data_file == ("data-file" in specific)
    assert h.data_file_raw == bool(specific.get("data-file-raw", False))
    assert h.corrupt == bool(specific.get("corrupt", False))
    assert h.dirty == bool(ref.get("dirty-flag", False))
    assert not h.encrypted
    assert h.unknown_incompatible_features == 0


def test_expected_values(images: dict[str, Path], tmp_path: Path) -> None:
    assert read_header(head(images["big"])).virtual_size == 2 * 1024**4
    overlay = read_header(head(images["overlay-raw"]))
    assert overlay.backing_file is not None and overlay.backing_file.endswith("/base.raw")
    assert overlay.backing_format == "raw"
    assert qcow2.EXT_BACKING_FORMAT in overlay.extensions
    data = read_header(head(images["data-file"]))
    assert data.incompatible_features & qcow2.INCOMPAT_DATA_FILE
    assert data.data_file is not None and data.data_file.endswith("/data.raw")


def _with_incompatible(data: bytes, bits: int) -> bytes:
    return data[:72] + struct.pack(">Q", bits) + data[80:]


def test_dirty_and_corrupt_bits(images: dict[str, Path]) -> None:
    data = head(images["plain"])
    assert read_header(_with_incompatible(data, qcow2.INCOMPAT_DIRTY)).dirty
    corrupt = read_header(_with_incompatible(data, qcow2.INCOMPAT_CORRUPT))
    assert corrupt.corrupt and not corrupt.dirty
    unknown = read_header(_with_incompatible(data, 1 << 40))
    assert unknown.unknown_incompatible_features == 1 << 40
    # bit 2 alone (no extension) still means "external data file"
    assert read_header(_with_incompatible(data, qcow2.INCOMPAT_DATA_FILE)).has_external_data_file


# ------------------------------------------------------------------------------------------------
# not qcow2, or broken
# ------------------------------------------------------------------------------------------------
def test_raw_and_empty_are_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "disk.qcow2"  # the name does not make it qcow2
    qemu_img("create", "-f", "raw", str(raw), "1M")
    for data in (head(raw), b"", b"QFI", b"\x00" * 4096):
        with pytest.raises(ValueError, match="not a qcow2 image"):
            read_header(data)
    assert not qcow2.is_qcow2(head(raw))


def test_truncated_and_inconsistent_headers(images: dict[str, Path]) -> None:
    good = head(images["overlay-raw"])
    with pytest.raises(ValueError, match="truncated"):
        read_header(good[:50])
    h = read_header(good)
    name_at = struct.unpack_from(">Q", good, 8)[0]
    with pytest.raises(ValueError, match="beyond"):
        read_header(good[:name_at + 2])  # the backing file name is cut off
    with pytest.raises(ValueError, match="version"):
        read_header(good[:4] + struct.pack(">I", 4) + good[8:])
    with pytest.raises(ValueError, match="cluster_bits"):
        read_header(good[:20] + struct.pack(">I", 40) + good[24:])
    with pytest.raises(ValueError, match="header_length"):
        read_header(good[:100] + struct.pack(">I", 8) + good[104:])
    with pytest.raises(ValueError, match="backing file name length"):
        read_header(good[:16] + struct.pack(">I", 5000) + good[20:])
    # an extension that claims more bytes than the header has
    ext_at = struct.unpack_from(">I", good, 100)[0]
    bad_ext = good[:ext_at + 4] + struct.pack(">I", 60000) + good[ext_at + 8:]
    with pytest.raises(ValueError, match="overruns"):
        read_header(bad_ext)
    assert h.backing_format == "raw"


def test_non_utf8_backing_name_is_refused(images: dict[str, Path]) -> None:
    good = head(images["overlay-raw"])
    name_at = struct.unpack_from(">Q", good, 8)[0]
    bad = good[:name_at] + b"\xff" + good[name_at + 1:]
    with pytest.raises(ValueError, match="UTF-8"):
        read_header(bad)


def test_tables_beyond_the_end_of_the_file(images: dict[str, Path]) -> None:
    """A file cut short keeps a good header; the tables it points at must lie within the file."""
    for name, path in images.items():
        size = path.stat().st_size
        assert qcow2.layout_problem(read_header(head(path)), size) is None, name
    plain = images["plain"]
    h = read_header(head(plain))
    size = plain.stat().st_size
    problem = qcow2.layout_problem(h, size - 1)  # the L1 table is the last thing qemu-img writes
    assert problem is not None and "L1 table" in problem and "beyond the end of the file" in problem
    problem = qcow2.layout_problem(replace(h, l1_size=0), 4096)  # an empty image has no L1 table
    assert problem is not None and "refcount table" in problem
    assert qcow2.layout_problem(replace(h, nb_snapshots=1, snapshots_offset=size), size) is not None
