"""``python -m hooksidecar`` is ``diskhooks-sidecar`` (see :mod:`hooksidecar.cli`)."""

from __future__ import annotations

from hooksidecar.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
