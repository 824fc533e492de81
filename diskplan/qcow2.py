"""Read a qcow2 image header from bytes: version, virtual size, backing file, data file, feature bits.

Pure: the caller reads the first bytes of a file (64 KiB is enough for images qemu-img makes) and hands
them over; this module never opens files, never runs ``qemu-img`` and never follows a backing chain.
It exists so that a guest-writable image can be inspected without probing its format (the
CVE-2026-24708 class: a guest writes a qcow2 header into a raw disk) and without a subprocess on the
hook sidecar's path.

Layout (qemu ``docs/interop/qcow2.txt``), all integers big-endian::

    0 magic "QFI\\xfb" | 4 version | 8 backing_file_offset (u64) | 16 backing_file_size (u32)
    20 cluster_bits | 24 size (u64) | 32 crypt_method | 36 l1_size | 40 l1_table_offset (u64)
    48 refcount_table_offset (u64) | 56 refcount_table_clusters | 60 nb_snapshots
    64 snapshots_offset (u64) | 72 incompatible_features (u64, v3)
    80 compatible_features | 88 autoclear_features | 96 refcount_order | 100 header_length
    then header extensions (type u32, length u32, data padded to 8 bytes) up to type 0

Anything that does not follow this layout raises :class:`ValueError` with the reason.
:func:`layout_problem` then checks the header against the file's size: a file cut short (a copy
that did not finish) keeps a good header, and ``qemu-img info`` reads it without complaint.
Shared by prepare and the hook sidecar so that both decide alike: :func:`round_to_sector` (the size
qemu gives an image) and :func:`raw_base_looks_qcow2` (the words both refuse such a base with).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

QCOW2_MAGIC = b"QFI\xfb"
#: how many bytes a caller should read: the header, its extensions and the backing file name of an
#: image made by qemu-img all live in the first cluster, and 64 KiB is qemu-img's default cluster.
HEADER_READ_BYTES = 64 * 1024

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_FILE_SIZE = 1023  # qemu refuses longer backing file names

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FULL_DISK_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
KNOWN_INCOMPATIBLE = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                      | INCOMPAT_EXTENDED_L2)
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
L1_ENTRY_BYTES = REFTABLE_ENTRY_BYTES = 8
SNAPSHOT_HEADER_BYTES = 40  # the fixed part of one snapshot table entry
#: qemu sizes images in 512-byte sectors: ``create`` rounds up, ``resize`` refuses other sizes
SECTOR = 512

_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes common to versions 2 and 3
_V3_TAIL = struct.Struct(">QQQII")  # incompatible, compatible, autoclear, refcount_order, header_length
_EXT = struct.Struct(">II")


@dataclass(frozen=True)
class Qcow2Header:
    """What diskhooks needs to know about a qcow2 image, as its header states it."""

    version: int
    virtual_size: int
    cluster_bits: int
    crypt_method: int
    backing_file: str | None  # as written in the header (absolute or relative), None if none
    backing_format: str | None  # header extension 0xE2792ACA, None if not recorded
    data_file: str | None  # external data file name (extension 0x44415441), None if none
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    extensions: tuple[int, ...] = ()  # extension types in file order, for diagnostics
    l1_size: int = 0  # entries
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0

    @property
    def dirty(self) -> bool:
        """Refcounts may be stale (lazy refcounts after an unclean stop); qemu repairs on open."""
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        """qemu marked the image corrupt; it refuses to open it for writing."""
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def has_external_data_file(self) -> bool:
        """Guest data lives in another file (incompatible bit 2 or a data-file extension)."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE) or self.data_file is not None

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def encrypted(self) -> bool:
        return self.crypt_method != 0

    @property
    def unknown_incompatible_features(self) -> int:
        """Incompatible feature bits this reader (and qemu 10) does not know: qemu refuses them."""
        return self.incompatible_features & ~KNOWN_INCOMPATIBLE


def is_qcow2(data: bytes) -> bool:
    """True when ``data`` starts with the qcow2 magic (says nothing about the rest)."""
    return data[:4] == QCOW2_MAGIC


def read_header(data: bytes) -> Qcow2Header:
    """Parse the qcow2 header at the start of ``data`` (the first bytes of an image file).

    Raises :class:`ValueError` when ``data`` is not a qcow2 image, is truncated, or the header is
    inconsistent (unknown version, cluster size out of range, a backing file name or an extension
    outside the bytes given, names that are not UTF-8).
    """
    if len(data) < 4 or not is_qcow2(data):
        raise ValueError("not a qcow2 image (the file does not start with the qcow2 magic QFI\\xfb)")
    if len(data) < _HEADER.size:
        raise ValueError(f"truncated qcow2 header ({len(data)} bytes, at least {_HEADER.size} needed)")
    (_magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size,
     l1_offset, refcount_offset, _refcount_clusters, nb_snapshots, snapshots_offset) = \
        _HEADER.unpack_from(data, 0)
    if version not in (2, 3):
        raise ValueError(f"unsupported qcow2 version {version} (2 and 3 exist)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ValueError(f"invalid qcow2 cluster_bits {cluster_bits}")
    cluster_size = 1 << cluster_bits

    incompatible = compatible = autoclear = 0
    header_length = V2_HEADER_LENGTH
    if version == 3:
        if len(data) < V2_HEADER_LENGTH + _V3_TAIL.size:
            raise ValueError("truncated qcow2 version 3 header")
        incompatible, compatible, autoclear, _refcount_order, header_length = \
            _V3_TAIL.unpack_from(data, V2_HEADER_LENGTH)
        if header_length < V3_MIN_HEADER_LENGTH or header_length > cluster_size:
            raise ValueError(f"invalid qcow2 header_length {header_length}")

    backing_file = None
    if backing_offset:
        if backing_size == 0 or backing_size > MAX_BACKING_FILE_SIZE:
            raise ValueError(f"invalid qcow2 backing file name length {backing_size}")
        if backing_offset > cluster_size:
            raise ValueError("the qcow2 backing file name lies outside the first cluster")
        end = backing_offset + backing_size
        if end > len(data):
            raise ValueError(f"the qcow2 backing file name (bytes {backing_offset}-{end}) lies beyond "
                             f"the {len(data)} bytes read")
        backing_file = _text(data[backing_offset:end], "backing file name")

    # extensions run from the end of the header to the backing file name (or the end of the cluster)
    ext_end = backing_offset if backing_offset else cluster_size
    backing_format = data_file = None
    types: list[int] = []
    offset = header_length
    while True:
        if offset + _EXT.size > ext_end:
            break  # no room for another extension: qemu stops here too
        if offset + _EXT.size > len(data):
            raise ValueError(f"the qcow2 header extensions run beyond the {len(data)} bytes read")
        ext_type, ext_len = _EXT.unpack_from(data, offset)
        if ext_type == EXT_END:
            break
        start = offset + _EXT.size
        if start + ext_len > ext_end or start + ext_len > len(data):
            raise ValueError(f"qcow2 header extension 0x{ext_type:08x} ({ext_len} bytes) overruns "
                             "the header")
        payload = data[start:start + ext_len]
        types.append(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = _text(payload, "backing format")
        elif ext_type == EXT_DATA_FILE:
            data_file = _text(payload, "data file name")
        offset = start + ((ext_len + 7) & ~7)

    return Qcow2Header(
        version=version, virtual_size=size, cluster_bits=cluster_bits, crypt_method=crypt_method,
        backing_file=backing_file, backing_format=backing_format, data_file=data_file,
        incompatible_features=incompatible, compatible_features=compatible,
        autoclear_features=autoclear, extensions=tuple(types), l1_size=l1_size,
        l1_table_offset=l1_offset, refcount_table_offset=refcount_offset, nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
    )


def layout_problem(header: Qcow2Header, file_size: int) -> str | None:
    """Why the tables ``header`` points at cannot all lie in a file of ``file_size`` bytes (None when
    they can): the whole L1 table, the refcount table's first entry, the first snapshot entry.

    qemu-img writes these tables in full, so a shorter file was cut off (a copy or a write that did
    not finish); qemu would read zeros there and write new metadata over whatever it finds.
    """
    tables = [("L1 table", header.l1_table_offset, header.l1_size * L1_ENTRY_BYTES),
              ("refcount table", header.refcount_table_offset, REFTABLE_ENTRY_BYTES)]
    if header.nb_snapshots:
        tables.append(("snapshot table", header.snapshots_offset, SNAPSHOT_HEADER_BYTES))
    for name, offset, length in tables:
        if length and offset + length > file_size:
            return (f"its {name} (bytes {offset}-{offset + length}) lies beyond the end of the file "
                    f"({file_size} bytes): the file was cut short")
    return None


def raw_base_looks_qcow2(where: str) -> str:
    """The refusal of a library base planned as raw whose first bytes are a qcow2 header (prepare
    and the hook sidecar say the same); ``where`` names the file."""
    return (f"{where} is qcow2, but the plan says raw: it starts with a qcow2 header, and anything "
            "that probes its format would open it as qcow2 and follow the backing or data file "
            "written in it (the format-confusion hazard); diskhooks never opens an image as a format "
            "it is not")


def round_to_sector(size: int) -> int:
    """``size`` rounded up to a multiple of 512, the size qemu-img gives an image of ``size`` bytes
    (what prepare creates and grows to, and what the sidecar compares a planned size with)."""
    return -(-size // SECTOR) * SECTOR


def _text(raw: bytes, what: str) -> str:
    raw = raw.rstrip(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the qcow2 {what} is not UTF-8") from None
    if "\0" in text:
        raise ValueError(f"the qcow2 {what} contains a NUL byte")
    return text
