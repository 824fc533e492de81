"""The result type shared by the pure mutation cores (VM/VMI and Pod)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mutation:
    """A mutated copy of the admitted object and the warnings to return to the user.

    ``obj`` is a new dict; the input object is never modified. When nothing needs to change,
    ``obj`` equals the input and the admission layer sends no patch.
    """

    obj: dict[str, Any]
    warnings: tuple[str, ...] = ()
