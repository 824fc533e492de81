"""Cold migration of a stopped VM's directory to another node (docs/MIGRATION.md).

Layers: ``diskplan.migration`` (pure: names, the status annotation, the wire requests, rsync's
allowed command line); here the I/O: ``tlsfiles`` (mutual TLS contexts), ``bridge`` (TLS <->
pipes, one thread), ``connector`` (rsync's remote shell), ``rsyncrun`` (the source's rsync),
``vmdir`` (the VM directory, staging, kept copies), ``keptcopy`` (the VM's first start on its new
node, the kept copy's deletion), ``cluster`` (VMI and Node reads), ``target`` (the listener and its
operations), ``source`` (one VM's migration away), ``service`` (the agent's part), ``command``
(``kubectl diskhooks migrate``).
"""
