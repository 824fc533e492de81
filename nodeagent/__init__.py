"""diskhooks-node: the per-node agent (home node of a VM, online growth of its running disks)."""
