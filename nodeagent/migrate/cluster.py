"""The API call a migration adds to the agent's (:class:`nodeagent.kube.Kube`, which also reads
the VMI by name): a Node's address. Nodes are read with a raw GET (``call_api``): loading
``CoreV1Api`` costs the agent ~20 MiB (see :mod:`nodeagent.events`). Grants: ``get`` on
``virtualmachineinstances`` and on ``nodes`` (the chart's ClusterRole has both).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from nodeagent.kube import API_TIMEOUT, Kube

ADDRESS_ORDER = ("InternalIP", "ExternalIP")


def get_node(kube: Kube, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    api = kube.api_client
    try:
        request = api.param_serialize(method="GET", resource_path="/api/v1/nodes/{name}",
                                      path_params={"name": name}, header_params={"Accept": "application/json"},
                                      auth_settings=["BearerToken"])
        response = api.call_api(*request, _request_timeout=API_TIMEOUT)
        response.read()
        node = api.response_deserialize(response, {"200": "object"}).data
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return node if isinstance(node, dict) else None


def node_address(node: Mapping[str, Any]) -> str | None:
    """The address another agent reaches this node's agent at: the first ``InternalIP`` of
    ``status.addresses``, else the first ``ExternalIP`` (IP addresses only)."""
    status = node.get("status")
    addresses = status.get("addresses") if isinstance(status, Mapping) else None
    if not isinstance(addresses, list):
        return None
    for kind in ADDRESS_ORDER:
        for a in addresses:
            if isinstance(a, Mapping) and a.get("type") == kind and isinstance(a.get("address"), str):
                try:
                    return str(ipaddress.ip_address(a["address"]))
                except ValueError:
                    continue
    return None
