"""The one lookup interface of the webhook: PersistentVolumeClaims and StorageClasses (and, for a
migration request, Nodes and VirtualMachineInstances: :class:`NodeLookups`).

The mutation cores take a :class:`Cluster` argument and only call its two getters (one GET of a
single object each: the chart's ClusterRole grants ``get`` and nothing else); they never talk to
an API server themselves. Two implementations:

- :class:`FileCluster` — objects from a YAML/JSON file (``--cluster-objects``): dry runs, CI, demos
  and tests. Built once, read-only afterwards.
- :class:`KubeCluster` — the Kubernetes API through the ``kubernetes`` client (imported lazily, so
  the cores and tests need no client), with the pod's service account or a kubeconfig. A lookup
  that fails for any reason other than "not found" raises :class:`ClusterError`; the mutation turns
  that into a denial naming the claim, so an unreachable API server never admits a passthrough it
  could not check. There is no API server on the build machine: only construction is tested.

Getters return a fresh dict (the object as ``kubectl get -o json`` shows it) or ``None``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import yaml

from diskplan.errors import Malformed

PVC = "PersistentVolumeClaim"
STORAGE_CLASS = "StorageClass"
NODE = "Node"
VMI = "VirtualMachineInstance"
LOOKUP_TIMEOUT_SECONDS = 3.0


class ClusterError(Exception):
    """A lookup could not be answered (API server unreachable, forbidden, timed out...)."""


class Cluster(Protocol):
    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def get_storage_class(self, name: str) -> dict[str, Any] | None: ...


@runtime_checkable
class NodeLookups(Protocol):
    """What a migration request is checked with (``webhook.vm.migration``): the target Node exists,
    the VM has no VMI. Both implementations below offer it (grants: ``get`` on nodes and on
    virtualmachineinstances)."""

    def get_node(self, name: str) -> dict[str, Any] | None: ...

    def get_vmi(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class FileCluster:
    """Objects read from text: a YAML list, a multi-document YAML stream, or a ``v1`` ``List``
    (``kubectl get pvc,sc -o yaml``). Only PVCs, StorageClasses, Nodes and VMIs are kept; other kinds are
    skipped (they still need a kind and a name)."""

    def __init__(self, objects: Iterable[Mapping[str, Any]] = ()) -> None:
        self._objects: dict[tuple[str, str, str], str] = {}
        for i, obj in enumerate(objects):
            self._add(obj, f"items[{i}]")

    @classmethod
    def from_text(cls, text: str) -> FileCluster:
        """Parse YAML or JSON text. Raises :class:`Malformed` naming the bad item."""
        try:
            docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
        except yaml.YAMLError as exc:
            raise Malformed("cluster objects", f"not valid YAML or JSON: {exc}") from None
        items: list[Any] = []
        for doc in docs:
            if isinstance(doc, list):
                items.extend(doc)
            elif isinstance(doc, Mapping) and isinstance(doc.get("kind"), str) \
                    and doc["kind"].endswith("List") and "items" in doc:
                if not isinstance(doc["items"], list):
                    raise Malformed("items", "must be a list of objects")
                items.extend(doc["items"])
            else:
                items.append(doc)
        return cls(items)

    def _add(self, obj: Any, where: str) -> None:
        if not isinstance(obj, Mapping):
            raise Malformed(where, "must be a Kubernetes object (a mapping)")
        kind = obj.get("kind")
        if not isinstance(kind, str) or not kind:
            raise Malformed(f"{where}.kind", "is required")
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        if not isinstance(name, str) or not name:
            raise Malformed(f"{where}.metadata.name", "is required")
        if kind not in (PVC, STORAGE_CLASS, NODE, VMI):
            return
        namespace = ""
        if kind in (PVC, VMI):
            value = meta.get("namespace") if isinstance(meta, Mapping) else None
            if not isinstance(value, str) or not value:
                raise Malformed(f"{where}.metadata.namespace", f"a {kind} needs one")
            namespace = value
        key = (kind, namespace, name)
        if key in self._objects:
            raise Malformed(where, f"{kind} {namespace + '/' if namespace else ''}{name} appears twice")
        # kept as JSON text: plain data only (YAML timestamps become strings), and every lookup
        # returns a fresh copy cheaply
        self._objects[key] = json.dumps(obj, default=str)

    def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        text = self._objects.get((kind, namespace, name))
        return None if text is None else dict(json.loads(text))

    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(PVC, namespace, name)

    def get_storage_class(self, name: str) -> dict[str, Any] | None:
        return self._get(STORAGE_CLASS, "", name)

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._get(NODE, "", name)

    def get_vmi(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(VMI, namespace, name)

    def __len__(self) -> int:
        return len(self._objects)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loading of the platform's own file (aliases are fine here: not user input)."""


EMPTY_CLUSTER = FileCluster()


class KubeCluster:
    """Lookups through the Kubernetes API (``kubernetes`` client, imported here only).

    Build with :meth:`in_cluster` (the webhook pod's service account; the chart's ClusterRole
    allows get on persistentvolumeclaims and storageclasses) or :meth:`from_kubeconfig`.
    """

    def __init__(self, api_client: Any, *, timeout: float = LOOKUP_TIMEOUT_SECONDS) -> None:
        from kubernetes import client

        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._storage = client.StorageV1Api(api_client)
        self._timeout = timeout

    @classmethod
    def in_cluster(cls, *, timeout: float = LOOKUP_TIMEOUT_SECONDS) -> KubeCluster:
        """The pod's service account. Raises the client's ConfigException outside a pod."""
        from kubernetes import client, config

        config.load_incluster_config()
        return cls(client.ApiClient(), timeout=timeout)

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, *, context: str | None = None,
                        timeout: float = LOOKUP_TIMEOUT_SECONDS) -> KubeCluster:
        """A kubeconfig file (default: ``$KUBECONFIG`` or ``~/.kube/config``, as kubectl)."""
        from kubernetes import config

        api_client = config.new_client_from_config(
            config_file=path, context=context)
        return cls(api_client, timeout=timeout)

    def _call(self, what: str, fn: Any, *args: Any) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = fn(*args, _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ClusterError(f"looking up {what} failed: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, TLS...
            raise ClusterError(f"looking up {what} failed: {type(exc).__name__}: {exc}") from None
        result = self._api_client.sanitize_for_serialization(obj)
        return dict(result) if isinstance(result, Mapping) else None

    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(f"PersistentVolumeClaim {namespace}/{name}",
                          self._core.read_namespaced_persistent_volume_claim, name, namespace)

    def get_storage_class(self, name: str) -> dict[str, Any] | None:
        return self._call(f"StorageClass {name}", self._storage.read_storage_class, name)

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._call(f"Node {name}", self._core.read_node, name)

    def get_vmi(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes import client

        custom = client.CustomObjectsApi(self._api_client)
        return self._call(f"VirtualMachineInstance {namespace}/{name}", custom.get_namespaced_custom_object,
                          "kubevirt.io", "v1", namespace, "virtualmachineinstances", name)
