"""Benchmarks that ship with the package (``duodiff-fast bench``, ``benchmarks/latency.py``)."""
