"""``python -m hooksidecar.prepare``: the prepare step's command line (see :mod:`hooksidecar.prepare.cli`)."""

from __future__ import annotations

import sys

from hooksidecar.prepare.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
