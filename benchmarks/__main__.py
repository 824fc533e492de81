"""``python -m benchmarks [webhook|sidecar|prepare|expand|node|capacity|migrate|soak|qemucheck|all] [options]``
— run the benchmarks (``all``: every one but ``soak``, the load-and-soak run of ``benchmarks/soak.py``).

The sidecar and prepare benchmarks live in ``benchmarks/sidecar_bench.py`` and
``benchmarks/prepare_bench.py`` (imported only when asked for, so a missing one does not stop the
webhook benchmark).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHMARKS = {"webhook": "benchmarks.webhook_bench", "sidecar": "benchmarks.sidecar_bench",
              "prepare": "benchmarks.prepare_bench", "expand": "benchmarks.expand_bench",
              "node": "benchmarks.node_bench", "capacity": "benchmarks.capacity_bench",
              "soak": "benchmarks.soak", "qemucheck": "benchmarks.qemu_check_bench",
              "migrate": "benchmarks.migrate_bench"}
#: run only when named (a soak runs for minutes): not part of ``all``
ONLY_NAMED = ("soak",)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    which = args.pop(0) if args and not args[0].startswith("-") else "all"
    if args and args[0] in ("-h", "--help") and which == "all":
        print(f"usage: python -m benchmarks [{'|'.join(BENCHMARKS)}|all] [options]\n"
              f"options go to the benchmark: python -m benchmarks webhook --help")
        return 0
    if which not in (*BENCHMARKS, "all"):
        print(f"usage: python -m benchmarks [{'|'.join(BENCHMARKS)}|all] [options]\n"
              f"unknown benchmark {which!r}", file=sys.stderr)
        return 2
    if which == "all" and args:
        print("python -m benchmarks: options apply to one benchmark; name it first "
              "(python -m benchmarks webhook --rounds 5)", file=sys.stderr)
        return 2
    names = [n for n in BENCHMARKS if n not in ONLY_NAMED] if which == "all" else [which]
    status = 0
    for name in names:
        try:
            module = importlib.import_module(BENCHMARKS[name])
        except ModuleNotFoundError as exc:
            if exc.name != BENCHMARKS[name]:
                raise
            print(f"== {name}: not available ({BENCHMARKS[name]} is missing)", file=sys.stderr)
            status = status or 1
            continue
        print(f"== {name} benchmark", flush=True)
        status = module.main(args) or status
    return status


if __name__ == "__main__":
    raise SystemExit(main())
