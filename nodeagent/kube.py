"""The agent's few calls to the API server, through the official ``kubernetes`` client.

Thin: read a VirtualMachine, merge-patch its metadata (the home node), create an Event, and the
list functions the watches use. Every VM patch names its field manager (:data:`FIELD_MANAGER`, or
``nodeagent.homeevent.HOME_FIELD_MANAGER`` for the home record alone, whose ``managedFields`` time
tells when the home was recorded). What to patch and what an Event says is decided elsewhere
(``nodeagent.home``, ``nodeagent.events``). Objects travel as dicts (the API server's JSON).

What the agent's ServiceAccount needs (the chart's ClusterRole): ``get``/``list``/``watch`` on
``virtualmachines`` and ``virtualmachineinstances`` (kubevirt.io), ``patch`` on ``virtualmachines``,
``create`` on ``events`` (events.k8s.io); and for :mod:`nodeagent.nodestatus`, ``get`` on ``nodes`` and
``patch`` on ``nodes/status``.
"""

from __future__ import annotations

import datetime
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from nodeagent.events import event_body

GROUP = "kubevirt.io"
VERSION = "v1"
VMS = "virtualmachines"
VMIS = "virtualmachineinstances"
API_TIMEOUT = (5.0, 30.0)  # connect, read: a request that hangs is retried, not waited on forever
POOL_SIZE = 16  # two watches, the workers and the Events fit without waiting for a connection
FIELD_MANAGER = "diskhooks-node-agent"  # the agent's VM patches (the home record has its own)


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): read it again and decide again."""


def load_client(kubeconfig: str | None) -> Any:
    """An ApiClient from ``kubeconfig``, or from the Pod's ServiceAccount when None."""
    from kubernetes import client, config

    conf = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
    else:
        config.load_incluster_config(client_configuration=conf)
    conf.connection_pool_maxsize = POOL_SIZE
    return client.ApiClient(conf)


def describe_error(exc: BaseException) -> str:
    """One line for the log: the API server's own message for an API error (its Status object's
    ``message``), else the exception's type and text."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        message = ""
        try:
            status = json.loads(exc.body or "")
            message = status.get("message", "") if isinstance(status, dict) else ""
        except (ValueError, TypeError):
            pass
        return f"HTTP {exc.status} {exc.reason or ''}: {message or str(exc.body)[:300]}"[:600]
    return f"{type(exc).__name__}: {str(exc)[:500]}"


class Kube:
    """The API server as the agent uses it."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.events: Any = client.EventsV1Api(api_client)  # not CoreV1Api: ~20 MiB less (events.py)

    def get_vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The VirtualMachine, or None when it does not exist."""
        return self._get(VMS, namespace, name)

    def get_vmi(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The VirtualMachineInstance, or None when it does not exist."""
        return self._get(VMIS, namespace, name)

    def _get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=API_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def patch_vm_metadata(self, namespace: str, name: str, patch: Mapping[str, Any], *,
                          field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Apply a JSON merge patch (``application/merge-patch+json``) to the VM as
        ``field_manager``; a ``resourceVersion`` in it makes a changed VM a :class:`Conflict`."""
        from kubernetes.client.exceptions import ApiException

        try:
            vm: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, VMS, name, dict(patch), field_manager=field_manager,
                _content_type="application/merge-patch+json", _request_timeout=API_TIMEOUT)
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"{namespace}/{name} changed since it was read") from None
            raise
        return vm

    def create_event(self, vm: Mapping[str, Any], *, reason: str, message: str, event_type: str,
                     node: str, suffix: str | None = None) -> bool:
        """Create an Event about ``vm`` (now), named ``<vm>.<suffix>`` (default: unique). True when
        created, False when an Event of that name exists already (409 AlreadyExists: for a fixed
        ``suffix``, the same Event sent before)."""
        from kubernetes.client.exceptions import ApiException

        now = datetime.datetime.now(datetime.UTC)
        body = event_body(vm, reason=reason, message=message, event_type=event_type, node=node, now=now,
                          suffix=suffix or f"{time.time_ns():x}{secrets.token_hex(2)}")
        namespace = body["metadata"]["namespace"]
        try:
            self.events.create_namespaced_event(namespace, body, _request_timeout=API_TIMEOUT)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def list_vmis(self, **kwargs: Any) -> Any:
        """``list_cluster_custom_object`` of VMIs (the watches pass the selector, paging, watch)."""
        return self.custom.list_cluster_custom_object(GROUP, VERSION, VMIS, **kwargs)

    def list_vms(self, **kwargs: Any) -> Any:
        return self.custom.list_cluster_custom_object(GROUP, VERSION, VMS, **kwargs)
