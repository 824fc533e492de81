#!/usr/bin/env bash
# Regenerates hooksidecar/_pb/ from diskhooks' own .proto files in hooksidecar/protos/ with grpcio-tools.
# The generated modules are committed; run this after editing a .proto and commit the result.
#   Usage: scripts/gen_protos.sh            (needs: pip install grpcio-tools, e.g. the dev extra)
# Only message modules (*_pb2.py + typed *_pb2.pyi) are generated, no *_pb2_grpc stubs: the server
# serves with its own codec (over h2grpc, or grpcio's generic handlers), and the tests build their calls from the
# service descriptors in the *_pb2 modules (the stubs would also pin grpcio >= the tools' version).
# The include mapping -Ihooksidecar/_pb=hooksidecar/protos records each file as
# hooksidecar/_pb/<name>.proto in the descriptor pool, where the modules live.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
out=hooksidecar/_pb
mkdir -p "$out"
rm -f "$out"/*_pb2.py "$out"/*_pb2_grpc.py "$out"/*_pb2.pyi
"$PYTHON" -m grpc_tools.protoc \
  -I"$out=hooksidecar/protos" \
  --python_out=. --pyi_out=. \
  "$out"/info.proto "$out"/v1alpha1.proto "$out"/v1alpha2.proto "$out"/v1alpha3.proto
# generated code is not held to the project's lint rules; protobuf ships no type stubs (Message is Any
# to mypy), so strict mypy is told to leave the generated stubs alone
for gen in "$out"/*_pb2.py "$out"/*_pb2.pyi; do
  header='# ruff: noqa'
  case "$gen" in *.pyi) header="$header"$'\n''# mypy: ignore-errors' ;; esac
  printf '%s\n%s\n' "$header" "$(cat "$gen")" > "$gen"
done
tools_version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')"
cat > "$out/__init__.py" <<DOC
"""Python modules generated from diskhooks' own protos in \`\`hooksidecar/protos/\`\` — do not edit.

Regenerate with \`\`scripts/gen_protos.sh\`\`, which runs (grpcio-tools $tools_version)::

    python -m grpc_tools.protoc -Ihooksidecar/_pb=hooksidecar/protos --python_out=. --pyi_out=. \\\\
        hooksidecar/_pb/info.proto hooksidecar/_pb/v1alpha1.proto hooksidecar/_pb/v1alpha2.proto \\\\
        hooksidecar/_pb/v1alpha3.proto

Message modules only. The server does not import them: it serves with its own HTTP/2 layer (``h2grpc``) and
the small codec in \`\`hooksidecar/server.py\`\` (the protobuf runtime and these modules cost ~2.6 MiB
of peak RSS, measured by \`\`python -m benchmarks sidecar\`\`; the sidecar runs under a 64M limit).
The tests use them, with the service descriptors they carry, as virt-launcher's side of the wire,
and check the server's codec against them. The generated code checks at import that the protobuf
runtime is at least the version of the tools that generated it.
"""
DOC
echo "generated: $(ls "$out")"
