"""Which plan key signs at a given moment: rotation that is safe across webhook replicas.

Pure: no clock, no files. The transport (``webhook/reload.py``) reads the plan-key directory (the
chart's Secret) into a :class:`PlanKeyRing` and asks it for the :class:`~diskplan.plan.PlanKeys`
of the moment with :meth:`PlanKeyRing.keys_at`, passing the wall-clock time in.

Why a delay: the kubelet refreshes each pod's Secret mount on its own schedule (a minute or two
apart between pods). If every replica signed with a new key as soon as it saw it, a replica that
still has only the old key would refuse the VMI and launcher-Pod CREATEs whose plans another
replica had just signed. So after a rotation the Secret carries ``current-not-before`` (unix
seconds): until then every replica *accepts* both keys but *signs* with ``previous``; from then
on it signs with ``current``. By that time every replica has the new files (the chart sets the
time to the upgrade's render time plus ``planKeys.signingDelaySeconds``, default 300 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diskplan.plan import PlanKeys

MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class PlanKeyRing:
    """The keys in the plan-key directory, and from when ``current`` signs.

    - ``current``: the newest key; always accepted, signs from ``current_not_before`` on.
    - ``previous``: the key before the last rotation, or None; always accepted, and the signing
      key while ``current_not_before`` is in the future.
    - ``current_not_before``: unix time in seconds, or None (``current`` signs at once: a first
      install, or a Secret made by hand without the file).
    """

    current: bytes
    previous: bytes | None = None
    current_not_before: int | None = None
    _signing_current: PlanKeys = field(init=False, repr=False, compare=False)
    _signing_previous: PlanKeys | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, key in (("current", self.current), ("previous", self.previous)):
            if key is not None and len(key) < MIN_KEY_BYTES:
                raise ValueError(f"plan key: the {name} key must be at least {MIN_KEY_BYTES} bytes")
        previous = self.previous if self.previous != self.current else None
        object.__setattr__(self, "previous", previous)
        object.__setattr__(self, "_signing_current",
                           PlanKeys(current=self.current,
                                    previous=() if previous is None else (previous,)))
        object.__setattr__(self, "_signing_previous",
                           None if previous is None or self.current_not_before is None
                           else PlanKeys(current=previous, previous=(self.current,)))

    def signs_with_current(self, now: float) -> bool:
        """Whether ``current`` is the signing key at unix time ``now``."""
        return self._signing_previous is None or self.current_not_before is None \
            or now >= self.current_not_before

    def keys_at(self, now: float) -> PlanKeys:
        """The keys to use at unix time ``now``: both accepted, the right one signing."""
        if self.signs_with_current(now) or self._signing_previous is None:
            return self._signing_current
        return self._signing_previous


def parse_not_before(text: bytes) -> int | None:
    """The ``current-not-before`` file: a unix time in whole seconds (blank: none).

    Raises ``ValueError`` with the reason.
    """
    value = text.strip()
    if not value:
        return None
    if not value.isdigit() or len(value) > 12:
        raise ValueError(f"{value[:40]!r} is not a unix time in seconds")
    return int(value)
