"""The platform policy (``diskplan/policy.py``): strict loading, defaults, and a clear error naming
the key for every kind of mistake a platform engineer can make in the YAML."""

from __future__ import annotations

import pytest

from diskplan.errors import Refused
from diskplan.policy import (
    DriverDefaults,
    HostDiskPolicy,
    NodeAgentPolicy,
    PassthroughPolicy,
    Profile,
    SidecarPolicy,
    SizingPolicy,
    image_repository,
    load_policy,
)
from tests.conftest import DATA, EXAMPLE_POLICY, ROOT

GI = 1024**3
TI = 1024**4
MINIMAL = "sidecar: {image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0}\n"


def test_the_example_policy_loads() -> None:
    p = load_policy(EXAMPLE_POLICY.read_text())
    assert p.host_disks == HostDiskPolicy(
        root="/var/lib/diskhooks/vms", image_library="/var/lib/diskhooks/images",
        max_disk_size=2 * TI, max_total_per_vm=8 * TI,
        defaults=DriverDefaults(bus="virtio", cache="none", io="native", discard="unmap"))
    assert p.passthrough == PassthroughPolicy(storage_classes=("local-nvme",), allow_lun=True)
    assert p.sizing.profiles == {"small": Profile(2, 4 * GI), "medium": Profile(4, 8 * GI),
                                 "large": Profile(16, 64 * GI)}
    assert (p.sizing.max_cpu, p.sizing.max_memory, p.sizing.cpu_allocation_ratio,
            p.sizing.memory_overcommit_percent, p.sizing.max_sockets) == (64, 256 * GI, 2.0, 100, 2)
    assert p.sidecar == SidecarPolicy(image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
                                      image_pull_policy="IfNotPresent",
                                      allowed_images=("registry.example.com/qcow2-hook:0.1.0",
                                                      "quay.io/kubevirt/example-hook-sidecar:*"))
    assert p.default_profile is None


def test_the_minimal_policy_takes_the_documented_defaults() -> None:
    p = load_policy((DATA / "policy-minimal.yaml").read_text())
    assert p.host_disks == HostDiskPolicy()
    assert p.host_disks.root == "/var/lib/diskhooks/vms" and p.host_disks.image_library is None
    assert p.passthrough == PassthroughPolicy(storage_classes=(), allow_lun=False)
    assert p.sizing == SizingPolicy()
    assert (p.sizing.max_cpu, p.sizing.max_memory, p.sizing.cpu_allocation_ratio,
            p.sizing.memory_overcommit_percent, p.sizing.max_sockets) == (64, 256 * GI, 1.0, 100, 2)
    assert p.sidecar.image_pull_policy == "IfNotPresent" and p.sidecar.allowed_images == ()
    assert p.default_profile is None


def test_the_strict_test_policy_loads() -> None:
    p = load_policy((DATA / "policy-strict.yaml").read_text())
    assert p.default_profile == "small"
    assert p.sizing.cpu_ratio.numerator == 3 and p.sizing.cpu_ratio.denominator == 2
    assert p.sidecar.repository == "registry.internal:5000/platform/diskhooks-sidecar"


def test_what_the_chart_renders_loads() -> None:
    """The chart writes ``defaultProfile: null`` or a quoted name, and ``""`` means none."""
    base = (ROOT / "examples" / "policy.yaml").read_text().replace("defaultProfile: null", "")
    assert load_policy(base + 'defaultProfile: ""\n').default_profile is None
    assert load_policy(base + 'defaultProfile: "small"\n').default_profile == "small"


def test_the_node_agent_keys() -> None:
    """``nodeAgent.serviceAccount`` names the user allowed to set the home node; ``onlineExpand``
    defaults to true and can be switched off."""
    example = load_policy(EXAMPLE_POLICY.read_text())
    assert example.node_agent == NodeAgentPolicy(service_account="diskhooks-system/diskhooks-node")
    assert example.node_agent.username == "system:serviceaccount:diskhooks-system:diskhooks-node"
    assert example.host_disks.online_expand is True
    minimal = load_policy(MINIMAL)
    assert minimal.node_agent == NodeAgentPolicy(service_account=None)
    assert minimal.node_agent.username is None
    assert minimal.host_disks.online_expand is True
    assert load_policy("nodeAgent: null\n" + MINIMAL).node_agent.username is None
    assert load_policy("nodeAgent: {serviceAccount: null}\n" + MINIMAL).node_agent.username is None
    longest = f"{'n' * 63}/{'a' * 63}"
    assert load_policy(f"nodeAgent: {{serviceAccount: {longest}}}\n" + MINIMAL).node_agent.username == \
        f"system:serviceaccount:{'n' * 63}:{'a' * 63}"
    off = load_policy("hostDisks: {onlineExpand: false}\n" + MINIMAL)
    assert off.host_disks.online_expand is False
    assert off.host_disks == HostDiskPolicy(online_expand=False)
    # what the source node does with its copy of a moved VM: kept until the VM ran on its new node
    assert minimal.node_agent.migration.keep_source == "untilStarted"
    assert example.node_agent.migration.keep_source == "untilStarted"
    forever = load_policy("nodeAgent: {migration: {keepSource: forever}}\n" + MINIMAL)
    assert forever.node_agent.migration.keep_source == "forever"
    assert load_policy("nodeAgent: {migration: null}\n" + MINIMAL).node_agent.migration.keep_source == \
        "untilStarted"


def test_helpers_of_the_model() -> None:
    p = load_policy(EXAMPLE_POLICY.read_text())
    assert p.host_disks.disk_path("vms", "pg01", "data") == "/var/lib/diskhooks/vms/vms/pg01/data.qcow2"
    assert p.host_disks.reserved_dirs() == ("/var/lib/diskhooks/vms", "/var/lib/diskhooks/images")
    strict = load_policy((DATA / "policy-strict.yaml").read_text()).sidecar
    assert strict.allows("registry.example.com/qcow2-hook:0.1.0")
    assert not strict.allows("registry.example.com/qcow2-hook:0.2.0")
    assert strict.allows("registry.internal:5000/hooks/smbios:1")
    assert not strict.allows("registry.internal:5000/hooksevil/x:1")
    assert not strict.allows("evil.example.com/registry.internal:5000/hooks/x")


@pytest.mark.parametrize(("image", "repository"), [
    ("ghcr.io/diskhooks/diskhooks-sidecar:0.1.0", "ghcr.io/diskhooks/diskhooks-sidecar"),
    ("registry:5000/a/b", "registry:5000/a/b"),
    ("registry:5000/a/b:1.2", "registry:5000/a/b"),
    ("ghcr.io/x/y@sha256:" + "a" * 64, "ghcr.io/x/y"),
    ("ghcr.io/x/y:1@sha256:" + "a" * 64, "ghcr.io/x/y"),
])
def test_image_repository(image: str, repository: str) -> None:
    assert image_repository(image) == repository


def _with(section: str) -> str:
    return MINIMAL + section


# (policy text, field the error names, words the reason contains)
BAD = [
    ("[1, 2]", "policy", "mapping"),
    ("hostDisk: {root: /x}\n" + MINIMAL, "hostDisk", "unknown key"),
    ("failurePolicy: Ignore\n" + MINIMAL, "failurePolicy", "Helm chart"),
    ("hostDisks: {root: var/lib/vms}\n" + MINIMAL, "hostDisks.root", "clean absolute"),
    ("hostDisks: {root: /var/lib/../etc}\n" + MINIMAL, "hostDisks.root", "clean absolute"),
    ("hostDisks: {root: /var/lib/vms/}\n" + MINIMAL, "hostDisks.root", "clean absolute"),
    ("hostDisks: {root: '/var/lib/$HOME'}\n" + MINIMAL, "hostDisks.root", "clean absolute"),
    ("hostDisks: {root: /etc/diskhooks}\n" + MINIMAL, "hostDisks.root", "system directory /etc"),
    ("hostDisks: {root: 42}\n" + MINIMAL, "hostDisks.root", "must be a string"),
    ("hostDisks: {root: /srv/vms, imageLibrary: /srv/vms/images}\n" + MINIMAL,
     "hostDisks.imageLibrary", "overlaps"),
    ("hostDisks: {root: /srv/vms/a, imageLibrary: /srv/vms}\n" + MINIMAL,
     "hostDisks.imageLibrary", "overlaps"),
    ("hostDisks: {maxDiskSize: lots}\n" + MINIMAL, "hostDisks.maxDiskSize", "quantity"),
    ("hostDisks: {maxDiskSize: -1Gi}\n" + MINIMAL, "hostDisks.maxDiskSize", "quantity"),
    ("hostDisks: {maxDiskSize: 2Ti, maxTotalPerVM: 1Ti}\n" + MINIMAL, "hostDisks.maxTotalPerVM",
     "at least"),
    ("hostDisks: {defaults: {bus: ide}}\n" + MINIMAL, "hostDisks.defaults.bus", "virtio, scsi, sata"),
    ("hostDisks: {defaults: {cache: writeback}}\n" + MINIMAL, "hostDisks.defaults.io", "threads"),
    ("hostDisks: {defaults: {discard: maybe}}\n" + MINIMAL, "hostDisks.defaults.discard", "unmap"),
    ("hostDisks: {defaults: {format: raw}}\n" + MINIMAL, "hostDisks.defaults.format", "unknown key"),
    ("passthrough: {storageClasses: local-nvme}\n" + MINIMAL, "passthrough.storageClasses", "list"),
    ("passthrough: {storageClasses: [Local_NVMe]}\n" + MINIMAL, "passthrough.storageClasses[0]",
     "StorageClass"),
    ("passthrough: {storageClasses: [a, a]}\n" + MINIMAL, "passthrough.storageClasses", "twice"),
    ("passthrough: {allowLun: 'yes'}\n" + MINIMAL, "passthrough.allowLun", "true or false"),
    ("sizing: {maxCPU: 0}\n" + MINIMAL, "sizing.maxCPU", "integer"),
    ("sizing: {maxCPU: true}\n" + MINIMAL, "sizing.maxCPU", "integer"),
    ("sizing: {maxCPU: '8'}\n" + MINIMAL, "sizing.maxCPU", "integer"),
    ("sizing: {maxMemory: 1k}\n" + MINIMAL, "sizing.maxMemory", "1Mi"),
    ("sizing: {cpuAllocationRatio: 0.5}\n" + MINIMAL, "sizing.cpuAllocationRatio", "between 1"),
    ("sizing: {memoryOvercommitPercent: 50}\n" + MINIMAL, "sizing.memoryOvercommitPercent", "between 100"),
    ("sizing: {maxSockets: 0}\n" + MINIMAL, "sizing.maxSockets", "integer"),
    ("sizing: {maxCPU: 8, maxSockets: 16}\n" + MINIMAL, "sizing.maxSockets", "between 1 and 8"),
    ("sizing: {profiles: [small]}\n" + MINIMAL, "sizing.profiles", "mapping"),
    ("sizing: {profiles: {Big_One: {cpu: 2, memory: 2Gi}}}\n" + MINIMAL, "sizing.profiles.Big_One",
     "DNS label"),
    ("sizing: {profiles: {small: {cpu: 2}}}\n" + MINIMAL, "sizing.profiles.small", "both"),
    ("sizing: {profiles: {small: {cpu: 2, memory: 2Gi, gpu: 1}}}\n" + MINIMAL,
     "sizing.profiles.small.gpu", "unknown key"),
    ("sizing: {maxCPU: 8, profiles: {big: {cpu: 16, memory: 2Gi}}}\n" + MINIMAL,
     "sizing.profiles.big.cpu", "maxCPU"),
    ("sizing: {profiles: {odd: {cpu: 1, memory: 1500M}}}\n" + MINIMAL, "sizing.profiles.odd.memory",
     "whole number of Mi"),
    ("sizing: {maxMemory: 8Gi, profiles: {big: {cpu: 1, memory: 16Gi}}}\n" + MINIMAL,
     "sizing.profiles.big.memory", "maxMemory"),
    ("hostDisks: {}\n", "sidecar", "required"),
    ("sidecar: {imagePullPolicy: Always}\n", "sidecar.image", "required"),
    ("sidecar: {image: 'not an image!'}\n", "sidecar.image", "image reference"),
    ("sidecar: {image: a/b:1, imagePullPolicy: Sometimes}\n", "sidecar.imagePullPolicy", "Always"),
    ("sidecar: {image: a/b:1, allowedImages: ['*']}\n", "sidecar.allowedImages[0]", "any image"),
    ("sidecar: {image: a/b:1, allowedImages: ['reg.io/*/x']}\n", "sidecar.allowedImages[0]",
     "only allowed at the end"),
    ("sidecar: {image: a/b:1, allowedImages: ['']}\n", "sidecar.allowedImages[0]", "non-empty"),
    ("defaultProfile: huge\n" + MINIMAL, "defaultProfile", "not a profile"),
    ("defaultProfile: [small]\n" + MINIMAL, "defaultProfile", "string"),
    ("sizing: &s {maxCPU: 2}\nother: *s\n" + MINIMAL, "sizing", "anchors"),
    ("sizing: {maxCPU: &n 2, maxSockets: *n}\n" + MINIMAL, "sizing.maxCPU", "anchors"),
    ("sizing: {maxCPU: 2, maxCPU: 4}\n" + MINIMAL, "sizing", "twice"),
    ("sizing: !!python/object:os.system {}\n" + MINIMAL, "sizing", "tags"),
    ("sizing: {cpuAllocationRatio: .nan}\n" + MINIMAL, "sizing.cpuAllocationRatio", "not a finite number"),
    ("sizing: {cpuAllocationRatio: -.inf}\n" + MINIMAL, "sizing.cpuAllocationRatio", "not a finite number"),
    ("sidecar: {image: a/b:1, allowedImages: [x/y:1, !!str x/z:1]}\n", "sidecar.allowedImages[1]", "tags"),
    # YAML 1.2 core schema: a timestamp is text, refused here as the path it is not
    ("hostDisks: {root: 2026-01-01}\n" + MINIMAL, "hostDisks.root", "not a clean absolute path"),
    ("- &a 1\n", "policy[0]", "anchors"),
    ("hostDisks: {onlineExpand: 'no'}\n" + MINIMAL, "hostDisks.onlineExpand", "true or false"),
    ("hostDisks: {onlineExpand: 0}\n" + MINIMAL, "hostDisks.onlineExpand", "true or false"),
    ("nodeAgent: diskhooks-system/diskhooks-node\n" + MINIMAL, "nodeAgent", "mapping"),
    ("nodeAgent: {serviceAccount: x/y, name: z}\n" + MINIMAL, "nodeAgent.name", "unknown key"),
    ("nodeAgent: {serviceAccount: diskhooks-node}\n" + MINIMAL, "nodeAgent.serviceAccount",
     "<namespace>/<name>"),
    ("nodeAgent: {serviceAccount: ''}\n" + MINIMAL, "nodeAgent.serviceAccount", "<namespace>/<name>"),
    ("nodeAgent: {serviceAccount: /diskhooks-node}\n" + MINIMAL, "nodeAgent.serviceAccount", "DNS labels"),
    ("nodeAgent: {serviceAccount: diskhooks-system/}\n" + MINIMAL, "nodeAgent.serviceAccount", "DNS labels"),
    ("nodeAgent: {serviceAccount: a/b/c}\n" + MINIMAL, "nodeAgent.serviceAccount", "DNS labels"),
    ("nodeAgent: {serviceAccount: Diskhooks/node}\n" + MINIMAL, "nodeAgent.serviceAccount", "DNS labels"),
    ("nodeAgent: {serviceAccount: 'ns:x/node'}\n" + MINIMAL, "nodeAgent.serviceAccount", "DNS labels"),
    ("nodeAgent: {serviceAccount: diskhooks.system/node}\n" + MINIMAL, "nodeAgent.serviceAccount",
     "DNS labels"),
    ("nodeAgent: {serviceAccount: \"ns/node\\n\"}\n" + MINIMAL, "nodeAgent.serviceAccount", "DNS labels"),
    (f"nodeAgent: {{serviceAccount: ns/{'a' * 64}}}\n" + MINIMAL, "nodeAgent.serviceAccount",
     "at most 63"),
    ("nodeAgent: {serviceAccount: [ns, node]}\n" + MINIMAL, "nodeAgent.serviceAccount", "string"),
    ("nodeAgent: {migration: {keepSource: never}}\n" + MINIMAL, "nodeAgent.migration.keepSource",
     "must be one of untilStarted, forever"),
    ("nodeAgent: {migration: {keepSource: ''}}\n" + MINIMAL, "nodeAgent.migration.keepSource", "empty"),
    ("nodeAgent: {migration: {keepSource: true}}\n" + MINIMAL, "nodeAgent.migration.keepSource", "string"),
    ("nodeAgent: {migration: {keep: forever}}\n" + MINIMAL, "nodeAgent.migration.keep", "unknown key"),
    ("nodeAgent: {migration: forever}\n" + MINIMAL, "nodeAgent.migration", "mapping"),
]


@pytest.mark.parametrize(("text", "field", "reason"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_a_bad_policy_is_refused_naming_the_key(text: str, field: str, reason: str) -> None:
    with pytest.raises(Refused) as err:
        load_policy(text)
    assert err.value.field == field, str(err.value)
    assert reason in err.value.reason, str(err.value)


def test_a_policy_larger_than_a_megabyte_is_refused() -> None:
    with pytest.raises(Refused) as err:
        load_policy(MINIMAL + "# " + "x" * (1024 * 1024) + "\n")
    assert err.value.field == "policy" and "limit" in err.value.reason


def test_an_empty_policy_names_the_one_required_key() -> None:
    with pytest.raises(Refused) as err:
        load_policy("")
    assert str(err.value) == "sidecar: is required"
