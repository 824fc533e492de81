"""Kubernetes resource quantities (``20Gi``, ``1.5Ti``, ``1e10``, ``+20Gi``, ``.5Gi``, ``2500m``),
parsed exactly and with bounds, and formatted in one canonical form.

Pure, and free of any Kubernetes client: the sidecar image ships this module alone.

**What is read** is the grammar Kubernetes documents for ``resource.Quantity``
(``k8s.io/apimachinery/pkg/api/resource``)::

    quantity ::= [sign] number [suffix]
    sign     ::= "+" | "-"
    number   ::= digits | digits "." | digits "." digits | "." digits   (a digit on one side at least)
    suffix   ::= binary | decimal | exponent
    binary   ::= Ki | Mi | Gi | Ti | Pi | Ei                          (powers of 1024)
    decimal  ::= n | u | m | k | M | G | T | P | E                     (powers of 1000)
    exponent ::= ("e" | "E") [sign] digits                             (powers of ten)

Digits are ASCII. ``1E`` is one exa (10**18), ``1E3`` is 1000. An int (a YAML/JSON integer) is
read as that many units. Surrounding ASCII whitespace is ignored, as Kubernetes does when it
decodes a quantity field; whitespace inside (``1 Gi``) is refused.

**Bounds**: the text may be at most :data:`MAX_TEXT` characters; the value is computed with integers
and fractions only (no floating point, no :mod:`decimal` context), and only after its magnitude is
known to be in range, so ``1e999999999`` is refused as too large at once and ``1e-999999999`` as too
fine, without building either number.

**Refused beyond what Kubernetes refuses** (each with its reason):

- a magnitude above 2**63-1 (Kubernetes silently caps it there), or a non-zero magnitude below
  1n (Kubernetes rounds it up to 1n);
- by :func:`parse_bytes` (sizes): zero, negative values, values that are not a whole number of
  bytes (``1500m`` is 1.5 bytes; ``2000m`` is 2 bytes and accepted), and floating-point numbers
  (an unquoted YAML ``1.5`` or a JSON ``1e10`` has lost the text it was written as; quote it).

**Formatting**: :func:`format_bytes` is the one form diskhooks writes into KubeVirt spec (hostDisk
``capacity``, ``memory.guest``, memory requests and limits), never the user's own text: the shortest
exact form, ``21474836480 -> '20Gi'``, ``10**10 -> '10G'``, ``1023 -> '1023'``, so that a second
pass over the same object produces the same text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_TEXT = 64  # characters of a quantity, after surrounding whitespace is removed
MAX_VALUE = 2**63 - 1  # the largest magnitude a Kubernetes quantity holds
MAX_BYTES = MAX_VALUE
_NANO = Fraction(1, 10**9)  # the finest precision of a Kubernetes quantity

_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}  # powers of two
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_GRAMMAR = re.compile(
    r"(?P<sign>[+-]?)(?P<int>[0-9]*)(?:(?P<dot>\.)(?P<frac>[0-9]*))?"
    r"(?:(?P<bin>[KMGTPE]i)|[eE](?P<exp>[+-]?[0-9]+)|(?P<dec>[numkMGTPE]?))"
)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_ASCII_SPACE = " \t\n\r\f\v"
# a normalised mantissa has at most MAX_TEXT digits, so beyond these decimal exponents the value is
# certainly out of range (checked without computing it)
_MAX_E10 = 20  # mantissa * 10**e10 >= 10**20 > MAX_VALUE once e10 + digits > 20
_MIN_E10 = -(MAX_TEXT + 10)  # mantissa * 10**e10 < 10**-10 < 1n
_SUFFIXES = "Ki, Mi, Gi, Ti, Pi, Ei; n, u, m, k, M, G, T, P, E; or an exponent such as e9"


@dataclass(frozen=True)
class _Number:
    """``(-1 if negative) * mantissa * 10**e10 * 2**e2``, mantissa not divisible by 10 (or 0)."""

    negative: bool
    mantissa: int
    e10: int
    e2: int
    text: str  # as written (stripped), for messages


def parse_quantity(value: object) -> Fraction:
    """The exact value of a Kubernetes quantity (units: bytes, cores...). Raises ``ValueError``
    naming the reason: not a quantity, whitespace inside, too long, too large, finer than 1n."""
    if isinstance(value, float):
        # a number from YAML/JSON (``cpu: 1.5``): its shortest repr is the decimal it was written as
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a quantity (not a finite number)")
        value = repr(value)
    n = _read(value)
    if n.mantissa == 0:
        return Fraction(0)
    if n.e10 < _MIN_E10:
        raise ValueError(f"{_show(n.text)} is finer than 1n, the smallest quantity Kubernetes keeps")
    exact = _exact(n)
    if abs(exact) < _NANO:
        raise ValueError(f"{_show(n.text)} is finer than 1n, the smallest quantity Kubernetes keeps")
    return exact


def parse_bytes(value: object) -> int:
    """A size: a quantity that is a whole, positive number of bytes. Raises ``ValueError`` with
    the reason (the word "quantity" in it, and the text cut short)."""
    if isinstance(value, float):
        raise ValueError(f"must be a quantity such as 20Gi written as text, not the floating-point "  # noqa: TRY004 - one error type for callers
                         f"number {_show(repr(value))} (quote it to keep it exact)")
    n = _read(value)
    if n.mantissa == 0:
        raise ValueError(f"{_show(n.text)} is a zero quantity; a size must be greater than zero")
    if n.negative:
        raise ValueError(f"{_show(n.text)} is a negative quantity; a size must be greater than zero")
    if n.e10 < 0 and (n.e10 < _MIN_E10 or (n.mantissa << n.e2) % 10**-n.e10):
        raise ValueError(f"{_show(n.text)} is not a whole number of bytes")
    return int(_exact(n))


def parse_millicpu(value: object) -> int:
    """A CPU quantity in whole millicores (``"500m"`` -> 500, ``"2"`` -> 2000, ``1.5`` -> 1500).
    Raises ``ValueError`` when it is not a quantity or not a whole number of millicores."""
    exact = parse_quantity(value) * 1000
    if exact.denominator != 1:
        raise ValueError(f"{_show(str(value))} is not a whole number of millicores")
    return int(exact)


def format_bytes(n: int) -> str:
    """The canonical form of ``n`` bytes: the shortest exact quantity, binary suffixes first on a
    tie. 21474836480 -> '20Gi', 1536 * 2**20 -> '1536Mi', 10**10 -> '10G', 1000 -> '1k',
    1023 -> '1023'."""
    best = str(n)
    if n <= 0:
        return best
    for suffix, unit in (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20),
                         ("Ki", 2**10), ("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9),
                         ("M", 10**6), ("k", 10**3)):
        if n % unit == 0:
            text = f"{n // unit}{suffix}"
            if len(text) < len(best):
                best = text
    return best


def format_millicpu(m: int) -> str:
    """CPU in millicores to a quantity: 2000 -> '2', 500 -> '500m'."""
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _read(value: object) -> _Number:
    """The grammar, the length bound and the normalisation; no value is computed here."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a quantity such as 20Gi, not {type(value).__name__}")  # noqa: TRY004 - one error type for callers
    if isinstance(value, int):
        if abs(value) > MAX_VALUE:  # compared as a number: str() of a huge int is costly (and capped)
            raise ValueError(f"the {value.bit_length()}-bit integer is too large (a quantity holds "
                             f"at most {MAX_VALUE})")
        value = str(value)
    if len(value) > 4 * MAX_TEXT:  # before stripping: nothing this long is a quantity
        raise ValueError(f"{_show(value)} is {len(value)} characters long; a quantity has at most "
                         f"{MAX_TEXT}")
    s = value.strip(_ASCII_SPACE)
    if not s:
        raise ValueError("an empty text is not a quantity such as 20Gi")
    if len(s) > MAX_TEXT:
        raise ValueError(f"{_show(s)} is {len(s)} characters long; a quantity has at most {MAX_TEXT}")
    if any(c.isspace() for c in s):
        raise ValueError(f"{_show(s)} is not a quantity: it contains whitespace (write e.g. 20Gi)")
    m = _GRAMMAR.fullmatch(s)
    if m is None or not (m["int"] or m["frac"]):
        number = _NUMBER.match(s)
        if number is not None and number.end() < len(s):
            raise ValueError(f"{_show(s)} is not a quantity: unknown suffix "
                             f"{_show(s[number.end():])} (use {_SUFFIXES})")
        raise ValueError(f"{_show(s)} is not a quantity such as 20Gi, 500M or 1e9")
    digits = (m["int"] + (m["frac"] or "")).lstrip("0")
    e10 = -len(m["frac"] or "")
    e2 = 0
    if m["bin"]:
        e2 = _BINARY[m["bin"]]
    elif m["exp"] is not None:
        exp_digits = m["exp"].lstrip("+-").lstrip("0")
        if len(exp_digits) > 6:  # |exponent| >= 10**6: out of range unless the mantissa is zero
            if not digits.rstrip("0"):
                return _Number(negative=m["sign"] == "-", mantissa=0, e10=0, e2=0, text=s)
            e10 += (-1 if m["exp"][0] == "-" else 1) * 10**6
        else:
            e10 += int(m["exp"])
    else:
        e10 += _DECIMAL[m["dec"] or ""]
    stripped = digits.rstrip("0")
    e10 += len(digits) - len(stripped)
    mantissa = int(stripped) if stripped else 0
    return _Number(negative=m["sign"] == "-", mantissa=mantissa, e10=e10, e2=e2, text=s)


def _exact(n: _Number) -> Fraction:
    """The value, or ``ValueError`` when its magnitude is above :data:`MAX_VALUE`; callers bound
    ``n.e10`` below (:data:`_MIN_E10`), so 10**e10 is never large in either direction."""
    if n.mantissa and n.e10 + len(str(n.mantissa)) > _MAX_E10:  # >= 10**20: not computed
        raise ValueError(f"{_show(n.text)} is too large (a quantity holds at most {MAX_VALUE})")
    magnitude = Fraction(n.mantissa << n.e2) * Fraction(10) ** n.e10
    if magnitude > MAX_VALUE:
        raise ValueError(f"{_show(n.text)} is too large (a quantity holds at most {MAX_VALUE})")
    return -magnitude if n.negative else magnitude


def _show(text: str) -> str:
    """``text`` quoted for a message, cut short."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
