"""Renderers of single benchmarks' README blocks, one module each; ``benchmarks/report.py``
registers them (``block(NAME)(fn)``) beside its own."""
