"""The VM/VMI mutation core: diskhooks annotations -> real KubeVirt spec and a signed plan.

Pure. :func:`webhook.vm.mutate.mutate_vm` and :func:`webhook.vm.mutate.mutate_vmi` take the
admitted object (a decoded JSON dict) and return a :class:`~webhook.mutation.Mutation` holding a new
object and warnings; the input is never modified. They do no I/O except through the ``cluster``
argument (PVC lookups for passthrough), read no environment and keep no state. Two error families:
:class:`~diskplan.errors.Refused` (a denial naming the field: ``diskhooks.io/disks[1].size``,
``spec.template.spec.instancetype``) and :class:`~diskplan.errors.Malformed` (the object is not a
VirtualMachine/VirtualMachineInstance).

What a VM with diskhooks annotations gets, in ``spec.template`` (a bare VMI: in itself):

- per disk a ``hostDisk`` volume ``<root>/<ns>/<vm>/<disk>.qcow2`` (``DiskOrCreate``, capacity =
  the size) and a disk with its bus/serial/bootOrder; cache/io/discard/backing go only into the
  plan (the hook sidecar applies them to the domain XML);
- per passthrough entry a PVC volume and a ``disk`` (virtio) or ``lun`` (scsi) after checking the
  claim (exists, Block mode, allowed StorageClass);
- CPU topology, guest memory, requests and limits (``webhook/sizing.py``);
- the diskhooks hook sidecar, last in ``hooks.kubevirt.io/hookSidecars`` (other entries must be
  allowed by policy), the signed plan ``diskhooks.io/plan`` and the label ``diskhooks.io/managed``.

The result is a function of the annotations, the policy and the user's own part of the spec: the
webhook's own volumes, disks, sidecar entry, plan and label are recognised and rebuilt, so calling
it again on its own output changes nothing (reinvocation, re-submission). A volume is recognised as
diskhooks' own only by its exact node path, or as a passthrough named in a plan that verifies; a
forged plan is never trusted, only replaced.

Where each rule lives:

- ``mutate.py``: the entry points, and which steps run in which order on which part of the object;
- ``metadata.py``: rules on the object's metadata (names, where annotations may stand, stale traces);
- ``disks.py``: requests -> volumes and disks, the user's own volumes, boot orders, persist-root;
- ``sidecars.py``: the hook-sidecar annotation (diskhooks' own entry, every other entry);
- ``planverify.py``: which plan is trusted, the old object of an UPDATE, writing the plan and label,
  verifying a VMI made from a VM template;
- ``updates.py``: growth, detached disks, the total per VM, grandfathered limits, and UPDATEs that
  leave diskhooks' inputs alone;
- ``shape.py``: the object's shape and small readers for decoded JSON.

A part of the VMI spec that diskhooks sets (like ``webhook/sizing.py``) gets a module of its own,
called from ``mutate.py`` beside the sizing step.
"""
