"""``python -m webhook`` is ``diskhooks-webhook`` (see ``webhook/cli.py``)."""

from webhook.cli import main

raise SystemExit(main())
