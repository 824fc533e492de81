"""Which VMs need their HomeNodeRecorded Event sent late (nodeagent/homeevent.py): pure, no API server."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.plan import DNS_SUBDOMAIN
from nodeagent.events import event_body
from nodeagent.homeevent import (
    HOME_FIELD_MANAGER,
    RECORDED_EVENT_WINDOW,
    home_record_entries,
    home_recorded_at,
    late_message,
    recorded_event_due,
    recorded_event_suffix,
)
from nodeagent.objects import slim_vm

NODE = "node-a"
UID = "11111111-2222-4333-8444-555555555555"
NOW = datetime.datetime(2026, 3, 1, 10, 0, 30, tzinfo=datetime.UTC)
HOME_FIELDS: dict[str, Any] = {"f:metadata": {"f:annotations": {f"f:{K.ANN_NODE}": {}},
                              "f:labels": {f"f:{K.LABEL_NODE}": {}}}}


def entry(time: str = "2026-03-01T10:00:00Z", *, manager: str = HOME_FIELD_MANAGER,
          fields: dict[str, Any] | None = None, **extra: str) -> dict[str, Any]:
    """A managedFields entry as the API server writes it for a merge patch."""
    return {"manager": manager, "operation": "Update", "apiVersion": "kubevirt.io/v1", "time": time,
            "fieldsType": "FieldsV1", "fieldsV1": HOME_FIELDS if fields is None else fields, **extra}


def vm(*entries: dict[str, Any], home: str | None = NODE, uid: str | None = UID,
       deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "pg01", "namespace": "vms", "resourceVersion": "9",
                            "managedFields": [entry(manager="kubectl-create",
                                                    fields={"f:spec": {"f:running": {}}}), *entries]}
    if uid is not None:
        meta["uid"] = uid
    if home is not None:
        meta["annotations"] = {K.ANN_NODE: home}
        meta["labels"] = {K.LABEL_NODE: home}
    if deleting:
        meta["deletionTimestamp"] = "2026-03-01T10:00:20Z"
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta,
            "spec": {"template": {"metadata": {"annotations": {K.ANN_PLAN: "{}"}}}}}


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def test_the_event_name_is_fixed_by_the_vm_uid_and_the_node() -> None:
    suffix = recorded_event_suffix(UID, NODE)
    assert suffix == recorded_event_suffix(UID, NODE)
    assert suffix.startswith("home-") and len(suffix) == 25
    assert len({suffix, recorded_event_suffix(UID, "node-b"),
                recorded_event_suffix("another-uid", NODE)}) == 3
    body = event_body(vm(), reason=K.EVENT_HOME_NODE_RECORDED, message="m", event_type="Normal",
                      node=NODE, now=NOW, suffix=suffix)
    assert body["metadata"]["name"] == f"pg01.{suffix}"
    assert DNS_SUBDOMAIN.match(body["metadata"]["name"])


@pytest.mark.parametrize(("the_vm", "due"), [
    (vm(entry()), "2026-03-01T10:00:00Z"),  # recorded 30 s ago
    (vm(entry("2026-03-01T09:50:30Z")), "2026-03-01T09:50:30Z"),  # exactly the window
    (vm(entry("2026-03-01T10:02:00Z")), "2026-03-01T10:02:00Z"),  # the API server's clock ahead
    (vm(entry("2026-03-01T09:40:00Z", apiVersion="kubevirt.io/v1alpha3"), entry()),
     "2026-03-01T10:00:00Z"),  # the latest entry of the home's manager
    (vm(entry("2026-03-01T09:50:29Z")), None),  # a second past the window
    (vm(entry("2026-03-01T08:00:00Z")), None),  # an old home: no call at the agent's start
    (vm(), None),  # no home record of the agent (set by someone else)
    (vm(entry(manager="diskhooks-node-agent")), None),  # the agent's other patches (a migration)
    (vm(entry(fields={"f:metadata": {"f:labels": {f"f:{K.LABEL_NODE}": {}}}})), None),  # annotation taken over
    (vm(entry(subresource="status")), None),
    (vm(entry(operation="Apply")), None),
    (vm(entry("yesterday")), None),
    (vm(entry("2026-03-01T12:00:00+02:00")), None),  # 10:00Z, inside the window, but not the API server's UTC form
    (vm(entry(), home="node-b"), None),
    (vm(entry(), home=None), None),
    (vm(entry(), uid=None), None),
    (vm(entry(), uid=""), None),
    (vm(entry(), deleting=True), None),
])
def test_which_vm_needs_its_event(the_vm: dict[str, Any], due: str | None) -> None:
    got = recorded_event_due(the_vm, node=NODE, now=NOW)
    assert got == (None if due is None else at(due))
    # the watch cache's slim copy decides the same
    assert recorded_event_due(slim_vm(the_vm), node=NODE, now=NOW) == got


def test_the_window_is_a_parameter_and_short() -> None:
    assert RECORDED_EVENT_WINDOW == datetime.timedelta(minutes=10)  # well inside the 1 h --event-ttl
    old = vm(entry("2026-03-01T09:00:00Z"))
    assert recorded_event_due(old, node=NODE, now=NOW) is None
    assert recorded_event_due(old, node=NODE, now=NOW, window=datetime.timedelta(hours=2)) == \
        at("2026-03-01T09:00:00Z")


def test_slim_vm_keeps_only_the_home_record_of_managed_fields() -> None:
    full = vm(entry(), entry(manager="diskhooks-node-agent"))
    slim = slim_vm(full)
    assert slim["metadata"]["managedFields"] == [
        {"manager": HOME_FIELD_MANAGER, "operation": "Update", "time": "2026-03-01T10:00:00Z",
         "fieldsV1": {"f:metadata": {"f:annotations": {f"f:{K.ANN_NODE}": {}}}}}]
    assert "managedFields" not in slim_vm(vm())["metadata"]
    assert len(full["metadata"]["managedFields"]) == 3  # the input is untouched
    assert home_record_entries("not a list") == [] and home_record_entries([None, 3]) == []
    assert home_recorded_at({"metadata": "odd"}) is None


def test_late_message_says_when_and_why() -> None:
    text = late_message(NODE, at("2026-03-01T10:00:00Z"))
    assert text.startswith("home node recorded: node-a (at 2026-03-01T10:00:00Z;")
    assert "sent late" in text
