"""The agent's watch (nodeagent/watch.py) against a real kube-apiserver (envtest): list, watch, objects
that stop matching the selector, 410 Gone -> list again, and a stop that does not wait for the server."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hooksidecar.logfmt import JsonLog
from nodeagent.kube import Kube
from nodeagent.objects import slim_vmi
from nodeagent.watch import DELETED, SYNC, ResourceWatch
from tests.envtest import ControlPlane
from tests.node_agent_support import Cluster, signed_plan, wait_for


@pytest.fixture
def watch_of(envtest: ControlPlane) -> Iterator[Callable[..., tuple[ResourceWatch, list[tuple[str, str]]]]]:
    """``watch_of(node, list_fn=None)``: a started ResourceWatch of VMIs on ``node`` and the
    ``(event type, name)`` it delivered."""
    started: list[ResourceWatch] = []

    def make(node: str, list_fn: Callable[..., Any] | None = None,
             restarts: list[str] | None = None) -> tuple[ResourceWatch, list[tuple[str, str]]]:
        kube = Kube(envtest.client())
        seen: list[tuple[str, str]] = []
        lock = threading.Lock()

        def on_change(kind: str, obj: dict[str, Any]) -> None:
            with lock:
                seen.append((kind, obj["metadata"]["name"]))

        w = ResourceWatch(resource="virtualmachineinstances", list_fn=list_fn or kube.list_vmis,
                          label_selector=f"kubevirt.io/nodeName={node}", on_change=on_change,
                          stop=threading.Event(), log=JsonLog(io.StringIO()),
                          slim=slim_vmi, on_restart=None if restarts is None else restarts.append,
                          watch_timeout=60)
        w.start()
        started.append(w)
        return w, seen

    yield make
    for w in started:
        w.stop()


def test_lists_then_follows_changes_and_drops_what_leaves_the_selector(
        cluster: Cluster, watch_of: Callable[..., tuple[ResourceWatch, list[tuple[str, str]]]]) -> None:
    ns, node = cluster.namespace, f"node-w-{os.urandom(3).hex()}"
    first = cluster.create_vm("first", None)
    cluster.create_vmi(first, node, signed_plan(ns, "first"))
    w, seen = watch_of(node)
    wait_for("the list", w.synced.is_set)
    assert (SYNC, "first") in seen and len(w) == 1
    cached = w.get(ns, "first")
    assert cached is not None and "managedFields" not in cached["metadata"]
    assert cached["metadata"]["annotations"]["diskhooks.io/plan"]

    second = cluster.create_vm("second", None)
    cluster.create_vmi(second, node, None)
    wait_for("the watch's ADDED", lambda: ("ADDED", "second") in seen)
    # relabelled to another node: the API server sends DELETED to a selector that no longer matches
    cluster.custom.patch_namespaced_custom_object(
        "kubevirt.io", "v1", ns, "virtualmachineinstances", "second",
        {"metadata": {"labels": {"kubevirt.io/nodeName": "elsewhere"}}},
        _content_type="application/merge-patch+json")
    wait_for("DELETED for the relabelled VMI", lambda: (DELETED, "second") in seen)
    assert w.get(ns, "second") is None
    cluster.custom.delete_namespaced_custom_object("kubevirt.io", "v1", ns, "virtualmachineinstances",
                                                   "first")
    wait_for("DELETED for the deleted VMI", lambda: (DELETED, "first") in seen)
    assert len(w) == 0


def test_a_410_gone_lists_again_and_the_watch_goes_on(
        envtest: ControlPlane, cluster: Cluster,
        watch_of: Callable[..., tuple[ResourceWatch, list[tuple[str, str]]]]) -> None:
    """The first watch asks for resourceVersion 1, older than anything the API server keeps: it
    answers 410 Gone, the watch lists again (a second SYNC) and then follows changes."""
    node = f"node-w-{os.urandom(3).hex()}"
    kube = Kube(envtest.client())
    forced: list[bool] = []

    def list_fn(**kwargs: Any) -> Any:
        if kwargs.get("watch") and not forced:
            forced.append(True)
            kwargs["resource_version"] = "1"
        return kube.list_vmis(**kwargs)

    vm = cluster.create_vm("kept", None)
    cluster.create_vmi(vm, node, None)
    restarts: list[str] = []
    w, seen = watch_of(node, list_fn, restarts)
    wait_for("a re-list after 410 Gone", lambda: restarts == ["gone"] and seen.count((SYNC, "kept")) == 2)
    late = cluster.create_vm("late", None)
    cluster.create_vmi(late, node, None)
    wait_for("the watch after the re-list", lambda: ("ADDED", "late") in seen)
    assert w.last_error is None


def test_stop_ends_a_watch_blocked_on_the_server_at_once(
        cluster: Cluster, watch_of: Callable[..., tuple[ResourceWatch, list[tuple[str, str]]]]) -> None:
    """The server keeps the watch open for 60 s; stop() shuts its socket instead of waiting."""
    w, _ = watch_of(f"node-w-{os.urandom(3).hex()}")
    wait_for("the list", w.synced.is_set)
    time.sleep(0.3)  # let it block in the watch's read
    assert w.stop(timeout=5.0)
    assert not w.alive
