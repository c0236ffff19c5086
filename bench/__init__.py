"""Benchmarks: each module is runnable with ``python -m bench.NAME`` and prints JSON (last line)."""
