"""Benchmarks: speed as a ratio against a named reference in one run, top-1 tables, ablations.

Run ``python -m zoo.bench <command> --help``; commands: data, moe (more to come).
"""
