"""virt-launcher's side of the hook protocol, for the demo, the benchmark and the tests.

Like virt-launcher, every call dials a new channel. Calls are made from the descriptors of the
modules generated from our own protos (``hooksidecar/_pb``), as a generated stub would make them.
Imports protobuf, so the sidecar server never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from hooksidecar._pb import info_pb2, v1alpha1_pb2, v1alpha2_pb2, v1alpha3_pb2

CALLBACKS: dict[str, ModuleType] = {"v1alpha1": v1alpha1_pb2, "v1alpha2": v1alpha2_pb2,
                                    "v1alpha3": v1alpha3_pb2}


def rpc(channel: grpc.Channel, module: ModuleType, service: str, method: str) -> Callable[..., Any]:
    """``service.method`` with the path and message classes taken from ``module``'s descriptors."""
    desc = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    request_cls = getattr(module, desc.input_type.name)
    response_cls = getattr(module, desc.output_type.name)
    call: Callable[..., Any] = channel.unary_unary(
        f"/{desc.containing_service.full_name}/{desc.name}",
        request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString)
    return call


def target(sock: Path | str) -> str:
    return f"unix://{sock}"


def call_info(sock: Path | str) -> dict[str, Any]:
    """Info with virt-launcher's 1 s timeout; returns name, versions and hook points."""
    with grpc.insecure_channel(target(sock)) as ch:
        res = rpc(ch, info_pb2, "Info", "Info")(info_pb2.InfoParams(), timeout=1, wait_for_ready=True)
    return {"name": res.name, "versions": list(res.versions),
            "hookPoints": [(h.name, h.priority) for h in res.hookPoints]}


def call_on_define_domain(sock: Path | str, domain_xml: bytes, vmi_json: bytes, *,
                          version: str = "v1alpha3") -> bytes:
    """OnDefineDomain with virt-launcher's one-minute timeout; returns the domain XML."""
    pb2 = CALLBACKS[version]
    with grpc.insecure_channel(target(sock)) as ch:
        res = rpc(ch, pb2, "Callbacks", "OnDefineDomain")(
            pb2.OnDefineDomainParams(domainXML=domain_xml, vmi=vmi_json), timeout=60, wait_for_ready=True)
    return bytes(res.domainXML)


def call_shutdown(sock: Path | str) -> None:
    with grpc.insecure_channel(target(sock)) as ch:
        rpc(ch, v1alpha3_pb2, "Callbacks", "Shutdown")(v1alpha3_pb2.ShutdownParams(), timeout=5)
