"""What a served ``OnDefineDomain`` call no longer does twice, and that it still checks all it did.

- The admitted plan (``DISKHOOKS_PLAN``) is parsed once per process; the VMI's annotation is still
  compared with it at every call, and a different one is still refused.
- The VMI JSON is parsed once: the core hands it to the caller's log (``on_vmi``).
- The call's log line (which compares the disks of the XML received and answered) is written once
  the answer is on its way, with either transport, and never later than the next call; at once
  for a large domain (its two documents are not kept for the line).
- A small serialised domain gets its close tags written in one split; a large one piece by piece:
  both give exactly what the comment-aware regular expression gives.

Inputs are KubeVirt's sample 05 with a signed plan (tests/test_domain.py's scenario), the sidecar's
own core and transports; grpcio plays virt-launcher where a socket is involved.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from lxml import etree

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.plan import sign_plan
from hooksidecar import callback, logfmt, xmlsafe
from hooksidecar import server as srv
from tests.test_domain import KEYS, S05, _set_plan
from tests.test_sidecar_server import call_on_define


def _served(xml: bytes, vmi: bytes, plan_text: str, **kw: Any) -> bytes:
    return callback.on_define_domain(xml, vmi, check_images=False, admitted_plan=plan_text, **kw)


def test_the_admitted_plan_is_parsed_once_and_still_compared_at_every_call() -> None:
    plan_text = sign_plan(S05.plan, KEYS)
    callback.admitted.cache_clear()
    first = _served(S05.xml(), S05.vmi_json(), plan_text)
    again = _served(S05.xml(), S05.vmi_json(), plan_text)
    assert first == again != S05.xml()
    info = callback.admitted.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    other = _set_plan(S05, replace(S05.plan, vm="another-vm"))
    with pytest.raises(Refused, match="differs from the plan verified"):
        _served(S05.xml(), other.vmi_json(), plan_text)  # the cached plan is not the VMI's
    vmi = S05.vmi()
    del vmi["metadata"]["annotations"][K.ANN_PLAN]
    with pytest.raises(Refused, match="has no diskhooks.io/plan any more"):
        _served(S05.xml(), json.dumps(vmi).encode(), plan_text)


def test_the_core_hands_the_parsed_vmi_to_the_caller() -> None:
    seen: list[Any] = []
    _served(S05.xml(), S05.vmi_json(), sign_plan(S05.plan, KEYS), on_vmi=seen.append)
    assert len(seen) == 1 and seen[0] == S05.vmi()
    assert logfmt.identity_of(seen[0]) == logfmt.vmi_identity(S05.vmi_json()) == \
        f"{S05.vmi()['metadata']['namespace']}/{S05.vmi()['metadata']['name']}"


@pytest.mark.parametrize("doc", [None, [], "x", {}, {"metadata": 3}, {"metadata": {"name": "a"}},
                                 {"metadata": {"name": "a", "namespace": 1}}])
def test_identity_of_a_vmi_that_does_not_say_is_a_question_mark(doc: Any) -> None:
    assert logfmt.identity_of(doc) == "?"


def test_changed_disks_ignores_white_space_and_lists_disks_that_come_or_go() -> None:
    xml = S05.xml()
    start = xml.index(b"<disk ")
    end = xml.index(b"</disk>", start) + len(b"</disk>")
    first = xml[start:end]
    alias = etree.fromstring(first).find("alias").get("name")
    assert logfmt.changed_disks(xml, xml.replace(b"\n\t\t\t", b"\n    ")) == []
    assert logfmt.changed_disks(xml, xml[:start] + xml[end:]) == [alias]
    edited = first.replace(b"<target ", b'<target  x="1" ')
    assert logfmt.changed_disks(xml, xml[:start] + edited + xml[end:]) == [alias]


def test_the_log_line_is_written_once_the_answer_is_on_its_way() -> None:
    stream = io.StringIO()
    servicers = srv.Servicers(settings=srv.SidecarSettings(check_images=False,
                                                           admitted_plan=sign_plan(S05.plan, KEYS)),
                              log=logfmt.JsonLog(stream), request_shutdown=lambda: None)
    handle = servicers.on_define_domain("v1alpha3")
    request = (srv.encode_bytes_field(srv.F_DOMAIN_XML, S05.xml())
               + srv.encode_bytes_field(srv.F_VMI, S05.vmi_json()))
    answer = handle(request)
    assert srv.decode_fields(answer, [srv.F_DOMAIN_XML])[srv.F_DOMAIN_XML] != S05.xml()
    assert stream.getvalue() == ""  # the transport has not sent the answer yet
    servicers.answered()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["hook"], r["result"], r["unchanged"]) for r in lines] == [("OnDefineDomain", "ok", False)]
    assert lines[0]["disksRewritten"] and lines[0]["vmi"] == logfmt.vmi_identity(S05.vmi_json())
    handle(request)
    handle(request)  # a caller that never calls answered(): the next call writes the line first
    assert len(stream.getvalue().splitlines()) == 2
    servicers.answered()
    assert len(stream.getvalue().splitlines()) == 3
    at = S05.xml().index(b">", S05.xml().index(b"<domain")) + 1  # a large domain: written at once
    pad = b"<description>" + b"x" * srv.DEFERRED_LOG_BYTES + b"</description>"
    large = S05.xml()[:at] + pad + S05.xml()[at:]
    handle(srv.encode_bytes_field(srv.F_DOMAIN_XML, large)
           + srv.encode_bytes_field(srv.F_VMI, S05.vmi_json()))
    assert len(stream.getvalue().splitlines()) == 4
    assert json.loads(stream.getvalue().splitlines()[-1])["bytesIn"] == len(large)


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
def test_both_transports_write_the_line_after_answering(tmp_path: Path, transport: str) -> None:
    stream = io.StringIO()
    sock = tmp_path / "t.sock"
    server = srv.HookServer(str(sock), srv.SidecarSettings(check_images=False, grace_seconds=1,
                                                           admitted_plan=sign_plan(S05.plan, KEYS)),
                            log=logfmt.JsonLog(stream), transport=transport)
    server.start()
    try:
        out = call_on_define(f"unix://{sock}", "v1alpha3", S05.xml(), S05.vmi_json())
        with pytest.raises(grpc.RpcError):
            call_on_define(f"unix://{sock}", "v1alpha3", b"<nope", S05.vmi_json())
    finally:
        server.stop("test over")
    calls = [json.loads(line) for line in stream.getvalue().splitlines() if '"event":"call"' in line]
    assert [(r["result"], r["code"]) for r in calls] == [("ok", "OK"), ("error", "INVALID_ARGUMENT")]
    assert calls[0]["bytesOut"] == len(out) and calls[0]["unchanged"] is False


def _grown(kind: str, size: int) -> bytes:
    """Sample 05's domain, serialised by lxml, grown to about ``size`` bytes with empty elements."""
    raw: bytes = etree.tostring(xmlsafe.parse_domain(S05.xml()), encoding="UTF-8")
    at = raw.index(b"</devices>")
    unit = b'<x a="1"/>' if kind == "attrs" else b"<x/>"
    return raw[:at] + unit * max(0, (size - len(raw)) // len(unit)) + raw[at:]


@pytest.mark.parametrize("size", [0, 32 * 1024 - 64, 32 * 1024 + 64, 200 * 1024])
@pytest.mark.parametrize("kind", ["empty", "attrs"])
def test_close_tags_are_the_same_by_split_and_piece_by_piece(kind: str, size: int) -> None:
    data = _grown(kind, size)
    assert (len(data) <= xmlsafe._SPLIT_MAX_BYTES) == (size < 32 * 1024)
    closed = xmlsafe._explicit_close_tags(data)
    assert closed == xmlsafe._explicit_close_tags_by_regex(data)
    assert closed == xmlsafe._explicit_close_tags_split(data)  # the split gives it at any size
    assert b"/>" not in closed
    assert etree.tostring(etree.fromstring(closed), method="c14n") == \
        etree.tostring(etree.fromstring(data), method="c14n")
