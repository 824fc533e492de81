"""``hostDisks.capacity`` of the policy: how much disk one node may promise (docs/CAPACITY.md).

Pure, and apart from :mod:`diskplan.policy` so that prepare, which reads these settings from its
command line (``--overcommit``, ``--reserve``), does not load the YAML machinery. :mod:`diskplan.policy`
parses the policy file with the same functions and re-exports :class:`CapacityPolicy`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from diskplan.errors import Refused
from diskplan.quantity import format_bytes, parse_bytes


@dataclass(frozen=True)
class CapacityPolicy:
    """``hostDisks.capacity``: how much disk the VMs of one node may be promised (docs/CAPACITY.md).

    - ``overcommit`` (default 1): planned virtual bytes of every image under ``hostDisks.root`` per
      byte of the filesystem holding it; the node's **budget** is ``floor(overcommit x size)``.
      Above 1 promises more than the disk holds (qcow2 images are thin); below 1 keeps a margin.
      A number from 0.1 to 100, kept as an exact fraction (``1.2`` is 6/5).
    - ``reserve`` (default ``5%``): free space prepare keeps on the filesystem: a percentage of its
      size (``"5%"``, ``"2.5%"``, 0 to 50) or a quantity (``50Gi``). A start that would create or
      grow an image with less free space than this is refused; the node agent then advertises no
      room for new images.
    """

    overcommit: Fraction = Fraction(1)
    reserve_percent: Fraction | None = Fraction(5)  # of the filesystem's size; None: reserve_bytes
    reserve_bytes: int = 0

    def budget(self, filesystem_bytes: int) -> int:
        """Planned virtual bytes the node may hold: ``floor(overcommit x filesystem size)``."""
        return math.floor(filesystem_bytes * self.overcommit)

    def reserve(self, filesystem_bytes: int) -> int:
        """Free bytes to keep: the percentage of ``filesystem_bytes`` (rounded up), or the quantity."""
        if self.reserve_percent is None:
            return self.reserve_bytes
        return math.ceil(filesystem_bytes * self.reserve_percent / 100)

    @property
    def overcommit_text(self) -> str:
        """``overcommit`` as a decimal (``1``, ``1.2``), the form prepare's ``--overcommit`` reads."""
        return fraction_text(self.overcommit)

    @property
    def reserve_text(self) -> str:
        """``reserve`` as written in the policy's canonical form (``5%``, ``50Gi``), the form
        prepare's ``--reserve`` reads."""
        if self.reserve_percent is None:
            return format_bytes(self.reserve_bytes)
        return f"{fraction_text(self.reserve_percent)}%"


OVERCOMMIT_RANGE = (Fraction(1, 10), Fraction(100))
MAX_RESERVE_PERCENT = Fraction(50)
_DECIMAL = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,6})?$")


def fraction_text(value: Fraction) -> str:
    """An exact decimal for a fraction whose denominator divides a power of ten (``6/5`` -> ``1.2``),
    ``p/q`` otherwise (never written by diskhooks: its fractions come from decimals)."""
    for places in range(13):
        scaled = value * 10**places
        if scaled.denominator == 1:
            digits = str(scaled.numerator).rjust(places + 1, "0")
            return digits if places == 0 else f"{digits[:-places]}.{digits[-places:]}"
    return f"{value.numerator}/{value.denominator}"


def parse_overcommit(value: object, where: str, *, text: bool = False) -> Fraction:
    """``hostDisks.capacity.overcommit`` (a YAML number; with ``text``, its decimal text as prepare's
    ``--overcommit`` gets it) as an exact fraction; :class:`Refused` naming ``where``."""
    low, high = OVERCOMMIT_RANGE
    reason = f"must be a number from {fraction_text(low)} to {fraction_text(high)} (planned virtual " \
             "bytes per byte of the filesystem)"
    if isinstance(value, bool):
        raise Refused(where, reason)
    if isinstance(value, int):
        ratio = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Refused(where, reason)
        ratio = Fraction(repr(value))
    elif text and isinstance(value, str) and _DECIMAL.match(value):
        ratio = Fraction(value)
    else:
        raise Refused(where, reason)
    if not low <= ratio <= high:
        raise Refused(where, reason)
    return ratio


def parse_reserve(value: object, where: str) -> tuple[Fraction | None, int]:
    """``hostDisks.capacity.reserve``: ``"<p>%"`` -> (p, 0); a quantity -> (None, bytes); ``0`` or
    ``"0%"`` keeps nothing. :class:`Refused` naming ``where``."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1].strip()
        if not _DECIMAL.match(number) or Fraction(number) > MAX_RESERVE_PERCENT:
            raise Refused(where, f"{value[:40]!r} is not a percentage from 0% to "
                          f"{fraction_text(MAX_RESERVE_PERCENT)}% (of the filesystem's size)")
        return Fraction(number), 0
    if value == 0 and not isinstance(value, bool) or value == "0":
        return None, 0
    try:
        return None, parse_bytes(value)
    except ValueError as exc:
        raise Refused(where, f"{exc}; write a percentage of the filesystem (\"5%\") or a quantity "
                      "(50Gi)") from None
