"""Benchmarks of sd_zoo (run with ``python -m benchmarks.<name>`` from the repository root)."""
