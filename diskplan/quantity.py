"""Kubernetes resource quantities (``20Gi``, ``500M``, ``1.5Ti``, ``2``), parsed exactly.

Only what diskhooks needs: sizes in bytes and CPU counts; no exponents, no negative values.
Formatting returns the shortest exact binary-suffixed form so that patches stay readable and stable.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]{1,19}(?:\.[0-9]{1,9})?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
MAX_BYTES = 2**63 - 1


def parse_bytes(text: object) -> int:
    """Parse a quantity into a whole number of bytes. Raises ``ValueError`` with the reason."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"must be a quantity such as 20Gi, not {type(text).__name__}")  # noqa: TRY004 - one error type for callers
    s = str(text).strip()
    m = _QUANTITY.match(s)
    if not m:
        raise ValueError(f"{s[:40]!r} is not a quantity such as 20Gi or 500M")
    try:
        value = Decimal(m.group(1)) * _SUFFIX[m.group(2) or ""]
    except InvalidOperation:  # pragma: no cover - the regex already bounds the text
        raise ValueError(f"{s[:40]!r} is not a quantity") from None
    if value != value.to_integral_value():
        raise ValueError(f"{s!r} is not a whole number of bytes")
    if value <= 0:
        raise ValueError(f"{s!r} must be greater than zero")
    if value > MAX_BYTES:
        raise ValueError(f"{s!r} is too large")
    return int(value)


def format_bytes(n: int) -> str:
    """Shortest exact form: 21474836480 -> '20Gi', 1500000000 -> '1500M', 1000 -> '1000'."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIX[suffix]
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    for suffix in ("E", "P", "T", "G", "M", "k"):
        unit = _SUFFIX[suffix]
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def format_millicpu(m: int) -> str:
    """CPU in millicores to a quantity: 2000 -> '2', 500 -> '500m'."""
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"
