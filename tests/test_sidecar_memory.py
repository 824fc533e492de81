"""The real sidecar gives back the memory of one call on the largest domain it accepts.

``python -m hooksidecar.cli serve`` on a unix socket, called as virt-launcher calls it (a new
channel per call; helpers and sample from tests/test_sidecar_server.py): a few calls on the sample,
then one on the sample's domain grown with empty elements to just under
``xmlsafe.MAX_DOMAIN_XML_BYTES`` (the most lxml nodes per byte, the worst case for memory). The
call's lxml tree costs ~20 MiB; once it is answered, the worker's malloc arena must not keep it
(glibc would, without ``malloc_trim``: RSS stayed ~18 MiB above the level before the call). A
memory property, read from ``/proc/<pid>/status``; the wait below is only for the server to finish
its side of the call after the client has the answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hooksidecar.xmlsafe import MAX_DOMAIN_XML_BYTES
from tests.test_sidecar_server import PlannedSample, Sidecar, build_sample, call_on_define, start_sidecar

MiB = 1024


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


pytestmark = pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's; other C libraries keep their own ways")


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def largest_domain(domain: bytes) -> bytes:
    """``domain`` grown with ``<a/>`` elements to just under the sidecar's bound."""
    room = MAX_DOMAIN_XML_BYTES - len(domain) - 64
    at = domain.index(b"</devices>")
    grown = domain[:at] + b"<x>" + b"<a/>" * ((room - 7) // 4) + b"</x>" + domain[at:]
    assert MAX_DOMAIN_XML_BYTES - 128 < len(grown) <= MAX_DOMAIN_XML_BYTES
    return grown


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> PlannedSample:
    return build_sample(tmp_path_factory.mktemp("prefix"))


@pytest.fixture
def sidecar(tmp_path: Path, sample: PlannedSample) -> Iterator[Sidecar]:
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    served = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix))
    yield served
    served.stop()


def test_rss_returns_to_its_level_after_a_call_on_the_largest_domain(sidecar: Sidecar,
                                                                       sample: PlannedSample) -> None:
    pid = sidecar.proc.pid
    small = call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi)
    for _ in range(4):  # the code paths of a call warmed, as in a launcher's later calls
        assert call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi) == small
    time.sleep(0.2)
    before = rss_kib(pid)

    big = largest_domain(sample.first_call)
    out = call_on_define(sidecar.target, "v1alpha3", big, sample.vmi)
    assert out != big and b".qcow2" in out and out.count(b"<a></a>") == big.count(b"<a/>")  # accepted, planned

    peak = rss_kib(pid, "VmHWM")
    assert peak - before > 10 * MiB, f"the call used only {(peak - before) / MiB:.1f} MiB: it proves nothing"
    deadline = time.monotonic() + 10.0
    after = rss_kib(pid)
    while after - before > 6 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)
        after = rss_kib(pid)
    assert after - before <= 6 * MiB, (
        f"RSS {before / MiB:.1f} MiB before the call, {after / MiB:.1f} MiB after it (peak {peak / MiB:.1f}): "
        "the memory of the call was kept")

    # a small call after it is answered as before and brings none of it back
    assert call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi) == small
    assert rss_kib(pid) - before <= 6 * MiB
