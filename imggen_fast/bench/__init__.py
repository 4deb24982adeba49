"""Benchmark cases, defined once: used by benchmarks/ and by the report."""
