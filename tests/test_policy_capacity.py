"""``hostDisks.capacity`` in the policy (``diskplan/policy.py``): defaults, the forms accepted, the
refusals naming the key, and the text forms the Pod mutation hands to prepare, read back the same."""

from __future__ import annotations

from fractions import Fraction

import pytest

from diskplan.errors import Refused
from diskplan.policy import CapacityPolicy, HostDiskPolicy, load_policy, parse_overcommit, parse_reserve
from tests.conftest import EXAMPLE_POLICY

GiB = 1 << 30
MINIMAL = "sidecar: {image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0}\n"


def capacity(body: str) -> CapacityPolicy:
    return load_policy(f"hostDisks: {{capacity: {body}}}\n" + MINIMAL).host_disks.capacity


def test_defaults_overcommit_one_and_five_percent() -> None:
    for text in (MINIMAL, "hostDisks: {capacity: null}\n" + MINIMAL, "hostDisks: {capacity: {}}\n" + MINIMAL):
        c = load_policy(text).host_disks.capacity
        assert c == CapacityPolicy() == HostDiskPolicy().capacity
        assert (c.overcommit, c.reserve_percent) == (Fraction(1), Fraction(5))
        assert (c.budget(200 * GiB), c.reserve(200 * GiB)) == (200 * GiB, 10 * GiB)
        assert (c.overcommit_text, c.reserve_text) == ("1", "5%")
    assert load_policy(EXAMPLE_POLICY.read_text()).host_disks.capacity == CapacityPolicy()


@pytest.mark.parametrize(("body", "overcommit", "budget", "reserve", "texts"), [
    ("{overcommit: 1.5}", Fraction(3, 2), 150 * GiB, 5 * GiB, ("1.5", "5%")),
    ("{overcommit: 3}", Fraction(3), 300 * GiB, 5 * GiB, ("3", "5%")),
    ("{overcommit: 0.8}", Fraction(4, 5), 80 * GiB, 5 * GiB, ("0.8", "5%")),
    ("{overcommit: 0.1}", Fraction(1, 10), 10 * GiB, 5 * GiB, ("0.1", "5%")),
    ("{overcommit: 100}", Fraction(100), 10000 * GiB, 5 * GiB, ("100", "5%")),
    ("{reserve: '2.5%'}", Fraction(1), 100 * GiB, (5 * GiB + 1) // 2, ("1", "2.5%")),
    ("{reserve: 0%}", Fraction(1), 100 * GiB, 0, ("1", "0%")),
    ("{reserve: 50%}", Fraction(1), 100 * GiB, 50 * GiB, ("1", "50%")),
    ("{reserve: 20Gi}", Fraction(1), 100 * GiB, 20 * GiB, ("1", "20Gi")),
    ("{reserve: 1500M}", Fraction(1), 100 * GiB, 1500 * 10**6, ("1", "1500M")),
    ("{reserve: 0}", Fraction(1), 100 * GiB, 0, ("1", "0")),
    ("{overcommit: 2, reserve: 10Gi}", Fraction(2), 200 * GiB, 10 * GiB, ("2", "10Gi")),
])
def test_values(body: str, overcommit: Fraction, budget: int, reserve: int, texts: tuple[str, str]) -> None:
    c = capacity(body)
    assert c.overcommit == overcommit
    assert (c.budget(100 * GiB), c.reserve(100 * GiB)) == (budget, reserve)
    assert (c.overcommit_text, c.reserve_text) == texts
    # what prepare reads back from the Pod mutation's --overcommit/--reserve is the same policy
    percent, reserve_bytes = parse_reserve(c.reserve_text, "--reserve")
    assert CapacityPolicy(parse_overcommit(c.overcommit_text, "--overcommit", text=True), percent,
                          reserve_bytes) == c


def test_percent_reserve_rounds_up_to_a_byte() -> None:
    assert capacity("{reserve: '0.01%'}").reserve(10**4 + 1) == 2


@pytest.mark.parametrize(("body", "field", "words"), [
    ("{overcommit: 0}", "hostDisks.capacity.overcommit", "from 0.1 to 100"),
    ("{overcommit: 0.05}", "hostDisks.capacity.overcommit", "from 0.1 to 100"),
    ("{overcommit: 101}", "hostDisks.capacity.overcommit", "from 0.1 to 100"),
    ("{overcommit: -1}", "hostDisks.capacity.overcommit", "from 0.1 to 100"),
    ("{overcommit: true}", "hostDisks.capacity.overcommit", "a number"),
    ("{overcommit: '1.5'}", "hostDisks.capacity.overcommit", "a number"),  # text only for prepare's flag
    ("{overcommit: .inf}", "hostDisks.capacity.overcommit", "not a finite number"),
    ("{overcommit: [1]}", "hostDisks.capacity.overcommit", "a number"),
    ("{reserve: 60%}", "hostDisks.capacity.reserve", "from 0% to 50%"),
    ("{reserve: '-5%'}", "hostDisks.capacity.reserve", "percentage"),
    ("{reserve: 'five%'}", "hostDisks.capacity.reserve", "percentage"),
    ("{reserve: -1Gi}", "hostDisks.capacity.reserve", "negative"),
    ("{reserve: 1.5}", "hostDisks.capacity.reserve", "quote it"),
    ("{reserve: lots}", "hostDisks.capacity.reserve", "5%"),
    ("{reserve: true}", "hostDisks.capacity.reserve", "quantity"),
    ("{size: 1Ti}", "hostDisks.capacity.size", "unknown key"),
    ("[1]", "hostDisks.capacity", "mapping"),
])
def test_refusals_name_the_key(body: str, field: str, words: str) -> None:
    with pytest.raises(Refused) as exc:
        capacity(body)
    assert exc.value.field == field
    assert words in exc.value.reason


@pytest.mark.parametrize("value", ["", "1e3", "1/2", " 1", "0.05", "1.0000001"])
def test_prepare_flag_refuses_other_text(value: str) -> None:
    with pytest.raises(Refused) as exc:
        parse_overcommit(value, "--overcommit", text=True)
    assert exc.value.field == "--overcommit"
