"""Python modules generated from diskhooks' own protos in ``hooksidecar/protos/`` — do not edit.

Regenerate with ``scripts/gen_protos.sh``, which runs (grpcio-tools 1.85.1)::

    python -m grpc_tools.protoc -Ihooksidecar/_pb=hooksidecar/protos --python_out=. --pyi_out=. \\
        hooksidecar/_pb/info.proto hooksidecar/_pb/v1alpha1.proto hooksidecar/_pb/v1alpha2.proto \\
        hooksidecar/_pb/v1alpha3.proto

Message modules only. The server does not import them: it serves with its own HTTP/2 layer (``h2grpc``) and
the small codec in ``hooksidecar/server.py`` (the protobuf runtime and these modules cost ~2.6 MiB
of peak RSS, measured by ``python -m benchmarks sidecar``; the sidecar runs under a 64M limit).
The tests use them, with the service descriptors they carry, as virt-launcher's side of the wire,
and check the server's codec against them. The generated code checks at import that the protobuf
runtime is at least the version of the tools that generated it.
"""
