"""diskplan: the pure, shared core of diskhooks.

Annotation keys, quantity parsing, the platform policy model, the parsing of user annotations with
precise errors, and the versioned, authenticated plan that the webhook writes and the sidecar reads.

This package does no I/O beyond what a caller hands it (bytes, dicts, strings). It never imports
Flask, gRPC, lxml or the Kubernetes client, and never reads the environment.
"""
