"""diskhooks admission webhook: VM/VMI mutation, launcher Pod mutation, the HTTPS server and its CLI."""
