"""diskhooks hook sidecar: domain-XML rewriting, image checks, the prepare step, gRPC server and CLI."""
