"""The agent's own Node: read and advertise ``diskhooks.io/storage`` (thin I/O).

An extended resource is advertised by patching the Node's ``status`` subresource (``capacity``
and ``allocatable``: nothing reserves part of it, so both hold the same figure; the kubelet keeps
extended resources it does not manage and copies capacity into allocatable itself, and it zeroes
them when the node registers anew, which the agent's next refresh repairs). Calls go through the
``kubernetes`` client's own request machinery with a JSON body, as :mod:`nodeagent.kube` does for
VMs, without loading ``CoreV1Api`` and its models (~20 MiB, see :mod:`nodeagent.events`).

RBAC (the chart's ClusterRole): ``get`` on ``nodes`` and ``patch`` on ``nodes/status``. Neither can
be narrowed to the agent's own Node by a ClusterRole; the agent only ever names its own.
"""

from __future__ import annotations

from typing import Any

from diskplan import keys as K
from nodeagent.kube import API_TIMEOUT

NODE_PATH = "/api/v1/nodes/{name}"
NODE_STATUS_PATH = "/api/v1/nodes/{name}/status"


def advertised_patch(gib: int) -> dict[str, Any]:
    """The merge patch that advertises ``gib`` GiB (pure)."""
    value = str(gib)
    return {"status": {"capacity": {K.RESOURCE_STORAGE: value},
                       "allocatable": {K.RESOURCE_STORAGE: value}}}


def advertised_of(node: Any) -> tuple[str | None, str | None]:
    """``diskhooks.io/storage`` in a Node's (dict) ``status.capacity`` and ``status.allocatable``."""
    status = node.get("status") if isinstance(node, dict) else None
    status = status if isinstance(status, dict) else {}
    out = []
    for member in ("capacity", "allocatable"):
        values = status.get(member)
        value = values.get(K.RESOURCE_STORAGE) if isinstance(values, dict) else None
        out.append(value if isinstance(value, str) else None)
    return out[0], out[1]


class NodeStatus:
    """The Node named ``node`` through ``api_client`` (a ``kubernetes.client.ApiClient``)."""

    def __init__(self, api_client: Any, node: str) -> None:
        self.api = api_client
        self.node = node

    def _call(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(method=method, resource_path=path,
                                           path_params={"name": self.node}, header_params=headers,
                                           body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(*request, _request_timeout=API_TIMEOUT)
        response.read()
        return self.api.response_deserialize(response, {"200": "object", "201": "object"}).data

    def read(self) -> tuple[str | None, str | None]:
        """What the Node advertises now (capacity, allocatable); ApiException (404: no such Node)."""
        return advertised_of(self._call("GET", NODE_PATH))

    def advertise(self, gib: int) -> tuple[str | None, str | None]:
        """Set capacity and allocatable to ``gib``; what the Node then says."""
        return advertised_of(self._call("PATCH", NODE_STATUS_PATH, advertised_patch(gib),
                                        "application/merge-patch+json"))
