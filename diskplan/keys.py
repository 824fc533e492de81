"""Every name diskhooks shares across layers: annotation keys, labels, paths, container names.

Keep them here so the webhook, the sidecar, the prepare step and the Helm chart agree.
"""

from __future__ import annotations

PREFIX = "diskhooks.io/"

# --- user annotations (on a VirtualMachine's metadata, or on a bare VirtualMachineInstance) ---
ANN_DISKS = PREFIX + "disks"
ANN_PERSIST_ROOT = PREFIX + "persist-root"
ANN_PASSTHROUGH = PREFIX + "passthrough"
ANN_CPU = PREFIX + "cpu"
ANN_MEMORY = PREFIX + "memory"
ANN_PROFILE = PREFIX + "profile"
USER_ANNOTATIONS = (ANN_DISKS, ANN_PERSIST_ROOT, ANN_PASSTHROUGH, ANN_CPU, ANN_MEMORY, ANN_PROFILE)
SIZING_ANNOTATIONS = (ANN_CPU, ANN_MEMORY, ANN_PROFILE)

# --- written only by the webhook ---
ANN_PLAN = PREFIX + "plan"  # on spec.template.metadata.annotations (VM) or metadata.annotations (VMI)
# label on the VMI template (hence on the VMI and its virt-launcher pod) selecting pods for /mutate-pod
LABEL_MANAGED = PREFIX + "managed"
LABEL_MANAGED_VALUE = "true"

# --- the home node (written only by the node agent's ServiceAccount, see docs) ---
# on a VirtualMachine's metadata.annotations (not the template): the node that holds its images
ANN_NODE = PREFIX + "node"
# label on the VirtualMachine's metadata, equal to ANN_NODE: each node agent watches only its VMs
LABEL_NODE = PREFIX + "node"
# file in the VM directory <hostDisks.root>/<ns>/<vm>/, written by prepare (diskplan/homemarker.py);
# two dots, so it never meets <dns-label>.qcow2, <label>.base.json or persist-root.* names
HOME_MARKER = "home.node.json"
# prepare's environment: the node its Pod runs on (downward API spec.nodeName)
ENV_NODE_NAME = "DISKHOOKS_NODE_NAME"
# cold migration (diskplan/migration.py, docs/MIGRATION.md), on a VirtualMachine's metadata.annotations:
# the user's request and its option, and the agents' status (JSON)
ANN_MIGRATE_TO = PREFIX + "migrate-to"
ANN_MIGRATE_DELETE_SOURCE = PREFIX + "migrate-delete-source"
ANN_MIGRATION_STATUS = PREFIX + "migration-status"
MIGRATION_ANNOTATIONS = (ANN_MIGRATE_TO, ANN_MIGRATE_DELETE_SOURCE, ANN_MIGRATION_STATUS)
# Events on the VirtualMachine
EVENT_HOME_NODE_RECORDED = "HomeNodeRecorded"
EVENT_DISK_EXPANDED = "DiskExpanded"
EVENT_DISK_EXPAND_FAILED = "DiskExpandFailed"

# --- KubeVirt names ---
ANN_HOOK_SIDECARS = "hooks.kubevirt.io/hookSidecars"
LABEL_LAUNCHER = "kubevirt.io"  # value "virt-launcher" on launcher pods
LABEL_CREATED_BY = "kubevirt.io/created-by"  # VMI uid, on launcher pods
ANN_DOMAIN = "kubevirt.io/domain"  # VMI name, on launcher pods
HOOK_VERSIONS = ("v1alpha3", "v1alpha2", "v1alpha1")

# --- paths as the virt-launcher pod sees them ---
# KubeVirt mounts the parent directory of each hostDisk volume here (one directory per volume).
LAUNCHER_VMI_DISKS = "/var/run/kubevirt-private/vmi-disks"
# KubeVirt's containerDisk files, as the launcher sees them: disk_<index of the volume in spec.volumes>.img
LAUNCHER_CONTAINER_DISKS = "/var/run/kubevirt/container-disks"
# KubeVirt's image-volume mounts of containerDisks (ImageVolume mode): disk_<index>/disk/<file>
LAUNCHER_IMAGE_VOLUMES = "/var/run/kubevirt-image-volume"
# added by the diskhooks Pod mutation:
DH_MOUNT_ROOT = "/var/run/kubevirt-private/diskhooks"
LAUNCHER_VM_DIR = DH_MOUNT_ROOT + "/vm"  # <hostDisks.root>/<ns>/<vm>/ (persist-root overlays)
LAUNCHER_IMAGE_LIBRARY = DH_MOUNT_ROOT + "/images"  # <hostDisks.imageLibrary>/, read-only
LAUNCHER_BASE_CATALOG = DH_MOUNT_ROOT + "/catalog"  # <hostDisks.root>/.diskhooks/catalog/, prepare only
POD_VOLUME_VM_DIR = "diskhooks-vm-dir"
POD_VOLUME_IMAGE_LIBRARY = "diskhooks-image-library"
POD_VOLUME_BASE_CATALOG = "diskhooks-base-catalog"
PREPARE_CONTAINER = "diskhooks-prepare"
ENV_PLAN = "DISKHOOKS_PLAN"
ENV_VMI_UID = "DISKHOOKS_VMI_UID"

# --- the node's base catalog (diskplan/basecatalog.py): the SHA-256 of each library base, hashed
# once per node by the node agent or the first prepare that needs it. Below hostDisks.root: a
# namespace is a DNS label, so the leading dot never meets a namespace directory.
CATALOG_SUBDIR = ".diskhooks/catalog"


def catalog_dir(root: str) -> str:
    """Node directory of the base catalog for ``hostDisks.root`` ``root``."""
    return f"{root.rstrip('/')}/{CATALOG_SUBDIR}"


def catalog_entry_name(base_file: str) -> str:
    """The catalog entry of the library file ``base_file`` (a plan's base file name: no slash, no
    leading dot). The suffixes keep entries, lock files and prepare-style temporary names
    (``.<name>.tmp-<hex>``, leading dot) apart."""
    return f"{base_file}.entry.json"


def catalog_lock_name(base_file: str) -> str:
    """The lock file (``flock``) of one library file's entry: whoever hashes that file holds it."""
    return f"{base_file}.lock"


# --- capacity (docs/CAPACITY.md; diskplan/capacity.py) ---
# the extended resource the node agent advertises on its Node (whole GiB) and launcher Pods request
RESOURCE_STORAGE = PREFIX + "storage"
# the node agent's summary of what the node's images hold, read by prepare (mounted read-only):
# <hostDisks.root>/.diskhooks/capacity/summary.json (the leading dot never meets a namespace)
CAPACITY_SUBDIR = ".diskhooks/capacity"
CAPACITY_SUMMARY = "summary.json"
LAUNCHER_CAPACITY = DH_MOUNT_ROOT + "/capacity"  # prepare only, read-only
POD_VOLUME_CAPACITY = "diskhooks-capacity"
# prepare's stdout line with the capacity figures (a dot: never a volume's DNS-label name)
CAPACITY_REPORT = "node.capacity"
# Event on the Node: a VM directory whose VM no longer exists (its images stay, and count)
EVENT_ORPHANED_VM_DIRECTORY = "OrphanedVMDirectory"


def capacity_dir(root: str) -> str:
    """Node directory of the capacity summary for ``hostDisks.root`` ``root``."""
    return f"{root.rstrip('/')}/{CAPACITY_SUBDIR}"


# qemu's uid/gid inside virt-launcher (non-root mode)
QEMU_UID = 107
QEMU_GID = 107


def launcher_disk_dir(volume: str) -> str:
    """Directory where KubeVirt mounts a hostDisk volume's parent directory in the launcher."""
    return f"{LAUNCHER_VMI_DISKS}/{volume}"


def disk_file_name(disk: str) -> str:
    """File name of a diskhooks disk; ``disk`` is a validated DNS label, so no dots, no slashes."""
    return f"{disk}.qcow2"


def disk_base_record_name(disk: str) -> str:
    """JSON record of the library base a disk's overlay was made on (written by prepare). ``disk``
    is a DNS label (no dots), so this never meets ``persist-root.<volume>.*`` (two dots before
    ``base.json``) nor prepare's temporary names (``.<file>.tmp-<hex>``, leading dot)."""
    return f"{disk}.base.json"


def persist_root_file_name(volume: str) -> str:
    """File of a persistent containerDisk overlay; the dots keep it apart from ``<dns-label>.qcow2``."""
    return f"persist-root.{volume}.qcow2"


def persist_root_marker_name(volume: str) -> str:
    """JSON record of the base a persistent overlay was made on (written by prepare)."""
    return f"persist-root.{volume}.base.json"


def container_disk_path(volume_index: int) -> str:
    return f"{LAUNCHER_CONTAINER_DISKS}/disk_{volume_index}.img"


def disk_alias(volume: str) -> str:
    """libvirt alias KubeVirt gives a user volume's disk."""
    return f"ua-{volume}"
