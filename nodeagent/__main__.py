"""``python -m nodeagent`` is ``diskhooks-node`` (see :mod:`nodeagent.cli`)."""

from __future__ import annotations

from nodeagent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
