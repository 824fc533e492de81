"""diskhooks benchmarks: ``python -m benchmarks [webhook|sidecar|all]``.

Each benchmark measures its subject and a baseline in the same run on the same machine and prints
medians, p99 and ratios. Nothing here asserts a timing; the tests never measure speed.
"""
